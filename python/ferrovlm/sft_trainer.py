"""``SFTTrainer`` with TRL 1.16's semantics (see ../shared/spec/trl.md): vision-language rows go through
``DataCollatorForVisionLanguageModeling`` as they are; text rows for a text model (or with a tokenizer as the
processing class) are tokenized up front as TRL's ``_prepare_dataset`` does (sft_dataset.py) and batched by
``DataCollatorForLanguageModeling``."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

from .data_collator import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling, is_conversational
from .distributed import ShardedEval, eval_speed, evaluation_group
from .generation import set_seed
from .peft import PeftModel, get_peft_model
from .sft_config import SFTConfig
from .sft_dataset import get_training_chat_template, is_chat_template_stop_token_trained, prepare_dataset
from .tokenization import has_generation_markers
from .trainer import BaseTrainer, TrainingError, _batch_arrays


def _model_name(model: Any) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
    return str(name).rstrip("/").split("/")[-1]


def _is_text_model(model: Any) -> bool:
    """A language model alone (``LlamaForCausalLM``): its config has no vision part."""
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "vision_config", None) is None


def _is_tokenizer(processing_class: Any) -> bool:
    """A tokenizer rather than a processor (which has an image processor and a ``tokenizer``)."""
    from .tokenization import PreTrainedTokenizerFast

    return isinstance(processing_class, PreTrainedTokenizerFast)


def _load_model(name: str, args: Any) -> Any:
    from .modeling import AutoModelForCausalLM, AutoModelForImageTextToText
    from .tokenization import _model_type

    kwargs = dict(args.model_init_kwargs or {}) if isinstance(args.model_init_kwargs, dict) else {}
    if _model_type(str(name)) == "llama":
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    return AutoModelForImageTextToText.from_pretrained(name, **kwargs)


def _first_row(dataset: Any) -> dict[str, Any]:
    return dict(dataset[0]) if dataset is not None and len(dataset) else {}


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
        from .processing import AutoProcessor

        if args is None:
            name = str(model).rstrip("/").split("/")[-1] if isinstance(model, str) else _model_name(model)
            args = SFTConfig(output_dir=f"{name}-SFT")
        if isinstance(model, str):
            model = _load_model(model, args)
        # transformers' Trainer seeds everything with args.seed in __init__; doing it before the adapter is
        # attached also makes a fresh LoRA's initial weights (and so the whole run) reproducible.
        set_seed(int(args.seed))
        if compute_loss_func is not None or compute_metrics is not None:
            raise NotImplementedError(
                "compute_loss_func and compute_metrics are not supported by ferrovlm's SFTTrainer"
            )
        if optimizers not in ((None, None), None) or optimizer_cls_and_kwargs is not None:
            raise NotImplementedError(
                "custom optimizers are not supported: ferrovlm trains with AdamW (args.optim is accepted)"
            )
        if processing_class is None:
            processing_class = tokenizer
        if processing_class is None:
            name = getattr(model.config, "_name_or_path", None)
            if _is_text_model(model):
                from .tokenization import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(name)
            else:
                processing_class = AutoProcessor.from_pretrained(name)
        sample = _first_row(train_dataset)
        is_vision = "image" in sample or "images" in sample
        # TRL tokenizes text datasets up front (dataset preparation) and pads them with DataCollatorForLanguageModeling;
        # ferrovlm does so for a text model or a tokenizer (a VLM with its processor keeps the vision collator).
        self._text_mode = not is_vision and (_is_text_model(model) or _is_tokenizer(processing_class))
        if is_vision and _is_text_model(model):  # (TRL also refuses a tokenizer; the SmolVLM cookbook passes one)
            raise ValueError(
                "The dataset appears to be vision-related (contains 'image' or 'images' keys), but the provided "
                "model does not seem to be a vision-language model. Please check your model and dataset."
            )
        if formatting_func is not None and not self._text_mode:
            raise NotImplementedError("formatting_func is supported for text datasets only")
        if self._text_mode and getattr(args, "chat_template_path", None) is not None:
            path = str(args.chat_template_path)
            if not path.endswith((".jinja", ".j2")):
                raise NotImplementedError(
                    "chat_template_path: only a .jinja / .j2 template file is supported (cloning a tokenizer's "
                    "template with new tokens is not)"
                )
            with open(path, encoding="utf-8") as f:
                processing_class.chat_template = f.read()
        if peft_config is not None:
            if isinstance(model, PeftModel):
                warnings.warn(
                    "the model already has a LoRA adapter (get_peft_model); peft_config is not applied a second time",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                model = get_peft_model(model, peft_config)
        self._formatting_func = formatting_func
        self._skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False)) \
            if isinstance(args.dataset_kwargs, dict) else False
        completion_only = args.completion_only_loss
        if completion_only is None:
            completion_only = "prompt" in sample and "completion" in sample
        self.completion_only_loss = bool(completion_only)
        self.padding_free = False
        super().__init__(model, args, train_dataset, eval_dataset, callbacks)
        self.processing_class = processing_class
        if self._text_mode:
            data_collator, self.train_dataset, self.eval_dataset = self._setup_text(
                args, processing_class, data_collator, train_dataset, eval_dataset, sample)
        if data_collator is None:
            data_collator = DataCollatorForVisionLanguageModeling(
                processing_class,
                max_length=args.max_length,
                completion_only_loss=self.completion_only_loss,
                pad_to_multiple_of=args.pad_to_multiple_of,
                dataset_text_field=args.dataset_text_field,
                assistant_only_loss=bool(args.assistant_only_loss),
            )
        self.data_collator = data_collator

    # -- text datasets --------------------------------------------------------------------------------
    def _setup_text(self, args: Any, tokenizer: Any, data_collator: Any, train_dataset: Any, eval_dataset: Any,
                    sample: dict[str, Any]) -> tuple[Any, Any, Any]:
        """TRL's text-path setup: the tokenizer's eos / pad tokens, padding-free, the assistant-only template, the
        collator and the prepared datasets."""
        tok = tokenizer
        vocab = None
        eos_token = tok.eos_token
        self._template_vars: dict[str, Any] = {}
        if args.eos_token is not None:
            vocab = tok.get_vocab()
            if args.eos_token not in vocab:
                raise ValueError(
                    f"The specified `eos_token` ('{args.eos_token}') is not found in the vocabulary of the given "
                    f"`processing_class` ({type(tok).__name__}). Ensure that the `eos_token` exists in the vocabulary "
                    "before using it as an EOS token."
                )
            eos_token = args.eos_token
            self._template_vars["eos_token"] = eos_token  # what the chat template sees as eos_token
        self._eos_token = eos_token
        self.padding_free = bool(args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split")))
        if self.padding_free and data_collator is not None:
            raise ValueError("Passing a custom data collator is not supported when using padding-free.")
        if self.padding_free and args.per_device_train_batch_size == 1 and not args.packing:
            warnings.warn(
                "You are using a per_device_train_batch_size of 1 with padding-free training. Using a batch size of 1 "
                "annihilate the benefits of padding-free training. Please consider increasing the batch size to at "
                "least 2.",
                UserWarning,
                stacklevel=3,
            )
        if args.assistant_only_loss and not is_conversational(sample):
            raise ValueError(
                "You set `assistant_only_loss=True`, but the dataset is not conversational. This option is only "
                "supported for conversational datasets."
            )
        self.chat_template = None
        if args.assistant_only_loss:
            template = tok.chat_template
            if template is None or not has_generation_markers(template):
                self.chat_template = get_training_chat_template(tok)
            if not is_chat_template_stop_token_trained(tok, chat_template=self.chat_template):
                warnings.warn(
                    "The chat template does not include the assistant turn's end-of-turn token in the loss mask; the "
                    "model may not learn to stop. The training loss still looks healthy, so this usually only surfaces "
                    "at inference. Either set `assistant_only_loss=False` to train on the full sequence, or edit the "
                    "chat template so the end-of-turn token falls inside `{% generation %}...{% endgeneration %}`.",
                    UserWarning,
                    stacklevel=3,
                )
        if data_collator is None:
            pad_token = args.pad_token or tok.pad_token or tok.eos_token
            vocab = vocab if vocab is not None else tok.get_vocab()
            if pad_token not in vocab:
                raise ValueError(
                    f"The specified `pad_token` ('{pad_token}') is not found in the vocabulary of the given "
                    f"`processing_class` ({type(tok).__name__}). Ensure that the `pad_token` exists in the vocabulary "
                    "before using it as a padding token."
                )
            data_collator = DataCollatorForLanguageModeling(
                pad_token_id=int(vocab[pad_token]),
                padding_free=self.padding_free,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        if self.padding_free and not args.packing and args.max_length is not None:
            raise ValueError(
                "When `padding_free=True` without packing, `max_length` is not enforced. Either enable packing (e.g., "
                "`packing=True, packing_strategy='bfd'`), provide already truncated inputs, or set `max_length=None`."
            )
        if self._skip_prepare:
            for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
                cols = set(_first_row(ds)) if ds is not None else set()
                if "labels" not in cols and ("completion_mask" in cols or "assistant_masks" in cols) and \
                        isinstance(data_collator, DataCollatorForLanguageModeling):
                    raise ValueError(
                        f"The {name} dataset has mask columns but no 'labels', and `skip_prepare_dataset=True` skips "
                        "label building, so it would train on the full sequence. Add a 'labels' column (-100 for "
                        "non-loss tokens) or drop `skip_prepare_dataset`."
                    )
            return data_collator, train_dataset, eval_dataset
        if self.completion_only_loss and self._formatting_func is not None:
            raise ValueError(
                "A formatting function was provided while `completion_only_loss=True`, which is incompatible. Using a "
                "formatter converts the dataset to a language modeling type, conflicting with completion-only loss. To "
                "resolve this, apply your formatting function before passing the dataset, or disable "
                "`completion_only_loss` in `SFTConfig`."
            )
        train_dataset = self._prepare(train_dataset, tok, args, bool(args.packing), "train")
        if eval_dataset is not None:
            packing = args.packing if args.eval_packing is None else args.eval_packing
            eval_dataset = self._prepare(eval_dataset, tok, args, bool(packing), "eval")
        return data_collator, train_dataset, eval_dataset

    def _prepare(self, dataset: Any, tokenizer: Any, args: Any, packing: bool, name: str) -> list[dict[str, Any]]:
        if dataset is None:
            raise ValueError("`train_dataset` is required")
        return prepare_dataset(dataset, tokenizer, args, packing, self._formatting_func, self.completion_only_loss,
                               self.chat_template, self._eos_token, self._template_vars, name)

    # -- one micro-batch ----------------------------------------------------------------------------
    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.data_collator(rows)
        get = out.get if hasattr(out, "get") else out.__getitem__
        if get("attention_mask") is None and get("position_ids") is not None:
            return _unflatten_padding_free(out, self.data_collator)
        return _batch_arrays(out)

    def _micro_step(self, batch: dict[str, Any], n_items: float, seed: int) -> float:
        """Forward + backward of one micro-batch with the gradient of (sum of its label tokens' losses) / n_items
        (the step's label tokens; under data parallelism, those of the global step / world size); returns that
        loss."""
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
        self._account(stats, "train", batch.get("num_tokens"))
        return stats["loss_sum"] / n_items

    def _account(self, stats: dict[str, Any], mode: str, num_tokens: Optional[int] = None) -> None:
        n, entropy, correct = stats["num_label_tokens"], stats["entropy_sum"], stats["correct"]
        # TRL counts attention_mask.sum(), or a padding-free batch's full length
        tokens = stats["num_mask_tokens"] if num_tokens is None else num_tokens
        if self._dp is not None:
            # TRL: sums over the ranks (accelerate's gather_for_metrics)
            sums, _ = self._dp.gather_metrics([n, entropy, correct, tokens], ranks=self._metric_ranks)
            n, entropy, correct, tokens = (float(v) for v in sums)
        self._record(mode, "entropy", entropy / n if n else 0.0)
        self._record(mode, "mean_token_accuracy", correct / n if n else 0.0)
        if mode == "train":
            self.state.total_train_tokens += int(tokens)
            self.state.num_input_tokens_seen = self.state.total_train_tokens
        self._metrics[mode]["num_tokens"] = [float(self.state.total_train_tokens)]  # TRL: eval logs it too

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if eval_dataset is not None and self._text_mode and not self._skip_prepare:
            # TRL prepares a dataset passed here like the ones given at init (idempotent on prepared rows)
            packing = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
            ds = self._prepare(ds, self.processing_class, self.args, bool(packing), "eval")
        t0 = time.time()
        self._metrics["eval"] = {}
        with self._eval_mode(), evaluation_group(self) as dp:
            ev = ShardedEval(len(ds), int(self.args.per_device_eval_batch_size), dp)  # this rank's batches
            for i, idx in enumerate(ev.batches):
                self._metric_ranks = ev.metric_ranks(i)
                batch = self._collate_rows(ds, idx, "eval_dataset")
                stats = self.session.evaluate(
                    batch["input_ids"],
                    batch["labels"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    pixel_attention_mask=batch["pixel_attention_mask"],
                )
                n = stats["num_label_tokens"]
                ev.add_loss(i, stats["loss_sum"] / n if n else float("nan"))
                self._account(stats, "eval")
        runtime = time.time() - t0
        metrics = {f"{metric_key_prefix}_loss": ev.loss}
        metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._flush_metrics("eval").items()})
        metrics.update(eval_speed(metric_key_prefix, runtime, ev))
        self.log(dict(metrics))
        return metrics


def _unflatten_padding_free(batch: Any, collator: Any) -> dict[str, Any]:
    """A padding-free batch (one row of concatenated sequences, ``position_ids`` restarting at 0) as the same
    sequences in a right-padded batch: transformers attends within each packed sequence (block-diagonal mask from
    the position ids) and the labels at sequence starts are -100, so the loss, gradients and metrics are the same.
    Sequences without any label token are left out; ``num_tokens`` keeps TRL's count (the flat length)."""
    from ._tensors import to_numpy

    get = batch.get if hasattr(batch, "get") else batch.__getitem__
    ids = to_numpy(get("input_ids"), np.int64, "input_ids")[0]
    labels = to_numpy(get("labels"), np.int64, "labels")[0]
    pos = to_numpy(get("position_ids"), np.int64, "position_ids")[0]
    starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
    seqs = [(ids[a:b], labels[a:b]) for a, b in zip(starts[:-1], starts[1:]) if (labels[a + 1 : b] != -100).any()]
    if not seqs:
        seqs = [(ids[:1], labels[:1])]
    width = max(len(s[0]) for s in seqs)
    pad_id = int(getattr(collator, "pad_token_id", 0) or 0)
    out_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    out_labels = np.full((len(seqs), width), -100, dtype=np.int64)
    attn = np.zeros((len(seqs), width), dtype=np.int64)
    for i, (a, b) in enumerate(seqs):
        out_ids[i, : len(a)] = a
        out_labels[i, : len(b)] = b
        attn[i, : len(a)] = 1
    out = _batch_arrays({"input_ids": out_ids, "labels": out_labels, "attention_mask": attn})
    out["num_tokens"] = int(len(pos))
    return out
