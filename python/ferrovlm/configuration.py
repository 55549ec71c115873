"""Model configs with attribute access, like transformers' ``PretrainedConfig``."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

_SUB_CONFIGS = ("text_config", "vision_config")


class PretrainedConfig:
    """A config read from ``config.json``; keys are attributes (``config.text_config.hidden_size``).

    Fields the model uses but the file omits carry transformers' defaults.
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if key in _SUB_CONFIGS and isinstance(value, dict):
                value = PretrainedConfig(**value)
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainedConfig:
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = value.to_dict() if isinstance(value, PretrainedConfig) else copy.deepcopy(value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def get_text_config(self, decoder: bool = False) -> PretrainedConfig:
        return getattr(self, "text_config", self)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class Idefics3Config(PretrainedConfig):
    model_type = "idefics3"


class SmolVLMConfig(PretrainedConfig):
    model_type = "smolvlm"


class LlamaConfig(PretrainedConfig):
    model_type = "llama"


CONFIG_CLASSES = {"idefics3": Idefics3Config, "smolvlm": SmolVLMConfig, "llama": LlamaConfig}
