"""GGUF block quantizer references for ferrovlm's exporter (dev only).

    python scripts/reference/gguf_quant.py  # needs numpy + gguf (gguf-py); llama-cpp-python optional

For two small deterministic float32 matrices (6 x 512: every type's block fits; 6 x 576: SmolLM2's row
length, which 256-value K-quant blocks do not divide) it records the bytes `gguf.quants.quantize(arr, qtype)`
(gguf-py, llama.cpp's own Python package) writes for F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K, and gguf-py's `gguf.quants.dequantize` of those bytes. When llama-cpp-python is installed, the same
rows also go through ggml's C quantizers from its shared library `libggml-base` (`quantize_row_<t>_ref`, and
`ggml_quantize_chunk`, which is what `llama-quantize` calls; with no importance matrix it uses the `_ref`
functions) and ggml's `dequantize_row_<t>`; K-types are not attempted on the 576 rows in C (ggml asserts).

Writes tests/fixtures/gguf_quant/:
  input.npz      a512 f32 [6, 512], a576 f32 [6, 576]
  quant.npz      gguf.<TYPE>.<a512|a576>.bytes  u8  (gguf-py quantize, rows concatenated)
                 gguf.<TYPE>.<a512|a576>.dequant f32 (gguf-py dequantize of those bytes)
                 ggml.<TYPE>.<a512|a576>.bytes  u8  (only when different from gguf-py's bytes)
                 ggml.<TYPE>.<a512|a576>.dequant f32 (only when different from gguf-py's dequant of them)
  expected.json  per type and matrix: outcome (ok / the exception gguf-py raised), block size, type size,
                 byte count, whether ggml's `_ref` bytes, `ggml_quantize_chunk` bytes and ggml's dequant
                 equal gguf-py's; the input rows' descriptions; versions.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
ROWS = [
    "standard normal",
    "0.02 * normal + 0.05 (small, positive mean: the min/offset types matter)",
    "normal with three outliers (+40, -25, +13) in the first block",
    "all zeros (d = 0)",
    "constant -0.3",
    "uniform integers -8..7 times 0.125 (exact ties at half steps)",
]


def make_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1402)
    out = {}
    for n in (512, 576):
        a = np.empty((6, n), dtype=np.float32)
        a[0] = rng.standard_normal(n)
        a[1] = 0.02 * rng.standard_normal(n) + 0.05
        a[2] = rng.standard_normal(n)
        a[2, [3, 17, 30]] = [40.0, -25.0, 13.0]
        a[3] = 0.0
        a[4] = -0.3
        a[5] = rng.integers(-8, 8, n) * 0.125
        out[f"a{n}"] = a
    return out


def ggml_lib():
    """libggml-base from llama-cpp-python, or None."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - optional
        return None, None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base*.dylib"))
    if not cands:
        return None, llama_cpp.__version__
    lib = ctypes.CDLL(str(cands[0]))
    return lib, llama_cpp.__version__


