"""``SFTConfig`` / ``DPOConfig``: TRL 1.16's training configurations (on transformers 5.24's
``TrainingArguments``), as plain mutable objects.

Every field TRL accepts is accepted, with TRL's defaults; a misspelled name raises ``TypeError`` like a
dataclass. Fields that change nothing in ferrovlm (distributed / hardware / integration knobs) warn once
when set to a non-default value. Derived values are resolved like ``TrainingArguments.__post_init__``:
``bf16=None`` -> ``not fp16``, ``eval_steps`` falls back to ``logging_steps``, ``report_to="none"`` -> ``[]``,
``gradient_checkpointing`` mirrors ``activation_checkpointing``, ...

Spellings removed from transformers 5 / TRL 1.x that the tutorials still use are accepted with a
``FutureWarning``: ``warmup_ratio`` (-> ``warmup_steps`` as a fraction in [0, 1)), ``evaluation_strategy``
(-> ``eval_strategy``), ``max_seq_length`` (-> ``max_length``, SFT), ``rpo_alpha=a`` (DPO, -> ``loss_type``
``["sigmoid", "sft"]`` with ``loss_weights`` ``[1, a]``), and ``overwrite_output_dir`` / ``logging_dir``
(ignored).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple

# ---- field tables: printed from the installed classes by
#      /work/refenv/bin/python scripts/reference/sft_collate.py --print-field-table
#      (transformers 5.24 TrainingArguments, TRL 1.16 SFTConfig / DPOConfig; enums as their values) ----
_TRAINING_ARGUMENTS = {
    'output_dir': None,
    'per_device_train_batch_size': 8,
    'num_train_epochs': 3.0,
    'max_steps': -1,
    'learning_rate': 5e-05,
    'lr_scheduler_type': 'linear',
    'lr_scheduler_kwargs': None,
    'warmup_steps': 0,
    'optim': 'adamw_torch_fused',
    'optim_args': None,
    'weight_decay': 0.0,
    'adam_beta1': 0.9,
    'adam_beta2': 0.999,
    'adam_epsilon': 1e-08,
    'optim_target_modules': None,
    'gradient_accumulation_steps': 1,
    'average_tokens_across_devices': True,
    'max_grad_norm': 1.0,
    'label_smoothing_factor': 0.0,
    'bf16': False,
    'fp16': False,
    'bf16_full_eval': False,
    'fp16_full_eval': False,
    'tf32': None,
    'activation_checkpointing': None,
    'activation_checkpointing_kwargs': None,
    'gradient_checkpointing': None,
    'gradient_checkpointing_kwargs': None,
    'torch_compile': False,
    'torch_compile_backend': None,
    'torch_compile_mode': None,
    'use_liger_kernel': False,
    'liger_kernel_config': None,
    'use_cache': False,
    'neftune_noise_alpha': None,
    'torch_empty_cache_steps': None,
    'auto_find_batch_size': False,
    'logging_strategy': 'steps',
    'logging_steps': 500,
    'logging_first_step': False,
    'log_on_each_node': True,
    'logging_nan_inf_filter': True,
    'include_num_input_tokens_seen': 'no',
    'log_level': 'passive',
    'log_level_replica': 'warning',
    'disable_tqdm': None,
    'report_to': 'none',
    'run_name': None,
    'project': 'huggingface',
    'trackio_space_id': None,
    'trackio_bucket_id': None,
    'trackio_static_space_id': None,
    'eval_strategy': 'no',
    'eval_steps': None,
    'eval_delay': 0,
    'per_device_eval_batch_size': 8,
    'prediction_loss_only': False,
    'eval_on_start': False,
    'eval_do_concat_batches': True,
    'eval_use_gather_object': False,
    'eval_accumulation_steps': None,
    'include_for_metrics': [],
    'batch_eval_metrics': False,
    'save_only_model': False,
    'save_strategy': 'steps',
    'save_steps': 500,
    'save_on_each_node': False,
    'save_total_limit': None,
    'enable_jit_checkpoint': False,
    'push_to_hub': False,
    'hub_token': None,
    'hub_private_repo': None,
    'hub_model_id': None,
    'hub_strategy': 'every_save',
    'hub_always_push': False,
    'hub_revision': None,
    'load_best_model_at_end': False,
    'metric_for_best_model': None,
    'greater_is_better': None,
    'ignore_data_skip': False,
    'restore_callback_states_from_checkpoint': False,
    'full_determinism': False,
    'seed': 42,
    'data_seed': None,
    'use_cpu': False,
    'accelerator_config': None,
    'parallelism_config': None,
    'dataloader_drop_last': False,
    'dataloader_num_workers': 0,
    'dataloader_pin_memory': True,
    'dataloader_persistent_workers': False,
    'dataloader_prefetch_factor': None,
    'dataloader_multiprocessing_context': None,
    'dataloader_in_order': True,
    'remove_unused_columns': True,
    'label_names': None,
    'train_sampling_strategy': 'random',
    'length_column_name': 'length',
    'ddp_find_unused_parameters': None,
    'ddp_bucket_cap_mb': None,
    'ddp_broadcast_buffers': None,
    'ddp_static_graph': None,
    'ddp_backend': None,
    'ddp_timeout': 1800,
    'fsdp': None,
    'fsdp_config': None,
    'deepspeed': None,
    'debug': '',
    'skip_memory_metrics': True,
    'do_train': False,
    'do_eval': False,
    'do_predict': False,
    'resume_from_checkpoint': None,
    'local_rank': -1,
}
_SFTCONFIG_FIELDS = {
    'learning_rate': 2e-05,
    'bf16': None,
    'gradient_checkpointing': True,
    'logging_steps': 10,
    'model_init_kwargs': None,
    'trust_remote_code': False,
    'router_aux_loss_coef': None,
    'chat_template_path': None,
    'dataset_text_field': 'text',
    'dataset_kwargs': None,
    'dataset_num_proc': None,
    'eos_token': None,
    'max_length': 1024,
    'truncation_mode': 'keep_start',
    'shuffle_dataset': False,
    'packing': False,
    'packing_strategy': 'bfd',
    'padding_free': False,
    'pad_to_multiple_of': 'auto',
    'eval_packing': None,
    'completion_only_loss': None,
    'assistant_only_loss': False,
    'loss_type': 'nll',
    'activation_offloading': False,
    'pad_token': None,
}
_DPOCONFIG_FIELDS = {
    'learning_rate': 1e-06,
    'bf16': None,
    'gradient_checkpointing': True,
    'logging_steps': 10,
    'model_init_kwargs': None,
    'trust_remote_code': False,
    'router_aux_loss_coef': None,
    'disable_dropout': True,
    'dataset_num_proc': None,
    'max_length': 1024,
    'truncation_mode': 'keep_start',
    'padding_free': False,
    'pad_to_multiple_of': 'auto',
    'precompute_ref_log_probs': False,
    'precompute_ref_batch_size': None,
    'loss_type': ['sigmoid'],
    'loss_weights': None,
    'ld_alpha': None,
    'f_divergence_type': 'reverse_kl',
    'f_alpha_divergence_coef': 0.5,
    'label_smoothing': 0.0,
    'beta': 0.1,
    'use_weighting': False,
    'discopop_tau': 0.05,
    'activation_offloading': False,
    'sync_ref_model': False,
    'ref_model_mixup_alpha': 0.6,
    'ref_model_sync_steps': 512,
    'pad_token': None,
}


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

# Fields accepted for compatibility that change nothing in ferrovlm (single process, CPU/accelerator chosen by
# the Rust core, no integrations): setting one to a non-default value warns once per process.
NO_EFFECT_FIELDS = frozenset({
    "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config",
    "torch_empty_cache_steps", "auto_find_batch_size", "log_on_each_node", "log_level", "log_level_replica",
    "disable_tqdm", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "eval_use_gather_object", "eval_do_concat_batches", "save_on_each_node", "enable_jit_checkpoint",
    "full_determinism", "use_cpu", "accelerator_config", "parallelism_config", "dataloader_drop_last",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataloader_in_order", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed",
    "debug", "skip_memory_metrics", "local_rank", "average_tokens_across_devices", "dataset_num_proc",
    "activation_offloading", "trust_remote_code", "router_aux_loss_coef", "use_cache",
    "overwrite_output_dir", "logging_dir",
})

# Legacy spellings: name -> (what it maps to, message)
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


class _TrainerConfig:
    """Shared by SFTConfig and DPOConfig: the TrainingArguments part."""

    _OWN_FIELDS: Dict[str, Any] = {}
    _LEGACY_OWN: Dict[str, str] = {}

    @classmethod
    def _defaults(cls) -> Dict[str, Any]:
        d = dict(_TRAINING_ARGUMENTS)
        d.update(cls._OWN_FIELDS)  # overridden defaults keep their place, new fields come after (dataclass order)
        return d

    @classmethod
    def field_names(cls) -> List[str]:
        return list(cls._defaults())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        defaults = self._defaults()
        names = list(defaults)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.__init__() takes {len(names)} positional arguments but {len(args)} were given")
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
        self._explicit = frozenset(kwargs) | frozenset(legacy)
        for k in sorted(kwargs):
            if k in NO_EFFECT_FIELDS and kwargs[k] != defaults[k]:
                _warn_once((type(self).__name__, k), f"{type(self).__name__}: `{k}` is accepted for compatibility but "
                           "changes nothing in ferrovlm.")
        self._apply_legacy(legacy)
        self.__post_init__()

    # -- resolution -------------------------------------------------------------------------------------------
    def _apply_legacy(self, legacy: Dict[str, Any]) -> None:
        for k, v in legacy.items():
            msg = _LEGACY.get(k) or self._LEGACY_OWN[k]
            _warn_once((type(self).__name__, "legacy", k), f"{type(self).__name__}: {msg}", FutureWarning)
            object.__setattr__(self, k, v)
            if k == "warmup_ratio":
                if v is not None and v != 0:
                    if not 0 <= float(v) < 1:
                        raise ValueError(f"warmup_ratio must lie in [0, 1), got {v}")
                    if self.warmup_steps not in (0, None) and "warmup_steps" in self._explicit:
                        warnings.warn("both warmup_steps and warmup_ratio are set; warmup_steps wins", UserWarning, stacklevel=4)
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
        if getattr(self, "bf16", False) is None:  # TRL: bf16 defaults to "not fp16"
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
                raise ValueError(f"evaluation strategy {self.eval_strategy.value} requires either non-zero --eval_steps or --logging_steps")
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
        for kind, strategy in (("logging", self.logging_strategy), ("eval", self.eval_strategy), ("save", self.save_strategy)):
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
                                 f"evaluation steps, but found {self.save_steps}, which is not a round multiple of {self.eval_steps}.")
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
        return 1

    @property
    def process_index(self) -> int:
        return 0

    @property
    def should_save(self) -> bool:
        return True

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """transformers: an integer (>= 1) is a number of steps, a float in [0, 1) a ratio, rounded up."""
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(num_training_steps * w)

    def resolved_steps(self, max_steps: int) -> Dict[str, Optional[int]]:
        """``logging_steps`` / ``eval_steps`` / ``save_steps`` as the Trainer uses them: a value < 1 is a fraction
        of ``max_steps``, rounded up (``TrainerState.compute_steps``)."""
        out = {}
        for kind in ("logging", "eval", "save"):
            v = getattr(self, f"{kind}_steps")
            out[f"{kind}_steps"] = None if v is None else (math.ceil(max_steps * v) if v < 1 else int(v))
        return out

    # -- dict / repr ----------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {}
        for k in self._defaults():
            v = getattr(self, k)
            d[k] = v.value if isinstance(v, Enum) else v
        if d.get("hub_token") is not None:
            d["hub_token"] = "<HUB_TOKEN>"
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> Dict[str, Any]:
        return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in self.to_dict().items()}

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        body = ",\n".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}(\n{body},\n)"

    __str__ = __repr__


def _enum(cls: type, value: Any, name: str) -> Any:
    try:
        return cls(getattr(value, "value", value))
    except ValueError:
        raise ValueError(f"{value!r} is not a valid {cls.__name__} for `{name}`, please select one of "
                         f"{[m.value for m in cls]}") from None


class TrainingArguments(_TrainerConfig):
    """transformers 5.24's ``TrainingArguments`` fields and defaults."""

    _OWN_FIELDS: Dict[str, Any] = {}


