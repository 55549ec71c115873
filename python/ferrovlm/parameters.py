"""Parameters and submodules as torch.nn.Module shows them: ``named_parameters()``, ``parameters()``,
``requires_grad`` / ``requires_grad_()``, and module paths (``model.model.vision_model.encoder.layers[0]``).

The values live in the Rust core; these objects are views that name them. ``requires_grad`` is the
model's choice of what a trainer trains when no ``peft_config`` is given (transformers trains every
parameter whose ``requires_grad`` is True): all parameters of a freshly loaded model, none of the base
model's once PEFT adapters are attached (PEFT freezes the base)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "bnb4bit": "uint8", "bnb8bit": "int8", "gguf": "float32"}


class Parameter:
    """One parameter of a model (``torch.nn.Parameter``'s surface: shape, dtype, ``requires_grad``, the values
    through ``data`` / ``numpy()``, set with ``copy_()`` or ``data = ...``)."""

    __slots__ = ("_owner", "name", "_shape", "_storage")

    def __init__(self, owner: Any, name: str, shape: tuple[int, ...], storage: str) -> None:
        self._owner = owner
        self.name = name  # the full name in the model (transformers' key)
        self._shape = shape
        self._storage = storage

    @property
    def requires_grad(self) -> bool:
        return self._owner._param_requires_grad(self.name)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self._owner._set_param_requires_grad([self.name], bool(value))

    def requires_grad_(self, requires_grad: bool = True) -> Parameter:
        self.requires_grad = requires_grad
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def size(self, dim: Optional[int] = None) -> Any:
        return self._shape if dim is None else self._shape[dim]

    def dim(self) -> int:
        return len(self._shape)

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def numel(self) -> int:
        n = 1
        for s in self._shape:
            n *= s
        return n

    @property
    def dtype(self) -> Any:
        """A torch dtype when torch is installed, else its name (``"float32"``)."""
        name = _TORCH_DTYPES.get(self._storage, "float32")
        try:
            import torch

            return getattr(torch, name)
        except ImportError:
            return name

    @property
    def data(self) -> np.ndarray:
        """The current values as a float32 array (a copy)."""
        return self._owner._core.parameter(self.name)

    @data.setter
    def data(self, value: Any) -> None:
        self.copy_(value)

    def copy_(self, value: Any) -> Parameter:
        """Sets the values (torch's ``param.copy_(value)`` under ``no_grad``, or ``param.data = value``): an
        array-like (numpy, a torch tensor, a list) of this parameter's shape, stored as the parameter is (float32
        or bfloat16). A tied output head follows the embedding. Quantized weights are refused (``InputError``)."""
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        self._owner._core.set_parameter(self.name, np.ascontiguousarray(np.asarray(value, dtype=np.float32)))
        return self

    def numpy(self) -> np.ndarray:
        return self.data

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={self._shape}, requires_grad={self.requires_grad})"


class ModuleView:
    """A submodule of a model by its path (``model.vision_model``, ``model.text_model.layers[3]``)."""

    def __init__(self, owner: Any, path: str) -> None:
        self._owner = owner
        self._path = path

    def _names(self) -> list[str]:
        pre = self._path + "."
        return [n for n in self._owner._param_table() if n.startswith(pre)]

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        cut = len(self._path) + 1
        for name, p in self._owner._all_parameters():
            if name.startswith(self._path + "."):
                rel = name[cut:]
                if not recurse and "." in rel:
                    continue
                yield (f"{prefix}.{rel}" if prefix else rel), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def requires_grad_(self, requires_grad: bool = True) -> ModuleView:
        self._owner._set_param_requires_grad(self._names(), bool(requires_grad))
        return self

    def _child(self, name: str) -> ModuleView:
        path = f"{self._path}.{name}"
        if not any(n.startswith(path + ".") for n in self._owner._param_table()):
            raise AttributeError(f"module '{self._path}' has no submodule '{name}'")
        return ModuleView(self._owner, path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name)

    def __getitem__(self, i: int) -> ModuleView:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for '{self._path}' ({n} modules)")
        return self._child(str(i % n))

    def __len__(self) -> int:
        cut = len(self._path) + 1
        idx = {n[cut:].split(".")[0] for n in self._names()}
        return sum(1 for s in idx if s.isdigit())

    def __iter__(self) -> Iterator[ModuleView]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ModuleView({self._path!r}, {sum(p.numel() for p in self.parameters()):,d} parameters)"


class ParametersMixin:
    """``named_parameters`` & co. for a model class holding ``self._core`` (a ``_core.VlmModel``)."""

    _core: Any

    def _param_table(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (tuple(s), st) for n, s, st, _ in self._core.named_parameters()}

    def _frozen(self) -> set[str]:
        f = self.__dict__.get("_frozen_params")
        if f is None:
            f = self.__dict__["_frozen_params"] = set()
        return f

    def _param_requires_grad(self, name: str) -> bool:
        return name not in self._frozen()

    def _set_param_requires_grad(self, names: list[str], value: bool) -> None:
        frozen = self._frozen()
        for n in names:
            if value:
                frozen.discard(n)
            else:
                frozen.add(n)

    def _all_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for n, (shape, storage) in self._param_table().items():
            yield n, Parameter(self, n, shape, storage)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """Every parameter under transformers' name (a tied head once, as the embedding)."""
        for n, p in self._all_parameters():
            yield (f"{prefix}.{n}" if prefix else n), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self._all_parameters():
            yield p

    def get_parameter(self, target: str) -> Parameter:
        table = self._param_table()
        if target not in table:
            raise AttributeError(f"the model has no parameter '{target}'")
        shape, storage = table[target]
        return Parameter(self, target, shape, storage)

    def requires_grad_(self, requires_grad: bool = True) -> Any:
        self._set_param_requires_grad(list(self._param_table()), bool(requires_grad))
        return self

    def trainable_parameter_names(self) -> list[str]:
        """The parameters a trainer trains without ``peft_config`` (``requires_grad`` True), in order."""
        frozen = self._frozen()
        return [n for n in self._param_table() if n not in frozen]

    @property
    def model(self) -> ModuleView:
        """The inner model (``model.vision_model``, ``model.connector``, ``model.text_model`` or, for a
        language model alone, ``model.layers``)."""
        return ModuleView(self, "model")

    @property
    def lm_head(self) -> ModuleView:
        """The output head (with tied embeddings its weight is ``model.text_model.embed_tokens.weight``,
        listed there)."""
        return ModuleView(self, "lm_head")