def ggml_quantize(lib, tname: str, a: np.ndarray, ggml_type: int) -> dict:
    """ggml's C quantizers for array a [rows, n]: `_ref` row function and ggml_quantize_chunk."""
    import gguf

    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]]
    rows, n = a.shape
    nbytes = rows * (n // bs) * ts
    x = np.ascontiguousarray(a, dtype=np.float32)
    xp = x.ctypes.data_as(ctypes.c_void_p)
    out = {}
    low = tname.lower().replace("_k", "_K")  # ggml spells quantize_row_q4_K_ref
    if tname not in ("F16", "BF16"):
        ref = np.zeros(nbytes, dtype=np.uint8)
        fn = getattr(lib, f"quantize_row_{low}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        fn(xp, ref.ctypes.data_as(ctypes.c_void_p), rows * n)
        out["ref"] = ref
        deq = np.zeros(rows * n, dtype=np.float32)
        dfn = getattr(lib, f"dequantize_row_{low}")
        dfn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        dfn.restype = None
        dfn(ref.ctypes.data_as(ctypes.c_void_p), deq.ctypes.data_as(ctypes.c_void_p), rows * n)
        out["dequant"] = deq.reshape(rows, n)
    chunk = np.zeros(nbytes, dtype=np.uint8)
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init(ggml_type)
    f = lib.ggml_quantize_chunk
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    f.restype = ctypes.c_size_t
    written = f(ggml_type, xp, chunk.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None)
    assert written == nbytes, (tname, written, nbytes)
    out["chunk"] = chunk
    return out


def main(fixtures: Path = FIX) -> None:
    import gguf
    from gguf import GGMLQuantizationType as QT

    out_dir = fixtures / "gguf_quant"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    lib, lcpp_version = ggml_lib()
    npz: dict = {}
    results: dict = {}
    for tname in TYPES:
        qt = QT[tname]
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        results[tname] = {"ggml_type_id": int(qt), "block_size": bs, "type_size": ts}
        for key, a in inputs.items():
            r: dict = {}
            try:
                q = gguf.quants.quantize(a, qt)
                qb = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
                deq = gguf.quants.dequantize(qb.reshape(a.shape[0], -1), qt).astype(np.float32)
                npz[f"gguf.{tname}.{key}.bytes"] = qb
                npz[f"gguf.{tname}.{key}.dequant"] = deq
                r.update(outcome="ok", n_bytes=int(qb.size), max_abs_err=float(np.abs(deq - a).max()))
            except Exception as e:  # noqa: BLE001 - recorded as the reference outcome
                qb = None
                r.update(outcome=f"{type(e).__name__}: {e}".rstrip(": "))
            fits = a.shape[1] % bs == 0
            if lib is not None and fits:
                g = ggml_quantize(lib, tname, a, int(qt))
                chunk = g["chunk"]
                r["ggml_quantize_chunk_equals_gguf_py"] = None if qb is None else bool(np.array_equal(chunk, qb))
                if "ref" in g:
                    r["ggml_ref_equals_ggml_quantize_chunk"] = bool(np.array_equal(g["ref"], chunk))
                if qb is None or not np.array_equal(chunk, qb):
                    npz[f"ggml.{tname}.{key}.bytes"] = chunk
                if "dequant" in g:
                    py_deq = gguf.quants.dequantize(g["ref"].reshape(a.shape[0], -1), qt).astype(np.float32)
                    r["ggml_dequant_equals_gguf_py_dequant"] = bool(np.array_equal(g["dequant"], py_deq))
                    same_as_stored = f"gguf.{tname}.{key}.dequant" in npz and np.array_equal(
                        g["dequant"], npz[f"gguf.{tname}.{key}.dequant"])
                    if not same_as_stored:
                        npz[f"ggml.{tname}.{key}.dequant"] = g["dequant"]
                    r["ggml_max_abs_err"] = float(np.abs(g["dequant"] - a).max())
            elif lib is not None:
                r["ggml"] = f"not attempted: row length {a.shape[1]} is not a multiple of the block size {bs}"
            results[tname][key] = r
    meta = {
        "gguf_py": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy": np.__version__,
        "llama_cpp_python": lcpp_version,
        "ggml_library": "libggml-base from llama-cpp-python" if lib is not None else None,
        "rows": ROWS,
        "note": "gguf-py quantizes F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 only; for the K-types it has "
                "dequantize but its quantize raises NotImplementedError, so ggml's C quantizer is the reference",
        "layout": "bytes are the rows' blocks concatenated (row-major, each row n/block_size blocks); "
                  "dequant has the input's shape",
    }
    np.savez(out_dir / "input.npz", **inputs)
    np.savez_compressed(out_dir / "quant.npz", **npz)
    (out_dir / "expected.json").write_text(json.dumps({"meta": meta, "types": results}, indent=1) + "\n")
    for p in out_dir.iterdir():
        p.chmod(0o644)
    print("gguf_quant:", {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())})
    for tname, r in results.items():
        print(f"  {tname}: a512 {r['a512'].get('outcome')[:40]}, a576 {r['a576'].get('outcome')[:60]}, "
              f"ggml==py {r['a512'].get('ggml_quantize_chunk_equals_gguf_py')}")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIX)
