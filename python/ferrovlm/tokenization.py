"""``PreTrainedTokenizerFast``-like tokenizer over the Rust ``tokenizers`` crate.

Special tokens, padding, truncation, decoding and chat templates behave as in transformers 5."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from . import _core
from ._tensors import is_torch_tensor
from .batch import BatchEncoding
from .hub import resolve_pretrained_kwargs


def padding_strategy(padding: Any) -> str:
    if padding is True or padding == "longest":
        return "longest"
    if padding is False or padding is None or padding == "do_not_pad":
        return "do_not_pad"
    if padding == "max_length":
        return "max_length"
    raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _ids_list(ids: Any) -> list[int]:
    if is_torch_tensor(ids):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(t) for t in ids]


def _model_type(directory: str) -> Optional[str]:
    f = Path(directory) / "config.json"
    try:
        return json.loads(f.read_text()).get("model_type") if f.is_file() else None
    except ValueError:
        return None


class PreTrainedTokenizerFast:
    """A Hugging Face tokenizer read from ``tokenizer.json`` + ``tokenizer_config.json``."""

    def __init__(self, core: _core.Tokenizer, name_or_path: str = "", chat_template: Optional[Any] = None) -> None:
        self._core = core
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.init_kwargs: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> PreTrainedTokenizerFast:
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:
            # the tokenizer of a GGUF file (tokenizer.ggml.*), as transformers rebuilds it
            gguf_file = os.fspath(gguf_file)
            path = resolve_pretrained_kwargs(pretrained_model_name_or_path, kwargs, marker=gguf_file)
            core, template = _core.Tokenizer.from_gguf(os.path.join(path, gguf_file))
            tok = cls(core, os.fspath(pretrained_model_name_or_path), template)
        else:
            path = resolve_pretrained_kwargs(pretrained_model_name_or_path, kwargs, marker="tokenizer.json")
            core = _core.Tokenizer.from_dir(path, _model_type(path))
            templates = _core.load_chat_templates(path, "tokenizer")
            tok = cls(core, os.fspath(pretrained_model_name_or_path), _templates_value(templates))
        if "padding_side" in kwargs:
            tok.padding_side = kwargs.pop("padding_side")
        return tok

    # -- special tokens ------------------------------------------------------------------------
    def _special(self, name: str) -> Optional[str]:
        return dict(self._core.special_tokens_map).get(name)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._core.special_tokens_map)
        extra = self._core.extra_special_tokens
        if extra:
            out["additional_special_tokens"] = list(extra)
        return out

    bos_token = property(lambda self: self._special("bos_token"))
    eos_token = property(lambda self: self._special("eos_token"))
    unk_token = property(lambda self: self._special("unk_token"))
    pad_token = property(lambda self: self._special("pad_token"))
    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    def _id_of(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._core.convert_tokens_to_ids(token)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._core.extra_special_tokens)

    @property
    def extra_special_tokens_ids(self) -> list[int]:
        return [self._core.convert_tokens_to_ids(t) for t in self._core.extra_special_tokens]

    # transformers 4.x names, still used by the tutorials
    additional_special_tokens = extra_special_tokens
    additional_special_tokens_ids = extra_special_tokens_ids

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._core.all_special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._core.all_special_ids)

    @property
    def padding_side(self) -> str:
        return self._core.padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        self._core.padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._core.truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        self._core.truncation_side = value

    @property
    def model_max_length(self) -> Optional[int]:
        return self._core.model_max_length

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    def __len__(self) -> int:
        return len(self._core)

    def get_vocab(self) -> dict[str, int]:
        n = len(self)
        return {t: i for i, t in enumerate(self._core.convert_ids_to_tokens(list(range(n)), False)) if t is not None}

    # -- changing and saving ---------------------------------------------------------------------
    def copy(self) -> PreTrainedTokenizerFast:
        """An independent copy (tokens added to it leave this tokenizer as it is)."""
        out = type(self)(self._core.copy(), self.name_or_path, copy.deepcopy(self.chat_template))
        out.init_kwargs = {k: v for k, v in self.init_kwargs.items() if k != "gguf_file"}
        return out

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Appends the tokens not in the vocabulary yet (ids from ``len(tokenizer)`` on); returns how many."""
        items = [new_tokens] if isinstance(new_tokens, str) or hasattr(new_tokens, "content") else list(new_tokens)
        return self._core.add_tokens([_token_text(t, "new_tokens") for t in items], bool(special_tokens))

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        """transformers' ``add_special_tokens``: named tokens (``eos_token``, ...) and ``extra_special_tokens`` /
        ``additional_special_tokens`` (replacing the list, or extending it); new ones are appended as special
        tokens. Returns how many tokens were new."""
        d = dict(special_tokens_dict or {})
        if "additional_special_tokens" in d and not d.get("extra_special_tokens"):
            d["extra_special_tokens"] = d.pop("additional_special_tokens")
        named, extra = [], []
        for key, value in d.items():
            if key == "extra_special_tokens":
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"Tokens {value} for key {key} should all be str or AddedToken instances")
                extra = [_token_text(t, key) for t in value]
            elif key in _SPECIAL_TOKEN_NAMES:
                named.append((key, _token_text(value, key)))
            else:
                valid = set(_SPECIAL_TOKEN_NAMES) | {"extra_special_tokens"}
                raise ValueError(f"Key {key} is not a valid special token. Valid keys are: {valid}")
        return self._core.add_special_tokens(named, extra, bool(replace_extra_special_tokens))

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> tuple[str, ...]:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``, as transformers 5 writes
        them; returns the paths."""
        from .composition import save_tokenizer

        return tuple(save_tokenizer(self, os.fspath(save_directory)))

    # -- encoding ------------------------------------------------------------------------------
    def __call__(
        self,
        text: Union[str, list[str], None] = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = None,
        padding_side: Optional[str] = None,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: Optional[bool] = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        if text is None:
            raise ValueError("You need to specify `text`")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        kwargs.pop("return_token_type_ids", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        ids, mask = self._core.encode_batch(
            texts, add_special_tokens, padding_strategy(padding), bool(truncation) and truncation != "do_not_truncate",
            max_length, pad_to_multiple_of, padding_side, None,
        )
        data: dict[str, Any] = {"input_ids": ids[0] if single else ids}
        if return_attention_mask is not False:
            data["attention_mask"] = mask[0] if single else mask
        if single and return_tensors is not None:
            data = {k: [v] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs:
            return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
        return list(self._core.encode(text, add_special_tokens))

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(self._core.tokenize(text))

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> str:
        return self._core.decode(_ids_list(token_ids), skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> list[str]:
        if is_torch_tensor(sequences):
            sequences = sequences.detach().cpu().numpy()
        return list(
            self._core.batch_decode(
                [_ids_list(s) for s in sequences], skip_special_tokens, clean_up_tokenization_spaces
            )
        )

    def convert_tokens_to_ids(self, tokens: Union[str, list[str]]) -> Any:
        if isinstance(tokens, str):
            return self._core.convert_tokens_to_ids(tokens)
        return [self._core.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, (int, np.integer)):
            return self._core.convert_ids_to_tokens([int(ids)], False)[0]
        return [
            t
            for t in self._core.convert_ids_to_tokens(_ids_list(ids), skip_special_tokens)
            if not (skip_special_tokens and t is None)
        ]

    # -- chat templates --------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Any,
        chat_template: Optional[str] = None,
        tools: Any = None,
        documents: Any = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: Any = False,
        truncation: bool = False,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        if not tokenize:
            return_dict = False
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        spans: Optional[list[list[tuple[int, int]]]] = [] if return_assistant_tokens_mask else None
        texts, batched = render_conversations(
            self,
            conversation,
            chat_template,
            tools,
            documents,
            add_generation_prompt,
            continue_final_message,
            normalize_image_urls=False,
            kwargs=kwargs,
            generation_spans=spans,
        )
        if not tokenize:
            return texts if batched else texts[0]
        enc = self(texts if batched else texts[0], add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=None if spans is not None else return_tensors)
        if not return_dict:
            return enc["input_ids"]
        if spans is not None:
            rows = enc["input_ids"] if batched else [enc["input_ids"]]
            masks = []
            for text, row_spans, row in zip(texts, spans, rows):
                full = list(self._core.encode(text, False))
                full_mask = assistant_tokens_mask(self, text, full, row_spans)
                cut = max_length if truncation and truncation != "do_not_truncate" else None
                if cut is None and truncation and truncation != "do_not_truncate":
                    cut = self.model_max_length
                masks.append(_align_mask(full, full_mask, list(row), cut, self.truncation_side, self.padding_side))
            enc["assistant_masks"] = masks if batched else masks[0]
            if return_tensors is not None:
                enc.convert_to_tensors(return_tensors)
        return enc


_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(token: Any, key: str) -> str:
    """A token given as a string or an ``AddedToken`` (its ``content``)."""
    text = getattr(token, "content", token)
    if not isinstance(text, str):
        raise ValueError(f"Token {token!r} for key {key} should be a str or an AddedToken instance")
    return text


def _templates_value(templates: Optional[list[Any]]) -> Any:
    """transformers' ``chat_template`` attribute: the string, or a dict when there are named ones."""
    if not templates:
        return None
    if len(templates) == 1 and templates[0][0] == "default":
        return templates[0][1]
    return {name: src for name, src in templates}


