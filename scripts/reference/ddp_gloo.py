"""Reference: TRL's SFTTrainer in two CPU processes (torchrun, gloo) for ferrovlm's data-parallel trainer (dev only).

    python scripts/reference/ddp_gloo.py  # with torch, transformers, peft, trl, datasets; starts torchrun itself

The same tiny SmolVLM, starting adapter and rows as tests/fixtures/sft/messages (read from there), trained by
`trl.SFTTrainer` under `torchrun --nproc_per_node 2` with `use_cpu=True, ddp_backend="gloo"` (what a TRL user on a
CPU writes), 3 optimizer steps per case. Writes, per case, into tests/fixtures/ddp/<case>/:

  args.json         every SFTConfig kwarg passed (output_dir excluded)
  rows.json         the dataset: indices into sft/messages/rows.json (row i of the dataset is that row)
  log_history.json  rank 0's trainer.state.log_history (the last entry has wall-clock timings)
  shards.json       per rank, the dataset rows of each micro-batch in the order the rank's dataloader gave them,
                    and per rank per micro-batch num_items_in_batch (the label tokens of the whole global step)
  single.json       (cases with a one-process twin) the twin's SFTConfig kwargs and log_history, and the largest
                    |two-process - one-process| per logged key: TRL's 2-process run equals its 1-process run
                    on the combined batch

The folder is emptied (except README.md) and rewritten on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_grads import FIX, build_tiny_smolvlm, clean_dir_keep_readme, fresh_dir, load_tiny, normalize_perms  # noqa: E402

OUT = FIX / "ddp"
SRC = FIX / "sft" / "messages"  # adapter/, images/, rows.json
WORLD = 2

COMMON_ARGS = dict(
    max_steps=3,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    seed=42,
    bf16=False,
    use_cpu=True,
    ddp_backend="gloo",
    dataloader_num_workers=0,
    max_grad_norm=1.0,
)

# case -> (kwargs of the 2-process run, kwargs of the 1-process run on the same global batches or None, the
# dataset: indices into rows.json)
CASES = {
    # 2 ranks x 2 rows = the 4 rows of each step, as sft/messages' one process with 4 rows a batch
    "messages": (dict(per_device_train_batch_size=2), dict(per_device_train_batch_size=4), [0, 1, 2, 3]),
    # 2 ranks x (1 row x 2 accumulation steps): micro-batch i of the step is rows {2i, 2i+1} of the epoch's order
    # over both ranks, as one process with 2 rows a batch and 2 accumulation steps
    "accum": (
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, lr_scheduler_type="linear",
             warmup_steps=1, weight_decay=0.01),
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, lr_scheduler_type="linear",
             warmup_steps=1, weight_decay=0.01),
        [0, 1, 2, 3],
    ),
    # 4 rows do not fill 2 ranks x 3 rows: accelerate's BatchSamplerShard (even_batches) completes rank 1's batch
    # with the epoch's first rows; no one-process run sees the same batches
    "loopback": (dict(per_device_train_batch_size=3), None, [0, 1, 2, 3]),
    # 5 rows (row 0 twice), 2 ranks x 2 rows: 2 steps an epoch, the second with 1 row of the dataset left
    # (5 % 4), so gather_for_metrics keeps only rank 0's entropy / accuracy / token count at that step
    "remainder": (dict(per_device_train_batch_size=2), None, [0, 1, 2, 3, 0]),
}

TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def load_rows(which: list[int]):
    from PIL import Image

    rows = json.loads((SRC / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(SRC / p).convert("RGB") for p in r["images"]]
    return [rows[i] for i in which]


def row_id(example, rows) -> int:
    """Which row of sft/messages/rows.json a collator example is (by its question)."""
    q = next(p["text"] for p in example["messages"][0]["content"] if p["type"] == "text")
    return next(i for i, r in enumerate(rows) if r["messages"][0]["content"][1]["text"] == q)


def train(ckpt: Path, kwargs: dict, which: list[int]) -> dict:
    """One SFTTrainer run (in whatever process group torchrun set up): log_history, rows per micro-batch, and
    num_items_in_batch per micro-batch."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base, processor = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, SRC / "adapter", is_trainable=True)
    rows = load_rows(which)
    out = tempfile.mkdtemp()
    args = SFTConfig(output_dir=out, **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    micro, items = [], []
    collate = trainer.data_collator

    def capturing(examples):
        micro.append([row_id(e, rows) for e in examples])
        return collate(examples)

    trainer.data_collator = capturing
    orig = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        items.append(None if num_items_in_batch is None else int(num_items_in_batch))
        return orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = recording
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    micro = micro[: len(items)]  # the dataloader collates one batch ahead: drop a last one never trained on
    return {"log_history": trainer.state.log_history, "micro_batches": micro, "num_items_in_batch": items,
            "world_size": trainer.args.world_size, "process_index": trainer.args.process_index,
            "parallel_mode": str(trainer.args.parallel_mode),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}


def worker(ckpt: Path, result_dir: Path) -> None:
    """Runs every case in this torchrun process; each rank writes its results to result_dir/<case>.rank<r>.json."""
    rank = int(os.environ["RANK"])
    for name, (kwargs, _, which) in CASES.items():
        res = train(ckpt, {**COMMON_ARGS, **kwargs}, which)
        (result_dir / f"{name}.rank{rank}.json").write_text(json.dumps(res))


def max_diff(a: list, b: list) -> dict:
    keys = [k for k in a[0] if k not in ("epoch", "step")]
    per = {k: max(abs(x[k] - y[k]) for x, y in zip(a[:-1], b[:-1])) for k in keys}
    per["train_loss"] = abs(a[-1]["train_loss"] - b[-1]["train_loss"])
    return per


def main() -> None:
    clean_dir_keep_readme(OUT)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_tiny_smolvlm(tmp / "smolvlm-tiny")
    results = tmp / "results"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", "29533", __file__, "--worker", str(ckpt), str(results)]
    subprocess.run(cmd, check=True, env=env)
    for name, (kwargs, single_kwargs, which) in CASES.items():
        case = fresh_dir(OUT / name)
        per_rank = [json.loads((results / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]
        assert all(p["world_size"] == WORLD and p["backend"] == "gloo" for p in per_rank), per_rank
        logs = [p["log_history"] for p in per_rank]
        for other in logs[1:]:  # every rank keeps the same log_history (timings aside)
            assert [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in other] == \
                [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in logs[0]]
        (case / "args.json").write_text(json.dumps({**COMMON_ARGS, **kwargs}, indent=2, sort_keys=True) + "\n")
        (case / "rows.json").write_text(json.dumps(which) + "\n")
        (case / "log_history.json").write_text(json.dumps(logs[0], indent=2) + "\n")
        shards = {"world_size": WORLD, "parallel_mode": per_rank[0]["parallel_mode"],
                  "ranks": [{"micro_batches": p["micro_batches"], "num_items_in_batch": p["num_items_in_batch"]}
                            for p in per_rank]}
        (case / "shards.json").write_text(json.dumps(shards, indent=1) + "\n")
        print(f"[ddp {name}] rows per micro-batch by rank: {[p['micro_batches'] for p in per_rank]}")
        for e in logs[0]:
            print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})
        if single_kwargs is not None:
            single_args = {**COMMON_ARGS, **single_kwargs}
            single_args.pop("ddp_backend")
            single = train(ckpt, single_args, which)
            diff = max_diff(logs[0], single["log_history"])
            # the same global batches: equal up to float summation order (other padding widths, other splits)
            assert all(v <= 1e-4 for v in diff.values()), diff
            (case / "single.json").write_text(json.dumps(
                {"args": single_args, "log_history": single["log_history"], "micro_batches": single["micro_batches"],
                 "max_abs_diff_vs_two_processes": diff}, indent=2) + "\n")
            print(f"[ddp {name}] |2 processes - 1 process| max per key: {diff}")
        normalize_perms(case)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
