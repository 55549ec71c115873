"""``TrlParser``: an ``argparse.ArgumentParser`` built from config dataclasses, as TRL's ``TrlParser`` (a
transformers ``HfArgumentParser``) builds it, with TRL's ``--config file.yaml``.

Each dataclass field becomes ``--name`` (and ``--name-with-dashes``), typed from its annotation the way
``HfArgumentParser`` reads it: ``Optional[X]`` is ``X`` (``none`` / ``null`` give None for non-string X), a
``Union`` holding ``str`` is its other member, ``bool`` fields take ``--flag``, ``--flag true|false|yes|no|1|0``
(a bare ``--flag`` also for ``Optional[bool]`` fields, where HfArgumentParser wants a value; ``--no_flag``
when the default is True), ``list[X]`` fields take one or more values, enums and ``choices``
are checked. A YAML ``--config`` file sets defaults (keys are field names; ``env:`` sets environment variables);
flags given on the command line win. Unknown flags, unknown YAML keys and values the dataclasses refuse are
argparse errors (exit status 2); TRL's scripts ignore unknown YAML keys."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Iterable
from enum import Enum
from typing import Any, Callable, Optional, Union

from ..dpo_config import DPO_LOSS_TYPES
from ..training_args import NO_EFFECT_FIELDS, OPTIMIZER_NAMES, SCHEDULER_TYPES

# Values the config classes accept, for --help and early errors (TRL's dataclasses carry these as enums or
# `choices` metadata). Keyed by (dataclass name or None for any, field name).
CHOICES: dict[tuple[Optional[str], str], list[Any]] = {
    (None, "optim"): list(OPTIMIZER_NAMES),
    (None, "lr_scheduler_type"): list(SCHEDULER_TYPES),
    (None, "truncation_mode"): ["keep_start", "keep_end"],
    ("SFTConfig", "loss_type"): ["nll", "dft", "chunked_nll"],
    ("SFTConfig", "packing_strategy"): ["bfd", "bfd_split", "wrapped"],
    (None, "log_level"): ["detail", "debug", "info", "warning", "error", "critical", "passive"],
    (None, "log_level_replica"): ["detail", "debug", "info", "warning", "error", "critical", "passive"],
    (None, "train_sampling_strategy"): ["random", "sequential", "group_by_length", "batch_rebalance"],
    (None, "ddp_backend"): ["nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl"],
    (None, "dataloader_multiprocessing_context"): ["fork", "spawn", "forkserver"],
    ("DPOConfig", "loss_type"): list(DPO_LOSS_TYPES),
}

# One line for the fields people set most; every other field is documented by its name, type and default.
FIELD_HELP = {
    "output_dir": "Where checkpoints (checkpoint-N/) and the final adapter or model are written.",
    "per_device_train_batch_size": "Rows per micro-batch.",
    "per_device_eval_batch_size": "Rows per evaluation batch.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "learning_rate": "The peak learning rate of AdamW.",
    "num_train_epochs": "Passes over the training data (unless --max_steps is set).",
    "max_steps": "Optimizer steps to run; overrides --num_train_epochs when > 0.",
    "lr_scheduler_type": "The learning-rate schedule.",
    "warmup_steps": "Warmup: a number of steps (>= 1) or a fraction of all steps (< 1).",
    "weight_decay": "AdamW's decoupled weight decay (not on biases and norm weights).",
    "max_grad_norm": "Clip the gradients to this global L2 norm (0: no clipping).",
    "logging_steps": "Log every N steps (a fraction < 1: of all steps).",
    "logging_first_step": "Also log after the first step.",
    "save_strategy": "When to write checkpoints: 'no', 'steps', 'epoch' or 'best'.",
    "save_steps": "Write a checkpoint every N steps (with --save_strategy steps).",
    "save_total_limit": "Keep at most this many checkpoints (the oldest go first).",
    "eval_strategy": "When to evaluate on --dataset_test_split: 'no', 'steps' or 'epoch'.",
    "eval_steps": "Evaluate every N steps (default: --logging_steps).",
    "seed": "Seeds the data order, the adapter's initial weights and dropout.",
    "bf16": "bfloat16 products with the frozen weights (CPU autocast's meaning); default: not --fp16.",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory.",
    "resume_from_checkpoint": "A checkpoint-N folder to continue training from.",
    "max_length": "Truncate rows to this many tokens.",
    "completion_only_loss": "Prompt-completion rows: train on the completion only (default: on).",
    "assistant_only_loss": "Train on the assistant turns only (templates with {%% generation %%} blocks).",
    "dataset_text_field": "The text column of plain-text rows.",
    "model_init_kwargs": "Extra from_pretrained keyword arguments, as JSON.",
    "beta": "DPO's beta (the strength of the reference).",
    "loss_type": "The loss (DPO: one or more, combined with --loss_weights).",
    "loss_weights": "Weights of the DPO losses in --loss_type.",
    "label_smoothing": "DPO's label smoothing (robust / cDPO).",
    "precompute_ref_log_probs": "Compute every reference log-probability once before training.",
    "push_to_hub": "Upload the result to the hub at the end (needs huggingface_hub).",
    "report_to": "Logging integrations; ferrovlm logs to the trainer state only.",
}


def string_to_bool(v: Any) -> bool:
    """``--flag VALUE`` for bool fields: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (yes/no, true/false, t/f, y/n, 1/0), got {v!r}")


