"""One process of tests/test_ddp.py's data-parallel runs (the test sets the torchrun environment: RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python tests/ddp_worker.py CHECKPOINT OUT_DIR CASE [CASE ...] [--set key=json ...] [--kill-rank R --kill-step S]

Trains each case of tests/fixtures/ddp (its SFTConfig / DPOConfig kwargs, and the rows and starting adapter of the
fixture folder its setup.json names: sft/messages or dpo/sigmoid) with ferrovlm's SFTTrainer / DPOTrainer (with its
eval dataset, if any) and writes OUT_DIR/<case>.rank<r>.json: log_history, the dataset rows of each train
micro-batch and eval batch, the bytes all-reduced and the wall time (and for cases with an eval dataset, what a
further ``evaluate()`` after ``train()`` returned). ``--kill-rank R --kill-step S``: rank R
kills itself (SIGKILL; with ``--kill-signal STOP`` it stops instead, as a hung process) when step S is logged.
``--bucket-bytes B``: the gradients are all-reduced in buckets of B bytes. ``--resume``: resumes from the last
checkpoint in OUT_DIR/<case>.out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SFT = FIXTURES / "sft" / "messages"
DDP = FIXTURES / "ddp"


def load_rows(which: list[int], source: Path = SFT) -> list[dict]:
    from PIL import Image

    rows = json.loads((source / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(source / p).convert("RGB") for p in r["images"]]
    return [rows[i] for i in which]


def setup(case: str) -> dict:
    """The case's trainer ("sft" / "dpo"), its source folder (a Path) and eval rows (or None)."""
    s = json.loads((DDP / case / "setup.json").read_text())
    return {**s, "source": FIXTURES / s["source"]}


class Killer:
    """A callback: sends this process ``sig`` (SIGKILL: it dies; SIGSTOP: it hangs) when step ``step`` is logged."""

    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_log(self, args, state, control, logs=None) -> None:
        if state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), self.sig)


class Clock:
    """A callback: the time of each log (steady-state throughput, without the group's setup)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, args, state, control, logs=None) -> None:
        if "loss" in (logs or {}):
            self.times.append(time.perf_counter())


def run_case(ckpt: Path, out: Path, case: str, overrides: dict, kill: Killer | None, bucket_bytes: int,
             resume: bool = False) -> None:
    import ferrovlm
    from ferrovlm import AutoProcessor, DPOConfig, DPOTrainer, PeftModel, SFTConfig, SFTTrainer, distributed

    rank = int(os.environ.get("RANK", "0"))
    args = json.loads((DDP / case / "args.json").read_text())
    args.update(overrides)
    which = json.loads((DDP / case / "rows.json").read_text())
    spec = setup(case)
    eval_which = spec["eval_rows"]
    base = ferrovlm.AutoModelForImageTextToText.from_pretrained(ckpt)
    model = PeftModel.from_pretrained(base, spec["source"] / "adapter", is_trainable=True)
    processor = AutoProcessor.from_pretrained(ckpt)
    clock = Clock()
    data = dict(train_dataset=load_rows(which, spec["source"]), processing_class=processor,
                eval_dataset=load_rows(eval_which, spec["source"]) if eval_which is not None else None,
                callbacks=[clock] + ([kill] if kill is not None else []))
    if spec["trainer"] == "dpo":
        cfg = DPOConfig(output_dir=str(out / f"{case}.out"), disable_tqdm=True, **args)
        trainer = DPOTrainer(model=model, args=cfg, **data)
    else:
        cfg = SFTConfig(output_dir=str(out / f"{case}.out"), disable_tqdm=True, **args)
        trainer = SFTTrainer(model=model, args=cfg, **data)
    micro: list[list[int]] = []
    evals: list[list[int]] = []
    rows_of = trainer._rows

    def recording(ds, idx):
        # as rows of the source folder, as the fixture records them
        if ds is trainer.train_dataset:
            micro.append([which[int(i)] for i in idx])
        else:
            evals.append([eval_which[int(i)] for i in idx])
        return rows_of(ds, idx)

    trainer._rows = recording
    made: list = []
    from_args = distributed.DataParallel.from_args

    def capturing(a):
        dp = from_args(a)
        if dp is not None and bucket_bytes:
            dp.bucket_bytes = bucket_bytes  # smaller than ddp_bucket_cap_mb can say: several buckets
        made.append(dp)
        return dp

    distributed.DataParallel.from_args = capturing  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    wall = time.perf_counter() - t0
    distributed.DataParallel.from_args = from_args  # type: ignore[method-assign]
    dp = made[-1] if made else None
    history, eval_batches = list(trainer.state.log_history), list(evals)  # those of train()
    # an evaluate() of its own after train() (it joins the group itself): the same as the evaluation after the
    # last step
    after = trainer.evaluate() if eval_which is not None and not resume else None
    res = {
        "log_history": history,
        "evaluate_after_train": after,
        "micro_batches": micro,
        "eval_batches": eval_batches,
        "wall_s": wall,
        "log_times": clock.times,
        "samples": len(micro) * int(args["per_device_train_batch_size"]),
        "bytes_all_reduced": dp.bytes_all_reduced if dp is not None else 0,
        "grad_bytes_per_step": dp.grad_bytes_per_step if dp is not None else 0,
        "world_size": trainer.args.world_size,
    }
    (out / f"{case}.rank{rank}.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("cases", nargs="+")
    p.add_argument("--set", action="append", default=[], help="an SFTConfig override, key=json")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=1)
    p.add_argument("--kill-signal", default="KILL", choices=["KILL", "STOP"])
    p.add_argument("--bucket-bytes", type=int, default=0, help="gradient all-reduce bucket size in bytes")
    p.add_argument("--resume", action="store_true", help="train(resume_from_checkpoint=True)")
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    mine = int(os.environ.get("RANK", "0")) == a.kill_rank
    kill = Killer(a.kill_step, getattr(signal, "SIG" + a.kill_signal)) if mine else None
    for case in a.cases:
        run_case(a.checkpoint, a.out, case, overrides, kill, a.bucket_bytes, a.resume)


if __name__ == "__main__":
    main()