class SFTConfig(_TrainerConfig):
    """TRL 1.16's ``SFTConfig`` (``learning_rate=2e-5``, ``logging_steps=10``, ``gradient_checkpointing=True``,
    ``bf16=not fp16``, ``max_length=1024``, ``completion_only_loss=None`` (= on for prompt-completion data),
    ``assistant_only_loss=False``, ...)."""

    _OWN_FIELDS = _SFTCONFIG_FIELDS
    _LEGACY_OWN = {"max_seq_length": "`max_seq_length` was renamed `max_length` (TRL 0.20)."}

    def _apply_legacy(self, legacy: Dict[str, Any]) -> None:
        if "max_seq_length" in legacy:
            v = legacy.pop("max_seq_length")
            _warn_once(("SFTConfig", "legacy", "max_seq_length"), f"SFTConfig: {self._LEGACY_OWN['max_seq_length']}", FutureWarning)
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
            _warn_once(("SFTConfig", "chunked_nll"), "`loss_type='chunked_nll'` is deprecated; using 'nll'.", FutureWarning)
            self.loss_type = "nll"
        if self.loss_type not in ("nll", "dft"):
            raise ValueError(f"Invalid `loss_type` {self.loss_type} passed. Supported values are 'nll' and 'dft'.")
        if self.packing_strategy == "bfd-requeue":
            self.packing_strategy = "bfd_split"
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        if self.pad_token is not None:
            _warn_once(("SFTConfig", "pad_token"), "`pad_token` is deprecated; set tokenizer.pad_token instead.", FutureWarning)

    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))


