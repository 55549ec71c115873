"""The forward pass equals transformers' (fp32, eager) on the fixture checkpoints.

Reference values come from scripts/make_reference.py. Outputs at padded positions mean nothing in any
implementation and are never compared."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES, REFERENCE_CASES, load_case
from ferrovlm import AutoModelForVision2Seq

_models = {}


def model(case: str):
    if case not in _models:
        _models[case] = AutoModelForVision2Seq.from_pretrained(FIXTURES / case / "checkpoint", dtype="float32")
    return _models[case]


def assert_logits_close(got: np.ndarray, want: np.ndarray, valid: np.ndarray) -> None:
    assert got.shape == want.shape
    scale = np.abs(want[valid]).max()
    diff = np.abs(got[valid] - want[valid]).max()
    assert diff <= 1e-4 * scale, f"max abs diff {diff} > 1e-4 x {scale}"


@pytest.mark.parametrize("case,suffix", REFERENCE_CASES)
def test_logits_and_loss_match_transformers(case, suffix):
    inputs, expected = load_case(case, suffix)
    out = model(case)(**inputs)
    assert_logits_close(out.logits, expected["logits"], inputs["attention_mask"].astype(bool))
    assert out.loss is not None
    assert abs(float(out.loss) - float(expected["loss"])) <= 1e-5 * abs(float(expected["loss"]))


@pytest.mark.parametrize("case,suffix", REFERENCE_CASES)
def test_vision_and_connector_outputs_match(case, suffix):
    inputs, expected = load_case(case, suffix)
    real, vision, connector = model(case)._core.image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    assert real == expected["real_image_index"].tolist()  # all-zero frames are dropped
    for got, want in ((vision, expected["vision_hidden"]), (connector, expected["connector"])):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("case,suffix", REFERENCE_CASES)
def test_logits_to_keep(case, suffix):
    inputs, expected = load_case(case, suffix)
    inputs.pop("labels")
    out = model(case)(**inputs, logits_to_keep=2)
    valid = inputs["attention_mask"][:, -2:].astype(bool)
    assert_logits_close(out.logits, expected["logits_last2"], valid)
    assert out.loss is None


def test_loss_with_logits_to_keep_still_covers_every_label():
    inputs, expected = load_case("idefics3_gqa", "")
    out = model("idefics3_gqa")(**inputs, logits_to_keep=1)
    assert out.logits.shape[1] == 1
    assert abs(float(out.loss) - float(expected["loss"])) <= 1e-5 * float(expected["loss"])


def test_text_only_batch_needs_no_pixels():
    inputs, expected = load_case("idefics3_gqa", "")
    row = 1  # the sample without images
    ids = inputs["input_ids"][row : row + 1]
    mask = inputs["attention_mask"][row : row + 1]
    out = model("idefics3_gqa")(input_ids=ids, attention_mask=mask)
    assert_logits_close(out.logits, expected["logits"][row : row + 1], mask.astype(bool))


def test_accepts_python_lists_and_int32():
    inputs, expected = load_case("smolvlm_tied", "")
    out = model("smolvlm_tied")(
        input_ids=inputs["input_ids"].astype(np.int32).tolist(),
        attention_mask=inputs["attention_mask"].astype(np.int32),
        pixel_values=inputs["pixel_values"],
        pixel_attention_mask=inputs["pixel_attention_mask"],
    )
    assert_logits_close(out.logits, expected["logits"], inputs["attention_mask"].astype(bool))


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    inputs, expected = load_case("smolvlm_tied", "")
    out = model("smolvlm_tied")(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert isinstance(out.logits, torch.Tensor) and isinstance(out.loss, torch.Tensor)
    assert abs(out.loss.item() - float(expected["loss"])) <= 1e-5 * float(expected["loss"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_close(dtype):
    # Reduced precision cannot match fp32 to 1e-4; it must stay close and finite.
    inputs, expected = load_case("idefics3_gqa", "")
    m = AutoModelForVision2Seq.from_pretrained(FIXTURES / "idefics3_gqa" / "checkpoint", dtype=dtype)
    out = m(**inputs)
    valid = inputs["attention_mask"].astype(bool)
    assert np.isfinite(out.logits).all()
    assert np.abs(out.logits[valid] - expected["logits"][valid]).max() <= 0.05 * np.abs(expected["logits"][valid]).max()
    assert abs(float(out.loss) - float(expected["loss"])) <= 0.01 * float(expected["loss"])
