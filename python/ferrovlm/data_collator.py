"""``DataCollatorForVisionLanguageModeling``: TRL 1.16's vision-language SFT collator, on ferrovlm's processor,
returning numpy arrays (``return_tensors="pt"`` gives torch tensors).

TRL rules reproduced (trl/trainer/sft_trainer.py, transformers 5.24):

* Rows: ``{"images": [...] | "image": img, "messages": [...]}`` (language modeling, conversational),
  ``{"images", "<dataset_text_field>": str}`` (language modeling, plain text) or
  ``{"images", "prompt", "completion"}`` (conversational message lists or plain strings).
* Messages with string content get ``{"type": "image"}`` placeholders for all the row's images in front of the
  first user message's text; placeholders are filled with the row's images in order; the count must match.
  Rows that hold their images both in ``"images"`` and in the content (``{"type": "image", "image": img}``, the
  same images: the HF cookbook's SFT rows) are taken as TRL <= 0.22 took them: each content image part is one of
  the row's images, counted once (TRL 1.16 raises there: no unfilled placeholder for the row's images).
* Language modeling: the chat template is rendered, then one processor call with ``padding=True``,
  ``padding_side="right"``, ``truncation=max_length is not None``, ``max_length``, ``add_special_tokens=False``;
  the cut follows the tokenizer's ``truncation_side``, which is "left" in SmolVLM's tokenizer_config.json (so
  TRL keeps the END of long conversations here, and the image tokens at the start are what gets cut).
  ``labels`` = ``input_ids`` with padding set to -100 (image tokens are NOT masked). With
  ``assistant_only_loss`` only the assistant turns' tokens are labels (see ``assistant_token_mask``).
* Prompt-completion: a conversational prompt is rendered with the generation prompt (or
  ``continue_final_message`` when it ends with an assistant turn); the completion is the rendering of
  prompt + completion minus the common prefix with the prompt. Prompts (with the images) are left-padded,
  completions right-padded, concatenated, flushed left (each row rolled so its first real token is at 0, all-pad
  trailing columns dropped), then cut to ``max_length`` (on the right). ``labels`` = -100 on padding, and with
  ``completion_only_loss`` on the prompt too. No EOS is appended (TRL skips dataset preparation for vision data).
* A batch where no row has an image is processed without images (no ``pixel_values``).
* Batch keys: ``input_ids``, ``attention_mask``, ``pixel_values``, ``pixel_attention_mask`` (when images),
  ``labels``. Idefics3 has no ``token_type_ids`` / ``mm_token_type_ids``.

Differences from TRL (deliberate): transformers 5.24's Idefics3 processor raises ``TypeError`` as soon as
truncation shortens a row of a batch with images; ferrovlm truncates (on the tokenizer's truncation side) and
raises ``ValueError`` only when the cut removes image tokens of a row. ``pad_to_multiple_of`` also works for
prompt-completion rows (TRL raises NotImplementedError there).

Assistant-only loss: TRL swaps in its training copy of the SmolVLM template (``{% generation %}`` around
everything after ``Assistant:`` up to and including ``<end_of_utterance>\\n``) and masks the tokens that overlap
that character span. ferrovlm finds the same spans without generation markers (``{% generation %}`` blocks of a
user's template are rendered by the core's chat template, the one place that handles them): the span of assistant
turn k starts where ``render(messages[:k], add_generation_prompt=True)`` ends and stops where ``render(messages[:k+1])``
ends (both must be prefixes of the full rendering). Character spans become token spans by tokenizing the text
before each boundary (tokens overlapping the span count, as in transformers), on the text before image
expansion; each ``<image>`` placeholder's mask value is then copied onto its expansion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .batch import BatchFeature

_SUPPORTED_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


# ---- TRL data helpers (own implementations of trl.data_utils behaviour) --------------------------------------

def is_conversational(example: dict[str, Any]) -> bool:
    """True when a supported key holds a list of ``{"role": ...}`` dicts."""
    for key in _SUPPORTED_KEYS:
        if key in example:
            v = example[key]
            return isinstance(v, list) and len(v) > 0 and isinstance(v[0], dict) and "role" in v[0]
    return False


def prepare_multimodal_messages(
    messages: list[dict[str, Any]], images: Optional[Sequence[Any]] = None
) -> list[dict[str, Any]]:
    """String contents become ``[{"type": "text", ...}]``; the first user message with string content gets one
    ``{"type": "image"}`` placeholder per image in front; unfilled placeholders get the images in order."""
    images = list(images or [])
    out: list[dict[str, Any]] = []
    images_included = False
    for m in messages:
        role = m.get("role")
        if role == "user":
            if isinstance(m.get("content"), str):
                if not images_included:
                    m = {**m, "content": [*({"type": "image"} for _ in images), {"type": "text", "text": m["content"]}]}
                    images_included = True
                else:
                    m = {**m, "content": [{"type": "text", "text": m["content"]}]}
        elif role in ("assistant", "system", "tool"):
            if isinstance(m.get("content"), str):
                m = {**m, "content": [{"type": "text", "text": m["content"]}]}
        else:
            raise ValueError(f"Invalid role in message: {role}. Expected 'system', 'user', 'assistant', or 'tool'.")
        out.append(m)
    slots = sum(1 for m in out if m.get("content") and m["role"] != "tool"
                for p in m["content"] if p.get("type") == "image" and "image" not in p)
    if slots != len(images) and images and _images_given_twice(out, images):
        # TRL <= 0.22 rows (the cookbook's): every image part of the content, filled or not, is a slot for the
        # row's images in order; the images in the content are the row's own, so each is counted once.
        it = iter(images)
        return [m if not m.get("content") or m["role"] == "tool" else
                {**m, "content": [({**p, "image": next(it)} if p.get("type") == "image" else p) for p in m["content"]]}
                for m in out]
    if slots != len(images):
        raise ValueError(
            f"Number of images provided ({len(images)}) does not match number of image placeholders ({slots})."
        )
    if images:
        it = iter(images)
        for i, m in enumerate(out):
            if not m.get("content") or m["role"] == "tool":
                continue
            out[i] = {
                **m,
                "content": [
                    ({**p, "image": next(it)} if p.get("type") == "image" and "image" not in p else p)
                    for p in m["content"]
                ],
            }
    return out


def _images_given_twice(messages: list[dict[str, Any]], images: Sequence[Any]) -> bool:
    """True when the content's image parts (filled or not) are as many as ``images`` and each filled one holds
    the image at its position in ``images`` (the same object, or equal pixels: a ``datasets`` row decodes the two
    copies separately): rows that give their images both in ``"images"`` and in the messages, which TRL <= 0.22
    trained on (its ``prepare_multimodal_messages`` left structured content alone and the processor got the
    ``"images"`` list)."""
    parts = [p for m in messages if m.get("content") and m["role"] != "tool"
             for p in m["content"] if p.get("type") == "image"]
    if len(parts) != len(images):
        return False
    return all("image" not in p or _same_image(p["image"], img) for p, img in zip(parts, images))


def _same_image(a: Any, b: Any) -> bool:
    if a is b:
        return True
    from .image_processing import _is_pil

    if _is_pil(a) and _is_pil(b):
        return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        a_arr, b_arr = np.asarray(a), np.asarray(b)
    except Exception:
        return False
    return a_arr.dtype != object and a_arr.shape == b_arr.shape and bool(np.array_equal(a_arr, b_arr))


def _images_of(messages: list[dict[str, Any]]) -> list[Any]:
    from .processing import _images_in

    return _images_in(messages)


def flush_left(mask: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rolls each row so its first non-zero mask entry is at column 0, then drops the trailing columns whose mask
    is zero in every row (TRL's ``flush_left``)."""
    n, m = mask.shape
    first = mask.argmax(axis=1)
    idx = (np.arange(m)[None, :] + first[:, None]) % m
    rolled = [np.take_along_axis(a, idx, axis=1) for a in (mask, *arrays)]
    empty = rolled[0].sum(axis=0) == 0
    cut = int(empty.argmax()) if empty.any() else m
    return tuple(a[:, :cut] for a in rolled)


