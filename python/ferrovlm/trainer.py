"""The training loop shared by ``SFTTrainer`` and ``DPOTrainer``: data order, gradient accumulation,
schedules, logging (``state.log_history`` with TRL's keys), checkpoints and resuming. Numbers (forward,
backward, optimizer) are computed in Rust by ``_core.TrainSession``; this file only drives it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._mt19937 import torch_randperm
from ._tensors import to_numpy
from .distributed import DataParallel, global_items, metric_ranks, rank_batches
from .errors import FerroVLMError
from .flos import flos_parameters, micro_batch_flos
from .trainer_utils import (  # noqa: F401 (re-exported: ferrovlm.trainer is where users of transformers look)
    OPTIMIZER_NAME,
    PREFIX_CHECKPOINT_DIR,
    RNG_STATE_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
    TrainerState,
    TrainOutput,
    sorted_checkpoints,
)


class TrainingError(FerroVLMError):
    """Training cannot go on (a non-finite loss, rows without labels, ...)."""


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The row order of one epoch: torch's RandomSampler as transformers seeds it (``seed + epoch``)."""
    return torch_randperm(n, seed + epoch) if shuffle else list(range(n))


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class _TrainPlan(NamedTuple):
    """The sizes of a run: rows, micro-batch size, accumulation steps, micro-batches and optimizer steps per
    epoch, optimizer steps in all, epochs."""

    n: int
    bs: int
    accum: int
    micro_per_epoch: int
    steps_per_epoch: int
    max_steps: int
    epochs: int


@dataclass
class _TrainingRun:
    """What one ``train()`` call carries from step to step besides ``TrainerState``."""

    plan: _TrainPlan
    session: Any  # the core's TrainSession
    logging_steps: int
    save_steps: int
    eval_steps: int
    save_strategy: str
    eval_strategy: str
    start_step: int
    t0: float
    bar: Any
    tr_loss: float = 0.0
    loss_since_log: float = 0.0
    steps_since_log: int = 0
    samples_seen: int = 0
    grad_norm: Optional[float] = None
    dp: Optional[DataParallel] = None  # the other ranks (WORLD_SIZE > 1)
    flos_parameters: int = 0  # see flos.py
    flos: float = 0.0  # since the last store into state.total_flos (transformers' current_flos)


def _strategy(args: Any, name: str) -> str:
    """``args.save_strategy`` / ``args.eval_strategy`` as a string ("no" when args has none)."""
    value = getattr(args, name, "no")
    return str(getattr(value, "value", value))


def _progress(total: int, initial: int, disable: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)


def _batch_arrays(batch: Any) -> dict[str, Any]:
    """A collator's output (BatchFeature / dict of numpy or torch) as the core's numpy inputs."""
    get = batch.get if hasattr(batch, "get") else batch.__getitem__
    out: dict[str, Any] = {}
    out["input_ids"] = to_numpy(get("input_ids"), np.int64, "input_ids")
    labels = get("labels")
    if labels is None:
        raise TrainingError(
            "the batch has no 'labels': the data collator must return labels (input_ids with -100 where no loss is "
            "taken)"
        )
    out["labels"] = to_numpy(labels, np.int64, "labels")
    am = get("attention_mask")
    out["attention_mask"] = to_numpy(am, np.int64, "attention_mask") if am is not None else None
    px = get("pixel_values")
    out["pixel_values"] = to_numpy(px, np.float32, "pixel_values") if px is not None else None
    pam = get("pixel_attention_mask")
    out["pixel_attention_mask"] = to_numpy(pam, np.bool_, "pixel_attention_mask") if pam is not None else None
    return out


def num_label_tokens(labels: np.ndarray) -> int:
    """Label tokens after the causal shift (TRL's ``num_items_in_batch``)."""
    return int((labels[:, 1:] != -100).sum())


