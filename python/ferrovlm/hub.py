"""Resolving ``from_pretrained`` arguments to a local checkpoint directory.

A local directory is used as is. A hub id (``org/name``) is looked up in the Hugging Face cache
(``HF_HUB_CACHE`` / ``HF_HOME`` / ``~/.cache/huggingface/hub``, layout ``models--org--name/snapshots/<hash>``)
by the Rust core; if it is not cached it is downloaded with ``huggingface_hub`` when that is installed
and the hub is not switched off (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
"""

from __future__ import annotations

import os
from typing import Optional

from . import _core
from .errors import ModelNotCachedError

# What a model or processor needs from a repo; weights in other formats are not fetched.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_pretrained(
    id_or_path: str | os.PathLike[str],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike[str]] = None,
    local_files_only: bool = False,
    token: Optional[str | bool] = None,
    marker: str = "config.json",
) -> str:
    """Returns the directory holding ``id_or_path``; ``marker`` is a file it must contain
    (``config.json`` for a model, ``tokenizer_config.json`` for a tokenizer, ...)."""
    name = os.fspath(id_or_path)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    try:
        return _core.resolve_model_dir(name, revision, cache, marker)
    except ModelNotCachedError as err:
        if local_files_only or is_offline():
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise ModelNotCachedError(f"{err}; {why}, so it is not downloaded") from None
        try:
            import huggingface_hub
        except ImportError:
            raise ModelNotCachedError(
                f"{err}; install huggingface_hub (pip install 'ferrovlm[hub]') to download it"
            ) from None
        try:
            return huggingface_hub.snapshot_download(
                name,
                revision=revision,
                cache_dir=cache,
                allow_patterns=_ALLOW_PATTERNS,
                token=token,
            )
        except Exception as download_err:  # network, auth, missing repo: all reported the same way
            raise ModelNotCachedError(f"{err}; downloading it failed: {download_err}") from download_err


def resolve_pretrained_kwargs(id_or_path: str | os.PathLike[str], kwargs: dict, marker: str = "config.json") -> str:
    """``resolve_pretrained`` taking (and removing) the hub keyword arguments of a ``from_pretrained``
    call: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``trust_remote_code``."""
    kwargs.pop("trust_remote_code", None)
    return resolve_pretrained(
        id_or_path,
        revision=kwargs.pop("revision", None),
        cache_dir=kwargs.pop("cache_dir", None),
        local_files_only=kwargs.pop("local_files_only", False),
        token=kwargs.pop("token", None),
        marker=marker,
    )
