"""Data-parallel training in processes started by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), as
transformers' Trainer does it under DDP: every rank reads its own shard of each epoch's order (accelerate's
``BatchSamplerShard``), the trainable parameters start from rank 0's, the gradients are averaged over the ranks
before each optimizer step, and the loss is normalised by the label tokens of the whole global batch (SFT) or is
each rank's mean over its pairs (DPO); the logged metrics are reduced over the ranks as accelerate's ``gather`` /
``gather_for_metrics`` reduce them; ``evaluate()`` reads its shard of the eval dataset and reduces ``eval_loss`` as
transformers' evaluation loop does (``ShardedEval``).

The numbers (forward, backward, AdamW) stay in the core; this module only moves buffers between processes through
a ``CollectiveBackend``: an existing collective engine, never one of ours. ``ddp_backend="gloo"`` (the CPU default)
is torch.distributed's gloo; an NCCL backend for GPUs slots in as another ``CollectiveBackend`` in ``BACKENDS``.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import FerroVLMError, InputError

# torch DDP's default bucket size (TrainingArguments.ddp_bucket_cap_mb unset)
DEFAULT_BUCKET_CAP_MB = 25


class DistributedError(FerroVLMError):
    """Data-parallel training cannot go on: a bad torchrun environment, an unavailable ``ddp_backend``, or a
    collective that failed (another rank died, or did not answer within ``ddp_timeout`` seconds)."""


@dataclass(frozen=True)
class DistributedEnv:
    """The process's place in the run, from the variables torchrun / accelerate launch set."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> Optional[DistributedEnv]:
        """None when ``WORLD_SIZE`` is unset or 1 (a single process)."""
        env = os.environ if environ is None else environ

        def num(name: str, default: Optional[int] = None) -> int:
            raw = env.get(name)
            if raw is None:
                if default is None:
                    raise DistributedError(
                        f"WORLD_SIZE={env.get('WORLD_SIZE')} but {name} is not set: start the processes with torchrun "
                        "(or set RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
                    )
                return default
            try:
                return int(raw)
            except ValueError:
                raise DistributedError(f"{name}={raw!r} is not an integer") from None

        world = num("WORLD_SIZE", 1)
        if world <= 1:
            return None
        rank = num("RANK")
        if not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        if "MASTER_ADDR" not in env:
            raise DistributedError(f"WORLD_SIZE={world} but MASTER_ADDR is not set")
        return cls(rank=rank, local_rank=num("LOCAL_RANK", rank), world_size=world, master_addr=env["MASTER_ADDR"],
                   master_port=num("MASTER_PORT"))


