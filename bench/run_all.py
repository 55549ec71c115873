"""Every benchmark in one run, against the PyTorch stack on the same machine, with the machine's own limits.

Dev only (needs torch, transformers, PEFT and TRL in the same environment as ferrovlm):

    python bench/run_all.py [--repeats 2] [--quick] [--kernels] [--only NAME ...] [--baseline /path/to/old/python]
                            [--out bench/out/summary]

It prints the CPU model and its instruction-set extensions, measures the machine's limits (fp32 and bf16
matmul GFLOP/s with torch, memory copy and read bandwidth), then runs each workload script `--repeats` times
(each run is ferrovlm then the PyTorch stack, so the sides alternate: A B A B ...) and reports the median of
each ratio. Decode is also given as bytes of weights read per second, as a fraction of the copy and of the
read bandwidth. Each training workload (SFT and DPO with LoRA, fp32 and with `bf16=True`; SFT with full
fine-tuning, fp32) is also given as achieved GFLOP/s per side (matmul FLOPs counted by bench/flops.py) and as a
fraction of the machine's matmul peak in its precision (ours with `--kernels`, torch's otherwise), with how far
apart the two sides' logged losses are. Writes `<out>.json` and `<out>.md` (markdown tables with the machine and
the date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the instruction-set extensions that matter for our kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "extensions": [f for f in FLAGS if f in flags]}


def machine_limits(quick: bool) -> dict[str, float]:
    """Matmul peak of torch in fp32 and bf16 (GFLOP/s, all threads), a large copy's bandwidth (GB/s, bytes
    read + written; numpy, one thread) and the read bandwidth of a large float32 sum (GB/s, bytes read: the
    better of numpy's, one thread, and torch's, all threads). Each bandwidth is the best of 5 over 256 MB
    (64 MB with `quick`)."""
    import numpy as np
    import torch

    out: dict[str, float] = {}
    n = 1024 if quick else 2048
    for name, dtype in (("torch_fp32_gflops", torch.float32), ("torch_bf16_gflops", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        reps, t0 = 3 if quick else 6, time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    size = (64 if quick else 256) << 20

    def best_of_5(f) -> float:
        f()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    out["copy_gb_per_s"] = 2 * src.nbytes / best_of_5(lambda: np.copyto(dst, src)) / 1e9
    x = np.ones(size // 4, dtype=np.float32)
    out["read_gb_per_s_numpy"] = x.nbytes / best_of_5(lambda: x.sum()) / 1e9
    xt = torch.from_numpy(x)
    out["read_gb_per_s_torch"] = x.nbytes / best_of_5(lambda: xt.sum()) / 1e9
    out["read_gb_per_s"] = max(out["read_gb_per_s_numpy"], out["read_gb_per_s_torch"])
    return out


def kernel_limits() -> dict[str, float]:
    """Our kernels' GFLOP/s next to torch's: the best over the shapes of `examples/bench_gemm_bf16.rs` (SmolVLM's
    layer shapes) of the AVX512-BF16 packed gemm and of candle's f32 matmul (the gemm crate)."""
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "bench_gemm_bf16"]
    text = subprocess.run(cmd, cwd=HERE.parent, check=True, capture_output=True, text=True).stdout
    packed, f32 = [], []
    for line in text.splitlines():
        cells = [c.split() for c in line.split("|")]
        if len(cells) == 4 and " x " in line and len(cells[1]) == 3:
            try:
                packed.append(float(cells[1][0]))
                f32.append(float(cells[1][2]))
            except ValueError:
                continue  # the header
    if not packed:
        raise RuntimeError(f"no kernel table in the output of {' '.join(cmd)}:\n{text}")
    return {"ours_bf16_gflops": max(packed), "ours_f32_gflops": max(f32)}


