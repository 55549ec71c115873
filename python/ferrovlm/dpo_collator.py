"""``DataCollatorForVisionPreference``: TRL 1.16's vision preference (DPO) collator, on ferrovlm's processor,
returning numpy arrays (``return_tensors="pt"`` gives torch tensors).

TRL rules reproduced (trl/trainer/dpo_trainer.py ``DataCollatorForVisionPreference``, trl/data_utils.py
``apply_chat_template``), see tests/fixtures/dpo/README.md:

* Rows: ``{"images": [...] | "image": img, "prompt", "chosen", "rejected"}``; conversational (message lists) or
  plain strings. Batch of B rows -> 2B sequences: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` are
  prompt+rejected of the same examples in the same order. The images of every row are given twice (once per
  sequence: each sequence gets its own copy of the pixel values).
* Conversational rows: ``prepare_multimodal_messages`` on the prompt (with the row's images), chosen and rejected;
  the prompt is rendered with the generation prompt (``continue_final_message`` when it ends with an assistant
  turn), prompt+chosen and prompt+rejected are rendered whole, the prompt text becomes the common character prefix
  of the three renderings and chosen/rejected the rest of their rendering (so the completions hold
  ``" answer<end_of_utterance>\\n"`` for SmolVLM). Plain-string rows are used as they are (no EOS added).
* Prompts (2B, with the images) are processed left-padded, chosen and rejected (no images) right-padded, each
  with ``add_special_tokens=False``; chosen and rejected are right-padded to a common width (pad id =
  ``pad_token_id or eos_token_id``), the prompt and completion blocks concatenated, flushed left (each row rolled
  so its first real token is at column 0, all-pad trailing columns dropped) and cut to ``max_length`` on the right.
* Keys: the prompt processor outputs (``pixel_values``, ``pixel_attention_mask``) plus ``input_ids``,
  ``attention_mask`` and ``completion_mask`` (1 on the chosen/rejected tokens). There are no ``labels``: the
  trainer uses ``input_ids`` masked with ``completion_mask == 0``.

Differences from TRL (deliberate): ``pad_to_multiple_of`` pads on the right (TRL raises NotImplementedError);
a ``max_length`` that cuts into a row's image tokens raises ``ValueError`` here (TRL fails later in the model
forward with "Image features and image tokens do not match").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .batch import BatchFeature
from .data_collator import (
    common_prefix_str,
    flush_left,
    generation_flags,
    is_conversational,
    prepare_multimodal_messages,
)


class DataCollatorForVisionPreference:
    """Collates vision preference rows into a [chosen; rejected] batch like TRL's collator of the same name."""

    def __init__(self, processor: Any, max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 return_tensors: str = "np") -> None:
        self.processor = processor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors

    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def _pad_id(self) -> int:
        tok = self._tokenizer
        # TRL: `pad_token_id or eos_token_id` (a pad id of 0 also falls back to the EOS id)
        return int(tok.pad_token_id or tok.eos_token_id)

    def _render(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kw)

    def render_example(self, ex: dict[str, Any], images: Sequence[Any]) -> tuple[str, str, str]:
        """-> (prompt, chosen, rejected) texts as TRL's ``apply_chat_template`` gives them for a preference row."""
        if not is_conversational(ex):
            return ex["prompt"], ex["chosen"], ex["rejected"]
        prompt = prepare_multimodal_messages(ex["prompt"], images=images)
        chosen = prepare_multimodal_messages(ex["chosen"])
        rejected = prepare_multimodal_messages(ex["rejected"])
        kw = dict(ex.get("chat_template_kwargs") or {})
        gen, cont = generation_flags(prompt)
        p = self._render(prompt, add_generation_prompt=gen, continue_final_message=cont, **kw)
        pc = self._render(prompt + chosen, **kw)
        pr = self._render(prompt + rejected, **kw)
        p = common_prefix_str(p, pc, pr)
        return p, pc[len(p):], pr[len(p):]

    def __call__(self, examples: Sequence[dict[str, Any]], return_tensors: Optional[str] = None) -> BatchFeature:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rt = return_tensors or self.return_tensors
        row_images: list[list[Any]] = []
        for ex in examples:
            if "images" in ex:
                row_images.append([] if ex["images"] is None else list(ex["images"]))
            elif "image" in ex:
                row_images.append([] if ex["image"] is None else [ex["image"]])
            else:
                row_images.append([])
        prompts, chosens, rejecteds = [], [], []
        for ex, imgs in zip(examples, row_images):
            p, c, r = self.render_example(ex, imgs)
            prompts.append(p)
            chosens.append(c)
            rejecteds.append(r)
        images: Optional[list[list[Any]]] = row_images * 2
        if all(len(x) == 0 for x in images):
            images = None

        proc_p = dict(self.processor(images=images, text=prompts * 2, padding=True, padding_side="left",
                                     return_tensors="np", add_special_tokens=False))
        proc_c = dict(self.processor(text=chosens, padding=True, padding_side="right", return_tensors="np",
                                     add_special_tokens=False))
        proc_r = dict(self.processor(text=rejecteds, padding=True, padding_side="right", return_tensors="np",
                                     add_special_tokens=False))
        pad_id = self._pad_id
        width = max(proc_c["input_ids"].shape[1], proc_r["input_ids"].shape[1])

        def right(a: np.ndarray, value: int) -> np.ndarray:
            extra = width - a.shape[1]
            if not extra:
                return a
            return np.concatenate([a, np.full((a.shape[0], extra), value, dtype=a.dtype)], axis=1)

        comp_ids = np.concatenate([right(proc_c["input_ids"], pad_id), right(proc_r["input_ids"], pad_id)], axis=0)
        comp_mask = np.concatenate([right(proc_c["attention_mask"], 0), right(proc_r["attention_mask"], 0)], axis=0)
        p_ids, p_mask = proc_p["input_ids"], proc_p["attention_mask"]
        input_ids = np.concatenate([p_ids, comp_ids.astype(p_ids.dtype)], axis=1)
        attention_mask = np.concatenate([p_mask, comp_mask.astype(p_mask.dtype)], axis=1)
        completion_mask = np.concatenate([np.zeros_like(p_mask), comp_mask.astype(p_mask.dtype)], axis=1)
        attention_mask, input_ids, completion_mask = flush_left(attention_mask, input_ids, completion_mask)
        if self.max_length is not None:
            input_ids = input_ids[:, : self.max_length]
            attention_mask = attention_mask[:, : self.max_length]
            completion_mask = completion_mask[:, : self.max_length]
        data = proc_p
        data["input_ids"] = input_ids
        data["attention_mask"] = attention_mask
        data["completion_mask"] = completion_mask
        self._check_image_tokens(data, p_ids)
        if self.pad_to_multiple_of:
            extra = (-input_ids.shape[1]) % self.pad_to_multiple_of
            if extra:
                n = input_ids.shape[0]
                data["input_ids"] = np.concatenate([input_ids, np.full((n, extra), pad_id, input_ids.dtype)], axis=1)
                data["attention_mask"] = np.concatenate(
                    [attention_mask, np.zeros((n, extra), attention_mask.dtype)], axis=1
                )
                data["completion_mask"] = np.concatenate(
                    [completion_mask, np.zeros((n, extra), completion_mask.dtype)], axis=1
                )
        out = BatchFeature(data)
        if rt == "pt":
            out.convert_to_tensors("pt")
        return out

    def _check_image_tokens(self, data: dict[str, Any], prompt_ids: np.ndarray) -> None:
        if self.max_length is None or "pixel_values" not in data:
            return
        img_id = getattr(self.processor, "image_token_id", None)
        if img_id is None:
            return
        want = (prompt_ids == img_id).sum(axis=1)
        have = (data["input_ids"] == img_id).sum(axis=1)
        for i, (w, h) in enumerate(zip(want, have)):
            if h < w:
                raise ValueError(f"max_length={self.max_length} cuts into the image tokens of sequence {i} ({h} of "
                                 f"{w} image tokens kept); raise max_length or set it to None")


__all__ = ["DataCollatorForVisionPreference"]