class CollectiveBackend(abc.ABC):
    """What data-parallel training needs from a collective engine. Buffers are numpy arrays, changed in place;
    every call is collective (all ranks make it, in the same order) and fails with ``DistributedError`` (never
    hangs past the timeout given at creation) when a rank is gone."""

    name: str
    rank: int
    world_size: int

    @abc.abstractmethod
    def broadcast_(self, buf: np.ndarray, src: int = 0) -> None:
        """Sets ``buf`` on every rank to rank ``src``'s."""

    @abc.abstractmethod
    def all_reduce_sum_(self, buf: np.ndarray) -> None:
        """Sets ``buf`` on every rank to the element-wise sum over the ranks."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Returns when every rank has reached it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leaves the group (nothing is collective after this)."""

    def all_reduce_sum_bucketed_(self, buf: np.ndarray, bucket_bytes: int) -> None:
        """``all_reduce_sum_`` on consecutive slices of at most ``bucket_bytes`` (as torch DDP reduces gradients
        in buckets of ``ddp_bucket_cap_mb``)."""
        flat = buf.reshape(-1)
        step = max(1, bucket_bytes // max(1, flat.itemsize))
        for a in range(0, flat.size, step):
            self.all_reduce_sum_(flat[a : a + step])

    def all_gather(self, values: Sequence[float]) -> np.ndarray:
        """``[world_size, len(values)]`` float64: row r holds rank r's values."""
        rows = np.zeros((self.world_size, len(values)), dtype=np.float64)
        rows[self.rank] = np.asarray(values, dtype=np.float64)
        self.all_reduce_sum_(rows)
        return rows


class TorchGlooBackend(CollectiveBackend):
    """torch.distributed's gloo (CPU tensors sharing the numpy buffers' memory). Joins the default process group
    when one is already initialised (e.g. by accelerate), else creates it over TCP at MASTER_ADDR:MASTER_PORT."""

    name = "gloo"

    def __init__(self, env: DistributedEnv, timeout_s: float) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise DistributedError(
                "ddp_backend='gloo' uses torch.distributed's gloo, and torch is not installed: pip install torch "
                "(the CPU wheel is enough)"
            ) from None
        if not dist.is_available() or not dist.is_gloo_available():
            raise DistributedError("this torch build has no gloo backend (torch.distributed.is_gloo_available())")
        self._torch, self._dist = torch, dist
        self.rank, self.world_size = env.rank, env.world_size
        self.timeout_s = float(timeout_s)
        self._owns_group = False
        if dist.is_initialized():
            if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
                raise DistributedError(
                    f"torch.distributed is initialised with rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the environment says rank {env.rank} of {env.world_size}"
                )
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        else:
            self._call(
                "joining the process group",
                lambda: dist.init_process_group(
                    backend="gloo",
                    init_method=f"tcp://{_host(env.master_addr)}:{env.master_port}",
                    rank=env.rank,
                    world_size=env.world_size,
                    timeout=datetime.timedelta(seconds=self.timeout_s),
                ),
            )
            self._owns_group = True
            self._group = None  # the default group

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, ValueError, OSError) as err:  # DistBackendError / DistNetworkError are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(err).__name__}: {str(err).strip()}); "
                f"another rank probably died or did not answer within ddp_timeout={self.timeout_s:g}s"
            ) from err

    def _tensor(self, buf: np.ndarray) -> Any:
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise DistributedError("collectives need writeable, contiguous numpy buffers")
        return self._torch.from_numpy(buf)

    def broadcast_(self, buf: np.ndarray, src: int = 0) -> None:
        t = self._tensor(buf)
        self._call("broadcast", lambda: self._dist.broadcast(t, src=src, group=self._group))

    def all_reduce_sum_(self, buf: np.ndarray) -> None:
        t = self._tensor(buf)
        self._call("all-reduce", lambda: self._dist.all_reduce(t, group=self._group))

    def all_reduce_sum_bucketed_(self, buf: np.ndarray, bucket_bytes: int) -> None:
        # every bucket in flight at once (gloo runs them in order), then waited for
        flat = buf.reshape(-1)
        step = max(1, bucket_bytes // max(1, flat.itemsize))
        tensors = [self._tensor(flat[a : a + step]) for a in range(0, flat.size, step)]

        def run() -> None:
            works = [self._dist.all_reduce(t, group=self._group, async_op=True) for t in tensors]
            for w in works:
                w.wait()

        self._call("all-reduce of the gradients", run)

    def barrier(self) -> None:
        self._call("barrier", lambda: self._dist.barrier(group=self._group))

    def close(self) -> None:
        if self._owns_group and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass  # a group whose peers died: nothing left to release
            self._owns_group = False


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def _nccl(env: DistributedEnv, timeout_s: float) -> CollectiveBackend:
    raise NotImplementedError(
        "ddp_backend='nccl' needs ferrovlm's CUDA build, which is not available yet; on CPUs use ddp_backend='gloo' "
        "(with use_cpu=True)"
    )


# ddp_backend -> the backend's factory (an NCCL one for the CUDA build goes here)
BACKENDS: dict[str, Callable[[DistributedEnv, float], CollectiveBackend]] = {"gloo": TorchGlooBackend, "nccl": _nccl}


_JOINED: dict[tuple[str, DistributedEnv], CollectiveBackend] = {}


def create_backend(ddp_backend: Optional[str], env: DistributedEnv, timeout_s: float) -> CollectiveBackend:
    """The backend TrainingArguments' ``ddp_backend`` names (None: gloo, what transformers uses on CPUs). A process
    joins the group once (as accelerate does) and leaves it at exit; later runs in it reuse the group."""
    name = "gloo" if ddp_backend is None else str(ddp_backend)
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"ddp_backend={name!r} is not supported; choose one of {sorted(BACKENDS)}")
    key = (name, env)
    if key not in _JOINED:
        if not _JOINED:
            atexit.register(_leave_all)
        _JOINED[key] = factory(env, timeout_s)
    return _JOINED[key]