def no_decay_names(names: Sequence[str]) -> list[str]:
    """transformers' decay groups: biases, norm weights (by name) and the parameters of LayerNorm modules
    (the vision tower's ``layer_norm1`` / ``layer_norm2``) get no weight decay."""
    pat = re.compile(r"(bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)|\.layer_norm\d*\.)")
    return [n for n in names if pat.search(n.lower())]


def full_training_names(model: Any) -> list[str]:
    """The model's own parameters a trainer trains (``requires_grad`` True): every parameter of a plain
    model unless frozen; none of a PEFT model's base unless unfrozen (PEFT freezes it)."""
    inner = getattr(model, "_peft_model", None)
    base = inner.base_model.model if inner is not None else model
    names = getattr(base, "trainable_parameter_names", None)
    return list(names()) if names is not None else []


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


class BaseTrainer:
    """What SFT and DPO share. Subclasses provide ``_collate(rows)`` and ``_micro_step(batch, scale, ...)``."""

    _tag = "train"

    def __init__(self, model: Any, args: Any, train_dataset: Any, eval_dataset: Any, callbacks: Any = None) -> None:
        core = getattr(model, "_core", None)
        if core is not None and core.quantization[0] not in (None, "gguf") and not _core.trainable_shapes(core):
            # transformers' Trainer: a quantized base cannot be trained itself (its weights are frozen codes).
            raise ValueError(
                "You cannot perform fine-tuning on purely quantized models. Please attach trainable adapters on top of"
                " the quantized model to correctly perform fine-tuning (peft_config= or get_peft_model())."
            )
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.state = TrainerState()
        self.callbacks = list(callbacks or [])
        self._session: Optional[Any] = None
        self._metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self._dp: Optional[DataParallel] = None  # set while train() runs in several processes
        # ranks whose metrics count in this step: accelerate's gather_for_metrics keeps the first
        # len(dataset) % (batch x world size) of them at an epoch's last step
        self._metric_ranks = 1

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """transformers' evaluation loop runs the model in eval mode (int8 layers: LLM.int8's product)."""
        was = bool(getattr(self.model, "training", False))
        _core.set_training(self.model._core, False)
        try:
            yield
        finally:
            _core.set_training(self.model._core, was)

    # -- core session -----------------------------------------------------------------------------
    @property
    def session(self) -> Any:
        if self._session is None:
            core = self.model._core
            adapters = [n for n, _ in _core.trainable_shapes(core)]
            base = full_training_names(self.model)  # transformers: every parameter with requires_grad
            peft = bool(adapters or _core.saved_module_params(core))  # PEFT's names (the core's rule)
            names = adapters + [("base_model.model." if peft else "") + n for n in base]
            if not names:
                raise TrainingError(
                    "the model has no trainable parameters: every parameter has requires_grad=False; pass"
                    " peft_config= or a model from get_peft_model(), or unfreeze some (requires_grad_())"
                )
            a = self.args
            self._session = _core.TrainSession(
                core,
                float(a.weight_decay),
                float(a.adam_beta1),
                float(a.adam_beta2),
                float(a.adam_epsilon),
                no_decay_names(names),
                bf16=bool(a.bf16),  # transformers' CPU autocast: frozen weights' products in bf16
                trainable=base,
            )
        return self._session

    # -- sizes ------------------------------------------------------------------------------------
    def _dataset_len(self, ds: Any) -> int:
        try:
            return len(ds)
        except TypeError:
            raise TypeError(
                "train_dataset must have a length (a list or a datasets.Dataset); iterable datasets are not supported"
            ) from None

    def _plan(self) -> _TrainPlan:
        a = self.args
        n = self._dataset_len(self.train_dataset)
        if n == 0:
            raise TrainingError("train_dataset is empty")
        bs, accum = int(a.per_device_train_batch_size), int(a.gradient_accumulation_steps)
        # each rank's share (accelerate's BatchSamplerShard: every rank gets as many full batches)
        micro_per_epoch = math.ceil(math.ceil(n / bs) / self._world_size())
        steps_per_epoch = max(micro_per_epoch // accum + int(micro_per_epoch % accum > 0), 1)
        if a.max_steps is not None and a.max_steps > 0:
            max_steps = int(a.max_steps)
            epochs = math.ceil(max_steps / steps_per_epoch)
        else:
            max_steps = math.ceil(a.num_train_epochs * steps_per_epoch)
            epochs = math.ceil(a.num_train_epochs)
        return _TrainPlan(n=n, bs=bs, accum=accum, micro_per_epoch=micro_per_epoch, steps_per_epoch=steps_per_epoch,
                          max_steps=max_steps, epochs=epochs)

    def _world_size(self) -> int:
        return self._dp.world_size if self._dp is not None else 1

    def _lr(self, step: int, max_steps: int) -> float:
        a = self.args
        warmup = (
            a.get_warmup_steps(max_steps) if hasattr(a, "get_warmup_steps") else int(getattr(a, "warmup_steps", 0) or 0)
        )
        kind = str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type))
        return float(a.learning_rate) * _core.lr_multiplier(kind, step, max_steps, int(warmup))

    def _rows(self, ds: Any, idx: Sequence[int]) -> list[dict[str, Any]]:
        return [ds[int(i)] for i in idx]

    def _collate_rows(self, ds: Any, idx: Sequence[int], what: str) -> dict[str, Any]:
        """Collates rows `idx` of `ds`; a collation error names the rows."""
        try:
            return self._collate(self._rows(ds, idx))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise type(err)(f"{what} rows {[int(i) for i in idx]}: {err}") from err

    # -- metrics ----------------------------------------------------------------------------------
    def _record(self, mode: str, key: str, value: float) -> None:
        self._metrics[mode].setdefault(key, []).append(float(value))

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        out = {}
        for k, vals in self._metrics[mode].items():
            if vals:
                out[k] = float(sum(vals) / len(vals))
        self._metrics[mode] = {}
        return out

    def log(self, logs: dict[str, float]) -> None:
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        logs["step"] = self.state.global_step
        self.state.log_history.append(logs)
        for cb in self.callbacks:
            fn = getattr(cb, "on_log", None)
            if fn is not None:
                fn(self.args, self.state, None, logs=logs)

    # -- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        out = Path(self.args.output_dir)
        final = out / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp = _atomic_dir(final)
        self._save_adapter(tmp)
        opt = self.session.optimizer_state()
        step = int(opt.pop("step"))
        _core.save_safetensors(
            tmp / OPTIMIZER_NAME, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in opt.items()}
        )
        (tmp / SCHEDULER_NAME).write_text(
            json.dumps({"optimizer_step": step, "lr_scheduler_type": str(self.args.lr_scheduler_type)})
        )
        (tmp / RNG_STATE_NAME).write_text(
            json.dumps({"seed": int(self.args.seed), "global_step": self.state.global_step})
        )
        self.state.save_to_json(tmp / TRAINER_STATE_NAME)
        (tmp / TRAINING_ARGS_NAME).write_text(
            self.args.to_json_string() if hasattr(self.args, "to_json_string") else "{}"
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        self._rotate_checkpoints()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = getattr(self.args, "save_total_limit", None)
        if not limit:
            return
        cps = sorted_checkpoints(self.args.output_dir)
        for old in cps[: max(0, len(cps) - int(limit))]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_adapter(self, d: Path) -> None:
        peft = getattr(self.model, "_peft_model", None) or self.model
        peft.save_pretrained(d)

    def _load_checkpoint(self, ckpt: Path) -> None:
        from .peft import WEIGHTS_NAME

        saved = set(_core.saved_module_params(self.model._core))  # modules_to_save copies: in the adapter file
        if _core.trainable_shapes(self.model._core) or saved:  # adapters
            state = _core.load_safetensors(ckpt / WEIGHTS_NAME)
            _core.load_adapter_state(self.model._core, state, True)
        # the model's own trained parameters (saved as a whole model)
        if [n for n in full_training_names(self.model) if n not in saved]:
            files = sorted(ckpt.glob("model*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{ckpt}: no model.safetensors to resume full-parameter training from")
            state = {}
            for f in files:
                state.update(_core.load_safetensors(f))
            self.session.load_parameters(state)
        opt = dict(_core.load_safetensors(ckpt / OPTIMIZER_NAME))
        sched = json.loads((ckpt / SCHEDULER_NAME).read_text())
        opt["step"] = int(sched["optimizer_step"])
        self.session.load_optimizer_state(opt)
        self.state = TrainerState.load_from_json(ckpt / TRAINER_STATE_NAME)

    def save_model(self, output_dir: Optional[str] = None) -> None:
        if not getattr(self.args, "should_save", True):
            return  # data parallel: rank 0 saves (transformers' args.should_save)
        d = Path(output_dir or self.args.output_dir)
        d.mkdir(parents=True, exist_ok=True)
        self._save_adapter(d)
        (d / TRAINING_ARGS_NAME).write_text(
            self.args.to_json_string() if hasattr(self.args, "to_json_string") else "{}"
        )

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        from .hub import is_offline

        if is_offline():
            raise FerroVLMError("push_to_hub: HF_HUB_OFFLINE is set, nothing can be uploaded")
        try:
            import huggingface_hub
        except ImportError:
            raise FerroVLMError("push_to_hub needs huggingface_hub (pip install 'ferrovlm[hub]')") from None
        self.save_model()
        repo = getattr(self.args, "hub_model_id", None) or Path(self.args.output_dir).name
        huggingface_hub.upload_folder(
            repo_id=repo,
            folder_path=str(self.args.output_dir),
            commit_message=kwargs.get("commit_message", "End of training"),
        )

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Optional[bool | str] = None, **kwargs: Any) -> TrainOutput:
        self._dp = DataParallel.from_args(self.args)  # several processes (torchrun): join their group
        try:
            run = self._setup_training(resume_from_checkpoint)
            try:
                for epoch in range(run.plan.epochs):
                    if self.state.global_step >= run.plan.max_steps:
                        break
                    self._train_epoch(run, epoch)
            finally:
                if run.bar is not None:
                    run.bar.close()
            return self._finish_training(run)
        finally:
            self._dp = None  # the process stays in the group (left at exit) for another train()

    def _setup_training(self, resume_from_checkpoint: Optional[bool | str | os.PathLike[str]]) -> _TrainingRun:
        """The plan, the core session, the state (fresh or from a checkpoint), the resolved intervals and the
        progress bar; puts the model in training mode."""
        a = self.args
        plan = self._plan()
        session = self.session  # created before a checkpoint is loaded into it
        if resume_from_checkpoint:
            self._load_checkpoint(self._resume_checkpoint(resume_from_checkpoint))
        else:
            self.state = TrainerState()
        st = self.state
        dp = self._dp
        if dp is not None:
            dp.broadcast_parameters(session)  # as DDP's constructor: every rank starts from rank 0's
            st.is_world_process_zero = st.is_local_process_zero = dp.rank == 0
        st.max_steps, st.num_train_epochs = plan.max_steps, plan.epochs
        st.train_batch_size = plan.bs
        steps = a.resolved_steps(plan.max_steps) if hasattr(a, "resolved_steps") else {}
        logging_steps = int(steps.get("logging_steps") or a.logging_steps or 1)
        save_steps = int(steps.get("save_steps") or getattr(a, "save_steps", 0) or 0)
        eval_steps = int(steps.get("eval_steps") or logging_steps)
        st.logging_steps, st.save_steps, st.eval_steps = logging_steps, save_steps, eval_steps
        start_step = st.global_step
        t0 = time.time()
        bar = _progress(plan.max_steps, start_step,
                        disable=bool(getattr(a, "disable_tqdm", False)) or not st.is_world_process_zero)
        self.model.train()
        return _TrainingRun(
            plan=plan, session=session, logging_steps=logging_steps, save_steps=save_steps, eval_steps=eval_steps,
            save_strategy=_strategy(a, "save_strategy"), eval_strategy=_strategy(a, "eval_strategy"),
            start_step=start_step, t0=t0, bar=bar, dp=dp, flos_parameters=self._flos_parameters(),
        )

    def _resume_checkpoint(self, resume_from_checkpoint: bool | str | os.PathLike[str]) -> Path:
        """The checkpoint to resume from: the path given, or (``True``) the last complete one in output_dir."""
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            ckpt = Path(resume_from_checkpoint)
        else:
            cps = sorted_checkpoints(self.args.output_dir)
            if not cps:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            ckpt = cps[-1]
        if not (ckpt / TRAINER_STATE_NAME).is_file():
            raise ValueError(f"{ckpt} is not a complete checkpoint (no {TRAINER_STATE_NAME})")
        return ckpt

    def _train_epoch(self, run: _TrainingRun, epoch: int) -> None:
        """The optimizer steps of one epoch (those a resumed run has not done yet), then the end-of-epoch
        evaluation and checkpoint."""
        plan, st = run.plan, self.state
        order = epoch_order(plan.n, int(self.args.seed), epoch, shuffle=True)
        micro = rank_batches(order, plan.bs, run.dp)  # this rank's batches of the epoch
        groups = [micro[i : i + plan.accum] for i in range(0, len(micro), plan.accum)]
        for gi, group in enumerate(groups):
            step_index = epoch * plan.steps_per_epoch + gi
            if step_index < st.global_step:
                continue  # resumed: this step is already done
            if st.global_step >= plan.max_steps:
                break
            # the step's batches are all read before its first forward: the dataloader's end is reached at once
            self._metric_ranks = metric_ranks(plan.n, plan.bs, self._world_size(), gi == len(groups) - 1)
            lr = self._lr(st.global_step, plan.max_steps)
            step_loss = self._training_step(run, group)
            self._optimizer_step(run, lr)
            st.epoch = epoch + (min((gi + 1) * plan.accum, len(micro))) / len(micro)
            self._track_loss(run, step_loss)
            self._maybe_log(run, lr)
            self._maybe_evaluate(run, "steps")
            self._maybe_save(run, "steps")
        self._maybe_evaluate(run, "epoch")
        self._maybe_save(run, "epoch")

    def _training_step(self, run: _TrainingRun, group: Sequence[Sequence[int]]) -> float:
        """Forward and backward over the micro-batches of one optimizer step (gradients accumulate in the core);
        returns the step's loss, which must be finite."""
        a, st = self.args, self.state
        batches = [self._collate_rows(self.train_dataset, idx, "train_dataset") for idx in group]
        n_items = global_items(run.dp, sum(self._count_items(b) for b in batches))
        step_loss = 0.0
        for mi, batch in enumerate(batches):
            seed = (int(a.seed) * 1_000_003 + st.global_step) * 64 + mi
            step_loss += self._micro_step(batch, n_items, seed)
            run.flos += micro_batch_flos(batch, run.flos_parameters)
            run.samples_seen += len(group[mi])
        if not math.isfinite(step_loss):
            last = sorted_checkpoints(a.output_dir)
            where = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise TrainingError(f"step {st.global_step + 1}: the loss is not finite ({step_loss}){where}")
        return step_loss

    def _optimizer_step(self, run: _TrainingRun, lr: float) -> None:
        """Clips the accumulated gradients, applies AdamW at ``lr`` and counts the step."""
        if run.dp is not None:
            run.dp.average_gradients(run.session)  # before clipping, as DDP's backward hooks
        run.grad_norm = run.session.optimizer_step(lr, float(self.args.max_grad_norm or 0.0))
        self.state.global_step += 1

    def _track_loss(self, run: _TrainingRun, step_loss: float) -> None:
        run.loss_since_log += step_loss
        run.steps_since_log += 1
        if run.bar is not None:
            run.bar.update(1)
            samples_per_s = run.samples_seen / max(time.time() - run.t0, 1e-9)
            run.bar.set_postfix(loss=f"{step_loss:.4f}", samples_per_s=f"{samples_per_s:.2f}")

    def _maybe_log(self, run: _TrainingRun, lr: float) -> None:
        """Every ``logging_steps`` steps (and after the first one with ``logging_first_step``): the mean loss since
        the last log, the gradient norm, the learning rate and the metrics recorded meanwhile."""
        step = self.state.global_step
        if step % run.logging_steps == 0 or (step == 1 and getattr(self.args, "logging_first_step", False)):
            loss = run.loss_since_log
            if run.dp is not None:  # transformers: the mean over the ranks
                loss = run.dp.sum(loss) / run.dp.world_size
            run.tr_loss += loss
            self._store_flos(run)
            logs = {"loss": loss / run.steps_since_log, "grad_norm": float(run.grad_norm), "learning_rate": lr}
            logs.update(self._flush_metrics("train"))
            self.log(logs)
            run.loss_since_log, run.steps_since_log = 0.0, 0

    def _maybe_evaluate(self, run: _TrainingRun, when: str) -> None:
        """Evaluates if there is an eval_dataset and the eval strategy is ``when`` ("steps": on every
        ``eval_steps``-th step and after the last; "epoch": at the end of an epoch), from ``eval_delay`` on
        (transformers' DefaultFlowCallback)."""
        st = self.state
        if run.eval_strategy != when or self.eval_dataset is None:
            return
        due = when == "epoch" or st.global_step % run.eval_steps == 0 or st.global_step >= st.max_steps
        if due and float(getattr(self.args, "eval_delay", 0) or 0) <= (st.epoch if when == "epoch" else st.global_step):
            self.evaluate()

    def _maybe_save(self, run: _TrainingRun, when: str) -> None:
        """Writes a checkpoint if the save strategy is ``when`` ("steps": on every ``save_steps``-th step and after
        the last, as transformers' DefaultFlowCallback; "epoch": at the end of an epoch)."""
        if run.save_strategy != when:
            return
        step = self.state.global_step
        if when == "epoch" or (run.save_steps and step % run.save_steps == 0) or step >= self.state.max_steps:
            self._store_flos(run)
            if run.dp is None or run.dp.rank == 0:  # only rank 0 writes; the others wait for the checkpoint
                self._save_checkpoint()
            if run.dp is not None:
                run.dp.barrier()

    def _finish_training(self, run: _TrainingRun) -> TrainOutput:
        """The run's summary metrics, logged like transformers' Trainer does at the end of ``train()``."""
        a, plan, st = self.args, run.plan, self.state
        self._store_flos(run)
        runtime = time.time() - run.t0
        done = st.global_step - run.start_step
        # the logged losses, plus (transformers) this rank's own since the last log
        train_loss = (run.tr_loss + run.loss_since_log) / done if done else 0.0
        if a.max_steps and a.max_steps > 0:
            n_samples = plan.max_steps * plan.bs * plan.accum * self._world_size()
        else:
            n_samples = plan.n * plan.epochs
        metrics = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(n_samples / runtime, 3) if runtime > 0 else 0.0,
            "train_steps_per_second": round(plan.max_steps / runtime, 3) if runtime > 0 else 0.0,
            "total_flos": float(st.total_flos),
            "train_loss": train_loss,
        }
        self.log(dict(metrics))
        return TrainOutput(st.global_step, train_loss, {**metrics, "epoch": st.epoch})

    def _count_items(self, batch: dict[str, Any]) -> int:
        return num_label_tokens(batch["labels"])

    def _flos_parameters(self) -> int:
        return flos_parameters(self.model)

    def _store_flos(self, run: _TrainingRun) -> None:
        """transformers' store_flos: the operations since the last store, summed over the ranks."""
        self.state.total_flos += run.dp.sum(run.flos) if run.dp is not None else run.flos
        run.flos = 0.0
