"""Reference token ids from transformers' generate on the tiny fixture checkpoints (dev only).

    python scripts/reference/generation.py  # in an environment with torch, transformers

Writes tests/fixtures/generation/expected.npz (+ cases.json describing each case). Inputs come from
tests/fixtures/idefics3_gqa/inputs*.npz (written by scripts/make_reference.py), so run that first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


def rows(inputs: dict, idx: list, left_pad: bool) -> dict:
    """Sub-batch of fixture rows, re-padded to their own longest length (left or right)."""
    ids, am = inputs["input_ids"][idx], inputs["attention_mask"][idx]
    lens = am.sum(1)
    width = int(lens.max())
    out_ids = np.full((len(idx), width), 2, np.int64)
    out_am = np.zeros((len(idx), width), np.int64)
    for r in range(len(idx)):
        real = ids[r][am[r].astype(bool)]
        if left_pad:
            out_ids[r, width - len(real):] = real
            out_am[r, width - len(real):] = 1
        else:
            out_ids[r, : len(real)] = real
            out_am[r, : len(real)] = 1
    px = inputs["pixel_values"][idx]
    pm = inputs["pixel_attention_mask"][idx]
    n_frames = int(max(((px[r].reshape(px.shape[1], -1) != 0).any(1)).sum() for r in range(len(idx))))
    keep = max(n_frames, 1)
    return {
        "input_ids": out_ids,
        "attention_mask": out_am,
        "pixel_values": px[:, :keep],
        "pixel_attention_mask": pm[:, :keep],
    }


def main(fixtures: Path = FIX) -> None:
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(
        fixtures / "idefics3_gqa" / "checkpoint", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    inputs = dict(np.load(fixtures / "idefics3_gqa" / "inputs.npz"))
    cases = {
        "one_image": ([0], {}),
        "two_images": ([2], {}),
        "text_only": ([1], {}),
        "batch_left_padded": ([0, 1, 2], {}),
        "beam3": ([0], {"num_beams": 3}),
        "beam3_batch": ([0, 2], {"num_beams": 3, "length_penalty": 0.7}),
        "repetition_penalty": ([2], {"repetition_penalty": 1.3}),
    }
    out, meta = {}, {}
    for name, (idx, extra) in cases.items():
        batch = rows(inputs, idx, left_pad=True)
        if name == "text_only":
            batch.pop("pixel_values")
            batch.pop("pixel_attention_mask")
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=299, **extra)
        with torch.no_grad():
            ids = model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, **kwargs)
        for k, v in batch.items():
            out[f"{name}.{k}"] = v
        out[f"{name}.output"] = ids.numpy()
        meta[name] = kwargs
    # an EOS that actually occurs: the 4th greedy token of "one_image" ends generation there
    first = out["one_image.output"][0, out["one_image.input_ids"].shape[1]:]
    eos = int(first[3])
    batch = rows(inputs, [0, 2], left_pad=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=[299, eos])
    with torch.no_grad():
        ids = model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, **kwargs)
    for k, v in batch.items():
        out[f"eos_stop.{k}"] = v
    out["eos_stop.output"] = ids.numpy()
    meta["eos_stop"] = kwargs
    for extra_name, extra in (
        ("beam3_eos", {"num_beams": 3}),
        ("beam3_eos_early", {"num_beams": 3, "early_stopping": True}),
    ):
        kw = dict(kwargs, **extra)
        with torch.no_grad():
            ids = model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, **kw)
        for k, v in batch.items():
            out[f"{extra_name}.{k}"] = v
        out[f"{extra_name}.output"] = ids.numpy()
        meta[extra_name] = kw
    dst = fixtures / "generation"
    dst.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst / "expected.npz", **out)
    (dst / "cases.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for name in meta:
        o = out[f"{name}.output"]
        print(name, o.shape, o[:, out[f'{name}.input_ids'].shape[1]:].tolist())


if __name__ == "__main__":
    main()
