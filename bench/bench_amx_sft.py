"""`bf16=True` SFT on a SmolVLM-256M-shaped checkpoint with ferrovlm's AMX tile kernels vs its AVX512-BF16
ones (`FERROVLM_NO_AMX=1`), the same workload as `bench_sft.py --bf16` (ferrovlm's side only, no torch
needed), each run in its own process, the two alternating so that other load on a shared machine slows
both alike. Prints each run's training time, samples/s, achieved GFLOP/s (bench/flops.py's nominal count),
losses, and the load average.

    python bench/bench_amx_sft.py [--steps 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from tiny_checkpoint import SMOLVLM_256M, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_checkpoint(Path(tmp) / "smolvlm-256m-random", SMOLVLM_256M, seed=0, dtype="bfloat16"))
        runs = []
        for r in range(args.rounds):
            for name in ("avx512bf16", "amx"):
                env = os.environ.copy()
                env.pop("FERROVLM_NO_AMX", None)
                if name == "avx512bf16":
                    env["FERROVLM_NO_AMX"] = "1"
                cmd = [sys.executable, str(HERE / "bench_sft.py"), "--side", "ferrovlm", "--ckpt", ckpt,
                       "--steps", str(args.steps), "--bf16"]
                load = os.getloadavg()[0]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.stderr.write(out.stderr[-4000:])
                    raise RuntimeError(f"{name} failed: {' '.join(cmd)}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                gflop = res["flops"]["nominal"]["total"] / 1e9
                runs.append((name, r, res, load))
                print(f"round {r} {name:>10}: train {res['train_s']:7.2f} s  {res['samples_per_s']:6.3f} samples/s  "
                      f"{gflop / res['train_s']:7.1f} GFLOP/s  losses {[round(x, 4) for x in res['losses']]}  "
                      f"load {load:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        for name in ("avx512bf16", "amx"):
            best = min(res["train_s"] for n, _, res, _ in runs if n == name)
            print(f"best {name:>10}: {best:.2f} s")


if __name__ == "__main__":
    main()
