"""``DPOConfig``: TRL 1.16's preference-optimisation configuration, a ``TrainingArguments`` dataclass with TRL's
own fields and defaults (see training_args.py for what all configs share: unknown names, legacy spellings,
fields that change nothing in ferrovlm, derived values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from . import _core
from .training_args import TrainingArguments, _warn_once, accepts_legacy_kwargs

# The DPO losses the core implements, with TRL's names (`DpoLoss::ALL` in src/train/dpo.rs).
DPO_LOSS_TYPES: tuple[str, ...] = tuple(_core.dpo_loss_types())


@accepts_legacy_kwargs
@dataclass(repr=False, eq=False)
class DPOConfig(TrainingArguments):
    """TRL 1.16's ``DPOConfig`` (``beta=0.1``, ``loss_type=["sigmoid"]``, ``loss_weights=None``,
    ``label_smoothing=0.0``, ``learning_rate=1e-6``, ``max_length=1024``, ``precompute_ref_log_probs=False``, ...).
    ``rpo_alpha=a`` (older TRL) becomes ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1.0, a]``."""

    # TrainingArguments fields whose default TRL changes (they keep their place in the field order)
    learning_rate: float = 1e-06
    bf16: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = True
    logging_steps: float = 10
    # TRL's own
    model_init_kwargs: Optional[Union[dict[str, Any], str]] = None
    trust_remote_code: bool = False
    router_aux_loss_coef: Optional[float] = None
    disable_dropout: bool = True
    dataset_num_proc: Optional[int] = None
    max_length: Optional[int] = 1024
    truncation_mode: str = "keep_start"
    padding_free: bool = False
    pad_to_multiple_of: Union[int, str, None] = "auto"
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: Optional[int] = None
    loss_type: Union[str, list[str]] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[list[float]] = None
    ld_alpha: Optional[float] = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    label_smoothing: float = 0.0
    beta: float = 0.1
    use_weighting: bool = False
    discopop_tau: float = 0.05
    activation_offloading: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    pad_token: Optional[str] = None

    _LEGACY_OWN: ClassVar[dict[str, str]] = {
        "rpo_alpha": "`rpo_alpha` was removed from TRL; it is mapped to loss_type=['sigmoid', 'sft'] "
                     "with loss_weights=[1.0, rpo_alpha].",
    }

    def _apply_legacy(self, legacy: dict[str, Any]) -> None:
        if "rpo_alpha" in legacy:
            a = legacy.pop("rpo_alpha")
            object.__setattr__(self, "rpo_alpha", a)
            if a is not None:
                _warn_once(("DPOConfig", "legacy", "rpo_alpha"), f"DPOConfig: {self._LEGACY_OWN['rpo_alpha']}",
                           FutureWarning)
                base = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
                weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(base)
                if "sft" in base:
                    raise ValueError("rpo_alpha cannot be combined with a loss_type that already contains 'sft'")
                self.loss_type = base + ["sft"]
                self.loss_weights = weights + [float(a)]
        super()._apply_legacy(legacy)

    def _check_loss_type(self) -> None:
        """Every name in ``loss_type`` (already a list) must be a DPO loss the core implements
        (``DPO_LOSS_TYPES``); TRL's other losses are refused here rather than at the first step."""
        bad = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if bad:
            raise ValueError(f"Unsupported DPO loss_type {bad}; ferrovlm implements {list(DPO_LOSS_TYPES)}")

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        self._check_loss_type()
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("`loss_weights` must have the same length as `loss_type` when combining multiple losses. "
                             f"Got {len(self.loss_weights)} weights for {len(self.loss_type)} loss types.")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):
            p = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if p.lower() in ("auto", "none", "null") else int(p)

    @property
    def rpo_alpha_weight(self) -> Optional[float]:
        """The weight of the 'sft' term, if any (what older TRL called rpo_alpha)."""
        if "sft" in self.loss_type:
            w = self.loss_weights or [1.0] * len(self.loss_type)
            return float(w[self.loss_type.index("sft")])
        return None


__all__ = ["DPOConfig", "DPO_LOSS_TYPES"]
