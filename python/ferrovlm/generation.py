"""Text generation: ``GenerationConfig``, the ``generate`` driver, streamers and ``set_seed``.

The loop itself (KV cache, greedy, sampling, beam search) runs in Rust without the GIL; this module
merges settings like transformers' ``generate`` and feeds streamers.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_new_tokens": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
    "eos_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "use_cache": True,
}
# Accepted and ignored (they change nothing here), like transformers' own flags.
_IGNORED = {"use_cache", "output_scores", "return_dict_in_generate", "output_attentions", "output_hidden_states",
            "transformers_version", "_from_model_config", "cache_implementation", "return_legacy_cache"}

_SEED: list[Optional[int]] = [None]


def set_seed(seed: int) -> None:
    """Seeds ferrovlm's sampling and adapter initialisation (and Python's / numpy's RNGs, and torch's when
    the program has imported torch), like ``transformers.set_seed``. torch is never imported here: that
    alone would add about 500 MB to the process."""
    _SEED[0] = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _next_seed() -> int:
    if _SEED[0] is None:
        return random.getrandbits(63)
    s = _SEED[0]
    _SEED[0] = (s * 6364136223846793005 + 1442695040888963407) % 2**63  # each call draws a new stream
    return s


class GenerationConfig:
    """Generation settings with transformers' defaults; attributes are the settings."""

    def __init__(self, **kwargs: Any) -> None:
        for k, v in _DEFAULTS.items():
            setattr(self, k, copy.deepcopy(v))
        for k, v in kwargs.items():
            setattr(self, k, v)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], model_config: Any = None) -> GenerationConfig:
        """Reads ``generation_config.json``; without one, special tokens come from the model config."""
        f = Path(path) / "generation_config.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except ValueError as err:
                from .errors import ConfigError

                raise ConfigError(f"{f}: invalid JSON: {err}") from None
            return cls(**data)
        return cls.from_model_config(model_config)

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """Defaults plus the special token ids of the model config's text part."""
        cfg = cls()
        # the VLM's text part, or a Llama config itself
        text = getattr(model_config, "text_config", model_config)
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(text, key, None) if text is not None else None
            if value is not None:
                setattr(cfg, key, value)
        return cfg

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Sets the known keys; returns the unknown ones (like transformers)."""
        unused = {}
        for k, v in kwargs.items():
            if k in _DEFAULTS or hasattr(self, k) or k in _IGNORED:
                setattr(self, k, v)
            else:
                unused[k] = v
        return unused

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if hasattr(value, "tolist"):
        v = value.tolist()
        return [int(x) for x in (v if isinstance(v, list) else [v])]
    return [int(value)]


def resolve(config: GenerationConfig, prompt_len: int, max_positions: int) -> dict[str, Any]:
    """The settings the Rust loop needs, validated like transformers' GenerationConfig.validate."""
    if config.max_new_tokens is not None:
        if int(config.max_new_tokens) <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {config.max_new_tokens}.")
        max_length = prompt_len + int(config.max_new_tokens)
    else:
        max_length = int(config.max_length)
        if max_length <= prompt_len:
            warnings.warn(
                f"Input length of input_ids is {prompt_len}, but `max_length` is set to {max_length}. "
                "Consider increasing `max_length` or, better yet, setting `max_new_tokens`.",
                stacklevel=3,
            )
    if prompt_len > max_positions:
        raise ValueError(f"the prompt has {prompt_len} tokens, more than max_position_embeddings ({max_positions})")
    num_beams = int(config.num_beams or 1)
    if num_beams < 1:
        raise ValueError(f"`num_beams` must be >= 1, got {num_beams}")
    if int(config.num_return_sequences or 1) != 1:
        raise NotImplementedError("num_return_sequences > 1 is not supported yet")
    temperature = float(config.temperature if config.temperature is not None else 1.0)
    if config.do_sample and temperature <= 0:
        raise ValueError(f"`temperature` must be a strictly positive float, got {temperature}")
    top_p = float(config.top_p if config.top_p is not None else 1.0)
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"`top_p` must be in [0, 1], got {top_p}")
    rp = float(config.repetition_penalty if config.repetition_penalty is not None else 1.0)
    if rp <= 0:
        raise ValueError(f"`repetition_penalty` must be strictly positive, got {rp}")
    eos = _ids(config.eos_token_id)
    pad = _ids(config.pad_token_id)
    pad_id = pad[0] if pad else (eos[0] if eos else 0)
    early = config.early_stopping
    early = "never" if early == "never" else ("true" if early else "false")
    return {
        "max_length": max_length,
        "min_new_tokens": int(config.min_new_tokens or 0),
        "do_sample": bool(config.do_sample),
        "temperature": temperature,
        "top_k": int(config.top_k or 0),
        "top_p": top_p,
        "repetition_penalty": rp,
        "num_beams": num_beams,
        "length_penalty": float(config.length_penalty if config.length_penalty is not None else 1.0),
        "early_stopping": early,
        "eos_token_ids": eos,
        "pad_token_id": pad_id,
        "seed": _next_seed(),
    }
