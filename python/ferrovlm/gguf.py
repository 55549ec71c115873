"""GGUF for llama.cpp: ``save_pretrained_gguf`` (Unsloth's API) and SmolVLM from GGUF files.

The files are written by the Rust core as llama.cpp's own converter (``convert_hf_to_gguf.py``) writes
them for the same checkpoint, and ``q4_k_m`` as ``llama-quantize ... Q4_K_M`` writes it from the f32
file. Names follow the converter's convention (gguf-py's ``naming_convention``)::

    <Name>[-<size>][-<finetune>][-<version>]-<TYPE>.gguf        the text model (arch llama)
    mmproj-<Name>[-<finetune>][-<version>]-<TYPE>.gguf           a VLM's vision tower + connector

with ``<TYPE>`` F16, Q8_0, Q4_K_M or F32 (the mmproj of a ``q4_k_m`` export is F16). The ``mmproj-``
prefix is what llama.cpp (``llama-server -hf``, ``llama-mtmd-cli --mmproj``) and LM Studio look for
next to the text file; ``<Name>`` comes from the name the model was loaded under (``HuggingFaceTB/
SmolVLM-256M-Instruct`` -> ``SmolVLM-256M-Instruct``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from . import _core
from .errors import CheckpointError, ConfigError
from .hub import resolve_pretrained

QUANTIZATION_METHODS: tuple[str, ...] = tuple(_core.GGUF_QUANTIZATION_METHODS)
# Unsloth's names for the same methods.
ALIASES: dict[str, str] = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}


def _local_dir(name: Any, marker: str) -> Optional[str]:
    """The local (or cached) folder of ``name`` holding ``marker``, without downloading anything."""
    if not name:
        return None
    if os.path.isdir(os.fspath(name)):
        path = os.fspath(name)
        return path if os.path.isfile(os.path.join(path, marker)) else None
    try:
        return resolve_pretrained(name, marker=marker, local_files_only=True)
    except (CheckpointError, ConfigError, OSError, ValueError):
        return None


def _sources(model: Any, tokenizer: Any) -> tuple[Optional[str], Optional[str]]:
    """(the folder of tokenizer / processor files, a GGUF file whose tokenizer keys to copy)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isfile(path) and path.endswith(".gguf"):
            return None, path
        folder = _local_dir(path, "tokenizer.json")
        if folder is None:
            raise ValueError(f"tokenizer={path!r}: no tokenizer.json there (give a tokenizer, a processor or a folder)")
        return folder, None
    names = []
    if tokenizer is not None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        gguf_file = getattr(tok, "gguf_file", None) or getattr(tok, "init_kwargs", {}).get("gguf_file")
        names.append(getattr(tok, "name_or_path", None))
        if gguf_file and os.path.isfile(os.fspath(gguf_file)):
            return _local_dir(names[0], "preprocessor_config.json"), os.fspath(gguf_file)
    names.append(getattr(model.config, "_name_or_path", None))
    for n in names:
        folder = _local_dir(n, "tokenizer.json")
        if folder is not None:
            return folder, None
    gguf_source = getattr(model, "_gguf_file", None)
    if gguf_source is not None:
        return _local_dir(names[-1], "preprocessor_config.json"), gguf_source
    return None, None


