"""LoRA / DoRA / modules_to_save gradients equal PEFT's (fixtures from scripts/reference/lora_grads.py):
the same saved adapter, the same batch, the loss's gradient for every adapter tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ferrovlm
from conftest import FIXTURES
from ferrovlm import _core
from ferrovlm.peft import PeftModel

LORA = FIXTURES / "lora"
CASES = json.loads((LORA / "cases.json").read_text())["cases"]


def _model(tiny_smolvlm):
    return ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_peft(tiny_smolvlm, case):
    base = _model(tiny_smolvlm)
    model = PeftModel.from_pretrained(base, LORA / case / "adapter", is_trainable=True)
    inputs = dict(np.load(LORA / case / "inputs.npz"))
    expected = dict(np.load(LORA / case / "expected.npz"))
    session = _core.TrainSession(model._core)
    labels = inputs["labels"]
    n = int((labels[:, 1:] != -100).sum())
    stats = session.forward_backward(
        inputs["input_ids"], labels, attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"].astype(np.float32),
        pixel_attention_mask=inputs["pixel_attention_mask"].astype(bool), loss_scale=1.0 / n,
    )
    assert stats["num_label_tokens"] == n
    np.testing.assert_allclose(stats["loss_sum"] / n, float(expected["loss"]), rtol=1e-5)
    grads = session.grads()
    want = {k[len("grad/"):]: v for k, v in expected.items() if k.startswith("grad/")}
    assert sorted(grads) == sorted(want)
    for k, g in want.items():
        scale = np.abs(g).max()
        err = np.abs(grads[k] - g).max() / max(scale, 1e-12)
        assert err <= 1e-4, f"{k}: max rel err {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_print_trainable_parameters_matches_peft(tiny_smolvlm, case, capsys):
    model = PeftModel.from_pretrained(_model(tiny_smolvlm), LORA / case / "adapter", is_trainable=True)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == CASES[case]["print_trainable_parameters"]
