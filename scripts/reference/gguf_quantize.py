"""GGML quantizers reference: gguf-py's `gguf.quants.quantize` and ggml's C reference quantizers.

Writes tests/fixtures/gguf_quant/quant.npz with
- `x512` [8, 512], `x576` [8, 576] (float32): weight-like random rows (N(0, 0.05)) with an all-zero
  block, a block with one huge outlier, a block of tiny values (f16-subnormal scales), an all-positive,
  an all-negative and a constant block; `special` [32] (float32): NaNs, infinities, signed zeros,
  bf16 / f16 rounding ties, overflow and subnormals, for the float types only;
- `q_T_512`, `q_T_576` (uint8): gguf.quants.quantize(x, T) for T in F32 F16 BF16 Q8_0 Q4_0 Q4_1
  Q5_0 Q5_1, and `q_T_special` for the float types;
- `ggml_T_512` (uint8) for T in Q4_K Q5_K Q6_K: the bytes of ggml's quantize_row_T_ref (what
  llama-quantize writes without an importance matrix), from scripts/reference/ggml_quantize_ref.c
  compiled against a llama.cpp checkout given with --ggml DIR (the `ggml` directory: include/, src/),
  e.g. the one vendored in the llama-cpp-python sdist. The C quantizers of the 32-value types are
  checked here against gguf-py (same bytes) but not stored.

    /work/refenv/bin/python scripts/reference/gguf_quantize.py --ggml /path/to/llama.cpp/ggml
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "tests" / "fixtures" / "gguf_quant"

PY_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]


def matrix(rng: np.random.Generator, cols: int) -> np.ndarray:
    x = (rng.standard_normal((8, cols)) * 0.05).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block (and K-quant super-block)
    x[1, 300] = 40.0  # one huge outlier
    x[2, 32:64] *= 1e-4  # tiny values: scales below f16's normal range
    x[3, 64:96] = np.abs(x[3, 64:96]) + 0.01  # all positive
    x[4, 96:128] = -np.abs(x[4, 96:128]) - 0.01  # all negative
    x[5, 128:160] = 0.25  # constant
    x[6, 256:512] = np.abs(x[6, 256:512])  # an all-positive super-block
    return x


def special() -> np.ndarray:
    bits = [
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFF812345,  # NaNs (quiet, signalling, payloads)
        0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # +-inf, +-0
        0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000,  # bf16 ties (to even: down, up), above, negative
        0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80400000,  # f32 max (bf16 overflow), tie below it, subnormals
        0x477FF000, 0x477FEFFF, 0x38000000, 0x33000000, 0x33000001, 0x387FC000,  # f16: 65520, below, 2^-15, 2^-25 ties
        0x3F800000, 0x3F801000, 0x3F803000, 0xC0490FDB, 0x3DCCCCCD, 0x4CBEBC20, 0x2EDBE6FF, 0x3A83126F, 0x00800000,
    ]
    return np.array(bits, dtype=np.uint32).view(np.float32)


def ggml_c(exe: Path, ty: str, x: np.ndarray) -> np.ndarray:
    r = subprocess.run([str(exe), ty, str(x.size)], input=x.astype("<f4").tobytes(), capture_output=True, check=True)
    return np.frombuffer(r.stdout, dtype=np.uint8)


def build(ggml: Path, tmp: Path) -> Path:
    exe = tmp / "ggml_quantize_ref"
    subprocess.run(
        ["gcc", "-O2", "-std=gnu11", "-w", "-I", str(ggml / "include"), "-I", str(ggml / "src"),
         str(ggml / "src" / "ggml-quants.c"), str(HERE / "ggml_quantize_ref.c"), "-lm", "-o", str(exe)],
        check=True,
    )
    return exe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ggml", type=Path, help="llama.cpp's ggml directory (for the K-quant bytes)")
    args = ap.parse_args()
    rng = np.random.default_rng(14)
    x512, x576, sp = matrix(rng, 512), matrix(rng, 576), special()
    out: dict[str, np.ndarray] = {"x512": x512, "x576": x576, "special": sp}
    for name in PY_TYPES:
        qt = GGMLQuantizationType[name]
        for tag, x in [("512", x512), ("576", x576)]:
            if name != "F32":  # F32 is the input itself
                out[f"q_{name}_{tag}"] = np.ascontiguousarray(quants.quantize(x, qt)).view(np.uint8).reshape(-1)
        if name in ("F32", "F16", "BF16"):
            with np.errstate(all="ignore"):
                out[f"q_{name}_special"] = np.ascontiguousarray(quants.quantize(sp, qt)).view(np.uint8).reshape(-1)
    if args.ggml is not None:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build(args.ggml, Path(tmp))
            for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
                for tag, x in [("512", x512), ("576", x576)]:
                    c = ggml_c(exe, name.lower(), x)
                    assert np.array_equal(c, out[f"q_{name}_{tag}"]), f"ggml C and gguf-py differ on {name} {tag}"
            for name in K_TYPES:
                out[f"ggml_{name}_512"] = ggml_c(exe, name[:2].lower() + "_K", x512)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "quant.npz", **out)
    print(f"wrote {OUT / 'quant.npz'}: {sorted(out)}")


if __name__ == "__main__":
    main()
