"""Runs shared by tests/test_reference_ops.py (the CPU with the reference compositions forced, what a GPU
runs) and tests/test_cuda.py (the GPU): a forward, greedy generation, a 3-step LoRA SFT and a 3-step DPO
run on the fixture models, each returning what the tests compare between two ways of computing."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

import ferrovlm
from conftest import FIXTURES, load_case
from ferrovlm import (
    AutoModelForVision2Seq,
    AutoProcessor,
    DPOConfig,
    DPOTrainer,
    PeftModel,
    SFTConfig,
    SFTTrainer,
    _core,
)

SFT_KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
DPO_KEYS = ("loss", "grad_norm", "logits/chosen", "logits/rejected", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy")
GENERATION = dict(np.load(FIXTURES / "generation" / "expected.npz"))


@contextmanager
def reference_ops(on: bool):
    """Forces the reference compositions (or the fused CPU kernels) for the body, then restores the switch."""
    before = _core.reference_ops()
    _core.set_reference_ops(on)
    try:
        yield
    finally:
        _core.set_reference_ops(before)


def forward(case: str, suffix: str, device: str = "cpu") -> dict:
    """Logits [B, L, V] and loss of the fixture case on `device`, float32."""
    inputs, _ = load_case(case, suffix)
    model = AutoModelForVision2Seq.from_pretrained(FIXTURES / case / "checkpoint", dtype="float32", device_map=device)
    out = model(**inputs)
    return {"logits": np.asarray(out.logits), "loss": float(out.loss), "valid": inputs["attention_mask"].astype(bool)}


def generate(device: str = "cpu") -> np.ndarray:
    """Greedy ids for the "one_image" generation case (8 new tokens) on `device`."""
    model = AutoModelForVision2Seq.from_pretrained(FIXTURES / "idefics3_gqa" / "checkpoint", dtype="float32",
                                                   device_map=device)
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    inputs = {k: GENERATION[f"one_image.{k}"] for k in keys if f"one_image.{k}" in GENERATION}
    return np.asarray(model.generate(**inputs, max_new_tokens=8, do_sample=False))


def _rows(folder: Path) -> list:
    rows = json.loads((folder / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(folder / p).convert("RGB") for p in r["images"]]
    return rows


def _args(folder: Path) -> dict:
    args = json.loads((folder / "args.json").read_text())
    args.pop("use_cpu", None)  # TRL's fixture runs set it; the device comes from the model here
    return args


def _train(trainer_cls, config_cls, kind: str, case: str, tiny_smolvlm: Path, out: Path, device: str):
    """(log_history, final adapter tensors) of TRL's 3-step `kind` fixture run `case` (LoRA) on `device`."""
    folder = FIXTURES / kind / case
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map=device)
    model = PeftModel.from_pretrained(base, folder / "adapter", is_trainable=True)
    trainer = trainer_cls(model=model, args=config_cls(output_dir=str(out), **_args(folder)),
                          train_dataset=_rows(folder), processing_class=AutoProcessor.from_pretrained(tiny_smolvlm))
    trainer.train()
    return trainer.state.log_history, trainer.model.named_trainable_parameters()


def sft(tiny_smolvlm: Path, out: Path, device: str = "cpu", case: str = "messages") -> tuple[list, dict]:
    """TRL's 3-step LoRA SFT fixture run on `device`."""
    return _train(SFTTrainer, SFTConfig, "sft", case, tiny_smolvlm, out, device)


def dpo(tiny_smolvlm: Path, out: Path, device: str = "cpu", case: str = "sigmoid") -> tuple[list, dict]:
    """TRL's 3-step DPO fixture run (LoRA, the starting adapter frozen as the reference) on `device`."""
    return _train(DPOTrainer, DPOConfig, "dpo", case, tiny_smolvlm, out, device)


def max_rel_diff(got: float, want: float, floor: float = 1e-6) -> float:
    return abs(got - want) / max(abs(want), floor)


def compare_runs(got: tuple[list, dict], want: tuple[list, dict], keys: tuple, what: str, rtol: float = 1e-4,
                 atol: float = 1e-6) -> float:
    """Asserts two runs' per-step logs (`keys`) and final adapters agree within rtol (+ atol); returns the
    largest relative difference of the logged values, for the record."""
    (hist_g, params_g), (hist_w, params_w) = got, want
    assert len(hist_g) == len(hist_w) == 4, f"{what}: {len(hist_g)} / {len(hist_w)} log entries, expected 3 steps"
    worst = 0.0
    for i, (g, w) in enumerate(zip(hist_g[:-1], hist_w[:-1])):
        for k in keys:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"{what} step {i + 1} {k}")
            worst = max(worst, max_rel_diff(float(g[k]), float(w[k])))
    assert params_g.keys() == params_w.keys()
    for k, v in params_w.items():
        np.testing.assert_allclose(params_g[k], v, rtol=rtol, atol=atol, err_msg=f"{what} final {k}")
    return worst


def logits_diff(got: dict, want: dict) -> float:
    """Largest |logit difference| at real positions, relative to the largest |logit|."""
    valid = want["valid"]
    return float(np.abs(got["logits"][valid] - want["logits"][valid]).max() / np.abs(want["logits"][valid]).max())
