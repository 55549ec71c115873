"""``DPOTrainer`` with TRL 1.16's semantics for vision preference data (see ../shared/spec/trl.md).

The reference model, as TRL picks it: an explicit ``ref_model``; else, for a model that already carries a
(trained) adapter, a frozen copy of that adapter as it was at the start; else (a fresh adapter made from
``peft_config``) the base model with the adapter disabled. The base weights are never copied. Each
image goes through the vision tower once per run (features cached by content), shared by the chosen and
rejected sequences and by the reference pass."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

from . import _core
from .distributed import ShardedEval, eval_speed, evaluation_group
from .dpo_collator import DataCollatorForVisionPreference
from .dpo_config import DPOConfig
from .flos import flos_parameters
from .generation import set_seed
from .peft import PeftModel, get_peft_model
from .trainer import BaseTrainer, _batch_arrays, full_training_names


def _labels_from_completion(batch: Any) -> Any:
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["completion_mask"])
    labels = np.where(mask.astype(bool), ids, -100).astype(np.int64)
    out = dict(batch)
    out["labels"] = labels
    return out


class DPOTrainer(BaseTrainer):
    """Preference optimisation of a SmolVLM / Idefics3 model with a LoRA adapter. Rows are
    ``{"images", "prompt", "chosen", "rejected"}`` (message lists or strings)."""

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Optional[DPOConfig] = None,
        data_collator: Optional[Callable[[list[dict[str, Any]]], Any]] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Optional[Sequence[Any]] = None,
        optimizers: Any = (None, None),
        peft_config: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from .modeling import AutoModelForImageTextToText
        from .processing import AutoProcessor

        if isinstance(model, str):
            model = AutoModelForImageTextToText.from_pretrained(model)
        if isinstance(ref_model, str):
            ref_model = AutoModelForImageTextToText.from_pretrained(ref_model)
        if args is None:
            name = str(getattr(model.config, "_name_or_path", "model")).rstrip("/").split("/")[-1]
            args = DPOConfig(output_dir=f"{name}-DPO")
        # transformers' Trainer seeds everything with args.seed in __init__; doing it before the adapter is
        # attached also makes a fresh LoRA's initial weights (and so the whole run) reproducible.
        set_seed(int(args.seed))
        if compute_metrics is not None or optimizers not in ((None, None), None):
            raise NotImplementedError(
                "compute_metrics and custom optimizers are not supported by ferrovlm's DPOTrainer"
            )
        processing_class = processing_class if processing_class is not None else tokenizer
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(getattr(model.config, "_name_or_path", None))
        if isinstance(model, PeftModel):
            if peft_config is not None:
                warnings.warn(
                    "the model already has a LoRA adapter; peft_config is not applied a second time",
                    UserWarning,
                    stacklevel=2,
                )
            self._ref_mode = "snapshot"
        elif peft_config is not None:
            model = get_peft_model(model, peft_config)
            self._ref_mode = "disabled"
        else:
            # Full-parameter training: TRL's reference is the starting model (it reloads the checkpoint); here a
            # handle on the weights as they are now, which training leaves untouched (it trains copies).
            self._ref_mode = "frozen"
        if ref_model is not None:
            self._ref_mode = "model"
        # The starting weights, as a copy whose trained parameters are autograd Vars like the policy's: the same
        # kernels run, so before the first step the reference equals the policy exactly (TRL: rewards 0).
        self._ref_core = (
            model._core.trainable_copy(full_training_names(model)) if self._ref_mode == "frozen" else None
        )
        self.ref_model = ref_model
        super().__init__(model, args, train_dataset, eval_dataset, callbacks)
        self.processing_class = processing_class
        self.data_collator = data_collator or DataCollatorForVisionPreference(
            processing_class, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
        )
        self._ref_state = _core.adapter_state(model._core) if self._ref_mode == "snapshot" else None
        self._precomputed: Optional[dict[int, tuple]] = None
        loss_type = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
        weights = args.loss_weights if args.loss_weights is not None else [1.0] * len(loss_type)
        if len(weights) != len(loss_type):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_type)} loss types")
        self._losses = [(str(t), float(w)) for t, w in zip(loss_type, weights)]

    # -- data ---------------------------------------------------------------------------------------
    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        for k in ("prompt", "chosen", "rejected"):
            for i, r in enumerate(rows):
                if k not in r or r[k] is None:
                    raise KeyError(f"row {i} of the batch has no '{k}'")
        for i, r in enumerate(rows):
            if r["chosen"] == r["rejected"]:
                warnings.warn(
                    "a row has identical chosen and rejected completions: it contributes no preference signal "
                    f"(batch row {i})",
                    UserWarning,
                    stacklevel=3,
                )
        return _batch_arrays(_labels_from_completion(self.data_collator(rows)))

    def _collate_rows(self, ds: Any, idx: Sequence[int], what: str) -> dict[str, Any]:
        batch = super()._collate_rows(ds, idx, what)
        batch["_rows"] = [int(i) for i in idx]
        return batch

    # -- reference ----------------------------------------------------------------------------------
    def _reference(self, batch: dict[str, Any]) -> list[float]:
        if (
            self._precomputed is not None
            and all(i in self._precomputed for i in batch.get("_rows", []))
            and batch.get("_rows")
        ):
            rows = batch["_rows"]
            return [self._precomputed[i][0] for i in rows] + [self._precomputed[i][1] for i in rows]
        ref = self._reference_pass(batch)
        rows = batch.get("_rows")
        if rows:
            # The reference is frozen: a training row's log-probs are computed once, the first time the row is
            # seen, and reused in later epochs (TRL recomputes them every time; the numbers are the same).
            p = len(rows)
            cache = self._precomputed if self._precomputed is not None else {}
            cache.update({i: (ref[j], ref[p + j]) for j, i in enumerate(rows)})
            self._precomputed = cache
        return ref

    def _reference_pass(self, batch: dict[str, Any]) -> list[float]:
        """The reference model's summed completion log-probs of the batch: chosen rows, then rejected rows."""
        kw = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  pixel_attention_mask=batch["pixel_attention_mask"])
        core = self.model._core
        if self._ref_mode == "model":
            return _core.sequence_logps(self.ref_model._core, batch["input_ids"], batch["labels"], **kw)
        if self._ref_mode == "frozen":
            return _core.sequence_logps(self._ref_core, batch["input_ids"], batch["labels"], **kw)
        if self._ref_mode == "disabled":
            _core.set_adapters_enabled(core, False)
            try:
                return self.session.sequence_logps(batch["input_ids"], batch["labels"], **kw)
            finally:
                _core.set_adapters_enabled(core, True)
        current = _core.adapter_state(core)
        _core.load_adapter_state(core, self._ref_state)
        try:
            return self.session.sequence_logps(batch["input_ids"], batch["labels"], **kw)
        finally:
            _core.load_adapter_state(core, current)

    def _precompute(self) -> None:
        out: dict[int, tuple] = {}
        bs = int(self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size)
        n = len(self.train_dataset)
        for start in range(0, n, bs):
            idx = list(range(start, min(start + bs, n)))
            batch = self._collate_rows(self.train_dataset, idx, "train_dataset")
            batch.pop("_rows")
            ref = self._reference(batch)
            p = len(idx)
            for j, i in enumerate(idx):
                out[i] = (ref[j], ref[p + j])
        self._precomputed = out

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        if self.args.precompute_ref_log_probs and self._precomputed is None:
            self._precompute()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # -- one micro-batch ----------------------------------------------------------------------------
    def _count_items(self, batch: dict[str, Any]) -> int:
        return 1

    def _flos_parameters(self) -> int:
        # TRL gives a PeftModel trained without ref_model a frozen "ref" copy of its adapter (our snapshot)
        return flos_parameters(self.model, ref_adapter_copy=self._ref_mode == "snapshot")

    def _micro_step(
        self, batch: dict[str, Any], n_items: int, seed: int, backward: bool = True, mode: str = "train"
    ) -> float:
        ref = self._reference(batch)
        accum = max(
            n_items, 1
        )  # one item per micro-batch: the loss is a mean over pairs, divided by the accumulation steps
        a = self.args
        s = self.session.dpo_step(
            batch["input_ids"],
            batch["labels"],
            ref,
            self._losses,
            beta=float(a.beta),
            label_smoothing=float(a.label_smoothing),
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            pixel_attention_mask=batch["pixel_attention_mask"],
            loss_scale=1.0 / accum,
            gradient_checkpointing=bool(a.gradient_checkpointing),
            dropout_seed=seed,
            backward=backward,
        )
        self._account_dpo(s, mode)
        return s["loss"] / accum

    def _account_dpo(self, s: dict[str, Any], mode: str) -> None:
        """Records a micro-batch's metrics as TRL does: token-weighted sums (under data parallelism summed over
        the ranks by accelerate's ``gather_for_metrics``, which drops ranks that only repeat rows at the end of
        the data) and per-pair means (``gather``: every rank's pairs, repeats included)."""

        def rec(k: str, v: float) -> None:
            self._record(mode, k, v)

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else 0.0

        v = s["vocab"]
        cr, rr = np.array(s["chosen_rewards"], np.float64), np.array(s["rejected_rewards"], np.float64)
        sums = [s["entropy_sum"], s["num_label_tokens"], s["num_mask_tokens"], s["chosen_logits_sum"] / v,
                s["chosen_tokens"], s["rejected_logits_sum"] / v, s["rejected_tokens"], s["chosen_correct"]]
        pairs = [cr.sum(), rr.sum(), (cr > rr).sum(), (cr - rr).sum(), np.sum(s["chosen_logps"]),
                 np.sum(s["rejected_logps"]), len(cr)]
        if self._dp is not None:
            sums, pairs = self._dp.gather_metrics(sums, pairs, self._metric_ranks)
        entropy, n, tokens, chosen_logits, chosen_n, rejected_logits, rejected_n, correct = (float(x) for x in sums)
        rec("entropy", ratio(entropy, n))
        if mode == "train":
            self.state.total_train_tokens += int(tokens)
        self._metrics[mode]["num_tokens"] = [float(self.state.total_train_tokens)]  # TRL: eval logs it too
        rec("logits/chosen", ratio(chosen_logits, chosen_n))
        rec("logits/rejected", ratio(rejected_logits, rejected_n))
        rec("mean_token_accuracy", ratio(correct, chosen_n))
        n_pairs = float(pairs[-1])
        for key, total in zip(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                               "logps/chosen", "logps/rejected"), pairs[:-1]):
            rec(key, float(total) / n_pairs)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        t0 = time.time()
        self._metrics["eval"] = {}
        with self._eval_mode(), evaluation_group(self) as dp:
            ev = ShardedEval(len(ds), int(self.args.per_device_eval_batch_size), dp)  # this rank's batches
            for i, idx in enumerate(ev.batches):
                self._metric_ranks = ev.metric_ranks(i)
                batch = self._collate_rows(ds, idx, "eval_dataset")
                batch.pop("_rows")
                ev.add_loss(i, self._micro_step(batch, 1, 0, backward=False, mode="eval"))
        runtime = time.time() - t0
        metrics = {f"{metric_key_prefix}_loss": ev.loss}
        metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._flush_metrics("eval").items()})
        metrics.update(eval_speed(metric_key_prefix, runtime, ev))
        self.log(dict(metrics))
        return metrics