class DataCollatorForLanguageModeling:
    """TRL 1.16's language-modeling collator: rows of token ids (``{"input_ids": [...], "labels": [...]}``, labels
    optional, ``seq_lengths`` for packed rows) padded on the right into a batch (numpy by default,
    ``return_tensors="pt"`` gives torch tensors).

    * ``input_ids`` padded with ``pad_token_id``; ``labels`` (the row's ``labels``, else a copy of its
      ``input_ids``) padded with -100; ``attention_mask`` 1 on the row's tokens, 0 on padding. Tokens that take no
      loss must already be -100 in the rows' labels (``SFTTrainer`` prepares them so).
    * ``pad_to_multiple_of``: the padded length is rounded up to a multiple.
    * ``padding_free=True``: the rows are concatenated into one row; ``position_ids`` restart at 0 at each row
      (each packed sequence with ``seq_lengths``) and replace ``attention_mask``; labels are -100 wherever the
      position is 0; ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 cumulative sequence starts), ``max_length_q`` /
      ``max_length_k`` (the longest sequence) and ``seq_idx`` (int32 sequence index of each token) are added.
    * ``return_position_ids=True`` (without ``padding_free``): ``position_ids`` as well as ``attention_mask``.
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False, return_position_ids: bool = False,
                 pad_to_multiple_of: Optional[int] = None, return_tensors: str = "np") -> None:
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.return_position_ids = return_position_ids
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors

    def __call__(self, examples: Sequence[dict[str, Any]], return_tensors: Optional[str] = None) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rt = return_tensors or self.return_tensors
        if rt not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {rt!r}")
        input_ids = [_int_row(ex["input_ids"], "input_ids") for ex in examples]
        labels = [_int_row(ex["labels"], "labels") if ex.get("labels") is not None else ids.copy()
                  for ex, ids in zip(examples, input_ids)]
        for i, (a, b) in enumerate(zip(input_ids, labels)):
            if a.shape != b.shape:
                raise ValueError(f"row {i}: labels has {b.shape[0]} entries for {a.shape[0]} input_ids")
        seq_lengths = [ex["seq_lengths"] for ex in examples] if "seq_lengths" in examples[0] else None
        position_ids = None
        if self.padding_free or self.return_position_ids:
            if seq_lengths is not None:
                position_ids = self.get_position_ids_from_packed_seq_lengths(seq_lengths)
            else:
                position_ids = [np.arange(len(ids), dtype=np.int64) for ids in input_ids]
        out: dict[str, Any] = {}
        if self.padding_free:
            input_ids = [np.concatenate(input_ids)]
            labels = [np.concatenate(labels)]
            position_ids = [np.concatenate(position_ids)]
        m = self.pad_to_multiple_of
        out["input_ids"] = pad(input_ids, self.pad_token_id, "right", m)
        out["labels"] = pad(labels, -100, "right", m)
        if self.padding_free:
            pos = pad(position_ids, 0, "right", m)
            out["position_ids"] = pos
            out["labels"][pos == 0] = -100
            starts = np.flatnonzero(pos[0] == 0)
            cu = np.concatenate([starts, [pos.shape[1]]]).astype(np.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
            out["max_length_q"] = out["max_length_k"] = int(np.diff(cu).max())
            out["seq_idx"] = np.repeat(np.arange(len(cu) - 1, dtype=np.int32), np.diff(cu))[None]
        else:
            if self.return_position_ids:
                out["position_ids"] = pad(position_ids, 0, "right", m)
            out["attention_mask"] = pad([np.ones_like(ids) for ids in input_ids], 0, "right", m)
        if rt == "pt":
            import torch

            out = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                   for k, v in out.items()}
        return out

    @staticmethod
    def get_position_ids_from_packed_seq_lengths(batch_seq_lengths: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Position ids restarting at 0 at each packed sequence, one array per row."""
        return [np.concatenate([np.arange(int(n), dtype=np.int64) for n in lens]) if len(lens) else
                np.zeros(0, dtype=np.int64) for lens in batch_seq_lengths]


