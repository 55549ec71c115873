"""Data-parallel training on CPUs: two processes on the loopback address with the environment torchrun sets, and
``use_cpu=True, ddp_backend="gloo"`` as a TRL user writes it, reproduce TRL's own two-process run
(tests/fixtures/ddp, from scripts/reference/ddp_gloo.py); a killed rank makes the other fail with
``DistributedError`` within a bounded time. The process tests need torch (gloo is torch.distributed's) and are
skipped without it; the data sharding is checked without processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ferrovlm
from conftest import FIXTURES
from ddp_worker import load_rows
from ferrovlm.distributed import DistributedEnv, DistributedError, shard_micro_batches
from ferrovlm.trainer import epoch_order

DDP = FIXTURES / "ddp"
CASES = ["messages", "accum", "loopback", "remainder"]
KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step")
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
PACKAGE_ROOT = str(Path(ferrovlm.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(ckpt: Path, out: Path, cases: list[str], world: int = 2, extra: tuple[str, ...] = ()) -> list:
    """Starts `world` worker processes with torchrun's environment; returns the Popen objects."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), *cases, *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list, timeout: float) -> list[tuple[int, str]]:
    """Waits for every process (killing them all past `timeout` seconds); (returncode, stderr) of each."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            _, err = p.communicate()
            pytest.fail(f"the processes did not finish within {timeout}s:\n{err[-3000:]}")
        out.append((p.returncode, err))
    return out


# -- without processes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_each_rank_reads_the_rows_accelerate_gives_it(case):
    """accelerate's BatchSamplerShard over transformers' seeded order, as TRL's ranks recorded them."""
    args = json.loads((DDP / case / "args.json").read_text())
    which = json.loads((DDP / case / "rows.json").read_text())
    shards = json.loads((DDP / case / "shards.json").read_text())
    bs, world = args["per_device_train_batch_size"], shards["world_size"]
    for rank, want in enumerate(shards["ranks"]):
        got: list[list[int]] = []
        epoch = 0
        while len(got) < len(want["micro_batches"]):
            got += shard_micro_batches(epoch_order(len(which), args["seed"], epoch), bs, world, rank)
            epoch += 1
        got = [[which[i] for i in b] for b in got[: len(want["micro_batches"])]]
        assert got == want["micro_batches"], f"rank {rank}"


def test_shard_micro_batches_cycles_the_first_rows():
    assert shard_micro_batches([4, 2, 0, 1, 3], 2, 2, 0) == [[4, 2], [3, 4]]
    assert shard_micro_batches([4, 2, 0, 1, 3], 2, 2, 1) == [[0, 1], [2, 0]]
    # fewer rows than one round: the first rows repeat until every rank has a full batch
    assert shard_micro_batches([1, 0], 3, 2, 0) == [[1, 0, 1]]
    assert shard_micro_batches([1, 0], 3, 2, 1) == [[0, 1, 0]]
    assert shard_micro_batches(list(range(8)), 2, 2, 1) == [[2, 3], [6, 7]]


def test_environment():
    assert DistributedEnv.from_environ({}) is None
    assert DistributedEnv.from_environ({"WORLD_SIZE": "1"}) is None
    env = DistributedEnv.from_environ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                                       "MASTER_PORT": "29500"})
    assert env == DistributedEnv(rank=1, local_rank=1, world_size=2, master_addr="h", master_port=29500)
    with pytest.raises(DistributedError, match="RANK is not set"):
        DistributedEnv.from_environ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(DistributedError, match="outside"):
        DistributedEnv.from_environ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(DistributedError, match="not an integer"):
        DistributedEnv.from_environ({"WORLD_SIZE": "two"})
    assert issubclass(DistributedError, ferrovlm.FerroVLMError) and ferrovlm.DistributedError is DistributedError


