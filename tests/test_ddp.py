"""Data-parallel training and evaluation on CPUs: two processes on the loopback address with the environment torchrun
sets, and ``use_cpu=True, ddp_backend="gloo"`` as a TRL user writes it, reproduce TRL's own two-process SFT and DPO
runs with their sharded evaluations (tests/fixtures/ddp, from scripts/reference/ddp_gloo.py); a killed rank makes
the other fail with ``DistributedError`` within a bounded time. The process tests need torch (gloo is
torch.distributed's) and are skipped without it; the data sharding and the evaluation's reductions are checked
without processes."""

from __future__ import annotations

import json
import os
import shutil
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
from ferrovlm.distributed import (
    CollectiveBackend,
    DataParallel,
    DistributedEnv,
    DistributedError,
    ShardedEval,
    metric_ranks,
    shard_micro_batches,
)
from ferrovlm.trainer import epoch_order

DDP = FIXTURES / "ddp"
CASES = ["messages", "accum", "loopback", "remainder"]  # SFT training
EVAL_CASES = ["sft_eval", "dpo", "dpo_accum"]  # SFT with evaluations, DPO with evaluations
KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step")
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second"}
UNCOMPARED = TIMING_KEYS | {"total_flos"}  # wall-clock values; ferrovlm does not estimate FLOPs (0.0)
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
class _Peer:
    """Rank 0 of 2 whose partner's contributions to each all-reduce are scripted."""

    def __init__(self, peer_rows: list[np.ndarray]) -> None:
        self.rank, self.world_size, self.peer_rows = 0, 2, list(peer_rows)

    def all_reduce_sum_(self, buf: np.ndarray) -> None:
        buf += self.peer_rows.pop(0).reshape(buf.shape)

    all_gather = CollectiveBackend.all_gather


@pytest.mark.parametrize("case", CASES + EVAL_CASES)
def test_each_rank_reads_the_rows_accelerate_gives_it(case):
    """accelerate's BatchSamplerShard over transformers' seeded order (training) and the sequential order
    (evaluation), as TRL's ranks recorded them."""
    args = json.loads((DDP / case / "args.json").read_text())
    which = json.loads((DDP / case / "rows.json").read_text())
    shards = json.loads((DDP / case / "shards.json").read_text())
    setup = json.loads((DDP / case / "setup.json").read_text())
    bs, world = args["per_device_train_batch_size"], shards["world_size"]
    for rank, want in enumerate(shards["ranks"]):
        got: list[list[int]] = []
        epoch = 0
        while len(got) < len(want["micro_batches"]):
            got += shard_micro_batches(epoch_order(len(which), args["seed"], epoch), bs, world, rank)
            epoch += 1
        got = [[which[i] for i in b] for b in got[: len(want["micro_batches"])]]
        assert got == want["micro_batches"], f"rank {rank}"
        if setup["eval_rows"] is None:
            assert want["eval_batches"] == []
            continue
        rows = setup["eval_rows"]
        once = shard_micro_batches(range(len(rows)), args["per_device_eval_batch_size"], world, rank)
        once = [[rows[i] for i in b] for b in once]
        assert len(want["eval_batches"]) % len(once) == 0 and want["eval_batches"] == once * (
            len(want["eval_batches"]) // len(once)), f"rank {rank}"


def test_sharded_eval_reductions():
    """transformers' evaluation loop: each batch's loss repeated per_device_eval_batch_size times, gathered, the
    repeats of rows past the dataset's end dropped at the last batch; gather_for_metrics keeps the first
    len % (batch x world) ranks there."""
    one = ShardedEval(5, 2, None)  # one process: the last batch (1 row) weighs 1
    assert one.batches == [[0, 1], [2, 3], [4]]
    for i, loss in enumerate([1.0, 2.0, 4.0]):
        one.add_loss(i, loss)
    assert one.count == 5 and one.loss == pytest.approx((2 + 4 + 4) / 5)
    assert [one.metric_ranks(i) for i in range(3)] == [1, 1, 1]
    # rank 0 of 2, 5 rows, 2 a batch: batches [0 1] [4 0] (rank 1: [2 3] [1 2]); 5 % 4 = 1 repeat kept at the end
    dp = DataParallel(_Peer([np.array([[0.0], [3.0]]), np.array([[0.0], [7.0]])]))  # type: ignore[arg-type]
    ev = ShardedEval(5, 2, dp)
    assert ev.batches == [[0, 1], [4, 0]]
    ev.add_loss(0, 1.0)
    ev.add_loss(1, 5.0)  # rank 1's 7.0 is past the end
    assert ev.count == 5 and ev.loss == pytest.approx((1 + 1 + 3 + 3 + 5) / 5)
    assert [ev.metric_ranks(0), ev.metric_ranks(1)] == [2, 1]
    assert metric_ranks(7, 2, 2, last=True) == 2 and metric_ranks(8, 2, 2, last=True) == 2
    assert metric_ranks(5, 1, 4, last=True) == 1 and metric_ranks(5, 1, 4, last=False) == 4
    # gather_metrics: the first group over the kept ranks, the second over all
    dp = DataParallel(_Peer([np.array([[0.0, 0.0], [10.0, 20.0]])]))  # type: ignore[arg-type]
    kept, everywhere = dp.gather_metrics([1.0], [2.0], ranks=1)
    assert kept.tolist() == [1.0] and everywhere.tolist() == [22.0]
    with pytest.raises(ferrovlm.InputError, match="eval dataset is empty"):
        ShardedEval(0, 2, None)
    with pytest.raises(ferrovlm.InputError, match="per_device_eval_batch_size must be at least 1"):
        ShardedEval(3, 0, None)


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
            assert got[-1]["total_flos"] == want[-1]["total_flos"], case  # summed over the ranks
        assert runs[0]["bytes_all_reduced"] > runs[0]["grad_bytes_per_step"] * 3 > 3 * 4096
    print(f"largest |ferrovlm - TRL| over the logged values: {worst:.3g}")


def test_dpo_and_evaluation_match_trl(tiny_smolvlm, tmp_path):
    """DPO training and SFT / DPO evaluations in two processes: every logged value of TRL's run (timings aside),
    each rank reading the batches TRL's did."""
    pytest.importorskip("torch")
    results = finish(launch(tiny_smolvlm, tmp_path, EVAL_CASES), timeout=600)
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
    worst = {"train": (0.0, ""), "eval": (0.0, "")}  # the largest |ours - TRL| and where
    for case in EVAL_CASES:
        want = json.loads((DDP / case / "log_history.json").read_text())
        shards = json.loads((DDP / case / "shards.json").read_text())
        for r in range(2):
            run = json.loads((tmp_path / f"{case}.rank{r}.json").read_text())
            assert run["micro_batches"] == shards["ranks"][r]["micro_batches"], f"{case} rank {r}"
            assert run["eval_batches"] == shards["ranks"][r]["eval_batches"], f"{case} rank {r}"
            got = run["log_history"]
            assert [sorted(set(e) - TIMING_KEYS) for e in got] == [sorted(set(e) - TIMING_KEYS) for e in want], case
            assert any("eval_loss" in e for e in got), case
            # evaluate() called alone after train(): the evaluation after the last step again
            last_eval = [e for e in want if "eval_loss" in e][-1]
            after = run["evaluate_after_train"]
            assert sorted(set(after) - TIMING_KEYS) == sorted(set(last_eval) - TIMING_KEYS - {"epoch", "step"})
            for k in set(after) - TIMING_KEYS:
                np.testing.assert_allclose(after[k], last_eval[k], rtol=1e-4, atol=1e-6, err_msg=f"{case} {k}")
            for i, (g, w) in enumerate(zip(got, want)):
                kind = "eval" if "eval_loss" in g else "train"
                for k in sorted(set(w) - UNCOMPARED):
                    np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-6,
                                               err_msg=f"{case} rank {r} entry {i} {k}")
                    worst[kind] = max(worst[kind], (abs(g[k] - w[k]), f"{case} {k}"))
    print("largest |ferrovlm - TRL|: " + ", ".join(f"{kind} entries {d:.3g} ({at})" for kind, (d, at) in worst.items()))


