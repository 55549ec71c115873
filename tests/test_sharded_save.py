"""`save_pretrained(max_shard_size=...)` shards as transformers does: the same files, the same
`model.safetensors.index.json` text (metadata.total_size / total_parameters, weight_map) and the same tensors
per shard as transformers writes for the same checkpoint (tests/fixtures/sharded_save, from
scripts/reference/sharded_save.py); the sharded folder loads back to identical logits."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from safetensors import safe_open

import ferrovlm
from conftest import FIXTURES, load_case
from ferrovlm import AutoModelForVision2Seq

EXPECTED = json.loads((FIXTURES / "sharded_save" / "expected.json").read_text())
_models: dict = {}


def _model(fixture: str, dtype: str):
    if (fixture, dtype) not in _models:
        _models[fixture, dtype] = AutoModelForVision2Seq.from_pretrained(
            FIXTURES / fixture / "checkpoint", dtype=dtype
        )
    return _models[fixture, dtype]


def _written(d):
    files = sorted(p.name for p in d.iterdir() if p.suffix in (".safetensors", ".json"))
    weights = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(d / name, "np") as f:
                weights[name] = {"metadata": f.metadata(), "tensors": sorted(f.keys())}
    index = d / "model.safetensors.index.json"
    return files, (index.read_text() if index.exists() else None), weights


@pytest.mark.parametrize("case", sorted(EXPECTED["cases"]))
def test_shards_and_index_equal_transformers(case, tmp_path):
    want = EXPECTED["cases"][case]
    model = _model(want["fixture"], want["dtype"])
    model.save_pretrained(tmp_path, max_shard_size=want["max_shard_size"])
    files, index, weights = _written(tmp_path)
    assert files == want["files"]
    assert index == want["index"]  # byte for byte
    assert weights == want["weights"]


@pytest.mark.parametrize("fixture,dtype", [("idefics3_gqa", "float32"), ("smolvlm_tied", "bfloat16")])
def test_sharded_folder_loads_back_to_identical_logits(fixture, dtype, tmp_path):
    model = _model(fixture, dtype)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert not (tmp_path / "model.safetensors").exists()
    again = AutoModelForVision2Seq.from_pretrained(tmp_path, dtype=dtype)
    inputs, _ = load_case(fixture, "")
    np.testing.assert_array_equal(again(**inputs).logits, model(**inputs).logits)
    for name, _ in model.named_parameters():
        np.testing.assert_array_equal(again.get_parameter(name).data, model.get_parameter(name).data)


def test_resaving_replaces_the_other_layout(tmp_path):
    model = _model("idefics3_gqa", "float32")
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # 7 shards
    model.save_pretrained(tmp_path, max_shard_size=150000)  # 5 shards: the old 7 go, as transformers does
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}-of-00005.safetensors"
                                                                      for i in range(1, 6)]
    model.save_pretrained(tmp_path)  # one file now: no shard or index is left to shadow it
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    model.save_pretrained(tmp_path, max_shard_size="0.2MB")
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "model.safetensors.index.json").exists()


def test_default_and_bad_sizes(tmp_path):
    default = inspect.signature(ferrovlm.Idefics3ForConditionalGeneration.save_pretrained).parameters
    assert default["max_shard_size"].default == EXPECTED["default_max_shard_size"]
    model = _model("idefics3_gqa", "float32")
    for bad in ("5GiB", "5", "lots"):
        with pytest.raises(ferrovlm.InputError, match="max_shard_size"):
            model.save_pretrained(tmp_path, max_shard_size=bad)
    assert not list(tmp_path.iterdir())
