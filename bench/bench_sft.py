"""SFT with LoRA on a SmolVLM-256M-shaped checkpoint (random weights, bf16 on disk like the real one):
ferrovlm vs TRL + PEFT + transformers, fp32 on CPU (or `--bf16`: `bf16=True` in SFTConfig on both sides,
as the tutorials set it, which TRL runs under CPU autocast to bf16), in the same run, each side in its own
process. `--full`: full fine-tuning instead (no `peft_config` on either side: every parameter of the
model trains, vision tower and embeddings included, with AdamW over all ~256M of them).

8 prompt-completion rows with one 512x512 image each (splitting off: one 64-token frame), batch 4,
LoRA r=8 alpha=16 on the text model's q/k/v/o/gate/up/down, 4 optimizer steps (2 epochs), constant lr.
Reports samples/s of the training loop (model loading excluded), peak RSS, each side's logged losses (and
how far apart the first ones are) and the achieved GFLOP/s (matmul FLOPs counted by bench/flops.py from the
config and the collated batches). Dev only (needs torch, transformers, peft, trl in the same environment):

    python bench/bench_sft.py [--steps 4] [--bf16] [--full] [--out bench/out/sft.json]

`--device cuda`: both sides on the GPU (a ferrovlm built with the `cuda` feature; README "CUDA build"), fp32;
peak memory is then each process's peak GPU memory as nvidia-smi reports it (CUDA context included on both).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_forward import BASELINE_HELP, noise_rows, peak_rss_mb, rss_mb, run_both_sides  # noqa: E402
from flops import batch_counts, run_batches, run_flops  # noqa: E402

# the text model only (a list would also match the vision q/k/v_proj)
TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def add_processor(ckpt: Path) -> None:
    """SmolVLM's tokenizer and chat template, and an image processor with 512 px tiles (64 tokens)."""
    for f in (ROOT / "tests" / "fixtures" / "tokenizer" / "smolvlm").iterdir():
        shutil.copy(f, ckpt / f.name)
    shutil.copy(
        ROOT / "tests" / "fixtures" / "processor" / "config" / "chat_template.json", ckpt / "chat_template.json"
    )
    pre = json.loads((ROOT / "tests" / "fixtures" / "processor" / "config" / "preprocessor_config.json").read_text())
    pre.update({"size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512}, "do_image_splitting": False})
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    (ckpt / "processor_config.json").write_text(
        json.dumps({"image_seq_len": 64, "processor_class": "Idefics3Processor"})
    )


def make_rows(n: int = 8) -> list:
    return noise_rows("completion", n)


class GpuPeak:
    """This process's peak GPU memory (MiB), polled from nvidia-smi every 0.1 s while running."""

    def __init__(self) -> None:
        import os
        import threading

        self.peak, self._stop, self._pid = 0.0, threading.Event(), str(os.getpid())
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import subprocess

        while not self._stop.is_set():
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, mem = line.partition(",")
                if pid.strip() == self._pid:
                    self.peak = max(self.peak, float(mem))
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_side(side: str, ckpt: str, steps: int, bf16: bool = False, full: bool = False, device: str = "cpu") -> dict:
    add_processor(Path(ckpt))
    gpu = GpuPeak() if device != "cpu" else None
    rows = raw_rows = make_rows()
    base = rss_mb()
    cfg = dict(
        output_dir=str(Path(ckpt) / f"out-{side}"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=bf16,
        seed=0,
        gradient_checkpointing=True,
        max_length=None,
    )  # TRL's default
    if side == "ferrovlm":
        from ferrovlm import AutoModelForImageTextToText, AutoProcessor, LoraConfig, SFTConfig, SFTTrainer

        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype="float32", device_map=device)
        args = SFTConfig(**cfg, disable_tqdm=True, use_cpu=device == "cpu")
    else:
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import SFTConfig, SFTTrainer

        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, device_map=device)
        args = SFTConfig(**cfg, use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True)
        from datasets import Dataset

        rows = Dataset.from_list(rows)  # TRL refuses plain lists
    processor = AutoProcessor.from_pretrained(ckpt)
    peft_config = None if full else LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=rows, processing_class=processor, peft_config=peft_config
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    extra = {"peak_gpu_mb": gpu.stop()} if gpu is not None else {}
    return {
        **extra,
        "train_s": train_s,
        "samples_per_s": steps * 4 / train_s,
        "peak_rss_mb": peak,
        "rss_base_mb": base,
        "losses": logged_losses(trainer),
        "flops": step_flops(trainer, ckpt, raw_rows, steps, dpo=False, full=full),
    }


def logged_losses(trainer) -> list:
    """The per-step training losses the trainer logged (``logging_steps=1``), from ``state.log_history``."""
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def step_flops(trainer, ckpt: str, rows: list, steps: int, dpo: bool, full: bool = False) -> dict:
    """Matmul FLOPs of the run (bench/flops.py), from this side's own collator over the rows the steps see
    (counted after the peak RSS was read). Each batch gets fresh copies of its rows: TRL's collators rewrite
    a row's messages in place (the image placeholders), and a run sees a row again in its next epoch."""
    config = json.loads((Path(ckpt) / "config.json").read_text())
    counts = [batch_counts(trainer.data_collator(copy.deepcopy(b))) for b in run_batches(rows, 4, steps)]
    return run_flops(config, counts, dpo=dpo, full=full)


def compare(results: dict, per_s: str) -> None:
    """Adds what both training benchmarks report next to their throughput: the first logged losses' distance
    and each side's achieved GFLOP/s. Both sides are credited with the FLOPs counted from the transformers
    side's batches (the reference; ferrovlm's collator must count the same, see ``flops_counts_agree``)."""
    f, t = results["ferrovlm"], results["transformers"]
    if f["losses"] and t["losses"]:
        results["first_loss_abs_diff"] = abs(f["losses"][0] - t["losses"][0])
    ref = t["flops"]
    results["flops"] = ref
    results["flops_counts_agree"] = all(
        abs(f["flops"][m]["total"] - ref[m]["total"]) <= 1e-9 * ref[m]["total"] for m in ("nominal", "distinct")
    )
    for name, r in results.items():
        if isinstance(r, dict) and per_s in r:
            # the work rate: the same nominal count for every side
            r["gflops_per_s"] = ref["nominal"]["total"] / r["train_s"] / 1e9
            # what the side computed: ferrovlm skips the redundant vision and shared-prefix work (flops.py)
            done = ref["distinct" if name.startswith("ferrovlm") else "nominal"]["total"]
            r["gflops_per_s_executed"] = done / r["train_s"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="bf16=True in SFTConfig on both sides (TRL: CPU autocast)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning on both sides (no peft_config)")
    ap.add_argument("--out", default=str(HERE / "out" / "sft.json"))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (both sides on the GPU)")
    ap.add_argument("--baseline", help=BASELINE_HELP)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.ckpt, args.steps, args.bf16, args.full, args.device)))
        return
    extra = ["--steps", str(args.steps), "--device", args.device] + (["--bf16"] if args.bf16 else []) + (
        ["--full"] if args.full else [])
    results = run_both_sides(__file__, extra, baseline=args.baseline)
    f, t = results["ferrovlm"], results["transformers"]
    results["bf16"] = args.bf16
    results["full"] = args.full
    results["device"] = args.device
    results["ratios"] = {
        "speedup": f["samples_per_s"] / t["samples_per_s"],
        "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
    }
    if "ferrovlm-baseline" in results:
        b = results["ferrovlm-baseline"]
        results["ratios"]["baseline_speedup"] = b["samples_per_s"] / t["samples_per_s"]
        results["ratios"]["after_over_before"] = f["samples_per_s"] / b["samples_per_s"]
    compare(results, "samples_per_s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'':16}{'ferrovlm':>12}{'TRL' if args.full else 'TRL+PEFT':>12}{'ratio':>10}")
    speedup = results["ratios"]["speedup"]
    print(f"{'samples/s':16}{f['samples_per_s']:12.3f}{t['samples_per_s']:12.3f}{speedup:9.2f}x (speedup)")
    ratio = results["ratios"]["peak_rss_ratio"]
    print(f"{'peak RSS MB':16}{f['peak_rss_mb']:12.1f}{t['peak_rss_mb']:12.1f}{ratio:9.2f}x (ours/theirs)")
    if "peak_gpu_mb" in f and "peak_gpu_mb" in t:
        results["ratios"]["peak_gpu_ratio"] = f["peak_gpu_mb"] / max(t["peak_gpu_mb"], 1.0)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"{'peak GPU MiB':16}{f['peak_gpu_mb']:12.0f}{t['peak_gpu_mb']:12.0f}"
              f"{results['ratios']['peak_gpu_ratio']:9.2f}x (ours/theirs)")
    print_flops_and_losses(results)


def print_flops_and_losses(results: dict) -> None:
    f, t = results["ferrovlm"], results["transformers"]
    per_step = results["flops"]["nominal"]["total"] / results["flops"]["steps"] / 1e9
    print(f"{'GFLOP/s':16}{f['gflops_per_s']:12.1f}{t['gflops_per_s']:12.1f}   ({per_step:.0f} GFLOP a step, "
          f"TRL's count; ferrovlm's own work: {f['gflops_per_s_executed']:.1f} GFLOP/s)")
    if not results["flops_counts_agree"]:
        print("note: the two sides' collators give different FLOP counts (see flops in the JSON)")
    print(f"losses ferrovlm {[f'{x:.4f}' for x in f['losses']]}\nlosses TRL      {[f'{x:.4f}' for x in t['losses']]}")
    if "first_loss_abs_diff" in results:
        print(f"first loss |ours - theirs| = {results['first_loss_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
