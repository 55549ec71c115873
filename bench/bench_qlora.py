"""bitsandbytes quantization on a SmolVLM-256M-shaped checkpoint (random weights, bf16 on disk like the real one):
ferrovlm vs transformers + bitsandbytes (+ PEFT + TRL), CPU, in the same run, every measurement in its own process.

1. load: peak RSS and RSS added by `from_pretrained` with NF4 (double quant, float32 compute), LLM.int8, bf16 and
   fp32 for ferrovlm, NF4 and fp32 for transformers; load time; `get_memory_footprint()`.
2. QLoRA SFT: NF4 base + `prepare_model_for_kbit_training`, LoRA r=8 alpha=16 on the text model's
   q/k/v/o/gate/up/down, 8 prompt-completion rows with one 512x512 image (one 64-token frame), batch 4, `--steps`
   optimizer steps, gradient checkpointing: samples/s of `train()` (loading excluded) and peak RSS, against TRL + PEFT
   + bitsandbytes (which, as TRL does for any quantized model, trains the adapter in bf16), and ferrovlm's own LoRA
   on the fp32 base (bench_sft.py's setup).
3. decode: tokens/s of greedy `generate` (one 512x512 image + a short question, `--new` new tokens) for ferrovlm's
   NF4 model against its bf16 model (and transformers + bitsandbytes NF4).

Dev only. Both stacks must be importable, from one interpreter or from two:

    python bench/bench_qlora.py [--steps 4] [--new 32] [--out bench/out/qlora.json]
    .venv/bin/python bench/bench_qlora.py --ref-python REF_PYTHON   # transformers side in another environment
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))
from bench_forward import make_inputs, peak_rss_mb, rss_mb  # noqa: E402
from bench_sft import TARGETS, add_processor, make_rows  # noqa: E402

MODES = {  # BitsAndBytesConfig kwargs / dtype per load mode
    "nf4": dict(
        quant=dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype="float32",
        ),
        dtype="float32",
    ),
    "int8": dict(quant=dict(load_in_8bit=True), dtype="float32"),
    "bf16": dict(quant=None, dtype="bfloat16"),
    "fp32": dict(quant=None, dtype="float32"),
}
JOBS = [  # (task, side, mode)
    ("load", "ferrovlm", "nf4"),
    ("load", "ferrovlm", "int8"),
    ("load", "ferrovlm", "bf16"),
    ("load", "ferrovlm", "fp32"),
    ("load", "transformers", "nf4"),
    ("load", "transformers", "fp32"),
    ("sft", "ferrovlm", "nf4"),
    ("sft", "transformers", "nf4"),
    ("sft", "ferrovlm", "fp32"),
    ("decode", "ferrovlm", "nf4"),
    ("decode", "ferrovlm", "bf16"),
    ("decode", "transformers", "nf4"),
]


def import_side(side: str) -> None:
    """Imports the stack first, so that `rss_mb()` after it is the baseline the model adds to."""
    if side == "ferrovlm":
        import ferrovlm  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401


def load(side: str, ckpt: str, mode: str):
    spec = MODES[mode]
    if side == "ferrovlm":
        from ferrovlm import AutoModelForImageTextToText, BitsAndBytesConfig

        q = BitsAndBytesConfig(**spec["quant"]) if spec["quant"] else None
        return AutoModelForImageTextToText.from_pretrained(ckpt, dtype=spec["dtype"], quantization_config=q)
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kw = dict(spec["quant"] or {})
    if "bnb_4bit_compute_dtype" in kw:
        kw["bnb_4bit_compute_dtype"] = getattr(torch, kw["bnb_4bit_compute_dtype"])
    q = BitsAndBytesConfig(**kw) if kw else None
    return AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, spec["dtype"]), quantization_config=q)


def run_load(side: str, ckpt: str, mode: str) -> dict:
    import_side(side)
    base = rss_mb()
    t0 = time.perf_counter()
    model = load(side, ckpt, mode)
    load_s = time.perf_counter() - t0
    return {"load_s": load_s, "rss_added_mb": rss_mb() - base, "peak_rss_mb": peak_rss_mb(), "rss_base_mb": base,
            "footprint_mb": model.get_memory_footprint() / 2**20}


def run_sft(side: str, ckpt: str, mode: str, steps: int) -> dict:
    import_side(side)
    rows = make_rows()
    base_rss = rss_mb()
    cfg = dict(
        output_dir=str(Path(ckpt) / f"out-{side}-{mode}"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        seed=0,
        gradient_checkpointing=True,
        max_length=None,
        disable_tqdm=True,
    )
    model = load(side, ckpt, mode)
    if side == "ferrovlm":
        from ferrovlm import AutoProcessor, LoraConfig, SFTConfig, SFTTrainer, prepare_model_for_kbit_training

        args = SFTConfig(**cfg)
    else:
        import torch
        from datasets import Dataset
        from peft import LoraConfig, prepare_model_for_kbit_training
        from transformers import AutoProcessor
        from trl import SFTConfig, SFTTrainer

        torch.manual_seed(0)
        args = SFTConfig(**cfg, use_cpu=True, dataloader_num_workers=0)
        rows = Dataset.from_list(rows)  # TRL refuses plain lists
    if mode != "fp32":
        model = prepare_model_for_kbit_training(model)
    processor = AutoProcessor.from_pretrained(ckpt)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=rows, processing_class=processor, peft_config=peft_config
    )
    adapter_dtype = None
    if side == "transformers":
        adapter_dtype = sorted(
            {str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad}
        )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "train_s": train_s,
        "samples_per_s": steps * 4 / train_s,
        "s_per_step": train_s / steps,
        "peak_rss_mb": peak_rss_mb(),
        "rss_base_mb": base_rss,
        "losses": losses,
        "adapter_dtype": adapter_dtype,
    }


def run_decode(side: str, ckpt: str, mode: str, new: int) -> dict:
    import_side(side)
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    ids, am, px, pm = make_inputs(cfg)
    ids, am = ids[:, :80], am[:, :80]  # 8 text + 73 image-block tokens: a short question (bench_generate.py)
    times = []
    model = load(side, ckpt, mode)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=px, pixel_attention_mask=pm)
    if side == "ferrovlm":
        class Clock:
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass
    else:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        torch.set_grad_enabled(False)
        model.eval()
        inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    t0 = time.perf_counter()
    model.generate(**inputs, streamer=Clock(), **kw)
    # times[0]: the prompt handed to the streamer; times[1]: the first new token
    return {
        "ttft_s": times[1] - t0,
        "decode_tokens_per_s": (len(times) - 2) / (times[-1] - times[1]),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_job(task: str, side: str, ckpt: str, mode: str, steps: int, new: int) -> dict:
    if task == "load":
        return run_load(side, ckpt, mode)
    if task == "sft":
        return run_sft(side, ckpt, mode, steps)
    return run_decode(side, ckpt, mode, new)


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    def get(task, side, mode, key):
        r = res.get(f"{task}/{side}/{mode}")
        return None if r is None or "error" in r else r.get(key)

    out = [
        "**Load** (peak RSS = the process's high-water mark; added = RSS after load minus after importing the stack)",
        "",
        "| stack | mode | load s | RSS added MB | peak RSS MB | get_memory_footprint MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for _, side, mode in [j for j in JOBS if j[0] == "load"]:
        out.append(
            f"| {side} | {mode} | {fmt(get('load', side, mode, 'load_s'), '.2f')} | "
            f"{fmt(get('load', side, mode, 'rss_added_mb'))} | "
            f"{fmt(get('load', side, mode, 'peak_rss_mb'))} | {fmt(get('load', side, mode, 'footprint_mb'))} |"
        )
    out += ["", "**SFT with LoRA r=8** (batch 4, 512x512 images, gradient checkpointing)", "",
            "| stack | base | samples/s | s/step | peak RSS MB | losses |", "|---|---|---:|---:|---:|---|"]
    for _, side, mode in [j for j in JOBS if j[0] == "sft"]:
        losses = get("sft", side, mode, "losses")
        base = {"nf4": "NF4 (QLoRA)", "fp32": "fp32"}[mode]
        if side == "transformers":
            base += f", TRL adapter {'/'.join(get('sft', side, mode, 'adapter_dtype') or ['?'])}"
        loss_text = " ".join(f"{x:.3f}" for x in losses) if losses else "-"
        out.append(
            f"| {side} | {base} | {fmt(get('sft', side, mode, 'samples_per_s'), '.3f')} | "
            f"{fmt(get('sft', side, mode, 's_per_step'), '.2f')} | "
            f"{fmt(get('sft', side, mode, 'peak_rss_mb'))} | {loss_text} |"
        )
    out += ["", "**Decode** (greedy, one 512x512 image + short question)", "",
            "| stack | weights | decode tokens/s | time to first token s | peak RSS MB |", "|---|---|---:|---:|---:|"]
    for _, side, mode in [j for j in JOBS if j[0] == "decode"]:
        out.append(
            f"| {side} | {mode} | {fmt(get('decode', side, mode, 'decode_tokens_per_s'), '.2f')} | "
            f"{fmt(get('decode', side, mode, 'ttft_s'), '.2f')} | {fmt(get('decode', side, mode, 'peak_rss_mb'))} |"
        )
    errors = [f"- {k}: {v['error']}" for k, v in res.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(out + (["", "errors:"] + errors if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="SFT optimizer steps (8 rows, batch 4: 2 epochs for 4)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per decode")
    ap.add_argument("--out", default=str(HERE / "out" / "qlora.json"))
    ap.add_argument("--ferrovlm-python", default=sys.executable, help="interpreter with ferrovlm installed")
    ap.add_argument(
        "--ref-python", default=sys.executable, help="interpreter with torch, transformers, bitsandbytes, peft, trl"
    )
    ap.add_argument("--only", default="", help="comma-separated tasks to run (load,sft,decode); default all")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        task, side, mode = args.job.split("/")
        print(json.dumps(run_job(task, side, args.ckpt, mode, args.steps, args.new)))
        return

    from tiny_checkpoint import SMOLVLM_256M, write_checkpoint

    tasks = set(filter(None, args.only.split(","))) or {"load", "sft", "decode"}
    results = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "smolvlm-256m-random", SMOLVLM_256M, seed=0, dtype="bfloat16")
        add_processor(ckpt)
        for task, side, mode in JOBS:
            if task not in tasks:
                continue
            key = f"{task}/{side}/{mode}"
            py = args.ferrovlm_python if side == "ferrovlm" else args.ref_python
            cmd = [py, __file__, "--job", key, "--ckpt", str(ckpt), "--steps", str(args.steps), "--new", str(args.new)]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode == 0:
                results[key] = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                results[key] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"[{time.perf_counter() - t0:6.1f}s] {key}: {results[key]}", file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n(total {results['wall_s']:.0f} s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
