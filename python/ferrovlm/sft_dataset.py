"""Dataset preparation of TRL 1.16's ``SFTTrainer`` for text (non-vision) data: ``SFTTrainer._prepare_dataset``
with ``trl.data_utils`` / ``trl.chat_template_utils`` behaviour, on ferrovlm's tokenizer. The result is a list of
``{"input_ids": [...], "labels": [...]}`` rows for ``DataCollatorForLanguageModeling``.

Steps, in TRL's order (rows: a list of dicts or a ``datasets.Dataset``):

1. A dataset that already has ``input_ids`` is *processed*: steps 2-4 are skipped (``formatting_func`` is ignored
   with a warning).
2. ``formatting_func(row)`` becomes the row's ``"text"`` (the other keys stay).
3. ``{"conversations": [{"from", "value"}]}`` rows are converted to ChatML (``"messages"``, ``role`` /
   ``content``). If the first row is not conversational, the EOS token is appended to the ``dataset_text_field``
   text (else to ``"completion"``) of every row that does not already end with it.
4. Tokenization. Prompt-completion rows (a ``"prompt"`` key): conversational ones are rendered with the chat
   template (the prompt with ``add_generation_prompt=True``, prompt + completion with the assistant mask when
   ``assistant_only_loss``), plain ones tokenized as ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)``
   (special tokens added); the completion starts where the two token lists diverge (``completion_mask``).
   Language-modeling rows: ``"messages"`` rendered and tokenized (``assistant_masks`` with
   ``assistant_only_loss``), or ``tokenizer(row[dataset_text_field])``. Per row ``tools`` (a list or JSON string)
   and ``chat_template_kwargs`` go to the chat template.
5. ``labels`` (unless the rows have them): ``input_ids`` with -100 wherever ``completion_mask`` (only with
   ``completion_only_loss``) or ``assistant_masks`` is 0.
6. With ``max_length``: ``input_ids`` / ``labels`` cut to ``max_length`` (``truncation_mode`` "keep_start" keeps
   the start, "keep_end" the end), then rows whose labels are all -100 are dropped.
7. ``shuffle_dataset``: ``datasets.Dataset.shuffle(seed)``'s order (``np.random.default_rng(seed).permutation``).

Packing (``packing=True``) is not implemented.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

from .data_collator import is_conversational
from .tokenization import has_generation_markers


def is_conversational_from_value(example: dict[str, Any]) -> bool:
    """A ``"conversations"`` list of ``{"from": ..., "value": ...}`` messages (ShareGPT style)."""
    msgs = example.get("conversations")
    if isinstance(msgs, list) and msgs:
        m = msgs[0]
        return isinstance(m, dict) and "from" in m and "value" in m
    return False


def maybe_convert_to_chatml(example: dict[str, Any]) -> dict[str, Any]:
    """``from`` / ``value`` -> ``role`` / ``content`` in the message lists, ``"conversations"`` -> ``"messages"``."""
    example = dict(example)
    for key in ("prompt", "completion", "chosen", "rejected", "messages", "conversations"):
        if key in example and isinstance(example[key], list):
            msgs = []
            for m in example[key]:
                if isinstance(m, dict):
                    m = dict(m)
                    if "from" in m:
                        m["role"] = m.pop("from")
                    if "value" in m:
                        m["content"] = m.pop("value")
                msgs.append(m)
            example[key] = msgs
    if "conversations" in example:
        example["messages"] = example.pop("conversations")
    return example


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens the two lists share."""
    n = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        n += 1
    return n


def get_training_chat_template(tokenizer: Any) -> Optional[str]:
    """TRL's ``get_training_chat_template`` for a template without ``{% generation %}`` markers: TRL swaps in its
    own training copy of a few known templates (Qwen, Llama 3, Gemma, SmolVLM, ...); ferrovlm has none of them, so
    a template with markers is needed (``None`` then: no patch) and any other raises TRL's error."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template["default"]
    if template is not None and has_generation_markers(template):
        return None
    raise ValueError(
        "The chat template is not training-compatible (missing prefix-preservation or `{% generation %}` markers) "
        "and patching is not supported for this template. Please manually modify the chat template for training."
    )


def is_chat_template_stop_token_trained(tokenizer: Any, chat_template: Optional[str] = None) -> bool:
    """Whether the assistant mask of ``[user, assistant, user]`` ends (whitespace aside) on an added token, the
    end-of-turn token the model must learn to emit (TRL's check)."""
    messages = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"},
                {"role": "user", "content": "dummy"}]
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, chat_template=chat_template)
    except (ValueError, TypeError, RuntimeError):
        return False
    added = {i for i, _, _ in tokenizer._core.added_tokens}
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    for t in reversed(masked):
        if tokenizer.decode([t]).strip() == "":
            continue
        return t in added
    return False


