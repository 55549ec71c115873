"""``SFTConfig``: TRL 1.16's supervised fine-tuning configuration, a ``TrainingArguments`` dataclass with TRL's
own fields and defaults (see training_args.py for what all configs share: unknown names, legacy spellings,
fields that change nothing in ferrovlm, derived values).

``DPOConfig`` and ``TrainingArguments`` lived here before they got their own modules; they (and the other public
names of the old module) are still importable from ``ferrovlm.sft_config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from .dpo_config import DPO_LOSS_TYPES, DPOConfig
from .training_args import (
    NO_EFFECT_FIELDS,
    OPTIMIZER_NAMES,
    SCHEDULER_TYPES,
    HubStrategy,
    IntervalStrategy,
    SaveStrategy,
    TrainingArguments,
    _warn_once,
    accepts_legacy_kwargs,
)


@accepts_legacy_kwargs
@dataclass(repr=False, eq=False)
class SFTConfig(TrainingArguments):
    """TRL 1.16's ``SFTConfig`` (``learning_rate=2e-5``, ``logging_steps=10``, ``gradient_checkpointing=True``,
    ``bf16=not fp16``, ``max_length=1024``, ``completion_only_loss=None`` (= on for prompt-completion data),
    ``assistant_only_loss=False``, ...)."""

    # TrainingArguments fields whose default TRL changes (they keep their place in the field order)
    learning_rate: float = 2e-05
    bf16: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = True
    logging_steps: float = 10
    # TRL's own
    model_init_kwargs: Optional[Union[dict[str, Any], str]] = None
    trust_remote_code: bool = False
    router_aux_loss_coef: Optional[float] = None
    chat_template_path: Optional[str] = None
    dataset_text_field: str = "text"
    dataset_kwargs: Optional[Union[dict[str, Any], str]] = None
    dataset_num_proc: Optional[int] = None
    eos_token: Optional[str] = None
    max_length: Optional[int] = 1024
    truncation_mode: str = "keep_start"
    shuffle_dataset: bool = False
    packing: bool = False
    packing_strategy: str = "bfd"
    padding_free: bool = False
    pad_to_multiple_of: Union[int, str, None] = "auto"
    eval_packing: Optional[bool] = None
    completion_only_loss: Optional[bool] = None
    assistant_only_loss: bool = False
    loss_type: str = "nll"
    activation_offloading: bool = False
    pad_token: Optional[str] = None

    _LEGACY_OWN: ClassVar[dict[str, str]] = {
        "max_seq_length": "`max_seq_length` was renamed `max_length` (TRL 0.20).",
    }

    def _apply_legacy(self, legacy: dict[str, Any]) -> None:
        if "max_seq_length" in legacy:
            v = legacy.pop("max_seq_length")
            _warn_once(("SFTConfig", "legacy", "max_seq_length"), f"SFTConfig: {self._LEGACY_OWN['max_seq_length']}",
                       FutureWarning)
            object.__setattr__(self, "max_seq_length", v)
            if "max_length" not in self._explicit:
                self.max_length = v
        super()._apply_legacy(legacy)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):
            p = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if p.lower() in ("auto", "none", "null") else int(p)
        if self.loss_type == "chunked_nll":
            _warn_once(("SFTConfig", "chunked_nll"), "`loss_type='chunked_nll'` is deprecated; using 'nll'.",
                       FutureWarning)
            self.loss_type = "nll"
        if self.loss_type not in ("nll", "dft"):
            raise ValueError(f"Invalid `loss_type` {self.loss_type} passed. Supported values are 'nll' and 'dft'.")
        if self.packing_strategy == "bfd-requeue":
            self.packing_strategy = "bfd_split"
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        if self.pad_token is not None:
            _warn_once(("SFTConfig", "pad_token"), "`pad_token` is deprecated; set tokenizer.pad_token instead.",
                       FutureWarning)

    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))


__all__ = ["SFTConfig", "DPOConfig", "TrainingArguments", "IntervalStrategy", "SaveStrategy", "HubStrategy",
           "NO_EFFECT_FIELDS", "OPTIMIZER_NAMES", "SCHEDULER_TYPES", "DPO_LOSS_TYPES"]