def pick_template(owner: Any, chat_template: Optional[str], with_tools: bool) -> str:
    t = chat_template if chat_template is not None else owner.chat_template
    if isinstance(t, dict):
        if chat_template is None:
            key = "tool_use" if with_tools and "tool_use" in t else "default"
        else:
            key = chat_template
        if key not in t:
            raise ValueError(f"no chat template named {key!r}; available: {sorted(t)}")
        t = t[key]
    if not t:
        raise ValueError(
            "Cannot use apply_chat_template because this processor does not have a chat template."
        )
    return t


def _jsonable(value: Any) -> Any:
    """Messages as JSON: content items that carry images/objects keep only their JSON fields."""
    if isinstance(value, dict):
        return {
            k: _jsonable(v)
            for k, v in value.items()
            if _is_json_leaf(v) and v is not None or isinstance(v, (dict, list, tuple))
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _is_json_leaf(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


_COMPILED: dict[str, Any] = {}


def render_conversations(owner: Any, conversation: Any, chat_template: Optional[str], tools: Any, documents: Any,
                         add_generation_prompt: bool, continue_final_message: bool, normalize_image_urls: bool,
                         kwargs: dict[str, Any], generation_spans: Optional[list[Any]] = None):
    """Renders one conversation (list of messages) or a batch of them. Returns (texts, batched).

    With ``generation_spans`` (a list), the character spans ``(start, end)`` of what each conversation's
    ``{% generation %}...{% endgeneration %}`` blocks rendered are appended to it, one list per conversation
    (transformers' ``AssistantTracker``)."""
    if conversation is None or (isinstance(conversation, (list, tuple)) and len(conversation) == 0):
        raise ValueError("apply_chat_template needs a non-empty conversation")
    batched = isinstance(conversation, (list, tuple)) and isinstance(conversation[0], (list, tuple))
    convs = list(conversation) if batched else [conversation]
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    source = pick_template(owner, chat_template, tools is not None)
    tokenizer = getattr(owner, "tokenizer", owner)
    variables = dict(tokenizer._core.special_tokens_map)
    variables.update(kwargs)
    variables_json = json.dumps(_jsonable(variables), ensure_ascii=False, default=str)
    tools_json = None if tools is None else json.dumps(tools, default=str)
    documents_json = None if documents is None else json.dumps(documents, default=str)
    texts = []
    for i, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
            raise TypeError(f"conversation {i}: expected a list of {{'role': ..., 'content': ...}} dicts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in conv]
        messages_json = json.dumps(_jsonable(messages), ensure_ascii=False)
        markers = None
        if generation_spans is not None:
            markers = _free_markers(source, messages_json, variables_json, tools_json or "", documents_json or "")
        src = source if markers is None else _tracking_source(source, markers)
        compiled = _COMPILED.get(src)
        if compiled is None:
            compiled = _COMPILED.setdefault(src, _core.ChatTemplate(src))
        text = compiled.render(
            messages_json,
            add_generation_prompt,
            "content" if continue_final_message is True else (continue_final_message or None),
            normalize_image_urls,
            variables_json,
            tools_json,
            documents_json,
        )
        if markers is not None:
            text, spans = _strip_markers(text, markers)
            generation_spans.append(spans)
        texts.append(text)
    return texts, batched


_GENERATION_TAG = re.compile(r"\{%([-+]?)\s*(generation|endgeneration)\s*([-+]?)%\}")


def has_generation_markers(chat_template: Any) -> bool:
    """Whether a chat template has ``{% generation %}`` markers (whitespace-control variants included; for named
    templates, the ``default`` one), as TRL checks it."""
    if isinstance(chat_template, dict):
        chat_template = chat_template["default"]
    return re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


def _free_markers(*texts: str) -> tuple[str, str]:
    """Two private-use characters that occur in none of the texts."""
    joined = "".join(texts)
    free = [c for c in map(chr, range(0xE000, 0xF900)) if c not in joined]
    return free[0], free[1]


def _tracking_source(source: str, markers: tuple[str, str]) -> str:
    """The template with each ``{% generation %}`` / ``{% endgeneration %}`` tag made into a block that prints a
    marker character at the point where the tag's body starts / ends (whitespace control kept on the outside)."""
    start, end = markers

    def repl(m: re.Match[str]) -> str:
        lead, kind, trail = m.group(1), m.group(2), m.group(3)
        if kind == "generation":
            return f"{{%{lead} if true %}}{{{{ '{start}' }}}}{{% if true {trail}%}}"
        return f"{{%{lead} endif %}}{{{{ '{end}' }}}}{{% endif {trail}%}}"

    return _GENERATION_TAG.sub(repl, source)


def _strip_markers(text: str, markers: tuple[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """Removes the markers; returns the text and the generation spans in the order their blocks closed."""
    start, end = markers
    out: list[str] = []
    n = 0
    stack: list[int] = []
    spans: list[tuple[int, int]] = []
    for ch in text:
        if ch == start:
            stack.append(n)
        elif ch == end:
            spans.append((stack.pop(), n))
        else:
            out.append(ch)
            n += 1
    return "".join(out), spans


def _boundary(tokenizer: Any, text: str, full: list[int], pos: int) -> tuple[int, bool]:
    """(number of tokens of ``full`` = encode(text) that end at or before character ``pos``, whether a token
    boundary lies at ``pos``), found by encoding ``text[:pos]``."""
    if pos <= 0:
        return 0, True
    if pos >= len(text):
        return len(full), True
    head = list(tokenizer._core.encode(text[:pos], False))
    n = 0
    for a, b in zip(head, full):
        if a != b:
            break
        n += 1
    return n, n == len(head)


def assistant_tokens_mask(tokenizer: Any, text: str, full: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 on the tokens of ``full`` (``text`` encoded without special tokens) that overlap one of the character
    spans (a token ``[a, b)`` overlaps ``[s, e)`` when ``b > s`` and ``a < e``), as transformers builds
    ``assistant_masks`` from the token offsets."""
    mask = [0] * len(full)
    for s, e in spans:
        first, _ = _boundary(tokenizer, text, full, s)
        last, at = _boundary(tokenizer, text, full, e)
        if not at:
            last += 1  # the token that straddles e overlaps the span
        for t in range(first, min(last, len(full))):
            mask[t] = 1
    return mask


def _align_mask(full: list[int], full_mask: list[int], row: list[int], truncate_to: Optional[int],
                truncation_side: str, padding_side: str) -> list[int]:
    """``full_mask`` (for the untruncated, unpadded ``full``) cut like the tokenizer cut ``full`` to ``truncate_to``
    tokens on ``truncation_side``, then padded with 0 on ``padding_side`` to the length of ``row`` (the tokenizer's
    output for the same text)."""
    keep, kmask = full, full_mask
    if truncate_to is not None and len(full) > truncate_to:
        sl = slice(len(full) - truncate_to, None) if truncation_side == "left" else slice(0, truncate_to)
        keep, kmask = full[sl], full_mask[sl]
    extra = len(row) - len(keep)
    b = extra if padding_side == "left" else 0
    if extra < 0 or row[b : b + len(keep)] != keep:
        raise ValueError("assistant mask: the tokenized text does not line up with its rendering")
    out = [0] * len(row)
    out[b : b + len(keep)] = kmask
    return out


class AutoTokenizer:
    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs)
