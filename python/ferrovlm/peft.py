"""PEFT's surface for LoRA / DoRA adapters: ``get_peft_model``, ``PeftModel``. The adapters live in the
Rust model (``_core.add_adapters``); this module picks the target modules with PEFT's rules and reads /
writes PEFT's files (``adapter_config.json``, ``adapter_model.safetensors``), which round-trip with the
``peft`` library."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from . import _core
from .generation import _next_seed
from .hub import resolve_pretrained
from .peft_config import (
    CONFIG_NAME,
    LoraConfig,
    TaskType,
    resolve_modules_to_save,
    resolve_target_modules,
    saved_target_modules,
)

WEIGHTS_NAME = "adapter_model.safetensors"


def module_names(core: _core.VlmModel) -> list[str]:
    """Every module name of the transformers model (parents, Linear layers, norms, embeddings), for PEFT's
    name matching. The tree is the core's (``model/modules.rs``), the one list of the model's names."""
    return list(_core.module_names(core))


def _split_modules_to_save(to_save: list[str], linear: list[str], params: list[str]) -> tuple[list[str], list[str]]:
    """PEFT wraps each module of ``to_save`` in a trainable copy. Its Linear layers get their copy as their
    adapter; its other parameters (norms, embeddings, the patch convolution, ...) get theirs in the model,
    the originals kept for ``disable_adapter()`` (``model/saved.rs``). Returns (Linear names, parameter
    names)."""
    save_linear = [n for n in linear if any(n == m or n.startswith(m + ".") for m in to_save)]
    owned = {f"{n}.{s}" for n in save_linear for s in ("weight", "bias")}
    save_params = [p for p in params if p not in owned and any(p.startswith(m + ".") for m in to_save)]
    return save_linear, save_params


_TIED_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not"
    " set to True. This can lead to complications, for example when merging the adapter or converting your model to"
    " formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)


def _check_tying(model: Any, config: LoraConfig) -> None:
    """PEFT's handling of a tied embedding / head in ``modules_to_save``: a warning (the copy of the embedding
    is the input side's only; the head keeps the original weight), or, with ``ensure_weight_tying``, one
    trained copy for both (not implemented here)."""
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    if not tied or not any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in config.modules_to_save or []):
        return
    if getattr(config, "ensure_weight_tying", False):
        raise NotImplementedError(
            "ensure_weight_tying=True with a tied embedding in modules_to_save is not supported yet: leave it False"
            " (the embedding's copy then trains the input side only, as PEFT does)"
        )
    warnings.warn(_TIED_WARNING, UserWarning, stacklevel=4)


def _attach(model: Any, config: LoraConfig, seed: Optional[int] = None) -> None:
    core = model._core
    linear = _core.linear_names(core)
    all_names = module_names(core)
    targets = resolve_target_modules(config, linear, ("lm_head",), all_names)
    to_save = resolve_modules_to_save(config, all_names)
    # A parent listed in modules_to_save covers its children: keep the outermost matches only.
    to_save = [m for m in to_save if not any(m.startswith(o + ".") for o in to_save if o != m)]
    save_linear, save_params = _split_modules_to_save(to_save, linear, [p[0] for p in core.named_parameters()])
    if to_save:
        _check_tying(model, config)
    targets = [t for t in targets if t not in save_linear]
    init = config.init_lora_weights
    init_s = "gaussian" if init == "gaussian" else ("true" if init is True else "false" if init is False else str(init))
    if len(set(config.rank_pattern or {}) | set(config.alpha_pattern or {})) > 0:
        raise NotImplementedError("rank_pattern / alpha_pattern are not supported yet")
    _core.add_adapters(
        core, targets, int(config.r), float(config.lora_alpha), float(config.lora_dropout or 0.0),
        bool(config.use_dora), bool(config.use_rslora), init_s, _next_seed() if seed is None else seed, save_linear,
        save_params,
    )
    config.target_modules = saved_target_modules(config, targets, all_names)


class _LoraModel:
    """``peft_model.base_model``: holds the wrapped transformers-like model as ``.model``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class PeftModel:
    """A model with a LoRA adapter named ``default`` (PEFT's ``PeftModelForCausalLM`` surface)."""

    def __init__(self, model: Any, peft_config: LoraConfig, adapter_name: str = "default", *, _attach_now: bool = True,
                 is_trainable: bool = True) -> None:
        if adapter_name != "default":
            raise NotImplementedError("ferrovlm models hold one adapter, named 'default'")
        self.__dict__["base_model"] = _LoraModel(model)
        self.__dict__["peft_config"] = {adapter_name: peft_config}
        self.__dict__["active_adapter"] = adapter_name
        self.__dict__["_trainable"] = is_trainable
        if _attach_now:
            _attach(model, peft_config)
        peft_config.inference_mode = not is_trainable
        if hasattr(model, "requires_grad_"):
            model.requires_grad_(False)  # PEFT freezes the base model
            if is_trainable:  # ... but trains the copies of modules_to_save
                model._set_param_requires_grad(_core.saved_module_params(model._core), True)
        model._peft_model = self

    # -- delegation -----------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.base_model.model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base_model.model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name in type(self).__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.base_model.model, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.generate(*args, **kwargs)

    def __repr__(self) -> str:
        r = self.peft_config["default"].r
        return f"PeftModelForCausalLM(base_model={self.base_model.model!r}, adapter=LoRA(r={r}))"

    # -- parameters -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all): all = base parameters + adapter tensors (PEFT counts both)."""
        base = self.base_model.model
        core = base._core
        adapter = sum(_prod(s) for _, s in _core.trainable_shapes(core))
        # base parameters unfrozen after PEFT froze them (requires_grad_(True)) train too, and so do the copies
        # of modules_to_save (PEFT counts the copy and the original in all params)
        unfrozen = sum(p.numel() for p in base.parameters() if p.requires_grad) if hasattr(base, "parameters") else 0
        saved = set(_core.saved_module_params(core))
        copies = sum(p.numel() for n, p in base.named_parameters() if n in saved) if saved else 0
        trainable = adapter + unfrozen if self._trainable else 0
        return trainable, core.num_parameters + adapter + copies

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def named_trainable_parameters(self) -> dict[str, Any]:
        """Adapter tensors by PEFT's saved key (float32 numpy arrays, copies)."""
        return dict(_core.adapter_state(self.base_model.model._core))

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        d = Path(save_directory)
        if d.is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        d.mkdir(parents=True, exist_ok=True)
        _core.save_safetensors(d / WEIGHTS_NAME, _core.adapter_state(self.base_model.model._core))
        cfg = self.peft_config[self.active_adapter]
        name = getattr(self.base_model.model.config, "_name_or_path", None)
        tmp = d / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(cfg.adapter_config(base_model_name_or_path=name), indent=2, sort_keys=True))
        os.replace(tmp, d / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, model: Any, model_id: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None, **kwargs: Any) -> PeftModel:
        hub_kw = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        path = Path(resolve_pretrained(model_id, marker=CONFIG_NAME, **hub_kw))
        cfg = config if config is not None else LoraConfig.from_pretrained(path)
        cfg = copy.copy(cfg)
        state = _core.load_safetensors(path / WEIGHTS_NAME)
        _attach(model, cfg)
        try:
            _core.load_adapter_state(model._core, state, True)
        except Exception:
            _core.remove_adapters(model._core, False)
            raise
        return cls(model, cfg, adapter_name, _attach_now=False, is_trainable=is_trainable)

    def load_adapter(
        self, model_id: str | os.PathLike[str], adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> None:
        PeftModel.from_pretrained(self.base_model.model, model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        fresh = self.base_model.model._peft_model
        self.__dict__["peft_config"] = fresh.peft_config
        self.__dict__["_trainable"] = is_trainable
        self.base_model.model._peft_model = self

    # -- adapters on / off ----------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        core = self.base_model.model._core
        was = _core.adapters_enabled(core)
        _core.set_adapters_enabled(core, False)
        try:
            yield
        finally:
            _core.set_adapters_enabled(core, was)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Any = None) -> Any:
        model = self.base_model.model
        _core.remove_adapters(model._core, True)
        model._peft_model = None
        return model

    def save_pretrained_gguf(
        self, save_directory: str | os.PathLike[str], tokenizer: Any = None, quantization_method: Any = "f16",
        **kwargs: Any,
    ) -> list[str]:
        """The base model with the adapter merged, as GGUF files for llama.cpp (Unsloth's API): a merged
        copy is exported, this model keeps its adapter. Returns the paths written."""
        from .gguf import save_pretrained_gguf

        model = self.base_model.model
        return save_pretrained_gguf(model, save_directory, tokenizer, quantization_method, True, **kwargs)

    def unload(self) -> Any:
        model = self.base_model.model
        saved = _core.saved_module_params(model._core)
        _core.remove_adapters(model._core, False)
        if saved and hasattr(model, "_set_param_requires_grad"):
            model._set_param_requires_grad(saved, False)  # the originals are back, frozen as PEFT left them
        model._peft_model = None
        return model

    def get_base_model(self) -> Any:
        return self.base_model.model

    def train(self, mode: bool = True) -> PeftModel:
        self.base_model.model.train(mode)
        return self

    def eval(self) -> PeftModel:
        self.base_model.model.eval()
        return self


def _prod(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def get_peft_model(model: Any, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Wraps `model` with a fresh LoRA adapter (PEFT's ``get_peft_model``). A model that already is a
    ``PeftModel`` is returned as is (one adapter, never two)."""
    if isinstance(model, PeftModel):
        return model
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"ferrovlm supports LoraConfig adapters, got {type(peft_config).__name__}")
    return PeftModel(model, copy.copy(peft_config), adapter_name)


def prepare_model_for_kbit_training(
    model: Any, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None
) -> Any:
    """PEFT's ``prepare_model_for_kbit_training``: the base is frozen (it always is here), the layers that
    are not quantized compute in float32 (bf16 weights widened exactly, as PEFT's upcast of fp16/bf16
    parameters), and gradient checkpointing is switched on when asked. Returns the model."""
    base = model.base_model.model if isinstance(model, PeftModel) else model
    if getattr(base, "is_quantized", False):
        _core.upcast_dense_layers(base._core)
    if use_gradient_checkpointing:
        base.enable_input_require_grads()
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": True}
        )
    return model


__all__ = ["PeftModel", "get_peft_model", "LoraConfig", "TaskType", "module_names", "prepare_model_for_kbit_training"]