def _int_row(value: Any, name: str) -> np.ndarray:
    from ._tensors import is_torch_tensor

    if is_torch_tensor(value):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"'{name}' must be a flat list of token ids, got an array of shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    return arr.astype(np.int64)


def pad(rows: Sequence[np.ndarray], padding_value: int = 0, padding_side: str = "right",
        pad_to_multiple_of: Optional[int] = None) -> np.ndarray:
    """TRL's ``pad``: rows of different lengths into one [n, L] array (L = the longest, rounded up to a multiple
    of ``pad_to_multiple_of``)."""
    n = max(len(r) for r in rows)
    if pad_to_multiple_of:
        n += (-n) % int(pad_to_multiple_of)
    out = np.full((len(rows), n), padding_value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if padding_side == "left":
            out[i, n - len(r):] = r
        else:
            out[i, : len(r)] = r
    return out


class DataCollatorForVisionLanguageModeling:
    """Collates vision-language rows into a batch like TRL's collator of the same name (numpy by default)."""

    def __init__(self, processor: Any, max_length: Optional[int] = None, completion_only_loss: bool = False,
                 pad_to_multiple_of: Optional[int] = None, dataset_text_field: str = "text",
                 assistant_only_loss: bool = False, chat_template: Optional[str] = None,
                 return_tensors: str = "np") -> None:
        self.processor = processor
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dataset_text_field = dataset_text_field
        self.assistant_only_loss = assistant_only_loss
        self.chat_template = chat_template
        self.return_tensors = return_tensors

    # -- entry ---------------------------------------------------------------------------------------------------
    def __call__(self, examples: Sequence[dict[str, Any]], return_tensors: Optional[str] = None) -> BatchFeature:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rt = return_tensors or self.return_tensors
        first = examples[0]
        if self.assistant_only_loss and "messages" not in first:
            raise ValueError(
                "The `assistant_only_loss` argument is only supported for conversational language modeling datasets."
            )
        if "messages" in first or self.dataset_text_field in first:
            if self.completion_only_loss:
                raise ValueError("The `completion_only_loss` argument is not supported for language modeling datasets.")
            data = self._collate_language_modeling(examples)
        elif "prompt" in first and "completion" in first:
            data = self._collate_prompt_completion(examples)
        else:
            raise KeyError(f"Unexpected input keys in examples: {list(first.keys())}.")
        out = BatchFeature(data)
        if rt == "pt":
            out.convert_to_tensors("pt")
        return out

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def _pad_id(self) -> int:
        tok = self._tokenizer
        pid = tok.pad_token_id
        if pid is None:
            pid = tok.eos_token_id
        return int(pid)

    @staticmethod
    def _row_images(examples: Sequence[dict[str, Any]]) -> list[list[Any]]:
        out = []
        for ex in examples:
            if "images" in ex:
                imgs = ex["images"]
                out.append([] if imgs is None else list(imgs))
            elif "image" in ex:
                out.append([] if ex["image"] is None else [ex["image"]])
            else:
                out.append([])
        return out

    def _render(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        return self.processor.apply_chat_template(messages, chat_template=kw.pop("chat_template", None),
                                                  tokenize=False, **kw)

    def _pad_multiple(self, data: dict[str, Any], pad_side: str = "right") -> None:
        m = self.pad_to_multiple_of
        if not m:
            return
        ids = data["input_ids"]
        extra = (-ids.shape[1]) % m
        if not extra:
            return
        def pad(a: np.ndarray, value: int) -> np.ndarray:
            block = np.full((a.shape[0], extra), value, dtype=a.dtype)
            return np.concatenate([a, block] if pad_side == "right" else [block, a], axis=1)
        data["input_ids"] = pad(ids, self._pad_id)
        data["attention_mask"] = pad(data["attention_mask"], 0)
        if "labels" in data:
            data["labels"] = pad(data["labels"], -100)

    def _check_image_tokens(self, data: dict[str, Any]) -> None:
        """After truncation: every real image tile must still have all its image tokens."""
        if self.max_length is None or "pixel_values" not in data:
            return
        mask = data.get("pixel_attention_mask")
        if mask is None:
            return
        tiles = mask.reshape(mask.shape[0], mask.shape[1], -1).any(axis=2).sum(axis=1)
        seq = int(getattr(self.processor, "image_seq_len", 0) or 0)
        img_id = getattr(self.processor, "image_token_id", None)
        if not seq or img_id is None:
            return
        have = (data["input_ids"] == img_id).sum(axis=1)
        for i, (t, h) in enumerate(zip(tiles, have)):
            if h < t * seq:
                raise ValueError(f"max_length={self.max_length} cuts into the image tokens of sample {i} ({h} of "
                                 f"{t * seq} image tokens kept); raise max_length or lower the image resolution")

    # -- language modeling ---------------------------------------------------------------------------------------
    def _collate_language_modeling(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        row_images = self._row_images(examples)
        kwargs = dict(padding=True, padding_side="right", truncation=self.max_length is not None,
                      max_length=self.max_length, add_special_tokens=False, return_tensors="np")
        convs = None
        if "messages" in examples[0]:
            convs = [prepare_multimodal_messages(ex["messages"], images=imgs) for ex, imgs in zip(examples, row_images)]
            template = self.chat_template
            texts = [self._render(c, chat_template=template) for c in convs]
            images = [_images_of(c) for c in convs]
        else:
            texts = [ex[self.dataset_text_field] for ex in examples]
            images = row_images
        if all(len(x) == 0 for x in images):
            images = None
        truncate_later = self.assistant_only_loss and self.max_length is not None
        if truncate_later:  # masks are found on whole rows, then rows are cut like the tokenizer would
            kwargs.update(truncation=False, max_length=None)
        out = self.processor(images=images, text=texts, **kwargs)
        data = dict(out)
        ids, attn = data["input_ids"], data["attention_mask"]
        amask = None
        if self.assistant_only_loss:
            amask = np.zeros_like(ids)
            for i, (conv, text) in enumerate(zip(convs, texts)):
                n = int(attn[i].sum())
                amask[i, :n] = self.assistant_token_mask(conv, text, ids[i, :n])
        if truncate_later:
            ids, attn, amask = self._truncate_right_padded(ids, attn, amask)
            data["input_ids"], data["attention_mask"] = ids, attn
        self._check_image_tokens(data)
        labels = ids.copy()
        labels[attn == 0] = -100
        if amask is not None:
            labels[amask == 0] = -100
        data["labels"] = labels
        self._pad_multiple(data)
        return data

    def _truncate_right_padded(self, ids: np.ndarray, attn: np.ndarray, extra: np.ndarray):
        """Cuts right-padded rows to ``max_length`` on the tokenizer's ``truncation_side`` and pads to the longest
        row again (what the tokenizer does with ``truncation=True, padding=True``)."""
        side = getattr(self._tokenizer, "truncation_side", "right")
        m = int(self.max_length)
        rows = []
        for i in range(ids.shape[0]):
            n = int(attn[i].sum())
            sl = slice(max(0, n - m), n) if side == "left" else slice(0, min(n, m))
            rows.append((ids[i, sl], extra[i, sl]))
        width = max(len(r[0]) for r in rows)
        new_ids = np.full((len(rows), width), self._pad_id, dtype=ids.dtype)
        new_attn = np.zeros((len(rows), width), dtype=attn.dtype)
        new_extra = np.zeros((len(rows), width), dtype=extra.dtype)
        for i, (a, e) in enumerate(rows):
            new_ids[i, : len(a)] = a
            new_attn[i, : len(a)] = 1
            new_extra[i, : len(a)] = e
        return new_ids, new_attn, new_extra

    def assistant_token_mask(self, messages: list[dict[str, Any]], text: str, input_ids: np.ndarray) -> np.ndarray:
        """1 on the tokens of ``input_ids`` (the processed, possibly truncated, unpadded row for the rendering
        ``text`` of ``messages``) that overlap an assistant turn's span (after ``Assistant:`` through the end of
        the turn, ``<end_of_utterance>\\n`` included)."""
        template = self.chat_template
        spans: list[tuple[int, int]] = []
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            upto = self._render(messages[: k + 1], chat_template=template)
            if k > 0:
                pre = self._render(messages[:k], chat_template=template, add_generation_prompt=True)
            else:  # no earlier message to render: the common prefix with a different assistant text
                other = [{**m, "content": [({**p, "text": "\x01" + p.get("text", "")} if p.get("type") == "text" else p)
                                           for p in m["content"]]}]
                alt = self._render(other, chat_template=template)
                j = 0
                while j < min(len(alt), len(upto)) and alt[j] == upto[j]:
                    j += 1
                pre = upto[:j]
            if not (upto.startswith(pre) and text.startswith(upto)):
                raise ValueError("assistant_only_loss: the chat template does not render conversations prefix by "
                                 "prefix, so assistant turns cannot be located")
            spans.append((len(pre), len(upto)))
        tok = self._tokenizer
        full = tok.encode(text, add_special_tokens=False)
        tmask = np.zeros(len(full), dtype=np.int64)
        for s, e in spans:
            a = _common_prefix(tok.encode(text[:s], add_special_tokens=False), full)
            before_end = tok.encode(text[:e], add_special_tokens=False)
            c = _common_prefix(before_end, full)
            b = c if c == len(before_end) else c + 1
            tmask[a:b] = 1
        return self._expand_mask(full, tmask, np.asarray(input_ids))

    def _expand_mask(self, unexpanded: list[int], tmask: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Copies each ``<image>`` placeholder's mask value onto its expansion in ``ids``."""
        tok = self._tokenizer
        img = tok.convert_tokens_to_ids(getattr(self.processor, "image_token", "<image>"))
        glob = tok.convert_tokens_to_ids(getattr(self.processor, "global_image_tag", "<global-img>"))
        fake = tok.convert_tokens_to_ids(getattr(self.processor, "fake_image_token", "<fake_token_around_image>"))
        out = np.zeros(len(ids), dtype=np.int64)
        i = j = 0
        n = len(ids)
        while j < n and i < len(unexpanded):
            t = unexpanded[i]
            if t == img and ids[j] != img:  # an expanded placeholder: <fake>...<global-img><image>*L<fake>
                k = j
                while k < n and ids[k] != glob:
                    k += 1
                k += 1
                while k < n and ids[k] == img:
                    k += 1
                if k < n and ids[k] == fake:
                    k += 1
                out[j:k] = tmask[i]
                j = k
            else:
                if ids[j] != t:
                    raise ValueError("assistant_only_loss: the processed tokens do not line up with the rendered text")
                out[j] = tmask[i]
                j += 1
            i += 1
        return out

    # -- prompt-completion ---------------------------------------------------------------------------------------
    def _collate_prompt_completion(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        row_images = self._row_images(examples)
        prompts, completions, images = [], [], []
        for ex, imgs in zip(examples, row_images):
            if is_conversational(ex):
                p_msgs = prepare_multimodal_messages(ex["prompt"], images=imgs)
                c_msgs = prepare_multimodal_messages(ex["completion"])
                p, c = self._render_prompt_completion(p_msgs, c_msgs, ex.get("chat_template_kwargs") or {})
                images.append(_images_of(p_msgs))
            else:
                p, c = ex["prompt"], ex["completion"]
                images.append(imgs)
            prompts.append(p)
            completions.append(c)
        if all(len(x) == 0 for x in images):
            images = None
        proc_p = dict(self.processor(images=images, text=prompts, padding=True, padding_side="left",
                                     return_tensors="np", add_special_tokens=False))
        proc_c = dict(self.processor(text=completions, padding=True, padding_side="right",
                                     return_tensors="np", add_special_tokens=False))
        input_ids = np.concatenate([proc_p["input_ids"], proc_c["input_ids"]], axis=1)
        attention_mask = np.concatenate([proc_p["attention_mask"], proc_c["attention_mask"]], axis=1)
        completion_mask = np.concatenate([np.zeros_like(proc_p["attention_mask"]), proc_c["attention_mask"]], axis=1)
        attention_mask, input_ids, completion_mask = flush_left(attention_mask, input_ids, completion_mask)
        if self.max_length is not None:
            input_ids = input_ids[:, : self.max_length]
            attention_mask = attention_mask[:, : self.max_length]
            completion_mask = completion_mask[:, : self.max_length]
        labels = input_ids.copy()
        labels[attention_mask == 0] = -100
        if self.completion_only_loss:
            labels[completion_mask == 0] = -100
        data = proc_p
        data["input_ids"] = input_ids
        data["attention_mask"] = attention_mask
        data["labels"] = labels
        self._pad_multiple(data)
        return data

    def _render_prompt_completion(self, prompt: list[dict[str, Any]], completion: list[dict[str, Any]],
                                  template_kwargs: dict[str, Any]) -> tuple[str, str]:
        gen, cont = generation_flags(prompt)
        p = self._render(prompt, add_generation_prompt=gen, continue_final_message=cont, **template_kwargs)
        full = self._render(prompt + completion, **template_kwargs)
        head = common_prefix_str(p, full)
        return head, full[len(head):]


def generation_flags(prompt: list[dict[str, Any]]) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message) for rendering a prompt the way TRL does."""
    last = prompt[-1]["role"]
    if last in ("user", "tool"):
        return True, False
    if last == "assistant":
        return False, True
    raise ValueError(f"Invalid role in the last message: {last}")


def common_prefix_str(*texts: str) -> str:
    """The longest common prefix of the texts."""
    n = min(len(t) for t in texts)
    j = 0
    while j < n and all(t[j] == texts[0][j] for t in texts[1:]):
        j += 1
    return texts[0][:j]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_vision_dataset(sample: dict[str, Any]) -> bool:
    """TRL's test on the first row: an ``image`` or ``images`` key."""
    return "image" in sample or "images" in sample


def signature_columns(is_vision: bool) -> list[str]:
    """Columns ``remove_unused_columns=True`` keeps (TRL's ``_set_signature_columns_if_needed``)."""
    return (
        ["messages", "prompt", "completion", "image", "images"] if is_vision else ["input_ids", "labels", "seq_lengths"]
    )


def skip_prepare_dataset(args: Any, sample: dict[str, Any]) -> bool:
    """TRL skips dataset preparation (ChatML conversion, EOS appending, tokenization) when
    ``dataset_kwargs={"skip_prepare_dataset": True}`` or when the data is a vision dataset: such rows go to the
    collator as they are (the user's ``data_collator`` when given, else ``DataCollatorForVisionLanguageModeling``)."""
    dk = getattr(args, "dataset_kwargs", None) or {}
    return bool(dk.get("skip_prepare_dataset", False)) or is_vision_dataset(sample)


__all__ = ["DataCollatorForLanguageModeling", "DataCollatorForVisionLanguageModeling",
           "prepare_multimodal_messages", "is_conversational", "flush_left",
           "is_vision_dataset", "signature_columns", "skip_prepare_dataset"]