def test_flat_gradient_and_parameter_buffers(tiny_smolvlm):
    """What the ranks exchange: the accumulated gradients / trainable values as one buffer, in param_names order."""
    from ferrovlm import AutoModelForImageTextToText, LoraConfig, _core, get_peft_model
    from ferrovlm.data_collator import DataCollatorForVisionLanguageModeling
    from ferrovlm.processing import AutoProcessor
    from ferrovlm.trainer import _batch_arrays

    peft = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_smolvlm),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    session = _core.TrainSession(peft._core)
    sizes = [int(np.prod(v.shape)) for v in (_core.adapter_state(peft._core)[n] for n in session.param_names)]
    assert session.numel == sum(sizes)
    flat, present = session.flat_grads()
    assert flat.dtype == np.float32 and flat.shape == (session.numel,) and not flat.any() and not present.any()
    collate = DataCollatorForVisionLanguageModeling(AutoProcessor.from_pretrained(tiny_smolvlm))
    batch = _batch_arrays(collate(load_rows([0, 1])))
    session.forward_backward(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"])
    grads = session.grads()
    flat, present = session.flat_grads()
    assert present.all()
    offsets = np.cumsum([0, *sizes])
    for i, name in enumerate(session.param_names):
        np.testing.assert_array_equal(flat[offsets[i] : offsets[i + 1]], grads[name].reshape(-1), err_msg=name)
    # import: scaled, and a tensor without a gradient gets none
    keep = present.copy()
    keep[0] = False
    session.set_flat_grads(flat * 4, keep, 0.25)
    after = session.grads()
    assert session.param_names[0] not in after
    for name in session.param_names[1:]:
        np.testing.assert_array_equal(after[name], grads[name], err_msg=name)
    with pytest.raises(ferrovlm.InputError, match="flat gradient buffer"):
        session.set_flat_grads(flat[:-1], present)
    values = session.flat_parameters()
    session.set_flat_parameters(values + 1)
    np.testing.assert_array_equal(session.flat_parameters(), values + 1)
    state = _core.adapter_state(peft._core)  # the model sees the values
    name = session.param_names[-1]
    np.testing.assert_array_equal(state[name].reshape(-1), (values + 1)[offsets[-2] :])


# -- two processes ------------------------------------------------------------------------------------------------
def test_two_processes_match_trl(tiny_smolvlm, tmp_path):
    pytest.importorskip("torch")
    # buckets of 4 KB: the gradient buffer goes in several all-reduces
    results = finish(launch(tiny_smolvlm, tmp_path, CASES, extra=("--bucket-bytes", "4096")), timeout=600)
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
    worst = 0.0
    for case in CASES:
        want = json.loads((DDP / case / "log_history.json").read_text())
        shards = json.loads((DDP / case / "shards.json").read_text())
        runs = [json.loads((tmp_path / f"{case}.rank{r}.json").read_text()) for r in range(2)]
        for r, run in enumerate(runs):
            assert run["world_size"] == 2
            assert run["micro_batches"] == shards["ranks"][r]["micro_batches"], f"{case} rank {r}"
            got = run["log_history"]  # every rank keeps the log, as transformers' Trainer
            assert len(got) == len(want), case
            for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
                for k in KEYS:
                    np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-7, err_msg=f"{case} step {i + 1} {k}")
                    worst = max(worst, abs(g[k] - w[k]))
            np.testing.assert_allclose(got[-1]["train_loss"], want[-1]["train_loss"], rtol=1e-4)
        assert runs[0]["bytes_all_reduced"] > runs[0]["grad_bytes_per_step"] * 3 > 3 * 4096
    print(f"largest |ferrovlm - TRL| over the logged values: {worst:.3g}")


def test_rank_zero_saves_and_both_resume(tiny_smolvlm, tmp_path):
    """Checkpoints under data parallelism: rank 0 writes checkpoint-2 (the other waits), and both ranks resuming
    from it redo TRL's step 3."""
    pytest.importorskip("torch")
    want = json.loads((DDP / "accum" / "log_history.json").read_text())
    save = ("--set", 'save_strategy="steps"', "--set", "save_steps=2")
    first = finish(launch(tiny_smolvlm, tmp_path, ["accum"], extra=save), timeout=300)  # 3 steps, saves at 2
    assert [rc for rc, _ in first] == [0, 0], first[0][1][-3000:] + first[1][1][-3000:]
    out = tmp_path / "accum.out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    again = finish(launch(tiny_smolvlm, tmp_path, ["accum"], extra=(*save, "--resume")), timeout=300)
    assert [rc for rc, _ in again] == [0, 0], again[0][1][-3000:] + again[1][1][-3000:]
    for r in range(2):
        got = json.loads((tmp_path / f"accum.rank{r}.json").read_text())["log_history"]
        assert [e["step"] for e in got] == [1, 2, 3, 3]
        for k in KEYS:
            np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-4, atol=1e-7, err_msg=f"rank {r} step 3 {k}")


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_a_dead_or_hung_rank_makes_the_other_fail(tiny_smolvlm, tmp_path, how):
    """Rank 1 dies (SIGKILL: rank 0's next collective fails at once) or hangs (SIGSTOP: after ddp_timeout)."""
    pytest.importorskip("torch")
    timeout = 10
    t0 = time.monotonic()
    procs = launch(tiny_smolvlm, tmp_path, ["messages"],
                   extra=("--set", f"ddp_timeout={timeout}", "--kill-rank", "1", "--kill-step", "1",
                          "--kill-signal", how))
    try:
        rc0, err0 = finish(procs[:1], timeout=180)[0]
        elapsed = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert rc0 != 0
    assert "DistributedError" in err0 and "rank 0 of 2" in err0 and f"ddp_timeout={timeout}s" in err0, err0[-3000:]
    assert elapsed < 120
    if how == "KILL":
        assert procs[1].returncode == -signal.SIGKILL
