"""SFTTrainer reproduces TRL's log_history step for step (fixtures from scripts/reference/sft_trajectory.py:
the same tiny model, the same starting PEFT adapter, the same rows and SFTConfig)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from conftest import FIXTURES
from ferrovlm import AutoProcessor, PeftModel, SFTConfig, SFTTrainer, _core

SFT = FIXTURES / "sft"
KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step")


def load_rows(case: str):
    rows = json.loads((SFT / case / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(SFT / case / p).convert("RGB") for p in r["images"]]
    return rows


def make_trainer(tiny_smolvlm, case: str, tmp_path, **overrides):
    args = json.loads((SFT / case / "args.json").read_text())
    args.update(overrides)
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    model = PeftModel.from_pretrained(base, SFT / case / "adapter", is_trainable=True)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), **args)
    return SFTTrainer(model=model, args=cfg, train_dataset=load_rows(case), processing_class=processor)


def assert_history_matches(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for k in KEYS:
            assert k in g, f"entry {i} lacks {k}: {g}"
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-7, err_msg=f"step {i + 1} {k}")
    np.testing.assert_allclose(got[-1]["train_loss"], want[-1]["train_loss"], rtol=1e-4)
    # 6 x input_ids elements x parameters without the embeddings (adapters included), as transformers counts
    assert got[-1]["total_flos"] == want[-1]["total_flos"]


@pytest.mark.parametrize("case", ["messages", "prompt_completion", "messages_accum"])
def test_log_history_matches_trl(tiny_smolvlm, tmp_path, case):
    trainer = make_trainer(tiny_smolvlm, case, tmp_path)
    out = trainer.train()
    want = json.loads((SFT / case / "log_history.json").read_text())
    assert_history_matches(trainer.state.log_history, want)
    assert out.global_step == 3
    final = _core.load_safetensors(SFT / case / "adapter_final" / "adapter_model.safetensors")
    got = trainer.model.named_trainable_parameters()
    for k, v in final.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-3, atol=1e-5, err_msg=k)


def test_first_batch_matches_trl_collator(tiny_smolvlm, tmp_path):
    for case in ("messages", "prompt_completion"):
        trainer = make_trainer(tiny_smolvlm, case, tmp_path)
        want = dict(np.load(SFT / case / "batch0.npz"))
        order = [2, 3, 0, 1]  # torch.randperm(4, manual_seed(42)), the first epoch's order
        batch = trainer._collate(trainer._rows(trainer.train_dataset, order))
        for k in ("input_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(batch[k], want[k], err_msg=f"{case} {k}")
        np.testing.assert_allclose(batch["pixel_values"], want["pixel_values"], atol=1e-6)


def test_data_order_is_torch_randperm():
    from ferrovlm.trainer import torch_randperm

    assert [torch_randperm(4, 42 + e) for e in range(3)] == [[2, 3, 0, 1], [0, 1, 3, 2], [0, 3, 1, 2]]