# TRL 1.16 DPOTrainer's loss names (dpo_trainer.py, the loss dispatch)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DPOConfig(_TrainerConfig):
    """TRL 1.16's ``DPOConfig`` (``beta=0.1``, ``loss_type=["sigmoid"]``, ``loss_weights=None``,
    ``label_smoothing=0.0``, ``learning_rate=1e-6``, ``max_length=1024``, ``precompute_ref_log_probs=False``, ...).
    ``rpo_alpha=a`` (older TRL) becomes ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1.0, a]``."""

    _OWN_FIELDS = _DPOCONFIG_FIELDS
    _LEGACY_OWN = {"rpo_alpha": "`rpo_alpha` was removed from TRL; it is mapped to loss_type=['sigmoid', 'sft'] "
                                "with loss_weights=[1.0, rpo_alpha]."}

    def _apply_legacy(self, legacy: Dict[str, Any]) -> None:
        if "rpo_alpha" in legacy:
            a = legacy.pop("rpo_alpha")
            object.__setattr__(self, "rpo_alpha", a)
            if a is not None:
                _warn_once(("DPOConfig", "legacy", "rpo_alpha"), f"DPOConfig: {self._LEGACY_OWN['rpo_alpha']}", FutureWarning)
                base = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
                weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(base)
                if "sft" in base:
                    raise ValueError("rpo_alpha cannot be combined with a loss_type that already contains 'sft'")
                self.loss_type = base + ["sft"]
                self.loss_weights = weights + [float(a)]
        super()._apply_legacy(legacy)

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        bad = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if bad:
            raise ValueError(f"Unknown DPO loss_type {bad}; expected one of {list(DPO_LOSS_TYPES)}")
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


__all__ = ["SFTConfig", "DPOConfig", "TrainingArguments", "IntervalStrategy", "SaveStrategy", "HubStrategy",
           "NO_EFFECT_FIELDS"]
