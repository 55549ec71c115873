"""PEFT ``modules_to_save`` for modules that are not Linear layers (norms, the tied token embedding, the vision
embeddings' Conv2d and position embedding, next to the connector): the keys PEFT saves, TRL + PEFT's 3-step SFT
``log_history`` and final adapter within 1e-4, the originals with ``disable_adapter()`` (and in a training
session's reference pass, as DPO runs it), save / load / merge / unload. Fixtures: scripts/reference/modules_to_save.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from conftest import FIXTURES
from ferrovlm import _core

FIX = FIXTURES / "modules_to_save"
DATA = FIXTURES / "full_ft" / "sft" / "full"
CASES = sorted(p.stem for p in FIX.glob("*.json"))
LOG_KEYS = ["loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "learning_rate"]


def _want(case):
    return json.loads((FIX / f"{case}.json").read_text())


def _rows():
    rows = json.loads((DATA / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(DATA / p).convert("RGB") for p in r["images"]]
    return rows


def _peft(path, case):
    """The tiny model with PEFT's adapter as the reference run started it: the LoRA tensors it drew, and the
    modules_to_save copies (equal to the originals)."""
    want = _want(case)
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = ferrovlm.get_peft_model(model, ferrovlm.LoraConfig(**want["lora_config"]))
    lora = {k: np.asarray(v, dtype=np.float32) for k, v in np.load(FIX / f"{case}_lora0.npz").items()}
    _core.load_adapter_state(model._core, lora, False)
    return model, peft


def _batch(processor, rows):
    return processor(text=[processor.apply_chat_template(rows[0]["messages"])], images=[rows[0]["images"]],
                     return_tensors="np")


def _checksum(logits):
    x = np.asarray(logits, dtype=np.float64)
    return float(x.sum()), float(np.abs(x).sum())


def _assert_checksum(got, want):
    s, a = got
    assert abs(a - want["abs_sum"]) <= 1e-5 * want["abs_sum"], (a, want)
    assert abs(s - want["sum"]) <= 1e-6 * want["abs_sum"], (s, want)


@pytest.mark.parametrize("case", CASES)
def test_wrapped_modules_and_saved_keys_equal_peft(tiny_smolvlm, tmp_path, case):
    want = _want(case)
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    cfg = ferrovlm.LoraConfig(**want["lora_config"])
    tied_warning = any("tie_word_embeddings=True" in w for w in want["warnings"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = ferrovlm.get_peft_model(model, cfg)
    assert tied_warning == any("tie_word_embeddings=True" in str(w.message) for w in caught)
    peft.save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: list(v.shape) for k, v in saved.items()} == {k: v["shape"] for k, v in want["adapter_initial"].items()}
    # the copies start as the originals (PEFT's deepcopy)
    for k, v in saved.items():
        if ".lora_" not in k:
            name = k.removeprefix("base_model.model.")
            shared = "model.text_model.embed_tokens.weight"  # a tied head is listed once, as the embedding
            value = model.get_parameter(shared if name == "lm_head.weight" else name).data
            np.testing.assert_array_equal(v, value)
            # a Linear layer's copy is its adapter; other parameters' copies train in the model
            in_model = name in _core.saved_module_params(model._core)
            if name != "lm_head.weight":
                assert model.get_parameter(name).requires_grad == in_model
            assert abs(float(np.linalg.norm(v.astype(np.float64))) - want["adapter_initial"][k]["norm"]) <= 1e-5 * (
                1 + want["adapter_initial"][k]["norm"])
    trainable, total = peft.get_nb_trainable_parameters()
    # PEFT counts the LoRA tensors and the copies as trainable, and the copies next to the originals in all
    assert trainable == sum(v.size for v in saved.values())
    assert total == model.num_parameters() + sum(v.size for v in saved.values())


@pytest.mark.parametrize("case", CASES)
def test_sft_with_modules_to_save_matches_trl_peft(tiny_smolvlm, tmp_path, case):
    want = _want(case)
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    model, peft = _peft(tiny_smolvlm, case)
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    rows = _rows()
    args = json.loads((DATA / "args.json").read_text())
    trainer = ferrovlm.SFTTrainer(model=peft, args=ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args),
                                  train_dataset=rows, processing_class=processor)
    trainer.train()
    got_log, want_log = trainer.state.log_history, want["log_history"]
    assert len(got_log) == len(want_log)
    for i, (g, w) in enumerate(zip(got_log[:-1], want_log[:-1])):
        for k in LOG_KEYS:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-7, err_msg=f"step {i + 1} {k}")
    assert got_log[-1]["total_flos"] == want_log[-1]["total_flos"]  # the copies count, embeddings do not
    # the adapter after training: PEFT's keys, norms within 1e-4, small tensors value by value
    peft.save_pretrained(tmp_path / "final")
    from safetensors.numpy import load_file

    final = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(want["adapter_final"])
    for k, v in final.items():
        w = want["adapter_final"][k]
        assert abs(float(np.linalg.norm(v.astype(np.float64))) - w["norm"]) <= 1e-4 * max(w["norm"], 1e-3), k
        if "values" in w and ".lora_" not in k:
            np.testing.assert_allclose(v.ravel(), w["values"], rtol=1e-4, atol=1e-6, err_msg=k)
    # the originals are untouched: the adapter off gives the base model (PEFT's logits too)
    batch = _batch(processor, rows)
    peft.eval()
    on = peft(**batch).logits
    _assert_checksum(_checksum(on), want["logits_on"])
    with peft.disable_adapter():
        off = peft(**batch).logits
    np.testing.assert_allclose(off, base(**batch).logits, rtol=1e-5, atol=1e-5)  # adapters' kernels round apart
    _assert_checksum(_checksum(off), want["logits_off"])
    # PEFT's originals after training are the untrained base's (its norms are float32 sums: 1e-4)
    for name, norm in want["original_norms"].items():
        assert abs(float(np.linalg.norm(base.get_parameter(name).data.astype(np.float64))) - norm) <= 1e-4 * norm
    # a training session's reference pass (DPO's, the adapter switched off) runs the originals too
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    kw = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
              pixel_attention_mask=batch["pixel_attention_mask"])
    with peft.disable_adapter():
        ref = trainer.session.sequence_logps(batch["input_ids"], labels, **kw)
    np.testing.assert_allclose(ref, _core.sequence_logps(base._core, batch["input_ids"], labels, **kw), rtol=1e-5)
    pol = trainer.session.sequence_logps(batch["input_ids"], labels, **kw)
    assert not np.allclose(pol, ref)
    # PeftModel.from_pretrained on a fresh base gives the trained model; merge_and_unload keeps the copies,
    # unload the originals
    again = ferrovlm.PeftModel.from_pretrained(ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm),
                                               tmp_path / "final")
    np.testing.assert_allclose(again(**batch).logits, on, rtol=1e-5, atol=1e-5)
    with again.disable_adapter():
        np.testing.assert_allclose(again(**batch).logits, off, rtol=1e-5, atol=1e-5)
    merged = again.merge_and_unload()
    np.testing.assert_allclose(merged(**batch).logits, on, rtol=1e-5, atol=1e-5)
    assert _core.saved_module_params(merged._core) == []
    plain = ferrovlm.PeftModel.from_pretrained(ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm),
                                               tmp_path / "final", is_trainable=True).unload()
    assert not any(p.requires_grad for p in plain.parameters())
    np.testing.assert_allclose(plain(**batch).logits, off, rtol=1e-5, atol=1e-5)


def test_modules_to_save_resumes_from_a_checkpoint(tiny_smolvlm, tmp_path):
    """The copies are in the checkpoint's adapter file and come back with train(resume_from_checkpoint=)."""
    case = "norm"
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    rows = _rows()
    args = {**json.loads((DATA / "args.json").read_text()), "save_strategy": "steps", "save_steps": 2}

    def trainer():
        _, peft = _peft(tiny_smolvlm, case)
        return ferrovlm.SFTTrainer(model=peft, args=ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args),
                                   train_dataset=rows, processing_class=processor), peft

    t1, p1 = trainer()
    t1.train()
    t2, p2 = trainer()
    t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert t2.state.log_history[-2]["loss"] == pytest.approx(t1.state.log_history[-2]["loss"], rel=1e-6)
    a, b = p1.named_trainable_parameters(), p2.named_trainable_parameters()
    assert sorted(a) == sorted(b) and "base_model.model.model.text_model.norm.weight" in a
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_whole_decoder_layer_in_modules_to_save(tiny_smolvlm, tmp_path):
    """A module holding Linear layers and norms: the Linears' copies are their adapters, the norms' copies are
    in the model; PEFT saves every parameter of the layer under its name; the adapter off gives the base."""
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    layer = "model.text_model.layers.1"
    peft = ferrovlm.get_peft_model(model, ferrovlm.LoraConfig(r=4, target_modules=["q_proj"],
                                                              modules_to_save=["text_model.layers.1"]))
    state = peft.named_trainable_parameters()
    copies = sorted(k.removeprefix("base_model.model.") for k in state if ".lora_" not in k)
    assert copies == sorted(n for n, _ in base.named_parameters() if n.startswith(layer + "."))
    assert not any(k.startswith(f"base_model.model.{layer}.") and ".lora_" in k for k in state)  # not targeted
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    rows = _rows()
    args = {**json.loads((DATA / "args.json").read_text()), "max_steps": 1}
    ferrovlm.SFTTrainer(model=peft, args=ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args),
                        train_dataset=rows, processing_class=processor).train()
    after = peft.named_trainable_parameters()
    for k in copies:
        assert not np.array_equal(after[f"base_model.model.{k}"], base.get_parameter(k).data), k  # trained
    batch = _batch(processor, rows)
    with peft.disable_adapter():
        np.testing.assert_allclose(peft(**batch).logits, base(**batch).logits, rtol=1e-5, atol=1e-5)
