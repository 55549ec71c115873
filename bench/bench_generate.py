"""generate() on a SmolVLM-256M-shaped checkpoint (random weights, bf16 on disk like the real one):
time to first token, decode tokens/s for 64 new tokens and peak RSS, ferrovlm vs transformers fp32,
in the same run (each side in its own subprocess). One 512x512 image (splitting off: 64 image
tokens) and a short question. Dev only (needs torch + transformers):

    python bench/bench_generate.py [--new 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))
from bench_forward import BASELINE_HELP, make_inputs, peak_rss_mb, run_both_sides  # noqa: E402


def run_side(side: str, ckpt: str, new: int, dtype: str = "float32", hf_dtype: str = "float32") -> dict:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    ids, am, px, pm = make_inputs(cfg)
    ids, am = ids[:, :80], am[:, :80]  # 8 text + 73 image-block tokens: a short question
    times = []

    class Clock:
        def put(self, value):
            times.append(time.perf_counter())

        def end(self):
            pass

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
    if side == "ferrovlm":
        from ferrovlm import AutoModelForVision2Seq

        model = AutoModelForVision2Seq.from_pretrained(ckpt, torch_dtype=dtype)
        inputs = dict(input_ids=ids, attention_mask=am, pixel_values=px, pixel_attention_mask=pm)
    else:
        import torch
        from transformers import AutoModelForImageTextToText
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # noqa: F811
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        torch.set_grad_enabled(False)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, hf_dtype)).eval()
        inputs = {
            k: torch.from_numpy(v)
            for k, v in dict(input_ids=ids, attention_mask=am, pixel_values=px, pixel_attention_mask=pm).items()
        }
    t0 = time.perf_counter()
    out = model.generate(**inputs, streamer=Clock(), **kw)
    t_end = time.perf_counter()
    # times[0]: prompt handed to the streamer; times[1]: first new token
    ttft = times[1] - t0
    decode_tps = (len(times) - 2) / (times[-1] - times[1])
    return {
        "ttft_s": ttft,
        "decode_tokens_per_s": decode_tps,
        "total_s": t_end - t0,
        "new_tokens": int(out.shape[1] - ids.shape[1]),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": [int(t) for t in (out[0, ids.shape[1] : ids.shape[1] + 16].tolist())],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "out" / "generate.json"))
    ap.add_argument(
        "--dtype",
        default="float32",
        help="ferrovlm's dtype (bfloat16: bf16 weights, AVX512-BF16 matmuls, f32 activations); transformers runs fp32",
    )
    ap.add_argument("--hf-dtype", default="float32", help="transformers' dtype (the issue's comparison is float32)")
    ap.add_argument("--baseline", help=BASELINE_HELP)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.ckpt, args.new, args.dtype, args.hf_dtype)))
        return
    extra = ["--new", str(args.new), "--dtype", args.dtype, "--hf-dtype", args.hf_dtype]
    res = run_both_sides(__file__, extra, baseline=args.baseline)
    f, t = res["ferrovlm"], res["transformers"]
    res["ratios"] = {
        "decode_speedup": f["decode_tokens_per_s"] / t["decode_tokens_per_s"],
        "ttft_ratio": f["ttft_s"] / t["ttft_s"],
        "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
        "same_first_16_tokens": f["tokens"] == t["tokens"],
    }
    if "ferrovlm-baseline" in res:
        b = res["ferrovlm-baseline"]
        res["ratios"]["baseline_decode_speedup"] = b["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        res["ratios"]["baseline_ttft_ratio"] = b["ttft_s"] / t["ttft_s"]
        res["ratios"]["decode_after_over_before"] = f["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'':20}{'ferrovlm':>12}{'transformers':>14}")
    for k in ("ttft_s", "decode_tokens_per_s", "total_s", "peak_rss_mb"):
        print(f"{k:20}{f[k]:12.3f}{t[k]:14.3f}")
    print(json.dumps(res["ratios"], indent=2))


if __name__ == "__main__":
    main()