@pytest.mark.parametrize("case", ["accum", "dpo_accum"])
def test_rank_zero_saves_and_both_resume(tiny_smolvlm, tmp_path, case):
    """Checkpoints under data parallelism (SFT, DPO): rank 0 writes checkpoint-2 (the other waits), and both ranks
    resuming from it redo TRL's step 3 (DPO: against the reference adapter of the start, not the checkpoint's)."""
    pytest.importorskip("torch")
    want = json.loads((DDP / case / "log_history.json").read_text())
    want3 = next(e for e in want if e["step"] == 3 and "loss" in e)
    save = ("--set", 'save_strategy="steps"', "--set", "save_steps=2", "--set", 'eval_strategy="no"')
    first = finish(launch(tiny_smolvlm, tmp_path, [case], extra=save), timeout=300)  # 3 steps, saves at 2 and 3
    assert [rc for rc, _ in first] == [0, 0], first[0][1][-3000:] + first[1][1][-3000:]
    out = tmp_path / f"{case}.out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    shutil.rmtree(out / "checkpoint-3")  # a run cut off after step 2
    again = finish(launch(tiny_smolvlm, tmp_path, [case], extra=(*save, "--resume")), timeout=300)
    assert [rc for rc, _ in again] == [0, 0], again[0][1][-3000:] + again[1][1][-3000:]
    for r in range(2):
        got = json.loads((tmp_path / f"{case}.rank{r}.json").read_text())["log_history"]
        assert [e["step"] for e in got] == [1, 2, 3, 3]
        assert set(got[2]) == set(want3)
        for k in want3:
            np.testing.assert_allclose(got[2][k], want3[k], rtol=1e-4, atol=1e-6, err_msg=f"rank {r} step 3 {k}")


@pytest.mark.parametrize(("case", "how"), [("messages", "KILL"), ("messages", "STOP"), ("dpo", "KILL")])
def test_a_dead_or_hung_rank_makes_the_other_fail(tiny_smolvlm, tmp_path, case, how):
    """Rank 1 dies (SIGKILL: rank 0's next collective fails at once) or hangs (SIGSTOP: after ddp_timeout), in
    SFT or DPO training."""
    pytest.importorskip("torch")
    timeout = 10
    t0 = time.monotonic()
    procs = launch(tiny_smolvlm, tmp_path, [case],
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
