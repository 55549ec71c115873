"""``BitsAndBytesConfig`` with transformers' fields, defaults, validation and dict form.

Quantizing happens in the Rust core while loading (``from_pretrained(..., quantization_config=...)``),
with bitsandbytes' algorithms: NF4 / FP4 in blocks of 64 (optionally with the block scales quantized
again), or LLM.int8 (int8 rows with per-row scales, outlier activations in 16 bits).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

_STORAGE = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
_COMPUTE = ("float32", "bfloat16", "float16")
_QUANT_TYPES = ("nf4", "fp4")


def _dtype_str(value: Any, field: str, allowed: tuple) -> str:
    """A torch dtype or its name, as transformers' dict form writes it ("bfloat16")."""
    if isinstance(value, str):
        name = value.replace("torch.", "")
    elif type(value).__name__ == "dtype" and str(value).startswith("torch."):
        name = str(value).split(".", 1)[1]
    else:
        raise ValueError(f"{field} must be a string or a torch.dtype, got {value!r}")
    aliases = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
    name = aliases.get(name, name)
    if name not in allowed:
        raise ValueError(f"{field}={value!r} is not supported: use one of {', '.join(allowed)}")
    return name


class BitsAndBytesConfig:
    """transformers' ``BitsAndBytesConfig``: load a model in 4 bits (NF4/FP4) or 8 bits (LLM.int8)."""

    quant_method = "bitsandbytes"

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list[str]] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Any = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Any = None,
        **kwargs: Any,
    ) -> None:
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = (
            "float32"
            if bnb_4bit_compute_dtype is None
            else _dtype_str(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", _COMPUTE)
        )
        self.bnb_4bit_quant_storage = (
            "uint8"
            if bnb_4bit_quant_storage is None
            else _dtype_str(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", _STORAGE)
        )
        self.post_init()

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        self._set_mode("load_in_4bit", value, self.load_in_8bit)

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        self._set_mode("load_in_8bit", value, self.load_in_4bit)

    def _set_mode(self, name: str, value: bool, other: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a boolean")
        if other and value:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        setattr(self, f"_{name}", value)

    def post_init(self) -> None:
        """transformers' checks, plus the quant type (bitsandbytes would reject it later)."""
        for name in (
            "load_in_4bit",
            "load_in_8bit",
            "llm_int8_enable_fp32_cpu_offload",
            "llm_int8_has_fp16_weight",
            "bnb_4bit_use_double_quant",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a boolean")
        if not isinstance(self.llm_int8_threshold, float):
            raise TypeError("llm_int8_threshold must be a float")
        if self.llm_int8_skip_modules is not None and not (
            isinstance(self.llm_int8_skip_modules, list) and all(isinstance(m, str) for m in self.llm_int8_skip_modules)
        ):
            raise TypeError("llm_int8_skip_modules must be a list of strings")
        if not isinstance(self.bnb_4bit_quant_type, str):
            raise TypeError("bnb_4bit_quant_type must be a string")
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not supported: use 'nf4' or 'fp4'")

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> Optional[str]:
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict form (what ``config.json`` holds under ``quantization_config``)."""
        out = copy.deepcopy(self.__dict__)
        out["quant_method"] = self.quant_method
        out["load_in_4bit"] = self.load_in_4bit
        out["load_in_8bit"] = self.load_in_8bit
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        default = BitsAndBytesConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default.get(k)}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        d = {k.lstrip("_"): v for k, v in config_dict.items() if k != "quant_method"}
        known = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount])
        config = cls(**{k: v for k, v in d.items() if k in known})
        unused = {}
        for k, v in kwargs.items():
            if hasattr(config, k):
                setattr(config, k, v)
            else:
                unused[k] = v
        return (config, unused) if return_unused_kwargs else config

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}\n"
