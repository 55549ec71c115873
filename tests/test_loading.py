"""from_pretrained: model classes, config access, dtypes, hub ids in the local cache."""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest

import ferrovlm
from conftest import IDEFICS3, SMOLVLM, load_case
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoModelForVision2Seq,
    Idefics3ForConditionalGeneration,
    ModelNotCachedError,
    SmolVLMForConditionalGeneration,
)


def test_auto_classes_pick_the_model_type():
    assert type(AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint")) is Idefics3ForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(SMOLVLM / "checkpoint")) is SmolVLMForConditionalGeneration


def test_config_attribute_access_and_defaults():
    m = Idefics3ForConditionalGeneration.from_pretrained(str(IDEFICS3 / "checkpoint"), torch_dtype="float32")
    c = m.config
    assert c.model_type == "idefics3"
    assert c._name_or_path == str(IDEFICS3 / "checkpoint")
    assert c.use_cache is True
    assert c.text_config.num_key_value_heads == 2
    assert c.text_config.rope_theta == 100000.0  # read from text_config.rope_parameters
    assert c.vision_config.patch_size == 16
    assert c.image_token_id == 290
    assert c.to_dict()["text_config"]["hidden_size"] == 48
    # the smolvlm fixture uses the older hub layout: text_config.rope_theta, no head_dim
    s = SmolVLMForConditionalGeneration.from_pretrained(SMOLVLM / "checkpoint").config
    assert s.text_config.head_dim == s.text_config.hidden_size // s.text_config.num_attention_heads
    assert s.tie_word_embeddings is True


def test_dtype_auto_takes_the_checkpoint_dtype():
    assert AutoModelForVision2Seq.from_pretrained(SMOLVLM / "checkpoint")._core.dtype == "bfloat16"  # stored bf16
    assert AutoModelForVision2Seq.from_pretrained(SMOLVLM / "checkpoint", dtype="auto")._core.dtype == "bfloat16"
    assert AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint")._core.dtype == "float32"
    m = AutoModelForVision2Seq.from_pretrained(SMOLVLM / "checkpoint", torch_dtype="float32")
    assert m._core.dtype == "float32"
    with pytest.raises(ValueError, match="int8"):
        AutoModelForVision2Seq.from_pretrained(SMOLVLM / "checkpoint", dtype="int8")


def test_torch_dtype_objects_are_accepted():
    torch = pytest.importorskip("torch")
    m = AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint", torch_dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16


def test_tutorial_keyword_arguments():
    m = AutoModelForVision2Seq.from_pretrained(
        IDEFICS3 / "checkpoint", torch_dtype="float32", device_map="auto", _attn_implementation="eager"
    )
    assert m.config._attn_implementation == "eager"
    assert m.eval() is m and m.train() is m and m.training
    assert m.num_parameters() > 0
    with pytest.raises(ValueError, match="attn_implementation"):
        AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint", attn_implementation="magic")


def _numel_in_safetensors(folder) -> int:
    """Counts elements from the safetensors headers (8-byte length, then JSON)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    return total


@pytest.mark.parametrize("folder", [IDEFICS3 / "checkpoint", SMOLVLM / "checkpoint"])
def test_num_parameters_counts_every_stored_tensor(folder):
    # tied lm_head is not stored and is counted once, like transformers' num_parameters()
    assert AutoModelForVision2Seq.from_pretrained(folder).num_parameters() == _numel_in_safetensors(folder)


def _make_cache(root, repo_id: str, src, commit: str = "0123abcd") -> None:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)


def test_hub_id_resolves_from_the_cache(tmp_path, monkeypatch):
    _make_cache(tmp_path / "hub", "HuggingFaceTB/SmolVLM-tiny", IDEFICS3 / "checkpoint")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = AutoModelForVision2Seq.from_pretrained("HuggingFaceTB/SmolVLM-tiny", torch_dtype="float32")
    assert m.config._name_or_path == "HuggingFaceTB/SmolVLM-tiny"
    inputs, expected = load_case("idefics3_gqa", "")
    assert abs(float(m(**inputs).loss) - float(expected["loss"])) < 1e-5 * float(expected["loss"])
    # cache_dir= points straight at a hub cache, like transformers
    m2 = AutoModelForVision2Seq.from_pretrained("HuggingFaceTB/SmolVLM-tiny", cache_dir=tmp_path / "hub")
    assert m2.config.model_type == "idefics3"


def test_offline_uncached_id_names_id_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotCachedError) as err:
        AutoModelForVision2Seq.from_pretrained("someone/not-here")
    msg = str(err.value)
    assert "someone/not-here" in msg and str(tmp_path / "models--someone--not-here") in msg and "HF_HUB_OFFLINE" in msg


def test_online_uncached_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, token=None):
        calls.append((repo_id, revision, cache_dir))
        dst = tmp_path / "downloaded"
        if not dst.exists():
            shutil.copytree(SMOLVLM / "checkpoint", dst)
        return str(dst)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    m = AutoModelForVision2Seq.from_pretrained("org/remote-model", revision="v1")
    assert calls == [("org/remote-model", "v1", None)]
    assert m.config.model_type == "smolvlm"
    with pytest.raises(ModelNotCachedError, match="local_files_only"):
        AutoModelForVision2Seq.from_pretrained("org/remote-model", local_files_only=True)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def snapshot_download(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotCachedError, match="org/x.*no network"):
        AutoModelForVision2Seq.from_pretrained("org/x")


def test_model_output_is_dict_and_attributes():
    inputs, _ = load_case("smolvlm_tied", "")
    out = AutoModelForVision2Seq.from_pretrained(SMOLVLM / "checkpoint", dtype="float32")(**inputs)
    assert out["logits"] is out.logits and "loss" in out
    assert isinstance(out.logits, np.ndarray) and out.logits.dtype == np.float32


def test_package_exports_typed_errors():
    assert issubclass(ferrovlm.ModelNotCachedError, ferrovlm.CheckpointError)
    for cls in (ferrovlm.ConfigError, ferrovlm.CheckpointError, ferrovlm.InputError):
        assert issubclass(cls, ferrovlm.FerroVLMError)
    assert json.loads(ferrovlm._core.load_config_json(str(IDEFICS3 / "checkpoint")))["scale_factor"] == 2


def test_core_stub_lists_every_native_name():
    """python/ferrovlm/_core.pyi is hand-written: it must name everything the native module exports."""
    import ast
    from pathlib import Path

    stub = ast.parse((Path(ferrovlm.__file__).parent / "_core.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    declared |= {t.id for n in stub.body if isinstance(n, ast.AnnAssign) for t in [n.target] if isinstance(t, ast.Name)}
    exported = {n for n in dir(ferrovlm._core) if not n.startswith("_")}
    assert exported <= declared | {"__version__"}, sorted(exported - declared)
