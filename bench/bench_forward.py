"""Forward pass of a SmolVLM-256M-shaped checkpoint (random weights, bf16 on disk like the real one):
ferrovlm vs transformers, fp32 on CPU, in the same run.

One 512x512 image (splitting off: one 64-token frame) plus 64 text tokens. Each side runs in its own
subprocess so that peak RSS is its own. Needs torch and transformers in the same environment (dev only):

    python bench/bench_forward.py [--repeats 3] [--out bench/out/forward.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork+exec.
    return _status_mb("VmHWM")


def make_inputs(cfg: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    t = 64  # (512/16/4)^2 image tokens
    image_tok = cfg["image_token_id"]
    text = rng.integers(3, 40000, size=64).tolist()
    ids = text[:8] + [49189, 49152] + [image_tok] * t + [49189] + text[8:]
    input_ids = np.array([ids], dtype=np.int64)
    pixel_values = rng.uniform(-1, 1, size=(1, 1, 3, 512, 512)).astype(np.float32)
    return input_ids, np.ones_like(input_ids), pixel_values, np.ones((1, 1, 512, 512), dtype=bool)


def run_side(side: str, ckpt: str, repeats: int) -> dict:
    """Runs inside the subprocess for one side."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    input_ids, attn, pixels, pmask = make_inputs(cfg)
    base = rss_mb()
    t0 = time.perf_counter()
    if side == "ferrovlm":
        from ferrovlm import AutoModelForVision2Seq

        model = AutoModelForVision2Seq.from_pretrained(ckpt, torch_dtype="float32")

        def fwd():
            return model(
                input_ids=input_ids, attention_mask=attn, pixel_values=pixels, pixel_attention_mask=pmask
            ).logits

    else:
        import torch
        from transformers import AutoModelForImageTextToText

        torch.set_grad_enabled(False)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
        ti = {
            "input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn),
            "pixel_values": torch.from_numpy(pixels), "pixel_attention_mask": torch.from_numpy(pmask),
        }

        def fwd():
            return model(**ti).logits.numpy()

    load_s = time.perf_counter() - t0
    rss_after_load = rss_mb() - base
    times = []
    logits = None
    for _ in range(repeats + 1):  # first call is a warm-up
        t0 = time.perf_counter()
        logits = fwd()
        times.append(time.perf_counter() - t0)
    return {
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load,
        "forward_s": sorted(times[1:])[len(times[1:]) // 2],
        "first_forward_s": times[0],
        "peak_rss_mb": peak_rss_mb(),
        "last_logits": [float(x) for x in logits[0, -1, :8]],
    }


def noise_rows(answer_key: str, n: int = 8) -> list:
    """`n` rows of a 512x512 noise image with a question (`prompt`) and an answer message list under
    `answer_key` ("completion" for SFT, "chosen" for DPO): the data of the training benchmarks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8))
        question = {"type": "text", "text": f"Question {i}: what is in this picture?"}
        answer = {"type": "text", "text": f"Answer {i}: random coloured noise, nothing else."}
        rows.append({
            "images": [img],
            "prompt": [{"role": "user", "content": [{"type": "image"}, question]}],
            answer_key: [{"role": "assistant", "content": [answer]}],
        })
    return rows


BASELINE_HELP = ("the python/ folder of an earlier ferrovlm build (its package with _core.abi3.so): it runs too, "
                 "as 'ferrovlm-baseline', for before/after ratios in the same run")


def run_both_sides(script: str, extra_args: list, baseline: Optional[str] = None) -> dict:
    """Writes the random 256M-shaped checkpoint, then runs `script --side S --ckpt DIR extra_args` for
    ferrovlm and for transformers, each in its own process; returns their JSON results by side. With
    `baseline`, ferrovlm also runs from that folder (PYTHONPATH) as side 'ferrovlm-baseline'."""
    from tiny_checkpoint import SMOLVLM_256M, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_checkpoint(Path(tmp) / "smolvlm-256m-random", SMOLVLM_256M, seed=0, dtype="bfloat16"))
        sides = [("ferrovlm", "ferrovlm", None)]
        if baseline:
            sides.append(("ferrovlm-baseline", "ferrovlm", baseline))
        sides.append(("transformers", "transformers", None))
        results = {}
        for name, side, path in sides:
            env = os.environ.copy()
            if path:
                env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
            cmd = [sys.executable, script, "--side", side, "--ckpt", ckpt, *extra_args]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:  # the side's own traceback, for the caller's error
                sys.stderr.write(out.stderr[-4000:])
                raise RuntimeError(f"side {name} failed ({out.returncode}): {' '.join(cmd)}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "out" / "forward.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.ckpt, args.repeats)))
        return
    results = run_both_sides(__file__, ["--repeats", str(args.repeats)])
    f, t = results["ferrovlm"], results["transformers"]
    results["ratios"] = {
        "forward_speedup": t["forward_s"] / f["forward_s"],
        "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
        "load_speedup": t["load_s"] / f["load_s"],
        "rss_after_load_ratio": f["rss_after_load_mb"] / t["rss_after_load_mb"],
        "max_abs_diff_last_logits_sample": max(abs(a - b) for a, b in zip(f["last_logits"], t["last_logits"])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'':14}{'ferrovlm':>12}{'transformers':>14}{'ratio':>10}")
    for key, label, better in [
        ("forward_s", "forward s", "speedup"), ("peak_rss_mb", "peak RSS MB", "ours/theirs"),
        ("load_s", "load s", "speedup"), ("rss_after_load_mb", "RSS load MB", "ours/theirs"),
    ]:
        ratio = t[key] / f[key] if better == "speedup" else f[key] / t[key]
        print(f"{label:14}{f[key]:12.3f}{t[key]:14.3f}{ratio:9.2f}x  ({better})")
    print(f"last-position logits agree to {results['ratios']['max_abs_diff_last_logits_sample']:.2e}")


if __name__ == "__main__":
    main()
