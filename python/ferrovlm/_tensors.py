"""numpy / torch at the boundary: inputs become numpy in the dtype the core wants; outputs come back
as torch tensors when the caller gave torch tensors. torch is optional."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def to_numpy(x: Any, dtype: Any, name: str) -> Optional[np.ndarray]:
    """``x`` (numpy, torch, nested lists or None) as a C-contiguous array of ``dtype``."""
    if x is None:
        return None
    if is_torch_tensor(x):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # bfloat16 has no numpy dtype
        x = t.numpy()
    try:
        arr = np.asarray(x)
    except Exception as err:  # ragged lists and other non-arrays
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array: {err}") from None
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a rectangular numeric array, got ragged or object data")
    if np.issubdtype(dtype, np.integer) and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def like_inputs(arr: np.ndarray, want_torch: bool) -> Any:
    """Returns ``arr`` as a torch tensor when the inputs were torch tensors."""
    if want_torch:
        import torch

        return torch.from_numpy(arr)
    return arr
