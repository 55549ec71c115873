"""Data-parallel SFT or DPO on CPUs: two processes (gloo, loopback, the torchrun environment) vs one, the same
global batches (tests/fixtures/ddp's `messages` case, or with `--case dpo` its `dpo` case without its evaluations:
the tiny SmolVLM, LoRA on the text model, 4 rows / pairs a step: one process with 4 a batch, or two with 2 each),
`--steps` optimizer steps. Reports each run's samples/s of the
training loop (steady state: from the first step's log to the last; and over the whole train() call, which
includes joining the process group), the bytes all-reduced per step (the flat gradient buffer, its presence
flags and the counts and metrics), and the largest difference between the two runs' logged values. On a
machine with 2 cores this proves the mechanism, not a speed-up. Needs torch (for gloo):

    python bench/bench_ddp.py [--case messages|dpo] [--steps 30] [--out bench/out/ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
WORKER = ROOT / "tests" / "ddp_worker.py"
SKIP = ("learning_rate", "epoch", "step")  # not compared between the runs


def run(ckpt: Path, out: Path, world: int, steps: int, case: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bs = 4 // world
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, str(WORKER), str(ckpt), str(out), case, "--set", f"max_steps={steps}",
               "--set", f"per_device_train_batch_size={bs}", "--set", 'eval_strategy="no"']
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed ({p.returncode})")
    return [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--case", default="messages", choices=["messages", "dpo"], help="SFT (messages) or DPO")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint  # the tests' tiny_smolvlm checkpoint

    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "smolvlm-tiny"
    fix = ROOT / "tests" / "fixtures"
    shutil.copytree(fix / "tokenizer" / "smolvlm", ckpt)
    for f in (fix / "processor" / "config").iterdir():
        shutil.copy(f, ckpt / f.name)
    write_checkpoint(ckpt, TINY_SMOLVLM, seed=3)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 49279, "pad_token_id": 2,
                                                              "bos_token_id": 1}))
    report: dict = {"case": a.case}
    logs = {}
    for world in (1, 2):
        out = tmp / f"w{world}"
        out.mkdir()
        ranks = run(ckpt, out, world, a.steps, a.case)
        # steady state: from the first step's log to the last (joining the group and the first step left out)
        times = ranks[0]["log_times"]
        steady = (len(times) - 1) * 4 / (times[-1] - times[0])
        report[f"{world}_process"] = {
            "samples_per_s": steady,
            "samples_per_s_whole_train": sum(r["samples"] for r in ranks) / max(r["wall_s"] for r in ranks),
            "bytes_all_reduced_per_step": ranks[0]["bytes_all_reduced"] / a.steps,
            "gradient_bytes_per_step": ranks[0]["grad_bytes_per_step"],
        }
        logs[world] = ranks[0]["log_history"][:-1]
    report["speedup"] = report["2_process"]["samples_per_s"] / report["1_process"]["samples_per_s"]
    report["max_abs_diff_logged"] = max(abs(x[k] - y[k]) for x, y in zip(logs[1], logs[2]) for k in x if k not in SKIP)
    print(json.dumps(report, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
