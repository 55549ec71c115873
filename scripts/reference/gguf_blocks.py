"""GGML block decoding reference: random blocks of every GGUF type and gguf-py's dequantization.

Writes tests/fixtures/gguf_blocks/blocks.npz with, per type T, `raw_T` (uint8, the stored bytes of
4 blocks' worth of one row; K-quants 2 super-blocks) and `deq_T` (float32, gguf.quants.dequantize of
them). The f16 scale fields get finite values of realistic size; every other byte is random, so
every quant value, scale and min code occurs. Run with the reference venv (needs numpy + gguf):

    python scripts/reference/gguf_blocks.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf_blocks"

# Byte offsets of the f16 scale fields in each block (the rest of the block is random).
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def main() -> None:
    rng = np.random.default_rng(7)
    out: dict[str, np.ndarray] = {}
    for name in ["F32", "F16", "BF16", *F16_FIELDS]:
        qt = GGMLQuantizationType[name]
        bs, ts = GGML_QUANT_SIZES[qt]
        n = 512 if bs == 256 else 128
        nblocks = n // bs
        if name == "F32":
            raw = rng.standard_normal(n).astype(np.float32).view(np.uint8)
        elif name == "F16":
            raw = rng.standard_normal(n).astype(np.float16).view(np.uint8)
        elif name == "BF16":
            raw = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            blocks = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
            for off in F16_FIELDS[name]:
                scale = (rng.uniform(0.001, 0.05, size=nblocks) * rng.choice([-1, 1], size=nblocks)).astype(np.float16)
                blocks[:, off : off + 2] = scale.view(np.uint8).reshape(nblocks, 2)
            raw = blocks.reshape(-1)
        deq = quants.dequantize(raw, qt).astype(np.float32).reshape(-1)
        assert deq.shape == (n,) and np.isfinite(deq).all(), name
        out[f"raw_{name}"] = raw
        out[f"deq_{name}"] = deq
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "blocks.npz", **out)
    print(f"wrote {OUT / 'blocks.npz'}: {len(out) // 2} types")


if __name__ == "__main__":
    main()