def save_pretrained_gguf(
    model: Any,
    save_directory: str | os.PathLike[str],
    tokenizer: Any = None,
    quantization_method: Any = "f16",
    merge_adapters: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Writes ``model`` as GGUF files into ``save_directory``; returns their paths (text file first).

    ``tokenizer``: a tokenizer, a processor (whose image settings then go into the mmproj file) or a
    folder; by default the files of the folder the model was loaded from (or the vocabulary of the GGUF
    file it was read from). ``quantization_method``: one of ``QUANTIZATION_METHODS`` (or Unsloth's
    ``ALIASES``), or a list of them (one text file each; the mmproj file once per type)."""
    if kwargs.pop("push_to_hub", False):
        raise NotImplementedError("push_to_hub is not supported: upload the files with huggingface_hub")
    if kwargs:
        warnings.warn(f"save_pretrained_gguf: {sorted(kwargs)} change nothing in ferrovlm", stacklevel=3)
    methods = list(quantization_method) if isinstance(quantization_method, (list, tuple)) else [quantization_method]
    resolved = []
    for m in methods:
        name = ALIASES.get(str(m).lower(), str(m).lower())
        if name not in QUANTIZATION_METHODS:
            allowed = ", ".join(QUANTIZATION_METHODS) + " (Unsloth's " + ", ".join(ALIASES) + ")"
            raise ValueError(f"unknown quantization_method {m!r}; allowed: {allowed}")
        resolved.append(name)
    if os.path.isfile(os.fspath(save_directory)):
        raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a folder")
    assets, tokenizer_gguf = _sources(model, tokenizer)
    name = getattr(model.config, "_name_or_path", None) or os.path.basename(os.path.abspath(save_directory))
    paths: list[str] = []
    for method in dict.fromkeys(resolved):
        text, mmproj = model._core.save_gguf(
            os.fspath(save_directory), method, os.fspath(name), assets, tokenizer_gguf, bool(merge_adapters),
            getattr(model, "_mmproj_file", None),
        )
        paths.append(text)
        if mmproj is not None and mmproj not in paths:
            paths.append(mmproj)
    if assets is None and tokenizer_gguf is None:
        warnings.warn(
            f"no tokenizer found (pass tokenizer=...): {os.path.basename(paths[0])} has no vocabulary and llama.cpp "
            "cannot load it",
            stacklevel=3,
        )
    return paths


def _resolve_file(name_or_path: Any, file: Any, hub: dict[str, Any]) -> str:
    file = os.fspath(file)
    if os.path.isabs(file) and os.path.isfile(file):
        return file
    folder = resolve_pretrained(name_or_path, marker=file, **hub)
    return os.path.join(folder, file)


def load_gguf_core(
    name_or_path: Any, gguf_file: Any, mmproj_file: Any, dtype: str, want_vlm: bool, model_type: str,
    hub: dict[str, Any],
) -> tuple[Any, Optional[str], str, Optional[str]]:
    """The core model of ``from_pretrained(name_or_path, gguf_file=..., mmproj_file=...)``, the folder whose
    config.json it used (None when the config came from the GGUF files), and the paths of the text and
    mmproj GGUF files.

    A language model: the GGUF file alone. A VLM: with ``mmproj_file`` the two GGUF files (a config.json
    in ``name_or_path`` or next to the text file is used when there is one); without it, the hub-layout
    folder ``name_or_path`` with its text model replaced by the GGUF file."""
    path = _resolve_file(name_or_path, gguf_file, hub)
    if not want_vlm:
        if mmproj_file is not None:
            raise ValueError("mmproj_file holds a vision tower: load it with Idefics3ForConditionalGeneration")
        return _core.VlmModel.load_gguf(path, dtype), None, path, None
    if mmproj_file is not None:
        mm = _resolve_file(name_or_path, mmproj_file, hub)
        folders = [os.fspath(name_or_path)] if os.path.isdir(os.fspath(name_or_path)) else []
        folders.append(os.path.dirname(path))
        config_dir = next((f for f in folders if os.path.isfile(os.path.join(f, "config.json"))), None)
        return _core.VlmModel.load_gguf(path, dtype, mm, config_dir, model_type), config_dir, path, mm
    folder = _local_dir(name_or_path, "config.json")
    if folder is None:
        if os.path.isdir(os.fspath(name_or_path)):
            raise ValueError(
                f"{os.fspath(gguf_file)!r} holds a Llama text model: a vision-language model needs mmproj_file= (its "
                "vision tower) or a folder with config.json and the vision weights; for the text model alone use "
                "AutoModelForCausalLM"
            )
        folder = resolve_pretrained(name_or_path, **hub)
    return _core.VlmModel.load_gguf(path, dtype, None, folder), folder, path, None


__all__ = ["QUANTIZATION_METHODS", "ALIASES", "save_pretrained_gguf", "load_gguf_core"]
