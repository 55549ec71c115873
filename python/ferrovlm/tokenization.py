"""``PreTrainedTokenizerFast``-like tokenizer over the Rust ``tokenizers`` crate.

Special tokens, padding, truncation, decoding and chat templates behave as in transformers 5."""

from __future__ import annotations

import json
import os
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
        **kwargs: Any,
    ) -> Any:
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
        )
        if not tokenize:
            return texts if batched else texts[0]
        enc = self(texts if batched else texts[0], add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors)
        return enc if return_dict else enc["input_ids"]


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
                         kwargs: dict[str, Any]):
    """Renders one conversation (list of messages) or a batch of them. Returns (texts, batched)."""
    if conversation is None or (isinstance(conversation, (list, tuple)) and len(conversation) == 0):
        raise ValueError("apply_chat_template needs a non-empty conversation")
    batched = isinstance(conversation, (list, tuple)) and isinstance(conversation[0], (list, tuple))
    convs = list(conversation) if batched else [conversation]
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    source = pick_template(owner, chat_template, tools is not None)
    compiled = _COMPILED.get(source)
    if compiled is None:
        compiled = _COMPILED.setdefault(source, _core.ChatTemplate(source))
    tokenizer = getattr(owner, "tokenizer", owner)
    variables = dict(tokenizer._core.special_tokens_map)
    variables.update(kwargs)
    texts = []
    for i, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
            raise TypeError(f"conversation {i}: expected a list of {{'role': ..., 'content': ...}} dicts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in conv]
        texts.append(compiled.render(
            json.dumps(_jsonable(messages), ensure_ascii=False),
            add_generation_prompt,
            "content" if continue_final_message is True else (continue_final_message or None),
            normalize_image_urls,
            json.dumps(_jsonable(variables), ensure_ascii=False, default=str),
            None if tools is None else json.dumps(tools, default=str),
            None if documents is None else json.dumps(documents, default=str),
        ))
    return texts, batched


class AutoTokenizer:
    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs)
