"""``SFTTrainer`` with TRL 1.16's semantics for vision-language data (see ../shared/spec/trl.md)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

from .data_collator import DataCollatorForVisionLanguageModeling
from .generation import set_seed
from .peft import PeftModel, get_peft_model
from .sft_config import SFTConfig
from .trainer import BaseTrainer, TrainingError, _batch_arrays


def _model_name(model: Any) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
    return str(name).rstrip("/").split("/")[-1]


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning of a SmolVLM / Idefics3 model with a LoRA adapter.

    Rows are ``{"images", "messages"}`` or ``{"images", "prompt", "completion"}`` (a list or a
    ``datasets.Dataset``), or whatever a user ``data_collator`` turns into ``input_ids`` / ``labels``
    (with ``dataset_kwargs={"skip_prepare_dataset": True}`` as the tutorials write it)."""

    def __init__(
        self,
        model: Any,
        args: Optional[SFTConfig] = None,
        data_collator: Optional[Callable[[list[dict[str, Any]]], Any]] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Any = None,
        compute_metrics: Any = None,
        callbacks: Optional[Sequence[Any]] = None,
        optimizers: Any = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from .modeling import AutoModelForImageTextToText
        from .processing import AutoProcessor

        if isinstance(model, str):
            model = AutoModelForImageTextToText.from_pretrained(model)
        if args is None:
            args = SFTConfig(output_dir=f"{_model_name(model)}-SFT")
        # transformers' Trainer seeds everything with args.seed in __init__; doing it before the adapter is
        # attached also makes a fresh LoRA's initial weights (and so the whole run) reproducible.
        set_seed(int(args.seed))
        if compute_loss_func is not None or formatting_func is not None or compute_metrics is not None:
            raise NotImplementedError(
                "compute_loss_func, compute_metrics and formatting_func are not supported by ferrovlm's SFTTrainer"
            )
        if optimizers not in ((None, None), None) or optimizer_cls_and_kwargs is not None:
            raise NotImplementedError(
                "custom optimizers are not supported: ferrovlm trains with AdamW (args.optim is accepted)"
            )
        if processing_class is None:
            processing_class = tokenizer
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(getattr(model.config, "_name_or_path", None))
        if peft_config is not None:
            if isinstance(model, PeftModel):
                warnings.warn(
                    "the model already has a LoRA adapter (get_peft_model); peft_config is not applied a second time",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                model = get_peft_model(model, peft_config)
        super().__init__(model, args, train_dataset, eval_dataset, callbacks)
        self.processing_class = processing_class
        if data_collator is None:
            completion_only = args.completion_only_loss
            if completion_only is None:
                first = train_dataset[0] if train_dataset is not None and len(train_dataset) else {}
                completion_only = "prompt" in first and "completion" in first
            data_collator = DataCollatorForVisionLanguageModeling(
                processing_class,
                max_length=args.max_length,
                completion_only_loss=bool(completion_only),
                pad_to_multiple_of=args.pad_to_multiple_of,
                dataset_text_field=args.dataset_text_field,
                assistant_only_loss=bool(args.assistant_only_loss),
            )
        self.data_collator = data_collator

    # -- one micro-batch ----------------------------------------------------------------------------
    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return _batch_arrays(self.data_collator(rows))

    def _micro_step(self, batch: dict[str, Any], n_items: int, seed: int) -> float:
        if n_items == 0:
            raise TrainingError(
                f"step {self.state.global_step + 1}: no row of this step has a label token after masking "
                "(every label is -100): check max_length truncation and the completion/assistant masks"
            )
        stats = self.session.forward_backward(
            batch["input_ids"],
            batch["labels"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            pixel_attention_mask=batch["pixel_attention_mask"],
            loss_scale=1.0 / n_items,
            gradient_checkpointing=bool(
                self.args.gradient_checkpointing or getattr(self.model, "is_gradient_checkpointing", False)
            ),
            dropout_seed=seed,
        )
        self._account(stats, "train")
        return stats["loss_sum"] / n_items

    def _account(self, stats: dict[str, Any], mode: str) -> None:
        n = stats["num_label_tokens"]
        if n:
            self._record(mode, "entropy", stats["entropy_sum"] / n)
            self._record(mode, "mean_token_accuracy", stats["correct"] / n)
        if mode == "train":
            self.state.total_train_tokens += int(stats["num_mask_tokens"])
            self.state.num_input_tokens_seen = self.state.total_train_tokens
            self._metrics[mode]["num_tokens"] = [float(self.state.total_train_tokens)]

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        bs = int(self.args.per_device_eval_batch_size)
        t0 = time.time()
        total, weight, n_batches = 0.0, 0, 0
        self._metrics["eval"] = {}
        with self._eval_mode():
            for start in range(0, len(ds), bs):
                idx = list(range(start, min(start + bs, len(ds))))
                batch = self._collate_rows(ds, idx, "eval_dataset")
                stats = self.session.evaluate(
                    batch["input_ids"],
                    batch["labels"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    pixel_attention_mask=batch["pixel_attention_mask"],
                )
                n = stats["num_label_tokens"]
                loss = stats["loss_sum"] / n if n else float("nan")
                total += loss * len(idx)
                weight += len(idx)
                n_batches += 1
                self._account(stats, "eval")
        runtime = time.time() - t0
        metrics = {f"{metric_key_prefix}_loss": total / weight}
        metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._flush_metrics("eval").items()})
        metrics.update({
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(weight / runtime, 3) if runtime > 0 else 0.0,
            f"{metric_key_prefix}_steps_per_second": round(n_batches / runtime, 3) if runtime > 0 else 0.0,
        })
        self.log(dict(metrics))
        return metrics
