"""``TrainingArguments``: transformers 5.24's training arguments as a mutable dataclass, and the machinery that
``SFTConfig`` / ``DPOConfig`` (TRL 1.16, subclasses of it like in TRL) share.

Every field transformers accepts is accepted, with its default; a misspelled name raises ``TypeError`` like a
dataclass. Fields that change nothing in ferrovlm (distributed / hardware / integration knobs) warn once when
set to a non-default value. Derived values are resolved like ``TrainingArguments.__post_init__``:
``bf16=None`` -> ``not fp16``, ``eval_steps`` falls back to ``logging_steps``, ``report_to="none"`` -> ``[]``,
``gradient_checkpointing`` mirrors ``activation_checkpointing``, ...

Spellings removed from transformers 5 / TRL 1.x that the tutorials still use are accepted with a
``FutureWarning``: ``warmup_ratio`` (-> ``warmup_steps`` as a fraction in [0, 1)), ``evaluation_strategy``
(-> ``eval_strategy``), ``max_seq_length`` (-> ``max_length``, SFT), ``rpo_alpha=a`` (DPO, -> ``loss_type``
``["sigmoid", "sft"]`` with ``loss_weights`` ``[1, a]``), and ``overwrite_output_dir`` / ``logging_dir``
(ignored).

The field defaults are those of the installed classes, as printed by
``python scripts/reference/sft_collate.py --print-field-table`` (in an environment with transformers 5.24 and
TRL 1.16; enums as their values).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Optional, TypeVar, Union

from .distributed import DistributedEnv


class IntervalStrategy(str, Enum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(str, Enum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class HubStrategy(str, Enum):
    END = "end"
    EVERY_SAVE = "every_save"
    CHECKPOINT = "checkpoint"
    ALL_CHECKPOINTS = "all_checkpoints"


OPTIMIZER_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)

# Fields accepted for compatibility that change nothing in ferrovlm (CPU/accelerator chosen by the Rust core, no
# integrations): setting one to a non-default value warns once per process. ddp_backend, ddp_timeout and
# ddp_bucket_cap_mb are not among them: data-parallel runs (distributed.py) use them.
NO_EFFECT_FIELDS = frozenset({
    "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config",
    "torch_empty_cache_steps", "auto_find_batch_size", "log_on_each_node", "log_level", "log_level_replica",
    "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "eval_use_gather_object", "eval_do_concat_batches", "save_on_each_node", "enable_jit_checkpoint",
    "full_determinism", "use_cpu", "accelerator_config", "parallelism_config", "dataloader_drop_last",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataloader_in_order", "ddp_find_unused_parameters",
    "ddp_broadcast_buffers", "ddp_static_graph", "fsdp", "fsdp_config", "deepspeed",
    "debug", "skip_memory_metrics", "local_rank", "average_tokens_across_devices", "dataset_num_proc",
    "activation_offloading", "trust_remote_code", "router_aux_loss_coef", "use_cache",
    "overwrite_output_dir", "logging_dir",
})

# Legacy spellings accepted by every config: name -> the FutureWarning's message
_LEGACY = {
    "warmup_ratio": "`warmup_ratio` was removed in transformers 5; it is mapped to `warmup_steps` (a float in [0, 1) "
                    "is a ratio of the total steps).",
    "evaluation_strategy": "`evaluation_strategy` was renamed `eval_strategy`.",
    "overwrite_output_dir": "`overwrite_output_dir` was removed in transformers 5 and is ignored.",
    "logging_dir": "`logging_dir` was removed in transformers 5 and is ignored.",
}

_VALID_DICT_FIELDS = ("accelerator_config", "fsdp_config", "deepspeed", "gradient_checkpointing_kwargs",
                      "activation_checkpointing_kwargs", "lr_scheduler_kwargs", "model_init_kwargs",
                      "dataset_kwargs")

_warned: set = set()


def _warn_once(key: Any, message: str, category: type = UserWarning) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, category, stacklevel=4)


def _enum(cls: type, value: Any, name: str) -> Any:
    try:
        return cls(getattr(value, "value", value))
    except ValueError:
        raise ValueError(f"{value!r} is not a valid {cls.__name__} for `{name}`, please select one of "
                         f"{[m.value for m in cls]}") from None


_Config = TypeVar("_Config", bound="type[TrainingArguments]")


def accepts_legacy_kwargs(cls: _Config) -> _Config:
    """Gives a config dataclass the constructor all configs share, in place of the generated one.

    On top of what the dataclass ``__init__`` does, it takes the legacy spellings (``_LEGACY`` and the class's
    ``_LEGACY_OWN``, applied by ``_apply_legacy`` before ``__post_init__``), deep-copies the values it is given,
    warns once about fields that change nothing in ferrovlm, and records which names were passed
    (``_explicit``). The generated ``__init__`` stays reachable as ``__wrapped__``, so ``inspect.signature``
    shows the fields; type checkers read the ``@dataclass`` itself."""
    generated = cls.__init__

    def __init__(self: TrainingArguments, *args: Any, **kwargs: Any) -> None:
        defaults = self._defaults()
        names = list(defaults)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.__init__() takes {len(names)} positional arguments but "
                            f"{len(args)} were given")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.__init__() got multiple values for argument '{name}'")
            kwargs[name] = value
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in _LEGACY or k in self._LEGACY_OWN}
        for k in kwargs:
            if k not in defaults:
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument '{k}'")
        for k, v in defaults.items():
            object.__setattr__(self, k, copy.deepcopy(kwargs[k]) if k in kwargs else copy.deepcopy(v))
        object.__setattr__(self, "_explicit", frozenset(kwargs) | frozenset(legacy))
        for k in sorted(kwargs):
            if k in NO_EFFECT_FIELDS and kwargs[k] != defaults[k]:
                _warn_once((type(self).__name__, k), f"{type(self).__name__}: `{k}` is accepted for compatibility but "
                           "changes nothing in ferrovlm.")
        self._apply_legacy(legacy)
        self.__post_init__()

    functools.update_wrapper(__init__, generated)
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@accepts_legacy_kwargs
@dataclass(repr=False, eq=False)
class TrainingArguments:
    """transformers 5.24's ``TrainingArguments`` fields and defaults."""

    output_dir: Optional[str] = None
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-05
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: Optional[Union[dict[str, Any], str]] = None
    warmup_steps: float = 0
    optim: str = "adamw_torch_fused"
    optim_args: Optional[str] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-08
    optim_target_modules: Union[None, str, list[str]] = None
    gradient_accumulation_steps: int = 1
    average_tokens_across_devices: bool = True
    max_grad_norm: float = 1.0
    label_smoothing_factor: float = 0.0
    bf16: Optional[bool] = False
    fp16: bool = False
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: Optional[bool] = None
    activation_checkpointing: Optional[bool] = None
    activation_checkpointing_kwargs: Optional[Union[dict[str, Any], str]] = None
    gradient_checkpointing: Optional[bool] = None
    gradient_checkpointing_kwargs: Optional[Union[dict[str, Any], str]] = None
    torch_compile: bool = False
    torch_compile_backend: Optional[str] = None
    torch_compile_mode: Optional[str] = None
    use_liger_kernel: bool = False
    liger_kernel_config: Optional[dict[str, Any]] = None
    use_cache: bool = False
    neftune_noise_alpha: Optional[float] = None
    torch_empty_cache_steps: Optional[int] = None
    auto_find_batch_size: bool = False
    logging_strategy: Union[IntervalStrategy, str] = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    include_num_input_tokens_seen: Union[str, bool] = "no"
    log_level: str = "passive"
    log_level_replica: str = "warning"
    disable_tqdm: Optional[bool] = None
    report_to: Union[None, str, list[str]] = "none"
    run_name: Optional[str] = None
    project: str = "huggingface"
    trackio_space_id: Optional[str] = None
    trackio_bucket_id: Optional[str] = None
    trackio_static_space_id: Optional[str] = None
    eval_strategy: Union[IntervalStrategy, str] = "no"
    eval_steps: Optional[float] = None
    eval_delay: float = 0
    per_device_eval_batch_size: int = 8
    prediction_loss_only: bool = False
    eval_on_start: bool = False
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    eval_accumulation_steps: Optional[int] = None
    include_for_metrics: list[str] = field(default_factory=list)
    batch_eval_metrics: bool = False
    save_only_model: bool = False
    save_strategy: Union[SaveStrategy, str] = "steps"
    save_steps: float = 500
    save_on_each_node: bool = False
    save_total_limit: Optional[int] = None
    enable_jit_checkpoint: bool = False
    push_to_hub: bool = False
    hub_token: Optional[str] = None
    hub_private_repo: Optional[bool] = None
    hub_model_id: Optional[str] = None
    hub_strategy: Union[HubStrategy, str] = "every_save"
    hub_always_push: bool = False
    hub_revision: Optional[str] = None
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    ignore_data_skip: bool = False
    restore_callback_states_from_checkpoint: bool = False
    full_determinism: bool = False
    seed: int = 42
    data_seed: Optional[int] = None
    use_cpu: bool = False
    accelerator_config: Optional[Union[dict[str, Any], str]] = None
    parallelism_config: Optional[Any] = None
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: Optional[int] = None
    dataloader_multiprocessing_context: Optional[str] = None
    dataloader_in_order: bool = True
    remove_unused_columns: bool = True
    label_names: Optional[list[str]] = None
    train_sampling_strategy: str = "random"
    length_column_name: str = "length"
    ddp_find_unused_parameters: Optional[bool] = None
    ddp_bucket_cap_mb: Optional[int] = None
    ddp_broadcast_buffers: Optional[bool] = None
    ddp_static_graph: Optional[bool] = None
    ddp_backend: Optional[str] = None
    ddp_timeout: int = 1800
    fsdp: Union[None, str, list[Any]] = None
    fsdp_config: Optional[Union[dict[str, Any], str]] = None
    deepspeed: Optional[Union[dict[str, Any], str]] = None
    debug: Union[str, list[Any]] = ""
    skip_memory_metrics: bool = True
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: Optional[str] = None
    local_rank: int = -1

    # Legacy spellings of this class only (name -> the FutureWarning's message), on top of _LEGACY.
    _LEGACY_OWN: ClassVar[dict[str, str]] = {}
    # The names given to the constructor, legacy ones included (set per instance by __init__).
    _explicit: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        """The constructor's fields and their defaults, in dataclass order (a field a subclass overrides keeps its
        place, new fields come after)."""
        return {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                for f in fields(cls) if f.init}

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls._defaults())

    # -- resolution -------------------------------------------------------------------------------------------
    def _apply_legacy(self, legacy: dict[str, Any]) -> None:
        for k, v in legacy.items():
            msg = _LEGACY.get(k) or self._LEGACY_OWN[k]
            _warn_once((type(self).__name__, "legacy", k), f"{type(self).__name__}: {msg}", FutureWarning)
            object.__setattr__(self, k, v)
            if k == "warmup_ratio":
                if v is not None and v != 0:
                    if not 0 <= float(v) < 1:
                        raise ValueError(f"warmup_ratio must lie in [0, 1), got {v}")
                    if self.warmup_steps not in (0, None) and "warmup_steps" in self._explicit:
                        warnings.warn("both warmup_steps and warmup_ratio are set; warmup_steps wins", UserWarning,
                                      stacklevel=4)
                    else:
                        self.warmup_steps = float(v)
            elif k == "evaluation_strategy":
                if "eval_strategy" not in self._explicit:
                    self.eval_strategy = v

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        self.output_dir = os.path.expanduser(os.fspath(self.output_dir))
        for f in _VALID_DICT_FIELDS:
            v = getattr(self, f, None)
            if isinstance(v, str) and v.startswith("{"):
                setattr(self, f, json.loads(v))
        if self.bf16 is None:  # TRL: bf16 defaults to "not fp16"
            self.bf16 = not self.fp16
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, getattr(self, new))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing = False
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        self.eval_strategy = _enum(IntervalStrategy, self.eval_strategy, "eval_strategy")
        self.logging_strategy = _enum(IntervalStrategy, self.logging_strategy, "logging_strategy")
        self.save_strategy = _enum(SaveStrategy, self.save_strategy, "save_strategy")
        self.hub_strategy = _enum(HubStrategy, self.hub_strategy, "hub_strategy")
        lr = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        if lr not in SCHEDULER_TYPES:
            raise ValueError(f"{lr!r} is not a valid SchedulerType, please select one of {list(SCHEDULER_TYPES)}")
        self.lr_scheduler_type = lr
        opt = getattr(self.optim, "value", self.optim)
        if opt not in OPTIMIZER_NAMES:
            raise ValueError(f"{opt!r} is not a valid OptimizerNames, please select one of {list(OPTIMIZER_NAMES)}")
        self.optim = opt
        if isinstance(self.debug, str):
            self.debug = self.debug.split()
        elif self.debug is None:
            self.debug = []
        if self.do_eval is False and self.eval_strategy != IntervalStrategy.NO:
            self.do_eval = True
        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            if self.logging_steps > 0:
                self.eval_steps = self.logging_steps
            else:
                raise ValueError(f"evaluation strategy {self.eval_strategy.value} requires either non-zero "
                                 "--eval_steps or --logging_steps")
        if self.load_best_model_at_end or self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy"):
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.report_to in ("all", ["all"], "none", ["none"], None):
            self.report_to = []  # no reporting integration runs inside ferrovlm
        elif not isinstance(self.report_to, list):
            self.report_to = [self.report_to]
        self._validate()

    def _validate(self) -> None:
        if self.logging_strategy == IntervalStrategy.STEPS and self.logging_steps == 0:
            raise ValueError("logging strategy steps requires non-zero --logging_steps")
        for kind, strategy in (("logging", self.logging_strategy), ("eval", self.eval_strategy),
                               ("save", self.save_strategy)):
            v = getattr(self, f"{kind}_steps")
            if strategy.value == "steps" and v is not None and v > 1:
                if v != int(v):
                    raise ValueError(f"--{kind}_steps must be an integer if bigger than 1: {v}")
                setattr(self, f"{kind}_steps", int(v))
        if self.load_best_model_at_end and self.save_strategy != SaveStrategy.BEST:
            if self.eval_strategy.value != self.save_strategy.value:
                raise ValueError("--load_best_model_at_end requires the save and eval strategy to match, except when "
                                 f'--save_strategy="best", but found\n- Evaluation strategy: {self.eval_strategy}\n'
                                 f"- Save strategy: {self.save_strategy}")
            if self.eval_strategy == IntervalStrategy.STEPS and self.save_steps % self.eval_steps != 0:
                raise ValueError("--load_best_model_at_end requires the saving steps to be a round multiple of the "
                                 f"evaluation steps, but found {self.save_steps}, which is not a round multiple of "
                                 f"{self.eval_steps}.")
        if self.fp16 and self.bf16:
            raise ValueError("At most one of fp16 and bf16 can be True, but not both")
        if self.fp16_full_eval and self.bf16_full_eval:
            raise ValueError("At most one of fp16 and bf16 can be True for full eval, but not both")
        if self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") and self.eval_strategy == IntervalStrategy.NO:
            raise ValueError(f"lr_scheduler_type {self.lr_scheduler_type} requires an eval strategy")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be an integer or a float")
        if self.max_steps is None:
            raise ValueError("max_steps must be an int (-1 for epochs)")

    # -- derived values used by the trainer ---------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def world_size(self) -> int:
        """The processes of the run (torchrun's ``WORLD_SIZE``; 1 without)."""
        env = DistributedEnv.from_environ()
        return 1 if env is None else env.world_size

    @property
    def process_index(self) -> int:
        """This process's rank (torchrun's ``RANK``; 0 without)."""
        env = DistributedEnv.from_environ()
        return 0 if env is None else env.rank

    @property
    def local_process_index(self) -> int:
        env = DistributedEnv.from_environ()
        return 0 if env is None else env.local_rank

    @property
    def should_save(self) -> bool:
        """Whether this process writes checkpoints and models: rank 0 only (on each node's local rank 0 with
        ``save_on_each_node``)."""
        if self.save_on_each_node:
            return self.local_process_index == 0
        return self.process_index == 0

    @property
    def should_log(self) -> bool:
        if self.log_on_each_node:
            return self.local_process_index == 0
        return self.process_index == 0

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """transformers: an integer (>= 1) is a number of steps, a float in [0, 1) a ratio, rounded up."""
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(num_training_steps * w)

    def resolved_steps(self, max_steps: int) -> dict[str, Optional[int]]:
        """``logging_steps`` / ``eval_steps`` / ``save_steps`` as the Trainer uses them: a value < 1 is a fraction
        of ``max_steps``, rounded up (``TrainerState.compute_steps``)."""
        out = {}
        for kind in ("logging", "eval", "save"):
            v = getattr(self, f"{kind}_steps")
            out[f"{kind}_steps"] = None if v is None else (math.ceil(max_steps * v) if v < 1 else int(v))
        return out

    # -- dict / repr ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {}
        for k in self._defaults():
            v = getattr(self, k)
            d[k] = v.value if isinstance(v, Enum) else v
        if d.get("hub_token") is not None:
            d["hub_token"] = "<HUB_TOKEN>"
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in self.to_dict().items()}

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        body = ",\n".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}(\n{body},\n)"

    __str__ = __repr__


__all__ = ["TrainingArguments", "IntervalStrategy", "SaveStrategy", "HubStrategy", "NO_EFFECT_FIELDS",
           "OPTIMIZER_NAMES", "SCHEDULER_TYPES"]
