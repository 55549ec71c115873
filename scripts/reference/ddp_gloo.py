"""Reference: TRL's SFTTrainer and DPOTrainer in two CPU processes (torchrun, gloo) for ferrovlm's data-parallel
trainers (dev only).

    python scripts/reference/ddp_gloo.py  # with torch, transformers, peft, trl, datasets; starts torchrun itself

The tiny SmolVLM with the starting adapter and rows of tests/fixtures/sft/messages (SFT cases) or
tests/fixtures/dpo/sigmoid (DPO cases), read from there, trained by `trl.SFTTrainer` / `trl.DPOTrainer`
(ref_model=None) under `torchrun --nproc_per_node 2` with `use_cpu=True, ddp_backend="gloo"` (what a TRL user on a
CPU writes), 3 optimizer steps per case; cases with an eval dataset also run transformers' sharded evaluation loop
(eval_strategy="steps"). Writes, per case, into tests/fixtures/ddp/<case>/:

  args.json         every SFTConfig / DPOConfig kwarg passed (output_dir excluded)
  setup.json        the trainer ("sft" / "dpo"), the fixture folder the rows and adapter come from, and the eval
                    dataset (indices into that folder's rows.json, or null)
  rows.json         the train dataset: indices into <source>/rows.json (row i of the dataset is that row)
  log_history.json  rank 0's trainer.state.log_history (the last entry has wall-clock timings)
  shards.json       per rank, the dataset rows of each train micro-batch in the order the rank's dataloader gave
                    them, per micro-batch num_items_in_batch (SFT: the label tokens of the whole global step; DPO:
                    None), and the eval rows of each eval batch (every evaluation, in order)
  single.json       (cases with a one-process twin) the twin's kwargs and log_history, and the largest
                    |two-process - one-process| per logged training key: TRL's 2-process run equals its 1-process
                    run on the combined batch

The folder is emptied (except README.md) and rewritten on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_grads import FIX, build_tiny_smolvlm, clean_dir_keep_readme, fresh_dir, load_tiny, normalize_perms  # noqa: E402

OUT = FIX / "ddp"
SOURCES = {"sft": "sft/messages", "dpo": "dpo/sigmoid"}  # trainer -> the folder with adapter/, images/, rows.json
WORLD = 2

# TrainingArguments every case shares (SFT and DPO)
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
DPO_ARGS = dict(beta=0.1, loss_type=["sigmoid"])  # as tests/fixtures/dpo/sigmoid


@dataclass(frozen=True)
class Case:
    trainer: str  # "sft" / "dpo"
    kwargs: dict  # the 2-process run's kwargs besides COMMON_ARGS (and DPO_ARGS)
    rows: list  # the train dataset: indices into SOURCES[trainer]/rows.json
    single: Optional[dict] = None  # the 1-process twin's kwargs (the same global batches), if any
    eval_rows: Optional[list] = None  # the eval dataset, if any

    def args(self) -> dict:
        return {**COMMON_ARGS, **(DPO_ARGS if self.trainer == "dpo" else {}), **self.kwargs}


EVAL_EVERY_2 = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=1)

CASES = {
    # 2 ranks x 2 rows = the 4 rows of each step, as sft/messages' one process with 4 rows a batch
    "messages": Case("sft", dict(per_device_train_batch_size=2), [0, 1, 2, 3],
                     single=dict(per_device_train_batch_size=4)),
    # 2 ranks x (1 row x 2 accumulation steps): micro-batch i of the step is rows {2i, 2i+1} of the epoch's order
    # over both ranks, as one process with 2 rows a batch and 2 accumulation steps
    "accum": Case(
        "sft",
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, lr_scheduler_type="linear",
             warmup_steps=1, weight_decay=0.01),
        [0, 1, 2, 3],
        single=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, lr_scheduler_type="linear",
                    warmup_steps=1, weight_decay=0.01),
    ),
    # 4 rows do not fill 2 ranks x 3 rows: accelerate's BatchSamplerShard (even_batches) completes rank 1's batch
    # with the epoch's first rows; no one-process run sees the same batches
    "loopback": Case("sft", dict(per_device_train_batch_size=3), [0, 1, 2, 3]),
    # 5 rows (row 0 twice), 2 ranks x 2 rows: 2 steps an epoch, the second with 1 row of the dataset left
    # (5 % 4), so gather_for_metrics keeps only rank 0's entropy / accuracy / token count at that step
    "remainder": Case("sft", dict(per_device_train_batch_size=2), [0, 1, 2, 3, 0]),
    # SFT with an evaluation at step 2 over 3 rows, 1 a batch: rank 0 gets rows 0 and 2, rank 1 rows 1 and 0
    # (padding); the last batch keeps only rank 0's loss (3 % 2 = 1) in eval_loss and its metrics
    "sft_eval": Case("sft", dict(per_device_train_batch_size=2, **EVAL_EVERY_2), [0, 1, 2, 3],
                     eval_rows=[0, 1, 2]),
    # DPO, 2 ranks x 2 pairs = the 4 pairs of dpo/sigmoid's one-process batch, with an evaluation at step 2 as above
    "dpo": Case("dpo", dict(per_device_train_batch_size=2, **EVAL_EVERY_2), [0, 1, 2, 3],
                single=dict(per_device_train_batch_size=4, **EVAL_EVERY_2), eval_rows=[0, 1, 2]),
    # DPO with 2 accumulation steps (each micro-batch's mean / 2), sigmoid + sft losses, 5 rows (row 0 twice): the
    # second step of each epoch has 1 row left, so the gather_for_metrics keys count only rank 0 while the
    # rewards / logps (accelerate's gather) count both; an evaluation at step 3 over 5 rows, 2 a batch
    "dpo_accum": Case(
        "dpo",
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, lr_scheduler_type="linear",
             warmup_steps=1, weight_decay=0.01, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
             eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=2),
        [0, 1, 2, 3, 0],
        eval_rows=[0, 1, 2, 3, 1],
    ),
}

TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second")


def load_rows(trainer: str, which: list[int]):
    from PIL import Image

    src = FIX / SOURCES[trainer]
    rows = json.loads((src / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(src / p).convert("RGB") for p in r["images"]]
    return [rows[i] for i in which]


def question(example) -> str:
    """The user's text of a collator example (SFT: its messages; DPO: its prompt)."""
    turns = example["messages"] if "messages" in example else example["prompt"]
    return next(p["text"] for p in turns[0]["content"] if p["type"] == "text")