def _rows(dataset: Any) -> list[dict[str, Any]]:
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(
            "train_dataset must have a length (a list or a datasets.Dataset); iterable datasets are not supported"
        ) from None
    return [dict(dataset[i]) for i in range(n)]


def _column_names(dataset: Any, rows: list[dict[str, Any]]) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return list(names)
    return list(rows[0].keys()) if rows else []


def _ids(value: Any) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(t) for t in value]


class _TextPreparer:
    """One dataset's preparation (see the module docstring)."""

    def __init__(self, tokenizer: Any, args: Any, completion_only_loss: bool, chat_template: Optional[str],
                 eos_token: Optional[str], template_vars: dict[str, Any]) -> None:
        self.tok = tokenizer
        self.args = args
        self.completion_only_loss = completion_only_loss
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.template_vars = template_vars
        self._warned_prefix = False

    def _chat(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        return self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)

    def tokenize(self, example: dict[str, Any]) -> dict[str, Any]:
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        chat_kwargs = {"chat_template": self.chat_template, "tools": tools, **self.template_vars,
                       **(example.get("chat_template_kwargs") or {})}
        assistant_only = bool(self.args.assistant_only_loss)
        out: dict[str, Any] = {}
        if "prompt" in example:
            if is_conversational(example):
                prompt_ids = _ids(self._chat(example["prompt"], add_generation_prompt=True, **chat_kwargs)["input_ids"])
                full = self._chat(list(example["prompt"]) + list(example["completion"]),
                                  return_assistant_tokens_mask=assistant_only, **chat_kwargs)
                ids = _ids(full["input_ids"])
                if "assistant_masks" in full:
                    out["assistant_masks"] = _ids(full["assistant_masks"])
            else:
                prompt_ids = _ids(self.tok(text=example["prompt"])["input_ids"])
                ids = _ids(self.tok(text=example["prompt"] + example["completion"])["input_ids"])
            n = common_prefix_length(prompt_ids, ids)
            if n < len(prompt_ids) and not self._warned_prefix:
                self._warned_prefix = True
                warnings.warn(
                    "The tokenized prompt is not a prefix of the tokenized prompt+completion, usually because the chat "
                    "template renders the prompt alone differently or because tokens merge across the boundary. The "
                    "completion starts where they diverge, and this end of the prompt is left out of the training "
                    f"sequence: {self.tok.decode(prompt_ids[n:])!r}. The model is trained on a context that differs "
                    "from the one it sees at inference. To avoid it, use a chat template that renders the prompt the "
                    "same way in both cases, or end the prompt on a token boundary. This warning is shown once, but it "
                    "likely applies to every example in the dataset.",
                    UserWarning,
                    stacklevel=4,
                )
            out["input_ids"] = ids
            out["completion_mask"] = [0] * n + [1] * (len(ids) - n)
        elif is_conversational(example):
            full = self._chat(example["messages"], return_assistant_tokens_mask=assistant_only, **chat_kwargs)
            out["input_ids"] = _ids(full["input_ids"])
            if "assistant_masks" in full:
                out["assistant_masks"] = _ids(full["assistant_masks"])
        else:
            out["input_ids"] = _ids(self.tok(text=example[self.args.dataset_text_field])["input_ids"])
        if "assistant_masks" in out and 1 not in out["assistant_masks"]:
            raise RuntimeError(
                "You're using `assistant_only_loss=True`, but at least one example has no assistant tokens. This "
                "usually means the tokenizer's chat template doesn't generate assistant masks — it may be missing the "
                "`{% generation %}` keyword. Please check the template and ensure it's correctly configured to support "
                "assistant masking."
            )
        return out

    def add_eos(self, example: dict[str, Any]) -> dict[str, Any]:
        eos = self.eos_token
        field = self.args.dataset_text_field
        if field in example and not example[field].endswith(eos):
            example[field] = example[field] + eos
        elif "completion" in example and not example["completion"].endswith(eos):
            example["completion"] = example["completion"] + eos
        return example


