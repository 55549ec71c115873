"""``BatchFeature`` / ``BatchEncoding``: dicts with attribute access and tensor conversion."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

_INT_KEYS = {"input_ids", "attention_mask", "labels", "token_type_ids", "rows", "cols"}


def convert(value: Any, key: str, return_tensors: Optional[str]) -> Any:
    """Lists become numpy ("np") or torch ("pt") arrays; None keeps Python lists."""
    if return_tensors is None:
        return value
    if return_tensors not in ("np", "pt"):
        raise ValueError(f"return_tensors must be 'np', 'pt' or None, got {return_tensors!r}")
    arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.int64 if key in _INT_KEYS else None)
    if arr.dtype == object:
        raise ValueError(
            f"cannot make a tensor of '{key}': its rows have different lengths; pass padding=True"
        )
    if return_tensors == "pt":
        try:
            import torch
        except ImportError:
            raise ImportError("return_tensors='pt' needs torch; use return_tensors='np'") from None
        return torch.from_numpy(np.ascontiguousarray(arr))
    return arr


class BatchFeature(dict):
    """A dict of model inputs with attribute access (``batch.input_ids``), ``.to(device)`` and
    ``.convert_to_tensors``, like transformers' ``BatchFeature`` / ``BatchEncoding``."""

    def __init__(self, data: Optional[dict[str, Any]] = None, tensor_type: Optional[str] = None) -> None:
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def convert_to_tensors(self, tensor_type: Optional[str] = None) -> BatchFeature:
        for k in list(self.keys()):
            self[k] = convert(self[k], k, tensor_type)
        return self

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Moves torch tensors (dtype casts apply to floating tensors only, like transformers); numpy
        arrays stay as they are, since everything runs on the CPU."""
        out = {}
        for k, v in self.items():
            if hasattr(v, "to") and hasattr(v, "is_floating_point"):
                if not v.is_floating_point():
                    dev_args = [a for a in args if not _is_dtype(a)]
                    dev_kwargs = {kk: vv for kk, vv in kwargs.items() if kk != "dtype"}
                    v = v.to(*dev_args, **dev_kwargs) if (dev_args or dev_kwargs) else v
                else:
                    v = v.to(*args, **kwargs)
            out[k] = v
        self.update(out)
        return self


def _is_dtype(a: Any) -> bool:
    return type(a).__name__ == "dtype"


BatchEncoding = BatchFeature
