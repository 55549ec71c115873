"""DPO with LoRA on a SmolVLM-256M-shaped checkpoint (random weights, bf16 on disk like the real one):
ferrovlm vs TRL + PEFT + transformers, fp32 on CPU (or `--bf16`: `bf16=True` in DPOConfig on both sides,
as the tutorials set it, which TRL runs under CPU autocast to bf16), in the same run, each side in its own
process.

8 preference pairs with one 512x512 image each (splitting off: one 64-token frame), batch 4, LoRA r=8
alpha=16 on the text model's q/k/v/o/gate/up/down (a fresh adapter: the reference is the base model with
the adapter disabled), 2 optimizer steps. Reports pairs/s of the training loop, peak RSS, each side's logged
losses (and how far apart the first ones are) and the achieved GFLOP/s (bench/flops.py). Dev only (needs torch,
transformers, peft, trl in the same environment):

    python bench/bench_dpo.py [--steps 2] [--bf16] [--out bench/out/dpo.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_forward import noise_rows, peak_rss_mb, rss_mb, run_both_sides  # noqa: E402
from bench_sft import add_processor, compare, logged_losses, print_flops_and_losses, step_flops  # noqa: E402

# the text model only (a list would also match the vision q/k/v_proj)
TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_rows(n: int = 8) -> list:
    rows = noise_rows("chosen", n)
    for i, r in enumerate(rows):
        r["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": f"Answer {i}: a cat on a sofa."}]}]
    return rows


def run_side(side: str, ckpt: str, steps: int, bf16: bool = False) -> dict:
    add_processor(Path(ckpt))
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
        max_length=1024,
    )  # TRL's defaults
    if side == "ferrovlm":
        from ferrovlm import AutoModelForImageTextToText, AutoProcessor, DPOConfig, DPOTrainer, LoraConfig

        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype="float32")
        args = DPOConfig(**cfg, disable_tqdm=True)
    else:
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import DPOConfig, DPOTrainer

        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
        args = DPOConfig(**cfg, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        from datasets import Dataset

        rows = Dataset.from_list(rows)  # TRL refuses plain lists
    processor = AutoProcessor.from_pretrained(ckpt)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=rows, processing_class=processor, peft_config=peft_config
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "train_s": train_s,
        "pairs_per_s": steps * 4 / train_s,
        "peak_rss_mb": peak,
        "rss_base_mb": base,
        "losses": logged_losses(trainer),
        "flops": step_flops(trainer, ckpt, raw_rows, steps, dpo=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16=True in DPOConfig on both sides (TRL: CPU autocast)")
    ap.add_argument("--out", default=str(HERE / "out" / "dpo.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.ckpt, args.steps, args.bf16)))
        return
    results = run_both_sides(__file__, ["--steps", str(args.steps)] + (["--bf16"] if args.bf16 else []))
    f, t = results["ferrovlm"], results["transformers"]
    results["bf16"] = args.bf16
    results["ratios"] = {
        "speedup": f["pairs_per_s"] / t["pairs_per_s"],
        "peak_rss_ratio": f["peak_rss_mb"] / t["peak_rss_mb"],
    }
    compare(results, "pairs_per_s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'':16}{'ferrovlm':>12}{'TRL+PEFT':>12}{'ratio':>10}")
    print(
        f"{'pairs/s':16}{f['pairs_per_s']:12.3f}{t['pairs_per_s']:12.3f}{results['ratios']['speedup']:9.2f}x (speedup)"
    )
    ratio = results["ratios"]["peak_rss_ratio"]
    print(f"{'peak RSS MB':16}{f['peak_rss_mb']:12.1f}{t['peak_rss_mb']:12.1f}{ratio:9.2f}x (ours/theirs)")
    print_flops_and_losses(results)


if __name__ == "__main__":
    main()