def prepare_dataset(dataset: Any, tokenizer: Any, args: Any, packing: bool, formatting_func: Optional[Callable],
                    completion_only_loss: bool, chat_template: Optional[str], eos_token: Optional[str],
                    template_vars: Optional[dict[str, Any]] = None,
                    dataset_name: str = "train") -> list[dict[str, Any]]:
    """``SFTTrainer._prepare_dataset`` for text data: a list of ``{"input_ids", "labels"}`` rows (plus
    ``seq_lengths`` when packed, which is not implemented)."""
    if packing:
        raise NotImplementedError("packing=True is not supported by ferrovlm's SFTTrainer yet; use packing=False")
    rows = _rows(dataset)
    if not rows:
        raise ValueError(f"the {dataset_name} dataset is empty")
    columns = _column_names(dataset, rows)
    is_processed = "input_ids" in columns
    prep = _TextPreparer(tokenizer, args, completion_only_loss, chat_template, eos_token, dict(template_vars or {}))

    if formatting_func is not None and is_processed:
        warnings.warn(
            "You passed a dataset that is already processed (contains an `input_ids` field) together with a "
            "formatting function. Therefore `formatting_func` will be ignored. Either remove the `formatting_func` or "
            "pass a dataset that is not already processed.",
            UserWarning,
            stacklevel=3,
        )
    if formatting_func is not None and not is_processed:
        rows = [{**r, "text": formatting_func(r)} for r in rows]

    if not is_processed:
        if is_conversational_from_value(rows[0]):
            rows = [maybe_convert_to_chatml(r) for r in rows]
        if not is_conversational(rows[0]):
            if eos_token is None:
                raise ValueError("the tokenizer has no eos_token to append to the texts; set SFTConfig(eos_token=...)")
            drop_messages = "messages" in columns
            rows = [prep.add_eos(copy.copy(r)) for r in rows]
            if drop_messages:
                rows = [{k: v for k, v in r.items() if k != "messages"} for r in rows]
        rows = [{**r, **prep.tokenize(r)} for r in rows]

    if "labels" not in rows[0]:
        mask_columns = []
        if completion_only_loss and "completion_mask" in rows[0]:
            mask_columns.append("completion_mask")
        if "assistant_masks" in rows[0]:
            mask_columns.append("assistant_masks")
        for r in rows:
            ids = _ids(r["input_ids"])
            masks = [_ids(r[c]) for c in mask_columns]
            r["labels"] = [t if all(bits) else -100 for t, *bits in zip(ids, *masks)]

    out = [{"input_ids": _ids(r["input_ids"]), "labels": _ids(r["labels"]),
            **({"seq_lengths": r["seq_lengths"]} if "seq_lengths" in r else {})} for r in rows]

    max_length = args.max_length
    if max_length is not None and not packing:
        if args.truncation_mode == "keep_start":
            sl = slice(None, max_length)
        elif args.truncation_mode == "keep_end":
            sl = slice(-max_length, None)
        else:
            raise ValueError(
                f"Unsupported truncation mode: {args.truncation_mode}, expected 'keep_start' or 'keep_end'"
            )
        out = [{**r, "input_ids": r["input_ids"][sl], "labels": r["labels"][sl]} for r in out]
        out = [r for r in out if any(t != -100 for t in r["labels"])]
        if not out:
            raise ValueError(f"every row of the {dataset_name} dataset is fully masked after truncation to "
                             f"max_length={max_length}")

    if args.shuffle_dataset:
        perm = np.random.default_rng(args.seed).permutation(len(out))
        out = [out[int(i)] for i in perm]
    return out


__all__ = ["prepare_dataset", "is_conversational_from_value", "maybe_convert_to_chatml", "common_prefix_length",
           "get_training_chat_template", "is_chat_template_stop_token_trained"]