def text_weight_params() -> int:
    """Weights read per decoded token by the text model of the benchmark checkpoint (its Linear layers and
    the head; the token embedding is a gather)."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    from tiny_checkpoint import SMOLVLM_256M

    t = SMOLVLM_256M["text_config"]
    h, i, layers, v = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    hd = t.get("head_dim", h // t["num_attention_heads"])
    attn = h * hd * (2 * t["num_attention_heads"] + 2 * t["num_key_value_heads"])
    return layers * (attn + 3 * h * i) + v * h


# A torch bf16 matmul peak below this fraction of its fp32 one means no bf16 units: TRL's bf16 runs are skipped.
SLOW_BF16 = 0.05

WORKLOADS = [
    # name, script, extra args, (ratio key, label, better)
    ("generate fp32", "bench_generate.py", ["--new", "64"],
     [("ttft_ratio", "time to first token, ours / theirs", "lower"), ("decode_speedup", "decode tokens/s", "higher"),
      ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("generate bf16 (ours) vs fp32", "bench_generate.py", ["--new", "64", "--dtype", "bfloat16"],
     [("ttft_ratio", "time to first token, ours / theirs", "lower"), ("decode_speedup", "decode tokens/s", "higher"),
      ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("SFT fp32, LoRA", "bench_sft.py", ["--steps", "4"],
     [("speedup", "samples/s", "higher"), ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("SFT bf16, LoRA", "bench_sft.py", ["--steps", "4", "--bf16"],
     [("speedup", "samples/s", "higher"), ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("SFT fp32, full fine-tuning", "bench_sft.py", ["--steps", "4", "--full"],
     [("speedup", "samples/s", "higher"), ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("DPO fp32, LoRA", "bench_dpo.py", ["--steps", "2"],
     [("speedup", "pairs/s", "higher"), ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("DPO bf16, LoRA", "bench_dpo.py", ["--steps", "2", "--bf16"],
     [("speedup", "pairs/s", "higher"), ("peak_rss_ratio", "peak RSS, ours / theirs", "lower")]),
    ("image processor", "bench_processor.py", ["--images", "16"], [("speedup", "images/s", "higher")]),
    ("SmolLM2-135M Q4_1 GGUF, text decode", "bench_gguf.py", ["--new", "64"],
     [("decode_vs_llama_cpp", "decode tokens/s vs llama.cpp (llama-cpp-python)", "higher"),
      ("rss_vs_llama_cpp", "RSS after load vs llama.cpp", "lower"),
      ("decode_vs_transformers", "decode tokens/s vs transformers (GGUF dequantized to f32)", "higher"),
      ("rss_vs_transformers", "RSS after load vs transformers", "lower")]),
]


def run_workload(script: str, args: list[str], baseline: Optional[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
        if baseline and script in ("bench_generate.py", "bench_sft.py"):
            cmd += ["--baseline", baseline]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def training_summary(runs: list[dict[str, Any]], bf16: bool, limits: dict[str, float]) -> dict[str, Any]:
    """Medians over the runs of a training workload: each side's achieved GFLOP/s and its fraction of the
    matmul peak in the workload's precision (ours when --kernels measured it, torch's otherwise), and how far
    apart the two sides' logged losses are (first and last step; DPO's first loss is ln 2 on both sides, as
    the fresh adapter leaves the policy equal to the reference)."""
    kind = "bf16" if bf16 else "f32"
    key = f"ours_{kind}_gflops" if f"ours_{kind}_gflops" in limits else f"torch_{'bf16' if bf16 else 'fp32'}_gflops"
    med = statistics.median
    out: dict[str, Any] = {
        "flops_per_step": med(r["flops"]["nominal"]["total"] / r["flops"]["steps"] for r in runs),
        "ferrovlm_gflops": med(r["ferrovlm"]["gflops_per_s"] for r in runs),
        "ferrovlm_gflops_executed": med(r["ferrovlm"]["gflops_per_s_executed"] for r in runs),
        "transformers_gflops": med(r["transformers"]["gflops_per_s"] for r in runs),
        "flops_counts_agree": all(r["flops_counts_agree"] for r in runs),
        "peak": key,
        "peak_gflops": limits[key],
    }
    # the fraction of the peak each side reached with the matmuls it ran (flops.py: ferrovlm skips work)
    out["ferrovlm_peak_fraction"] = out["ferrovlm_gflops_executed"] / limits[key]
    out["transformers_peak_fraction"] = out["transformers_gflops"] / limits[key]
    for which, i in (("first", 0), ("last", -1)):
        diffs = [abs(r["ferrovlm"]["losses"][i] - r["transformers"]["losses"][i])
                 for r in runs if r["ferrovlm"]["losses"] and r["transformers"]["losses"]]
        out[f"{which}_loss_abs_diff"] = med(diffs) if diffs else None
    return out


def ratios_of(result: dict[str, Any]) -> dict[str, float]:
    r = result.get("ratios", result)
    return {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown(summary: dict[str, Any]) -> str:
    m, lim = summary["machine"], summary["limits"]
    lines = [
        f"Benchmarks of {summary['date']} on {m['model']} ({m['logical_cpus']} logical CPUs; "
        f"{', '.join(m['extensions'])}), {summary['repeats']} run(s) each, medians.",
        "",
        f"Machine limits: torch fp32 matmul {lim['torch_fp32_gflops']:.0f} GFLOP/s, bf16 "
        f"{lim['torch_bf16_gflops']:.0f} GFLOP/s, copy {lim['copy_gb_per_s']:.1f} GB/s (numpy, one thread), "
        f"read {lim['read_gb_per_s']:.1f} GB/s (float32 sum: numpy, one thread, {lim['read_gb_per_s_numpy']:.1f}; "
        f"torch, all threads, {lim['read_gb_per_s_torch']:.1f})"
        + (f"; ours: f32 {lim['ours_f32_gflops']:.0f} GFLOP/s, bf16 {lim['ours_bf16_gflops']:.0f} GFLOP/s"
           if "ours_bf16_gflops" in lim else "") + ".",
        "",
        "| workload | measure | ferrovlm vs PyTorch stack (or as named) | runs |",
        "|---|---|---|---|",
    ]
    for w in summary["workloads"]:
        if "skipped" in w:
            lines.append(f"| {w['name']} | {w['skipped']} | | |")
            continue
        for key, label, better in w["measures"]:
            vals = w["ratios"].get(key, [])
            if vals:
                lines.append(f"| {w['name']} | {label} ({better} is better) | {statistics.median(vals):.2f}x | "
                             f"{', '.join(f'{v:.2f}' for v in vals)} |")
        if "decode_bandwidth_fraction" in w:
            lines.append(f"| {w['name']} | ferrovlm decode: weights read / copy bandwidth | "
                         f"{w['decode_bandwidth_fraction']:.0%} | |")
            lines.append(f"| {w['name']} | ferrovlm decode: weights read / read bandwidth | "
                         f"{w['decode_read_bandwidth_fraction']:.0%} | |")
    training = [w for w in summary["workloads"] if "training" in w]
    if training:
        lines += [
            "",
            "Training: matmul FLOPs of a step counted from the config and the batches (bench/flops.py: as TRL "
            "computes it, no recomputation); GFLOP/s = FLOPs / wall time of the training loop. ferrovlm's work "
            "rate credits it with TRL's count; its own rate and its share of the peak count the matmuls it runs "
            "(each distinct image through the frozen vision tower once per run, a DPO pair's shared prefix once). "
            "Peak: the matmul peak in the workload's precision.",
            "",
            "| workload | GFLOP a step | ferrovlm GFLOP/s: work (own) | PyTorch stack GFLOP/s | share of peak: "
            "ferrovlm / PyTorch | peak | loss \\|ours - theirs\\|: first / last |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in training:
            g = w["training"]
            peak = f"{g['peak'].replace('_gflops', '').replace('_', ' ')} {g['peak_gflops']:.0f}"
            loss = " / ".join("n/a" if g[k] is None else f"{g[k]:.1e}" for k in ("first_loss_abs_diff",
                                                                                 "last_loss_abs_diff"))
            lines.append(
                f"| {w['name']} | {g['flops_per_step'] / 1e9:.0f} | {g['ferrovlm_gflops']:.1f} "
                f"({g['ferrovlm_gflops_executed']:.1f}) | {g['transformers_gflops']:.1f} | "
                f"{g['ferrovlm_peak_fraction']:.0%} / {g['transformers_peak_fraction']:.0%} | {peak} | {loss} |"
            )
        if not all(w["training"]["flops_counts_agree"] for w in training):
            lines.append("\nNote: ferrovlm's and TRL's collators gave different FLOP counts; TRL's were used.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each workload (sides alternate)")
    ap.add_argument("--quick", action="store_true", help="smaller limit measurements")
    ap.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    ap.add_argument("--baseline", help="the python/ folder of an earlier ferrovlm build, run too where supported")
    ap.add_argument("--kernels", action="store_true",
                    help="also our matmul kernels' GFLOP/s (builds and runs examples/bench_gemm_bf16.rs with cargo)")
    ap.add_argument("--out", default=str(HERE / "out" / "summary"))
    args = ap.parse_args()

    summary: dict[str, Any] = {"date": datetime.date.today().isoformat(), "repeats": args.repeats,
                               "machine": cpu_info()}
    m = summary["machine"]
    print(f"CPU: {m['model']} ({m['logical_cpus']} logical CPUs); extensions: {' '.join(m['extensions'])}", flush=True)
    summary["limits"] = machine_limits(args.quick)
    if args.kernels:
        summary["limits"].update(kernel_limits())
    print("limits:", json.dumps({k: round(v, 1) for k, v in summary["limits"].items()}), flush=True)
    weight_bytes_bf16 = 2 * text_weight_params()
    summary["workloads"] = []
    out = Path(args.out)
    lim = summary["limits"]
    for name, script, extra, measures in WORKLOADS:
        if args.only and name not in args.only:
            continue
        if "--bf16" in extra and lim["torch_bf16_gflops"] < SLOW_BF16 * lim["torch_fp32_gflops"]:
            # No bf16 units (AVX2-only CPUs): torch's bf16 matmul, which TRL's CPU autocast runs, is a
            # scalar fallback here; one TRL step would take this long.
            # GFLOP a step as bench/flops.py counts them for these workloads (bench/results/2026-12-04-*)
            minutes = {"bench_sft.py": 1045, "bench_dpo.py": 3985}[script] / lim["torch_bf16_gflops"] / 60
            reason = (f"skipped: torch's bf16 matmul runs at {lim['torch_bf16_gflops']:.1f} GFLOP/s on this CPU "
                      f"({lim['torch_fp32_gflops']:.0f} in fp32), so one TRL bf16=True step would take about "
                      f"{minutes:.0f} minutes")
            print(f"{name}: {reason}", flush=True)
            summary["workloads"].append({"name": name, "script": script, "args": extra, "measures": measures,
                                         "ratios": {}, "runs": [], "skipped": reason})
            continue
        runs = []
        for i in range(args.repeats):
            print(f"{name}: run {i + 1}/{args.repeats}", flush=True)
            runs.append(run_workload(script, extra, args.baseline))
        ratios: dict[str, list[float]] = {}
        for r in runs:
            for k, v in ratios_of(r).items():
                ratios.setdefault(k, []).append(v)
        w: dict[str, Any] = {"name": name, "script": script, "args": extra, "measures": measures,
                             "ratios": ratios, "runs": runs}
        if script == "bench_generate.py":
            # ferrovlm keeps the checkpoint's bf16 weights in bf16 in both modes: 2 bytes a weight per token.
            tps = statistics.median(r["ferrovlm"]["decode_tokens_per_s"] for r in runs)
            w["decode_bandwidth_fraction"] = tps * weight_bytes_bf16 / (summary["limits"]["copy_gb_per_s"] * 1e9 / 2)
            w["decode_read_bandwidth_fraction"] = tps * weight_bytes_bf16 / (summary["limits"]["read_gb_per_s"] * 1e9)
        if script in ("bench_sft.py", "bench_dpo.py"):
            w["training"] = training_summary(runs, "--bf16" in extra, summary["limits"])
        summary["workloads"].append(w)
        write(summary, out)  # after each workload, so a long run that is stopped keeps what it measured
    print(write(summary, out))


def write(summary: dict[str, Any], out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary)
    out.with_suffix(".md").write_text(md)
    return md


if __name__ == "__main__":
    main()
