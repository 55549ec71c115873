"""Devices as torch and transformers name them: ``device_map=`` of ``from_pretrained``, ``model.to(...)``,
``model.device``.

ferrovlm runs on the CPU, and on NVIDIA GPUs when built with the ``cuda`` feature (README, "CUDA build").
A device that this build or machine cannot give raises ``ferrovlm.DeviceError`` saying what is missing.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _core

# device_map strategies of accelerate: all of the model on the first GPU when there is one, else the CPU.
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class device:
    """A device like ``torch.device``: ``.type`` ("cpu" or "cuda"), ``.index`` (None on the CPU), ``str()``
    "cpu" / "cuda:0"; equal to another device or a string naming the same one."""

    __slots__ = ("type", "index")

    def __init__(self, spec: Any, index: Optional[int] = None) -> None:
        text = str(spec).strip().lower()
        kind, _, idx = text.partition(":")
        if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()):
            raise ValueError(f"Expected one of cpu, cuda device type at start of device string: {spec!r}")
        if idx and index is not None:
            raise ValueError(f"device {spec!r} already names an index; do not pass index={index}")
        self.type: str = kind
        self.index: Optional[int] = int(idx) if idx else index
        if kind == "cpu" and self.index not in (None, 0):
            raise ValueError(f"the CPU has no device index {self.index}")
        if kind == "cpu":
            self.index = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        if self.index is None:
            return f"device(type='{self.type}')"
        return f"device(type='{self.type}', index={self.index})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (device, str)) or type(other).__name__ == "device":
            try:
                o = other if isinstance(other, device) else device(str(other))
            except ValueError:
                return False
            return (self.type, self.index) == (o.type, o.index)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.type, self.index))


def device_spec(value: Any) -> Optional[str]:
    """The device string ferrovlm's core takes ("cpu", "cuda", "cuda:N", "auto") for a ``device_map`` or
    ``.to()`` argument: a string, an int (a GPU ordinal, as torch and accelerate read it), a ``torch.device``
    or :class:`device`, or a ``device_map`` dict whose modules all go to one device. None for None."""
    if value is None:
        return None
    if isinstance(value, dict):
        targets = {str(v) if not isinstance(v, int) else f"cuda:{v}" for v in value.values()}
        if len(targets) != 1:
            raise ValueError(
                f"device_map {value!r} splits the model over several devices; ferrovlm keeps a model on one device"
            )
        return device_spec(next(iter(targets)))
    if isinstance(value, bool):
        raise ValueError(f"device {value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"device ordinal {value} is negative")
        return f"cuda:{value}"
    text = str(value).strip().lower()
    if text in _AUTO_MAPS:
        return "auto"
    if text == "disk" or text == "meta":
        raise ValueError(f"device {value!r}: ferrovlm does not offload weights to {text}")
    return text


def is_device_arg(value: Any) -> bool:
    """Whether a positional ``.to()`` argument names a device (rather than a dtype)."""
    if isinstance(value, (device, int)) and not isinstance(value, bool):
        return True
    if type(value).__name__ == "device":  # torch.device
        return True
    return isinstance(value, str) and value.strip().lower().partition(":")[0] in ("cpu", "cuda", "mps", "auto")


def as_device(name: str) -> Any:
    """The model's device as torch names it: a ``torch.device`` when torch is installed (so that
    ``inputs.to(model.device)`` works), else a :class:`device`."""
    try:
        import torch

        return torch.device(name)
    except ImportError:
        return device(name)


def cuda_is_available() -> bool:
    """Whether this ferrovlm can run on cuda:0 here (built with CUDA, a driver and a GPU present)."""
    return bool(_core.cuda_available())