def row_id(example, rows) -> int:
    """Which row of the source rows.json a collator example is (by its question)."""
    q = question(example)
    return next(i for i, r in enumerate(rows) if question(r) == q)


def train(ckpt: Path, case: Case, kwargs: dict) -> dict:
    """One SFTTrainer / DPOTrainer run (in whatever process group torchrun set up): log_history, the rows of each
    train micro-batch and eval batch, and num_items_in_batch per train micro-batch."""
    from datasets import Dataset
    from peft import PeftModel

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    src = FIX / SOURCES[case.trainer]
    base, processor = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, src / "adapter", is_trainable=True)
    every = load_rows(case.trainer, list(range(len(json.loads((src / "rows.json").read_text())))))
    train_ds = Dataset.from_list([every[i] for i in case.rows])
    eval_ds = Dataset.from_list([every[i] for i in case.eval_rows]) if case.eval_rows is not None else None
    out = tempfile.mkdtemp()
    if case.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(output_dir=out, **kwargs),
                             train_dataset=train_ds, eval_dataset=eval_ds, processing_class=processor)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=out, **kwargs), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=processor)
    micro, items, evals = [], [], []
    collate = trainer.data_collator

    def capturing(into):
        def fn(examples):
            into.append([row_id(e, every) for e in examples])
            return collate(examples)
        return fn

    trainer.data_collator = capturing(micro)
    get_eval = trainer.get_eval_dataloader

    def eval_loader(*a, **kw):  # the eval dataloader keeps the collator it is built with
        trainer.data_collator = capturing(evals)
        try:
            return get_eval(*a, **kw)
        finally:
            trainer.data_collator = capturing(micro)

    trainer.get_eval_dataloader = eval_loader
    orig = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            items.append(None if num_items_in_batch is None else int(num_items_in_batch))
        return orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = recording
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    micro = micro[: len(items)]  # the dataloader collates one batch ahead: drop a last one never trained on
    return {"log_history": trainer.state.log_history, "micro_batches": micro, "num_items_in_batch": items,
            "eval_batches": evals, "world_size": trainer.args.world_size, "process_index": trainer.args.process_index,
            "parallel_mode": str(trainer.args.parallel_mode),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}


def worker(ckpt: Path, result_dir: Path) -> None:
    """Runs every case in this torchrun process; each rank writes its results to result_dir/<case>.rank<r>.json."""
    rank = int(os.environ["RANK"])
    for name, case in CASES.items():
        res = train(ckpt, case, case.args())
        (result_dir / f"{name}.rank{rank}.json").write_text(json.dumps(res))


def max_diff(a: list, b: list) -> dict:
    """Largest |a - b| per logged training key (eval entries aside) and of train_loss."""
    steps_a, steps_b = [e for e in a if "loss" in e], [e for e in b if "loss" in e]
    keys = [k for k in steps_a[0] if k not in ("epoch", "step")]
    per = {k: max(abs(x[k] - y[k]) for x, y in zip(steps_a, steps_b)) for k in keys}
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
    for name, spec in CASES.items():
        case = fresh_dir(OUT / name)
        per_rank = [json.loads((results / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]
        assert all(p["world_size"] == WORLD and p["backend"] == "gloo" for p in per_rank), per_rank
        logs = [p["log_history"] for p in per_rank]
        for other in logs[1:]:  # every rank keeps the same log_history (timings aside)
            assert [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in other] == \
                [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in logs[0]]
        (case / "args.json").write_text(json.dumps(spec.args(), indent=2, sort_keys=True) + "\n")
        (case / "setup.json").write_text(json.dumps(
            {"trainer": spec.trainer, "source": SOURCES[spec.trainer], "eval_rows": spec.eval_rows}) + "\n")
        (case / "rows.json").write_text(json.dumps(spec.rows) + "\n")
        (case / "log_history.json").write_text(json.dumps(logs[0], indent=2) + "\n")
        shards = {"world_size": WORLD, "parallel_mode": per_rank[0]["parallel_mode"],
                  "ranks": [{"micro_batches": p["micro_batches"], "num_items_in_batch": p["num_items_in_batch"],
                             "eval_batches": p["eval_batches"]} for p in per_rank]}
        (case / "shards.json").write_text(json.dumps(shards, indent=1) + "\n")
        print(f"[ddp {name}] rows per micro-batch by rank: {[p['micro_batches'] for p in per_rank]}; eval batches: "
              f"{[p['eval_batches'] for p in per_rank]}")
        for e in logs[0]:
            print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})
        if spec.single is not None:
            single_args = {**COMMON_ARGS, **(DPO_ARGS if spec.trainer == "dpo" else {}), **spec.single}
            single_args.pop("ddp_backend")
            single = train(ckpt, spec, single_args)
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