def _or_none(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    """``inner``, with ``none`` / ``null`` meaning None (for ``Optional`` fields of a non-string type)."""

    def convert(v: str) -> Any:
        return None if v.lower() in ("none", "null") else inner(v)

    convert.__name__ = getattr(inner, "__name__", "value")  # argparse names the type in its messages
    return convert


def _json_dict(v: str) -> Any:
    try:
        out = json.loads(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {v!r}") from None
    if not isinstance(out, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {v!r}")
    return out


def _scalar(tp: Any) -> Callable[[str], Any]:
    """The converter of a scalar annotation: int, float, str, a dict (JSON) or anything else (a string)."""
    if tp in (int, float, str):
        return tp
    if tp is dict or typing.get_origin(tp) is dict:
        return _json_dict
    return str


def _choice_converter(choices: list[Any]) -> Callable[[str], Any]:
    by_text = {str(c): c for c in choices}

    def choice(v: str) -> Any:
        return by_text.get(v, v)

    return choice


def _is_union(tp: Any) -> bool:
    """``Union[...]`` / ``Optional[...]``, or ``X | Y`` on Python >= 3.10."""
    origin = typing.get_origin(tp)
    return origin is Union or (sys.version_info >= (3, 10) and origin is getattr(types, "UnionType", None))


def _narrow(tp: Any) -> tuple[Any, bool]:
    """The one type a field's flag parses (HfArgumentParser's reading of a ``Union``) and whether ``none``
    means None."""
    if not _is_union(tp):
        return tp, False
    members = typing.get_args(tp)
    if type(None) not in members:  # Union[X, str]: X (as transformers reads `Union[IntervalStrategy, str]`)
        return (members[0] if members[1] is str else members[1]), False
    if bool in members:
        return tp, False  # Optional[bool]: a bool flag
    pick = members[0] if members[1] is type(None) else members[1]
    return pick, pick is not str


def _is_bool(tp: Any) -> bool:
    return tp is bool or (_is_union(tp) and set(typing.get_args(tp)) == {bool, type(None)})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the line breaks of the description and the examples."""


class TrlParser(argparse.ArgumentParser):
    """TRL's ``TrlParser``: ``TrlParser((ScriptArguments, SFTConfig, ModelConfig))`` and
    ``parse_args_and_config()`` give one instance per dataclass."""

    def __init__(self, dataclass_types: Any = None, **kwargs: Any) -> None:
        if dataclass_types is None:
            dataclass_types = []
        elif dataclasses.is_dataclass(dataclass_types) or not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        self.dataclass_types = list(dataclass_types)
        for dtype in self.dataclass_types:
            if "config" in {f.name for f in dataclasses.fields(dtype)}:
                raise ValueError(f"Dataclass {dtype.__name__} has a field named 'config', which is reserved for the "
                                 "config file path")
            self._add_dataclass_arguments(dtype)
        self.add_argument("--config", metavar="FILE.yaml", default=None,
                          help="A YAML file of flag values (keys are the flag names without dashes; an `env:` "
                               "mapping sets environment variables); flags on the command line override it.")

    # -- building ---------------------------------------------------------------------------------------------
    def _add_dataclass_arguments(self, dtype: type) -> None:
        group = self.add_argument_group(f"{dtype.__name__} ({dtype.__module__.split('.')[0]})")
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                self._add_field(group, dtype.__name__, f, hints[f.name])

    def _add_field(self, group: Any, owner: str, f: dataclasses.Field, hint: Any) -> None:
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        meta = dict(f.metadata)
        default = _default(f)
        help_text = meta.pop("help", None) or FIELD_HELP.get(f.name) or f"{owner}.{f.name}"
        if f.name in NO_EFFECT_FIELDS:
            help_text += " (accepted; changes nothing in ferrovlm)"
        kw: dict[str, Any] = {"dest": f.name, "help": help_text}
        choices = meta.pop("choices", None) or CHOICES.get((owner, f.name)) or CHOICES.get((None, f.name))
        tp, accepts_none = _narrow(hint)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, Enum):
            choices = [m.value for m in tp]
        if _is_bool(tp):  # a bare --flag is True (HfArgumentParser wants a value when the default is None)
            kw.update(type=string_to_bool, nargs="?", const=True, metavar="{true,false}",
                      default=False if default is dataclasses.MISSING and tp is bool else default)
        elif origin is list:
            (item,) = typing.get_args(tp) or (str,)
            kw.update(type=_scalar(item), nargs="+")
        else:
            kw["type"] = _or_none(_scalar(tp)) if accepts_none else _scalar(tp)
        if choices is not None:
            kw["choices"] = choices  # a list field checks each of its values
            if "nargs" not in kw:
                kw["type"] = _choice_converter(choices)
        if "default" not in kw:
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
        group.add_argument(*names, **kw)
        if default is True and _is_bool(tp):
            group.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                               dest=f.name, help=f"Sets --{f.name} false.")

    def error(self, message: str) -> typing.NoReturn:
        """argparse's error (exit status 2) with a one-line usage: the full one lists some 200 flags."""
        self.exit(2, f"usage: {self.prog} [flags] (`{self.prog} --help` lists them)\n{self.prog}: error: {message}\n")

    # -- parsing ----------------------------------------------------------------------------------------------
    def parse_args_and_config(self, args: Optional[Iterable[str]] = None, return_remaining_strings: bool = False,
                              fail_with_unknown_args: bool = True) -> tuple[Any, ...]:
        """The dataclass instances for ``args`` (default ``sys.argv[1:]``) after applying ``--config``. With
        ``return_remaining_strings``, unknown flags come back as a last list instead of being an error."""
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_path(argv)
        if path is not None:
            self.set_defaults_with_config(**self._read_config(path))
        if return_remaining_strings:
            ns, rest = self.parse_known_args(argv)
        else:
            ns, rest = self.parse_args(argv), []
        out = self._instances(ns)
        return (*out, rest) if return_remaining_strings else out

    def _read_config(self, path: str) -> dict[str, Any]:
        try:
            import yaml
        except ImportError:
            self.error("--config needs PyYAML: pip install pyyaml")
        try:
            with open(path, encoding="utf-8") as fh:
                config = yaml.safe_load(fh)
        except OSError as err:
            self.error(f"--config: cannot read {path}: {err.strerror or err}")
        except yaml.YAMLError as err:
            self.error(f"--config: {path} is not valid YAML: {err}")
        if not isinstance(config, dict):
            self.error(f"--config: {path} must hold a YAML mapping of flag names to values")
        env = config.pop("env", None) or {}
        if not isinstance(env, dict):
            self.error(f"--config: `env` in {path} must be a mapping")
        for k, v in env.items():
            os.environ[str(k)] = str(v)
        known = {a.dest for a in self._actions}
        unknown = sorted(k for k in config if k not in known or k == "config")
        if unknown:
            self.error(f"--config: unknown keys in {path}: {', '.join(map(str, unknown))}")
        return config

    def set_defaults_with_config(self, **values: Any) -> list[str]:
        """Makes ``values`` the defaults of the flags with those names (they stop being required); returns the
        names that no flag has, as ``--name value`` strings (TRL's return value)."""
        used = set()
        for action in self._actions:
            if action.dest in values:
                action.default = values[action.dest]
                action.required = False
                used.add(action.dest)
        return [s for k, v in values.items() if k not in used for s in (f"--{k}", str(v))]

    def _instances(self, ns: argparse.Namespace) -> tuple[Any, ...]:
        out = []
        actions = {a.dest: a for a in self._actions if a.option_strings and a.dest != "help"}
        for dtype in self.dataclass_types:
            kwargs = {}
            for f in dataclasses.fields(dtype):  # only what differs from the default counts as given
                value, default = getattr(ns, f.name, dataclasses.MISSING), _default(f)
                if not f.init or value is dataclasses.MISSING:
                    continue
                if isinstance(default, str) and f.name in actions and actions[f.name].type is not None:
                    default = self._get_value(actions[f.name], default)  # as argparse reads a string default
                if value != default or type(value) is not type(default):
                    kwargs[f.name] = value
            try:
                out.append(dtype(**kwargs))
            except (ValueError, TypeError, NotImplementedError) as err:
                self.error(str(err))
        return tuple(out)


def _config_path(argv: list[str]) -> Optional[str]:
    """The value of the last ``--config`` in ``argv`` (``--config FILE`` or ``--config=FILE``)."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


__all__ = ["TrlParser", "HelpFormatter", "string_to_bool"]
