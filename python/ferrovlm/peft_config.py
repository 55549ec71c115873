"""``LoraConfig`` / ``TaskType``: PEFT 0.21's LoRA configuration, its ``adapter_config.json`` and its rules for
choosing the modules that get an adapter.

PEFT facts reproduced here (peft 0.21.2):

* ``LoraConfig`` is a dataclass: an unknown field raises ``TypeError``; a list ``target_modules`` /
  ``exclude_modules`` is turned into a ``set`` after construction; ``peft_type`` is always ``"LORA"``.
* ``adapter_config.json`` holds every field except ``runtime_config``, sets written as lists, keys sorted,
  ``indent=2``. ``PeftModel.save_pretrained`` additionally sets ``inference_mode=true``, fills
  ``base_model_name_or_path`` from the model's ``name_or_path`` when unset, and writes ``auto_mapping``
  (``{"base_model_class", "parent_library"}``) only when ``task_type`` is None.
* Matching a module name ``key`` (``check_target_module_exists``), in this order:
  ``exclude_modules`` (a str: regex fullmatch; a list: equal or ends with ``"." + entry``) -> not targeted;
  ``modules_to_save`` entries (regex ``(^|.*\\.)entry($|\\..*)``) -> not targeted;
  ``target_modules`` a str: regex fullmatch; a list: equal -> targeted, else ends with ``"." + entry`` and,
  with ``layers_to_transform``, the layer index (first ``.<pattern>.<int>.`` group, or the first numbered
  segment when ``layers_pattern`` is empty) must be listed. An exact match skips the layer filter.
* ``"all-linear"`` (case-insensitive) = every ``nn.Linear`` of the model except the output embedding
  (``lm_head``). The vision tower and the connector ARE included. The set of full names then replaces
  ``target_modules``; when it has >= 20 entries PEFT condenses it to the shortest suffixes that do not name any
  other module (so SmolVLM's adapter_config.json lists e.g. ``["down_proj", "fc1", ..., "proj", ...]``).
  The same condensing applies to any list of >= 20 entries.
* ``modules_to_save`` wraps every module whose name ends with an entry (plain ``str.endswith``, no dot).
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Optional

PEFT_VERSION = "0.21.2"  # the PEFT release whose files we write (adapter_config.json "peft_version")
CONFIG_NAME = "adapter_config.json"
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


class TaskType(str, Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:  # like PEFT's str enums in f-strings
        return self.value


class PeftType(str, Enum):
    LORA = "LORA"

    def __str__(self) -> str:
        return self.value


# PEFT 0.21.2 LoraConfig fields, in dataclass order, with their defaults (sub-configs as dicts / None).
_LORA_FIELDS: dict[str, Any] = {
    "task_type": None,
    "peft_type": None,
    "auto_mapping": None,
    "peft_version": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": None,  # LoraRuntimeConfig in PEFT; never saved
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

_INIT_STRINGS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga", "velora")


class LoraConfig:
    """PEFT's ``LoraConfig`` (same field names, defaults and checks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(_LORA_FIELDS)
        if len(args) > len(names):
            raise TypeError(f"LoraConfig.__init__() takes {len(names)} positional arguments but {len(args)} were given")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"LoraConfig.__init__() got multiple values for argument '{name}'")
            kwargs[name] = value
        for k in kwargs:
            if k not in _LORA_FIELDS:
                raise TypeError(f"LoraConfig.__init__() got an unexpected keyword argument '{k}'")
        for k, v in _LORA_FIELDS.items():
            setattr(self, k, kwargs[k] if k in kwargs else copy.deepcopy(v))
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(getattr(self.task_type, "value", self.task_type))
            except ValueError:
                raise ValueError(f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                                 f"{', '.join(t.value for t in TaskType)}.") from None
        if self.peft_version is None:
            self.peft_version = PEFT_VERSION
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.use_dora and self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        iw = self.init_lora_weights
        if not isinstance(iw, bool) and not (
            isinstance(iw, str) and (iw in _INIT_STRINGS or iw.startswith("pissa_niter_"))
        ):
            raise ValueError(f"init_lora_weights must be True, False or one of {list(_INIT_STRINGS)}, got {iw!r}")
        if iw == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          stacklevel=1)
        if self.lora_bias:
            if iw not in (True, False):
                raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                                 f"got init_lora_weights={iw} instead.")
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if self.alora_invocation_tokens is not None and self.task_type != TaskType.CAUSAL_LM:
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=1)

    # -- PEFT's interface ------------------------------------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def scaling(self, module_name: Optional[str] = None) -> float:
        """The LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` with rslora), with rank_pattern / alpha_pattern
        applied to ``module_name`` like PEFT's ``get_pattern_key``."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    def rank_for(self, module_name: Optional[str]) -> int:
        if module_name is None or not self.rank_pattern:
            return self.r
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern.get(key, self.r)

    def alpha_for(self, module_name: Optional[str]) -> float:
        if module_name is None or not self.alpha_pattern:
            return self.lora_alpha
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern.get(key, self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field but runtime_config, enums as strings, sets as sorted lists
        (PEFT writes ``list(set)``, an arbitrary order)."""
        out = {}
        for k in _LORA_FIELDS:
            if k == "runtime_config":
                continue
            out[k] = _jsonable(getattr(self, k))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    to_json = to_json_string

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], auto_mapping_dict: Optional[dict] = None, **kwargs: Any
    ) -> None:
        d = Path(save_directory)
        if d.is_file():
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        d.mkdir(parents=True, exist_ok=True)
        out = self.to_dict()
        if auto_mapping_dict is not None:
            out["auto_mapping"] = auto_mapping_dict
        (d / CONFIG_NAME).write_text(json.dumps(out, indent=2, sort_keys=True))

    def adapter_config(self, base_model_name_or_path: Optional[str] = None,
                       base_model_class: str = "Idefics3ForConditionalGeneration",
                       parent_library: str = "transformers.models.idefics3.modeling_idefics3") -> dict[str, Any]:
        """What ``PeftModel.save_pretrained`` writes for this config: inference_mode true, the base model name
        filled in when unset, auto_mapping when task_type is None."""
        out = self.to_dict()
        if out["base_model_name_or_path"] is None:
            out["base_model_name_or_path"] = base_model_name_or_path or None
        out["inference_mode"] = True
        if self.task_type is None:
            out["auto_mapping"] = {"base_model_class": base_model_class, "parent_library": parent_library}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """From an adapter_config.json dict. Keys a newer PEFT added are dropped with a warning (like PEFT);
        a ``runtime_config`` key is dropped."""
        data = dict(data)
        if data.get("peft_type", "LORA") not in ("LORA", PeftType.LORA):
            raise ValueError(f"not a LoRA adapter config: peft_type={data.get('peft_type')!r}")
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.", stacklevel=1)
            del data["runtime_config"]
        unknown = sorted(k for k in data if k not in _LORA_FIELDS)
        if unknown:
            warnings.warn(f"Unexpected keyword arguments {unknown} for class LoraConfig, these are ignored. This "
                          "probably means that you're loading a configuration file that was saved using a higher "
                          "version of PEFT.", stacklevel=1)
            for k in unknown:
                del data[k]
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        return json.loads(Path(path).read_text())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: Optional[str] = None,
                        **kwargs: Any) -> LoraConfig:
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        f = path / CONFIG_NAME
        if not f.is_file():
            try:
                from . import _core

                f = Path(_core.resolve_model_dir(os.fspath(pretrained_model_name_or_path), kwargs.get("revision"),
                                                 kwargs.get("cache_dir"), CONFIG_NAME))
                f = (f / subfolder if subfolder else f) / CONFIG_NAME
            except Exception:
                raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}'") from None
        data = cls.from_json_file(f)
        class_kwargs = {k: v for k, v in kwargs.items() if k in _LORA_FIELDS}
        return cls.from_dict({**class_kwargs, **data})

    # -- dataclass-like behaviour ----------------------------------------------------------------------------------
    def __eq__(self, other: Any) -> bool:
        return isinstance(other, LoraConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={getattr(self, k)!r}" for k in _LORA_FIELDS)
        return f"LoraConfig({items})"

    def __copy__(self) -> LoraConfig:
        new = LoraConfig.__new__(LoraConfig)
        new.__dict__.update(self.__dict__)
        return new


def _jsonable(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "__dict__") and not isinstance(v, type):
        return {k: _jsonable(x) for k, x in vars(v).items() if not k.startswith("_")}
    return v


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the name (after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


# ---- target module resolution ----------------------------------------------------------------------------------

def is_all_linear(cfg: LoraConfig) -> bool:
    t = cfg.target_modules
    return isinstance(t, str) and t.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    if layers_pattern is None or len(layers_pattern) == 0:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def module_is_excluded(cfg: LoraConfig, key: str) -> bool:
    ex = cfg.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return True
    if cfg.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save):
        return True
    return False


def module_matches(cfg: LoraConfig, key: str, target_modules: Any = None) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name (target_modules defaults to the config's)."""
    if module_is_excluded(cfg, key):
        return False
    targets = cfg.target_modules if target_modules is None else target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    lt = cfg.layers_to_transform
    if found and lt is not None and (len(lt) != 0 if isinstance(lt, list) else True):
        idx = _layer_index(key, cfg.layers_pattern)
        if idx is None:
            return False
        return idx == lt if isinstance(lt, int) else idx in lt
    return found


def resolve_target_modules(cfg: LoraConfig, linear_names: Sequence[str],
                           output_layer_names: Iterable[str] = ("lm_head",),
                           all_module_names: Optional[Sequence[str]] = None) -> list[str]:
    """The names (in ``linear_names`` order) of the Linear modules PEFT 0.21 wraps with LoRA for ``cfg``.

    ``linear_names``: the model's ``nn.Linear`` module names (SmolVLM: ``model.vision_model.encoder.layers.N.
    self_attn.{q,k,v,out}_proj`` / ``.mlp.fc{1,2}``, ``model.connector.modality_projection.proj``,
    ``model.text_model.layers.N.self_attn.{q,k,v,o}_proj`` / ``.mlp.{gate,up,down}_proj``, ``lm_head``).
    With ``all_module_names`` (every named module), a match on a module that is not Linear raises like PEFT.
    Raises ``ValueError`` when nothing matches."""
    linear = list(linear_names)
    targets: Any = cfg.target_modules
    if is_all_linear(cfg):
        out_layers = set(output_layer_names)
        targets = {n for n in linear if n not in out_layers}
    if targets is None:
        raise ValueError("Please specify `target_modules` in `peft_config`")
    chosen = [n for n in linear if module_matches(cfg, n, targets)]
    if all_module_names is not None:
        lin = set(linear)
        bad = [n for n in all_module_names if n and n not in lin and module_matches(cfg, n, targets)]
        if bad:
            raise ValueError(f"Target module {bad[0]} is not supported. Currently, only `torch.nn.Linear` layers "
                             "are supported by ferrovlm's LoRA.")
    if not chosen:
        raise ValueError(f"Target modules {sorted(targets) if isinstance(targets, set) else targets} not found in "
                         "the base model. Please check the target modules and try again.")
    return chosen


def minimal_target_modules(targets: Iterable[str], other_module_names: Iterable[str]) -> set[str]:
    """The shortest name suffixes (whole dot-separated parts) that cover every target and name no other module
    (PEFT's ``_find_minimal_target_modules``)."""
    targets = set(targets)
    if not targets or "" in targets:
        raise ValueError("target_modules should be a non-empty list or set of non-empty strings.")
    others = set(other_module_names)
    if not targets.isdisjoint(others):
        raise ValueError("target_modules and other_module_names overlap")

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken = {s for o in others for s in suffixes(o)}
    required: set[str] = set()
    for name, sufs in sorted(((t, suffixes(t)) for t in targets), key=lambda x: x[1]):
        for s in sufs:
            if s in required or s in taken:
                continue
            if not any(name.endswith("." + r) for r in required):
                required.add(s)
                break
    return required or targets


def saved_target_modules(cfg: LoraConfig, targeted: Sequence[str], all_module_names: Sequence[str]) -> Any:
    """``target_modules`` as PEFT leaves it in the config after injection (and writes to adapter_config.json):
    "all-linear" becomes the set of targeted names; a set of >= 20 entries is condensed to minimal suffixes."""
    t: Any = set(targeted) if is_all_linear(cfg) else cfg.target_modules
    if isinstance(t, (set, list)) and len(t) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        sufs = tuple("." + s for s in t)
        others = [n for n in all_module_names if n not in t and not n.endswith(sufs)]
        new = minimal_target_modules(t, others)
        if len(new) < len(t):
            t = new
    return t


def resolve_modules_to_save(cfg: LoraConfig, module_names: Sequence[str]) -> list[str]:
    """Modules PEFT wraps as trainable copies: those whose name ends with a ``modules_to_save`` entry (plain
    ``str.endswith``)."""
    if not cfg.modules_to_save:
        return []
    return [n for n in module_names if n and any(n.endswith(m) for m in cfg.modules_to_save)]


__all__ = ["LoraConfig", "TaskType", "PeftType", "resolve_target_modules", "resolve_modules_to_save",
           "saved_target_modules", "minimal_target_modules", "module_matches"]
