"""Full-parameter training (no PEFT): every parameter's gradient equals transformers', freezing works the
transformers way, and SFTTrainer / DPOTrainer without peft_config reproduce TRL's full fine-tuning runs
(fixtures from scripts/reference/full_ft.py, see tests/fixtures/full_ft/README.md)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from conftest import FIXTURES
from ferrovlm import _core

FULL = FIXTURES / "full_ft"
CASES = json.loads((FULL / "grads" / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def tiny_untied(tiny_smolvlm, tmp_path_factory):
    """tiny_smolvlm with its own random lm_head (the `untied` recipe of cases.json)."""
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    dst = tmp_path_factory.mktemp("untied") / "smolvlm-untied"
    shutil.copytree(tiny_smolvlm, dst)
    write_checkpoint(dst, {**TINY_SMOLVLM, "tie_word_embeddings": False}, seed=3)
    return dst


def _load(path):
    return ferrovlm.AutoModelForImageTextToText.from_pretrained(path)


def _freeze(model, how):
    """Runs the freezing code the reference ran (cases.json's `freeze`), on our model."""
    if how is not None:
        exec(how, {"model": model})


def _rel_err(got, want, floor=1e-12):
    """Max abs difference relative to the reference's largest value (or to `floor`, for gradients that
    are zero in exact arithmetic, like the keys' bias: softmax ignores a shift shared by all keys)."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), floor))


def _forward_backward(session, inputs, n, checkpointing=False):
    return session.forward_backward(
        inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"].astype(np.float32),
        pixel_attention_mask=inputs["pixel_attention_mask"].astype(bool), loss_scale=1.0 / n,
        gradient_checkpointing=checkpointing,
    )


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_gradient_matches_transformers(tiny_smolvlm, tiny_untied, case, checkpointing):
    spec = CASES[case]
    model = _load(tiny_untied if case == "untied" else tiny_smolvlm)
    _freeze(model, spec.get("freeze"))
    assert model.trainable_parameter_names() == spec["trainable"]
    inputs = dict(np.load(FULL / "grads" / case / "inputs.npz"))
    expected = dict(np.load(FULL / "grads" / case / "expected.npz"))
    session = _core.TrainSession(model._core, trainable=model.trainable_parameter_names())
    n = spec["num_label_tokens"]
    stats = _forward_backward(session, inputs, n, checkpointing)
    assert stats["num_label_tokens"] == n
    np.testing.assert_allclose(stats["loss_sum"] / n, spec["loss"], rtol=1e-5)
    grads = session.grads()
    assert sorted(grads) == sorted(spec["trainable"])
    floor = 1e-3 * max(float(v) for k, v in expected.items() if k.startswith("grad_norm/"))
    for name in spec["trainable"]:
        g = grads[name]
        if f"grad/{name}" in expected:
            want = expected[f"grad/{name}"]
            assert g.shape == want.shape, name
            err = _rel_err(g, want, floor)
            assert err <= 1e-4, f"{name}: max rel err {err:.2e}"
        else:  # a large embedding / head: sampled rows, column sums and the norm
            rows = expected[f"grad_row_ids/{name}"]
            assert _rel_err(g[rows], expected[f"grad_rows/{name}"]) <= 1e-4, name
            np.testing.assert_allclose(g.astype(np.float64).sum(0), expected[f"grad_colsum/{name}"],
                                       rtol=1e-4, atol=1e-6 * np.abs(g).max())
        np.testing.assert_allclose(np.linalg.norm(g.astype(np.float64)), float(expected[f"grad_norm/{name}"]),
                                   rtol=1e-4, atol=1e-4 * floor)


@pytest.mark.parametrize("freeze", [
    None,
    "model.model.vision_model.embeddings.requires_grad_(False)\n"
    "model.model.vision_model.encoder.layers[0].requires_grad_(False)",
    "model.model.vision_model.encoder.requires_grad_(False)",
])
def test_vision_checkpointing_gives_the_same_gradients(tiny_smolvlm, freeze):
    """gradient_checkpointing recomputes the training vision tower's layers in the backward (and stops
    below the lowest one that trains): the gradients are bit for bit those of the kept graph."""
    inputs = dict(np.load(FULL / "grads" / "all" / "inputs.npz"))
    n = int((inputs["labels"][:, 1:] != -100).sum())
    grads, losses = [], []
    for checkpointing in (False, True):
        model = _load(tiny_smolvlm)
        _freeze(model, freeze)
        session = _core.TrainSession(model._core, trainable=model.trainable_parameter_names())
        losses.append(_forward_backward(session, inputs, n, checkpointing)["loss_sum"])
        grads.append(session.grads())
    assert losses[0] == losses[1]
    assert sorted(grads[0]) == sorted(grads[1])
    for name, g in grads[0].items():
        np.testing.assert_array_equal(grads[1][name], g, err_msg=name)


def test_freezing_the_transformers_way(tiny_smolvlm):
    model = _load(tiny_smolvlm)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "model.vision_model.embeddings.patch_embedding.weight"
    assert "lm_head.weight" not in names  # tied: listed once, as the embedding
    assert all(p.requires_grad for p in model.parameters())
    p = model.get_parameter("model.vision_model.embeddings.patch_embedding.weight")
    assert p.shape == (32, 3, 8, 8) and p.numel() == 32 * 3 * 64
    model.model.vision_model.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if n.startswith("model.vision_model.")}
    layer = model.model.text_model.layers[1]
    assert [n for n, _ in layer.named_parameters()][:1] == ["self_attn.q_proj.weight"]
    assert len(model.model.text_model.layers) == 2
    model.requires_grad_(False)
    assert model.trainable_parameter_names() == []
    with pytest.raises(AttributeError, match="no submodule 'nope'"):
        model.model.nope  # noqa: B018


def test_peft_freezes_the_base(tiny_smolvlm):
    model = _load(tiny_smolvlm)
    peft = ferrovlm.get_peft_model(model, ferrovlm.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not any(p.requires_grad for p in model.parameters())
    assert peft.get_nb_trainable_parameters()[0] > 0


def test_bitsandbytes_weights_cannot_be_trained(tiny_smolvlm):
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(
        tiny_smolvlm, quantization_config=ferrovlm.BitsAndBytesConfig(load_in_4bit=True)
    )
    with pytest.raises(ferrovlm.FerroVLMError, match="quantized"):
        _core.TrainSession(model._core, trainable=["model.text_model.layers.0.self_attn.q_proj.weight"])


# --------------------------------------------------------------------------------------------------
# trainers
# --------------------------------------------------------------------------------------------------

KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step")


def _rows(d):
    rows = json.loads((d / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(d / p).convert("RGB") for p in r["images"]]
    return rows


def _check_final(model, d, rtol=1e-4):
    want = json.loads((d / "final_norms.json").read_text())
    got = {n: float(np.linalg.norm(p.data.astype(np.float64))) for n, p in model.named_parameters()}
    assert sorted(got) == sorted(want)
    # The keys' bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys):
    # AdamW turns the rounding noise of either implementation into lr-sized steps, so it is not compared.
    noise = {n for n in want if n.endswith("self_attn.k_proj.bias")}
    bad = {n: (got[n], w) for n, w in want.items() if n not in noise and abs(got[n] - w) > rtol * max(abs(w), 1e-6)}
    assert not bad, f"final norms differ: {list(bad.items())[:5]}"
    sample = dict(np.load(d / "final_sample.npz"))
    for k, v in sample.items():
        if k in got and k not in noise:
            assert _rel_err(model.get_parameter(k).data, v) <= 1e-4, k


def _assert_history(got, want, keys):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for k in keys:
            if k in w:
                np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-7, err_msg=f"step {i + 1} {k}")
    assert got[-1]["total_flos"] == want[-1]["total_flos"]


@pytest.mark.parametrize("case", ["full", "full_freeze_vision", "full_accum"])
def test_sft_full_finetuning_matches_trl(tiny_smolvlm, tmp_path, case):
    d = FULL / "sft" / case
    if not d.exists():
        pytest.skip(f"no fixture {case}")
    args = json.loads((d / "args.json").read_text())
    model = _load(tiny_smolvlm)
    if "freeze_vision" in case:
        _freeze(model, "for p in model.model.vision_model.parameters(): p.requires_grad = False")
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    cfg = ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args)
    trainer = ferrovlm.SFTTrainer(model=model, args=cfg, train_dataset=_rows(d), processing_class=processor)
    trainer.train()
    want = json.loads((d / "log_history.json").read_text())
    _assert_history(trainer.state.log_history, want, KEYS)
    _check_final(model, d)
    # save_model writes the whole model in the hub layout; it reloads with the trained values
    trainer.save_model(str(tmp_path / "saved"))
    again = _load(tmp_path / "saved")
    for n in ("model.connector.modality_projection.proj.weight", "model.text_model.norm.weight"):
        np.testing.assert_array_equal(again.get_parameter(n).data, model.get_parameter(n).data)


def test_dpo_full_finetuning_matches_trl(tiny_smolvlm, tmp_path):
    d = FULL / "dpo" / "full"
    args = json.loads((d / "args.json").read_text())
    model = _load(tiny_smolvlm)
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    cfg = ferrovlm.DPOConfig(output_dir=str(tmp_path / "out"), **args)
    trainer = ferrovlm.DPOTrainer(model=model, args=cfg, train_dataset=_rows(d), processing_class=processor)
    trainer.train()
    want = json.loads((d / "log_history.json").read_text())
    keys = sorted({k for w in want[:-1] for k in w} - {"train_runtime", "train_samples_per_second",
                                                        "train_steps_per_second"})
    _assert_history(trainer.state.log_history, want, keys)
    _check_final(model, d)


def test_full_finetuning_resumes_from_a_checkpoint(tiny_smolvlm, tmp_path):
    d = FULL / "sft" / "full"
    args = {**json.loads((d / "args.json").read_text()), "save_strategy": "steps", "save_steps": 2}
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)

    def trainer():
        model = _load(tiny_smolvlm)
        cfg = ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args)
        return model, ferrovlm.SFTTrainer(model=model, args=cfg, train_dataset=_rows(d), processing_class=processor)

    straight, t = trainer()
    t.train()
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()
    resumed, t2 = trainer()
    t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    np.testing.assert_allclose(t2.state.log_history[-2]["loss"], t.state.log_history[-2]["loss"], rtol=1e-6)
    for n, p in straight.named_parameters():
        np.testing.assert_allclose(resumed.get_parameter(n).data, p.data, rtol=1e-6, atol=1e-7, err_msg=n)


def test_load_parameters_names_a_missing_or_misshapen_parameter(tiny_smolvlm):
    """TrainSession.load_parameters (resuming full-parameter training) is all or nothing, and its errors name
    the parameter (and the shapes)."""
    model = _load(tiny_smolvlm)
    names = ["model.text_model.norm.weight", "model.connector.modality_projection.proj.weight"]
    session = _core.TrainSession(model._core, trainable=names)
    before = {n: model.get_parameter(n).data for n in names}
    good = {n: np.full_like(v, 0.5) for n, v in before.items()}
    with pytest.raises(ferrovlm.InputError, match=r"lacks the trained parameter 'model\.text_model\.norm\.weight'"):
        session.load_parameters({names[1]: good[names[1]]})
    bad = {**good, names[0]: np.zeros((7,), np.float32)}
    shapes = r"'model\.text_model\.norm\.weight' has shape \[7\], expected \[32\]"
    with pytest.raises(ferrovlm.InputError, match=shapes):
        session.load_parameters(bad)
    for n in names:  # nothing changed
        np.testing.assert_array_equal(model.get_parameter(n).data, before[n])
    session.load_parameters({**good, "model.unrelated.weight": np.zeros(3, np.float32)})
    for n in names:
        assert (model.get_parameter(n).data == 0.5).all()


def test_resume_without_model_safetensors_names_the_checkpoint(tiny_smolvlm, tmp_path):
    d = FULL / "sft" / "full"
    args = {**json.loads((d / "args.json").read_text()), "save_strategy": "steps", "save_steps": 2}
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    cfg = ferrovlm.SFTConfig(output_dir=str(tmp_path / "out"), **args)
    ferrovlm.SFTTrainer(model=_load(tiny_smolvlm), args=cfg, train_dataset=_rows(d), processing_class=processor).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    (ckpt / "model.safetensors").unlink()
    t = ferrovlm.SFTTrainer(model=_load(tiny_smolvlm), args=cfg, train_dataset=_rows(d), processing_class=processor)
    msg = re.escape(str(ckpt)) + r": no model\.safetensors to resume full-parameter training"
    with pytest.raises(FileNotFoundError, match=msg):
        t.train(resume_from_checkpoint=str(ckpt))