def _leave_all() -> None:
    while _JOINED:
        _JOINED.popitem()[1].close()


def shard_micro_batches(order: Sequence[int], bs: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: ``order`` cut into batches of ``bs``, batch i going to rank
    i % world_size, as accelerate's ``BatchSamplerShard`` (``even_batches=True``, ``drop_last=False``) deals
    them: when the batches do not fill every rank equally, or the last is short, the missing rows are the
    epoch's first ones again (so every rank gets the same number of full batches)."""
    order = [int(i) for i in order]
    n_batches = -(-len(order) // bs)
    rounds = -(-n_batches // world_size)
    deficit = rounds * world_size * bs - len(order)
    if deficit:
        first = order[: world_size * bs]  # the first round's rows, repeated while they are too few
        while len(first) < world_size * bs:
            first = first + first
        order = order + first[:deficit]
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    return batches[rank::world_size]


class DataParallel:
    """What the trainer does with the other ranks: starting parameters, gradient averaging, global counts and
    the gathered metrics. Counts what it all-reduces (``bytes_all_reduced``)."""

    def __init__(self, backend: CollectiveBackend, bucket_cap_mb: Optional[int] = None) -> None:
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.bucket_bytes = int((bucket_cap_mb or DEFAULT_BUCKET_CAP_MB) * 1024 * 1024)
        self.bytes_all_reduced = 0
        self.grad_bytes_per_step = 0

    @classmethod
    def from_args(cls, args: Any) -> Optional[DataParallel]:
        """None for a single process; else joins the group TrainingArguments' ddp_backend names."""
        env = DistributedEnv.from_environ()
        if env is None:
            return None
        timeout = float(getattr(args, "ddp_timeout", 1800) or 1800)
        return cls(create_backend(getattr(args, "ddp_backend", None), env, timeout),
                   getattr(args, "ddp_bucket_cap_mb", None))

    def broadcast_parameters(self, session: Any) -> None:
        """Every rank starts from rank 0's trainable parameters (as DDP's constructor broadcasts them)."""
        flat = np.ascontiguousarray(session.flat_parameters(), dtype=np.float32)
        self.backend.broadcast_(flat, src=0)
        if self.rank != 0:
            session.set_flat_parameters(flat)

    def average_gradients(self, session: Any) -> None:
        """The accumulated gradients averaged over the ranks (sum in buckets, then / world size); a tensor that
        has a gradient on any rank has one on all."""
        flat, present = session.flat_grads()
        flat = np.ascontiguousarray(flat, dtype=np.float32)
        flags = present.astype(np.float32)
        self.backend.all_reduce_sum_bucketed_(flat, self.bucket_bytes)
        self.backend.all_reduce_sum_(flags)
        self.grad_bytes_per_step = flat.nbytes + flags.nbytes
        self.bytes_all_reduced += self.grad_bytes_per_step
        session.set_flat_grads(flat, flags > 0, 1.0 / self.world_size)

    def sum(self, value: float) -> float:
        buf = np.array([value], dtype=np.float64)
        self.backend.all_reduce_sum_(buf)
        self.bytes_all_reduced += buf.nbytes
        return float(buf[0])

    def gather(self, values: Sequence[float]) -> np.ndarray:
        rows = self.backend.all_gather(values)
        self.bytes_all_reduced += rows.nbytes
        return rows

    def barrier(self) -> None:
        self.backend.barrier()

    def gather_metrics(self, for_metrics: Sequence[float], gathered: Sequence[float] = (),
                       ranks: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """One all-gather of a micro-batch's metric sums: ``for_metrics`` summed over the first ``ranks`` ranks
        (accelerate's ``gather_for_metrics``, which drops the ranks that only repeat rows at a dataloader's end),
        ``gathered`` over all of them (accelerate's ``gather``)."""
        k = len(for_metrics)
        rows = self.gather([*for_metrics, *gathered])
        return rows[: self.world_size if ranks is None else ranks, :k].sum(axis=0), rows[:, k:].sum(axis=0)


def rank_batches(order: Sequence[int], bs: int, dp: Optional[DataParallel]) -> list[list[int]]:
    """The micro-batches of ``order`` this process reads: all of them (one process) or its shard."""
    if dp is None:
        return [[int(i) for i in order[a : a + bs]] for a in range(0, len(order), bs)]
    return shard_micro_batches(order, bs, dp.world_size, dp.rank)


def metric_ranks(n: int, bs: int, world_size: int, last: bool) -> int:
    """The ranks whose values accelerate's ``gather_for_metrics`` keeps: all, except at a dataloader's last batch
    when len(dataset) % (batch x world size) = k > 0 rows are left: then the first k (a per-rank scalar counts as
    one row)."""
    left = n % (bs * world_size)
    return min(world_size, left) if last and left else world_size


def global_items(dp: Optional[DataParallel], n_items: float) -> float:
    """transformers' ``num_items_in_batch`` of a step: this rank's count, or under data parallelism the count of
    the whole global step / world size (each rank's loss is then scaled by the world size, and DDP averages the
    gradients: the gradient of the global mean)."""
    return n_items if dp is None else dp.sum(n_items) / dp.world_size


class ShardedEval:
    """transformers' evaluation loop over ``n`` rows, ``bs`` a batch, as this process reads them: the sequential
    order cut into batches, dealt over the ranks (``BatchSamplerShard``: the last ones filled with the first rows);
    each batch's loss is repeated ``per_device_eval_batch_size`` times, gathered over the ranks, and at the last
    batch only the first ``n % (bs x world size)`` of those repeats are kept (``gather_for_metrics``);
    ``eval_loss`` is their mean. In one process that is the row-weighted mean of the batch losses."""

    def __init__(self, n: int, bs: int, dp: Optional[DataParallel]) -> None:
        if n == 0:
            raise InputError("evaluate(): the eval dataset is empty")
        if bs < 1:
            raise InputError(f"evaluate(): per_device_eval_batch_size must be at least 1, not {bs}")
        self.dp, self.bs = dp, bs
        self.world_size = dp.world_size if dp is not None else 1
        self.n = n
        self.batches = rank_batches(range(n), bs, dp)
        self.remainder = n % (bs * self.world_size)
        self.total, self.count = 0.0, 0

    def metric_ranks(self, i: int) -> int:
        """The ranks ``gather_for_metrics`` keeps at batch ``i``."""
        return metric_ranks(self.n, self.bs, self.world_size, i == len(self.batches) - 1)

    def add_loss(self, i: int, loss: float) -> None:
        losses = self.dp.gather([loss])[:, 0] if self.dp is not None else np.array([loss])
        keep = self.remainder if i == len(self.batches) - 1 and self.remainder else self.bs * self.world_size
        for value in losses:  # rank by rank, as the gathered repeats lie
            copies = min(self.bs, keep)
            self.total += float(value) * copies
            self.count += copies
            keep -= copies

    @property
    def loss(self) -> float:
        return self.total / self.count


def eval_speed(prefix: str, runtime: float, ev: ShardedEval) -> dict[str, float]:
    """transformers' ``speed_metrics`` of an evaluation: the rows of the whole eval dataset and this rank's
    batches over the wall time."""
    return {
        f"{prefix}_runtime": round(runtime, 4),
        f"{prefix}_samples_per_second": round(ev.n / runtime, 3) if runtime > 0 else 0.0,
        f"{prefix}_steps_per_second": round(len(ev.batches) / runtime, 3) if runtime > 0 else 0.0,
    }


@contextlib.contextmanager
def evaluation_group(trainer: Any) -> Iterator[Optional[DataParallel]]:
    """The ranks an ``evaluate()`` call shares its batches with: ``train()``'s group while training, else (an
    ``evaluate()`` of its own under ``WORLD_SIZE`` > 1) the group the trainer's args name; None in one process.
    Sets ``trainer._dp`` meanwhile (the metrics gather over it) and keeps ``trainer._metric_ranks``."""
    outer, ranks = trainer._dp, trainer._metric_ranks
    trainer._dp = outer if outer is not None else DataParallel.from_args(trainer.args)
    try:
        yield trainer._dp
    finally:
        trainer._dp, trainer._metric_ranks = outer, ranks
