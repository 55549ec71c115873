"""ferrovlm's DataCollatorForVisionPreference against TRL 1.16's (the first collated batch of each DPOTrainer run,
fixtures from scripts/reference/dpo_trajectory.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ferrovlm import AutoProcessor
from ferrovlm.dpo_collator import DataCollatorForVisionPreference

FIX = Path(__file__).parent / "fixtures" / "dpo"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "batch0.npz").exists()) if FIX.exists() else []


@pytest.fixture(scope="module")
def processor(tiny_smolvlm):
    return AutoProcessor.from_pretrained(tiny_smolvlm)


def load_rows(case: str):
    from PIL import Image

    rows = json.loads((FIX / case / "rows.json").read_text())
    out = []
    for r in rows:
        r = copy.deepcopy(r)
        imgs = []
        for name in r["images"]:
            img = Image.open(FIX / case / name)
            img.load()
            imgs.append(img)
        r["images"] = imgs
        out.append(r)
    return out


def batch0_rows(case: str):
    steps = json.loads((FIX / case / "steps.json").read_text())
    order = steps["micro_batches"][0]["rows"]
    rows = load_rows(case)
    return [rows[i] for i in order]


def assert_same(got, want):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.shape == v.shape, (k, g.shape, v.shape)
        if v.dtype.kind == "f":
            np.testing.assert_allclose(g, v, rtol=0, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(g.astype(v.dtype), v, err_msg=k)
        if k != "pixel_attention_mask":  # transformers' PIL path gives int64 0/1, ferrovlm's processor bool
            assert g.dtype == v.dtype, (k, g.dtype, v.dtype)


@pytest.mark.skipif(not CASES, reason="no tests/fixtures/dpo/<case>/batch0.npz")
@pytest.mark.parametrize("case", CASES)
def test_batch0_matches_trl(case, processor):
    args = json.loads((FIX / case / "args.json").read_text())
    steps = json.loads((FIX / case / "steps.json").read_text())
    coll = DataCollatorForVisionPreference(processor, max_length=steps["max_length"])
    rows = batch0_rows(case)
    before = json.dumps(json.loads((FIX / case / "rows.json").read_text()))
    got = coll(rows)
    want = dict(np.load(FIX / case / "batch0.npz"))
    assert_same(got, want)
    # the rows are not modified
    assert json.dumps(json.loads((FIX / case / "rows.json").read_text())) == before
    assert args["per_device_train_batch_size"] * 2 == want["input_ids"].shape[0]


@pytest.mark.skipif(not CASES, reason="no tests/fixtures/dpo/<case>/batch0.npz")
def test_layout(processor):
    """Rows 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected; same prompt tokens; completion right after it."""
    case = CASES[0]
    coll = DataCollatorForVisionPreference(processor)
    rows = batch0_rows(case)
    got = coll(rows)
    ids, attn, cm = got["input_ids"], got["attention_mask"], got["completion_mask"]
    B = len(rows)
    assert ids.shape[0] == 2 * B
    assert got["pixel_values"].shape[0] == 2 * B
    np.testing.assert_array_equal(got["pixel_values"][:B], got["pixel_values"][B:])
    tok = processor.tokenizer
    for i in range(2 * B):
        n = int(attn[i].sum())
        assert attn[i, :n].all() and not attn[i, n:].any()  # flushed left: real tokens first
        start = int(np.argmax(cm[i]))
        assert cm[i, start:n].all() and not cm[i, :start].any() and not cm[i, n:].any()
        text = tok.decode(ids[i, start:n].tolist())
        msg = rows[i % B]["chosen" if i < B else "rejected"][0]["content"][0]["text"]
        assert text == " " + msg + "<end_of_utterance>\n", text
        if i < B:
            p = int(np.argmax(cm[i + B]))
            assert p == start
            np.testing.assert_array_equal(ids[i, :start], ids[i + B, :start])


def test_plain_text_rows(processor):
    """Plain-string prompt/chosen/rejected rows are used verbatim (no chat template, no EOS added)."""
    from PIL import Image

    img = Image.new("RGB", (32, 32), (10, 200, 30))
    rows = [{"images": [img], "prompt": "<image>What colour?", "chosen": " Green.", "rejected": " Red, very red."},
            {"image": img, "prompt": "<image>Say hi.", "chosen": " Hi", "rejected": " No"}]
    got = DataCollatorForVisionPreference(processor, max_length=None)(rows)
    assert sorted(got) == ["attention_mask", "completion_mask", "input_ids", "pixel_attention_mask", "pixel_values"]
    tok = processor.tokenizer
    for i, want in enumerate([" Green.", " Hi", " Red, very red.", " No"]):
        m = got["completion_mask"][i].astype(bool)
        assert tok.decode(got["input_ids"][i][m].tolist()) == want
