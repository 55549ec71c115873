"""DPOTrainer reproduces TRL's log_history step for step (fixtures from scripts/reference/dpo_trajectory.py:
the same tiny model, the same starting PEFT adapter, which TRL also uses, frozen, as the reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from conftest import FIXTURES
from ferrovlm import AutoProcessor, DPOConfig, DPOTrainer, PeftModel, _core

DPO = FIXTURES / "dpo"
KEYS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "epoch",
    "step",
)


def load_rows(case: str):
    rows = json.loads((DPO / case / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(DPO / case / p).convert("RGB") for p in r["images"]]
    return rows


def make_trainer(tiny_smolvlm, case, tmp_path, **overrides):
    args = json.loads((DPO / case / "args.json").read_text())
    args.update(overrides)
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    model = PeftModel.from_pretrained(base, DPO / case / "adapter", is_trainable=True)
    return DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(tmp_path / "out"), **args),
        train_dataset=load_rows(case),
        processing_class=AutoProcessor.from_pretrained(tiny_smolvlm),
    )


@pytest.mark.parametrize("case", ["sigmoid", "ipo", "hinge", "sigmoid_sft"])
def test_log_history_matches_trl(tiny_smolvlm, tmp_path, case):
    trainer = make_trainer(tiny_smolvlm, case, tmp_path)
    trainer.train()
    want = json.loads((DPO / case / "log_history.json").read_text())
    got = trainer.state.log_history
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for k in KEYS:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=2e-5, err_msg=f"step {i + 1} {k}")
    assert got[-1]["total_flos"] == want[-1]["total_flos"]  # TRL's "ref" copy of the adapter counts
    final = _core.load_safetensors(DPO / case / "adapter_final" / "adapter_model.safetensors")
    mine = trainer.model.named_trainable_parameters()
    for k, v in final.items():
        np.testing.assert_allclose(mine[k], v, rtol=1e-3, atol=1e-5, err_msg=k)


def test_precomputed_reference_gives_the_same_losses(tiny_smolvlm, tmp_path):
    live = make_trainer(tiny_smolvlm, "sigmoid", tmp_path / "a")
    live.train()
    pre = make_trainer(tiny_smolvlm, "sigmoid", tmp_path / "b", precompute_ref_log_probs=True)
    pre.train()
    for g, w in zip(pre.state.log_history[:-1], live.state.log_history[:-1]):
        for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_one_vision_pass_per_image(tiny_smolvlm, tmp_path):
    trainer = make_trainer(tiny_smolvlm, "sigmoid", tmp_path)
    trainer.train()
    # 3 steps over 4 rows, each image in chosen, rejected and the reference pass: every distinct frame
    # (10 tiles per image, some tiles alike) went through the vision tower exactly once.
    batch = trainer._collate(trainer.train_dataset)
    frames = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:])
    distinct = {f.tobytes() for f in frames if np.any(f != 0)}
    assert trainer.session.cached_images == len(distinct) <= 40
