"""``--dataset_name`` for ``ferrovlm sft`` / ``ferrovlm dpo``: the splits of a JSONL file, a folder of
``<split>.jsonl`` files, a ``datasets`` folder (``save_to_disk``) or a hub dataset.

JSONL rows have the shape of the Python rows (``{"images", "messages"}``, ``{"images", "prompt", "completion"}``,
``{"images", "prompt", "chosen", "rejected"}``, text rows); images are paths, relative to the file (or absolute,
or http(s) URLs), in ``"images"`` (a list), ``"image"``, or a content part ``{"type": "image", "image": path}``.
Every row is read and every image file checked up front (an error names the file, the row and the path); the
images themselves are decoded when the trainer takes the row."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import InputError
from ..image_processing import load_image

_MESSAGE_KEYS = ("messages", "prompt", "completion", "chosen", "rejected", "conversations")


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _map_images(row: dict[str, Any], fn: Callable[[str], Any]) -> dict[str, Any]:
    """``row`` with every image path ``p`` replaced by ``fn(p)`` (the same row when it has none)."""
    out = dict(row)
    if isinstance(out.get("images"), list):
        out["images"] = [fn(p) if isinstance(p, str) else p for p in out["images"]]
    if isinstance(out.get("image"), str):
        out["image"] = fn(out["image"])
    for key in _MESSAGE_KEYS:
        msgs = out.get(key)
        if not isinstance(msgs, list):
            continue
        new_msgs = []
        for m in msgs:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                parts = [{**p, "image": fn(p["image"])} if isinstance(p, dict) and p.get("type") == "image"
                         and isinstance(p.get("image"), str) else p for p in m["content"]]
                m = {**m, "content": parts}
            new_msgs.append(m)
        out[key] = new_msgs
    return out


class JsonlDataset(Sequence):
    """The rows of a JSONL file, with image paths resolved against the file's folder; ``ds[i]`` decodes the
    row's images (``load_image``: PIL images with Pillow installed, numpy arrays otherwise)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        self.has_images = False
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{self.path}: cannot read the dataset: {err}") from None
        for row in self._records(text):
            row_index = len(self._rows)
            if not isinstance(row, dict):
                raise InputError(f"{self.path}: row {row_index} is a JSON {type(row).__name__}, not an object")
            self._rows.append(_map_images(row, lambda p, i=row_index: self._resolve(p, i)))
        if not self._rows:
            raise InputError(f"{self.path}: the dataset has no rows")

    def _records(self, text: str) -> Any:
        """The parsed rows: JSON lines, or one JSON array (``datasets``' json loader
        takes both)."""
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except ValueError as err:
                raise InputError(f"{self.path}: not valid JSON: {err}") from None
            yield from rows
            return
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise InputError(f"{self.path}: line {line_no} is not valid JSON: {err}") from None

    def _resolve(self, p: str, row_index: int) -> str:
        self.has_images = True
        if _is_url(p):
            return p
        full = Path(p).expanduser()
        full = full if full.is_absolute() else self.path.parent / full
        if not full.is_file():
            raise InputError(f"{self.path}: row {row_index}: image file {p!r} not found (looked for {full})")
        return str(full)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._rows[i]
        index = i if i >= 0 else len(self) + i

        def load(p: str) -> Any:
            try:
                return load_image(p)
            except Exception as err:  # an unreadable or undecodable file: name the row
                raise InputError(f"{self.path}: row {index}: cannot load image {p!r}: {err}") from None

        return _map_images(row, load)

    @property
    def column_names(self) -> list[str]:
        return list(dict.fromkeys(k for row in self._rows for k in row))


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``name`` or ``org/name``)."""
    return (name.endswith((".jsonl", ".json")) or name.startswith((".", "~", "/")) or os.path.isabs(name)
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _datasets_module(why: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{why} needs the `datasets` package (pip install datasets)") from None
    return datasets


def _rows(ds: JsonlDataset) -> Any:
    """Text-only JSONL rows go to the trainer as a plain list (nothing to decode)."""
    return ds if ds.has_images else list(ds)


def load_splits(name: str, config: Optional[str] = None, streaming: bool = False) -> dict[str, Any]:
    """The splits of ``--dataset_name``, by split name (a single JSONL file is the ``train`` split)."""
    path = Path(name).expanduser()
    if path.is_file():
        return {"train": _rows(JsonlDataset(path))}
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            datasets = _datasets_module(f"{path} (a folder written by save_to_disk)")
            loaded = datasets.load_from_disk(str(path))
            return dict(loaded) if isinstance(loaded, dict) else {"train": loaded}
        files = sorted(path.glob("*.jsonl"))
        if files:
            return {f.stem: _rows(JsonlDataset(f)) for f in files}
        datasets = _datasets_module(f"{path} (no <split>.jsonl files in it)")
        return dict(datasets.load_dataset(str(path), name=config))
    if _looks_local(name):
        raise InputError(f"--dataset_name {name!r}: no such file or folder")
    datasets = _datasets_module(f"the hub dataset {name!r}")
    if streaming:
        raise InputError("--dataset_streaming: ferrovlm's trainers need the dataset's length; load it without "
                         "streaming")
    return dict(datasets.load_dataset(name, name=config))


def pick_split(splits: dict[str, Any], split: str, name: str, flag: str) -> Any:
    if split not in splits:
        raise InputError(f"{flag} {split!r}: {name} has no such split (it has: {', '.join(sorted(splits))})")
    return splits[split]


__all__ = ["JsonlDataset", "load_splits", "pick_split"]
