"""SmolLM2-135M-Instruct from a GGUF file: ferrovlm vs llama.cpp (llama-cpp-python) vs transformers, in
the same run, each side in its own process: load time, RSS after loading, greedy decode tokens/s for
`--new` tokens after a chat prompt (same thread count: llama.cpp gets n_threads = our rayon threads).
llama.cpp quantizes activations inside its matmuls, ferrovlm computes with the exact dequantized
weights, transformers dequantizes the whole file to f32. Dev only (needs llama-cpp-python and torch +
transformers + gguf for the other sides; a side that cannot import is reported as skipped):

    SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf python bench/bench_gguf.py [--file OTHER.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_forward import peak_rss_mb  # noqa: E402

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
          198, 1, 4093, 198, 19161, 253, 1890, 8216, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]  # "poem" chat


def threads() -> int:
    return int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)


def run_side(side: str, path: str, new: int) -> dict:
    p = Path(path)
    stamps: list[float] = []  # [prompt handed over, first token, second token, ...]

    class Clock:
        def put(self, value: object) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    t0 = time.perf_counter()
    if side == "ferrovlm":
        import numpy as np

        from ferrovlm import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)
        load_s, rss = time.perf_counter() - t0, peak_rss_mb()
        ids = np.array([PROMPT], np.int64)
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # warm-up
        t1 = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        total = time.perf_counter() - t1
        tokens = out[0, len(PROMPT):].tolist()
    elif side == "llama.cpp":
        from llama_cpp import Llama

        model = Llama(model_path=str(p), n_ctx=512, n_threads=threads(), n_batch=512, verbose=False)
        load_s, rss = time.perf_counter() - t0, peak_rss_mb()
        list(zip(range(4), model.generate(PROMPT, top_k=1, temp=0.0)))  # warm-up
        model.reset()
        t1 = time.perf_counter()
        stamps.append(t1)
        tokens = []
        for tok in model.generate(PROMPT, top_k=1, temp=0.0, reset=True):  # greedy
            stamps.append(time.perf_counter())
            tokens.append(int(tok))
            if len(tokens) == new:
                break
        total = time.perf_counter() - t1
    else:
        import torch
        from transformers import AutoModelForCausalLM as HFModel
        from transformers.generation.streamers import BaseStreamer

        clock = type("HFClock", (BaseStreamer,), {"put": Clock.put, "end": Clock.end})()

        torch.set_grad_enabled(False)
        model = HFModel.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
        load_s, rss = time.perf_counter() - t0, peak_rss_mb()
        ids = torch.tensor([PROMPT])
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        total = time.perf_counter() - t1
        tokens = out[0, len(PROMPT):].tolist()
    return {
        "load_s": load_s,
        "rss_after_load_mb": rss,
        "prompt_plus_decode_s": total,  # tokens_per_s counts the prompt's time too; decode_tokens_per_s not
        "tokens_per_s": new / total,
        "decode_tokens_per_s": (len(stamps) - 2) / (stamps[-1] - stamps[1]),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": [int(t) for t in tokens[:16]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default=os.environ.get("SMOLLM2_GGUF", ""))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--sides", default="ferrovlm,llama.cpp,transformers")
    ap.add_argument("--out", default=str(HERE / "out" / "gguf.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.file, args.new)))
        return
    if not Path(args.file).is_file():
        sys.exit("give the GGUF file with --file or SMOLLM2_GGUF")
    res: dict = {"file": args.file, "threads": threads(), "new_tokens": args.new}
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--file", args.file, "--new", str(args.new)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            res[side] = {"skipped": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
            continue
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    f = res.get("ferrovlm", {})
    res["ratios"] = {}  # flat, for bench/run_all.py
    for other in ("llama.cpp", "transformers"):
        o = res.get(other, {})
        if "tokens_per_s" in f and "tokens_per_s" in o:
            res[f"vs_{other}"] = {
                "decode_tokens_per_s_ratio": f["decode_tokens_per_s"] / o["decode_tokens_per_s"],
                "tokens_per_s_ratio": f["tokens_per_s"] / o["tokens_per_s"],
                "load_time_ratio": f["load_s"] / o["load_s"],
                "rss_after_load_ratio": f["rss_after_load_mb"] / o["rss_after_load_mb"],
                "same_first_16_tokens": f["tokens"] == o["tokens"],
            }
            key = other.replace(".", "_")
            res["ratios"][f"decode_vs_{key}"] = res[f"vs_{other}"]["decode_tokens_per_s_ratio"]
            res["ratios"][f"rss_vs_{key}"] = res[f"vs_{other}"]["rss_after_load_ratio"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
