"""transformers-like model classes over the Rust core.

``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration`` and the auto classes
``AutoModelForVision2Seq`` / ``AutoModelForImageTextToText``: ``from_pretrained`` loads a local dir or a
cached hub id; calling the model returns ``.logits`` and ``.loss`` like transformers.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Optional

import numpy as np

from . import _core
from ._tensors import is_torch_tensor, like_inputs, to_numpy
from .configuration import CONFIG_CLASSES, PretrainedConfig
from .device import as_device, device_spec, is_device_arg
from .generation import GenerationConfig, resolve
from .hub import resolve_pretrained
from .parameters import ParametersMixin

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
_ATTN_IMPLEMENTATIONS = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}
# Keyword arguments transformers' forward accepts that change nothing here.
_IGNORED_FORWARD_KWARGS = {"use_cache", "output_attentions", "output_hidden_states", "return_dict", "cache_position"}


def _dtype_name(dtype: Any, config: dict[str, Any]) -> str:
    """Maps ``dtype=`` / ``torch_dtype=`` (torch dtype, string, "auto" or None) to a core dtype name.

    None and "auto" take the checkpoint's own dtype, as transformers 5 does."""
    if dtype is None or dtype == "auto":
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
        return _DTYPE_NAMES.get(str(stored), "float32")
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16, float16 or 'auto'")
    return _DTYPE_NAMES[name]


def _is_dtype(a: Any) -> bool:
    return type(a).__name__ == "dtype" or str(a).replace("torch.", "") in _DTYPE_NAMES


def _quantization_config(quantization_config: Any, load_in_4bit: bool, load_in_8bit: bool) -> Any:
    """A ``BitsAndBytesConfig`` from ``quantization_config`` (config or dict) or the legacy
    ``load_in_4bit`` / ``load_in_8bit`` keywords (as transformers still accepts)."""
    from .quantization_config import BitsAndBytesConfig

    if load_in_4bit or load_in_8bit:
        if quantization_config is not None:
            raise ValueError(
                "You can't pass `load_in_4bit`or `load_in_8bit` as a kwarg when passing `quantization_config` argument "
                "at the same time."
            )
        warnings.warn(
            "The `load_in_4bit` and `load_in_8bit` arguments are deprecated and will be removed in the future "
            "versions. "
            "Please, pass a `BitsAndBytesConfig` object in `quantization_config` argument instead.",
            FutureWarning,
            stacklevel=3,
        )
        return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ValueError(f"quantization method {method!r} is not supported (bitsandbytes)")
        return BitsAndBytesConfig.from_dict(quantization_config)
    if isinstance(quantization_config, BitsAndBytesConfig):
        return quantization_config
    if type(quantization_config).__name__ == "BitsAndBytesConfig" and hasattr(quantization_config, "to_dict"):
        return BitsAndBytesConfig.from_dict(quantization_config.to_dict())  # transformers' own class
    raise ValueError(
        f"unsupported quantization_config {type(quantization_config).__name__}; use ferrovlm.BitsAndBytesConfig"
    )


class ModelOutput(dict):
    """A dict with attribute access, like transformers' ``ModelOutput`` (``out.logits``, ``out["loss"]``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_tuple(self) -> tuple:
        return tuple(v for v in self.values() if v is not None)


class Idefics3ForConditionalGeneration(ParametersMixin):
    """Idefics3 vision-language model for causal LM, as in transformers."""

    config_class = CONFIG_CLASSES["idefics3"]
    main_input_name = "input_ids"

    def __init__(
        self, core: _core.VlmModel, config: PretrainedConfig, generation_config: Optional[GenerationConfig] = None
    ) -> None:
        self._core = core
        self.config = config
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.training = False

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        torch_dtype: Any = None,
        device_map: Any = None,
        attn_implementation: Optional[str] = None,
        _attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[str | os.PathLike[str]] = None,
        local_files_only: bool = False,
        token: Optional[str | bool] = None,
        low_cpu_mem_usage: Optional[bool] = None,
        trust_remote_code: bool = False,
        quantization_config: Any = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        gguf_file: Optional[str | os.PathLike[str]] = None,
        mmproj_file: Optional[str | os.PathLike[str]] = None,
    ) -> Idefics3ForConditionalGeneration:
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass only one of dtype= and torch_dtype=")
        attn = attn_implementation or _attn_implementation
        if attn is not None and attn not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn!r} is not one of {sorted(_ATTN_IMPLEMENTATIONS)}")
        if attn in ("flash_attention_2", "flash_attention_3"):
            warnings.warn(
                f"attn_implementation={attn!r} needs a GPU; ferrovlm runs its own fused attention on the CPU",
                stacklevel=2,
            )
        quant = _quantization_config(quantization_config, load_in_4bit, load_in_8bit)
        device = device_spec(device_map) or "cpu"  # transformers: no device_map loads on the CPU
        if mmproj_file is not None and gguf_file is None:
            raise ValueError("mmproj_file needs the text model's gguf_file too")
        if gguf_file is not None:
            if quant is not None:
                raise ValueError("a GGUF file is already quantized; do not pass quantization_config with gguf_file")
            return cls._from_gguf(
                pretrained_model_name_or_path,
                gguf_file,
                dtype if dtype is not None else torch_dtype,
                attn,
                dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token),
                mmproj_file,
            ).to(device)
        path = resolve_pretrained(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        resolved = json.loads(_core.load_config_json(path))
        model_type = resolved["model_type"]
        expected = cls.config_class.model_type
        if issubclass(cls, _AutoBase) and model_type not in cls._model_types:
            raise ValueError(
                f"Unrecognized configuration class {CONFIG_CLASSES[model_type].__name__} for this kind of AutoModel: "
                f"{cls.__name__}. Model type should be one of {', '.join(sorted(cls._model_types))}."
            )
        if not issubclass(cls, _AutoBase) and (model_type == "llama") != (expected == "llama"):
            raise ValueError(
                f"a '{model_type}' checkpoint cannot be loaded into {cls.__name__} (made for '{expected}')"
            )
        if not issubclass(cls, _AutoBase) and model_type != expected:
            warnings.warn(
                f"loading a '{model_type}' checkpoint into {cls.__name__} (made for '{expected}'); the math is the "
                "same",
                stacklevel=2,
            )
        stored_quant = resolved.get("quantization_config")
        if stored_quant is not None and quant is not None:
            warnings.warn(
                "You passed `quantization_config` or equivalent parameters to `from_pretrained` but the model you're "
                "loading already has a `quantization_config` attribute. The `quantization_config` from the model "
                "will be used.",
                stacklevel=2,
            )
            quant = None
        core = _core.VlmModel.load(
            path,
            _dtype_name(dtype if dtype is not None else torch_dtype, resolved),
            json.dumps(quant.to_dict()) if quant is not None else None,
            device,
        )
        if quant is not None:
            resolved["quantization_config"] = quant.to_dict()
        config = CONFIG_CLASSES[model_type].from_dict(resolved)
        config._name_or_path = os.fspath(pretrained_model_name_or_path)
        config._attn_implementation = attn or "eager"
        target = _MODEL_CLASSES[model_type] if issubclass(cls, _AutoBase) else cls
        return target(core, config, GenerationConfig.from_pretrained(path, config))

    @classmethod
    def from_text_model(
        cls, text_model: Any, processor: Any = None, *, vision_config: Any = None, vision_model: Any = None,
        scale_factor: Optional[int] = None, image_size: Optional[int] = None, reuse_connector: Optional[bool] = None,
        mean_resizing: bool = True, pad_to_multiple_of: Optional[int] = None, seed: Optional[int] = None,
    ) -> Idefics3ForConditionalGeneration:
        """A VLM from a language model (``LlamaForCausalLM``, from a folder or GGUF; or its folder) and a vision
        tower: new, from ``vision_config`` (a dict of ``Idefics3VisionConfig`` keys, transformers' defaults for
        the others; ``image_size`` from the processor, ``patch_size`` so that the processor's ``image_seq_len``
        fits), or the tower of ``vision_model`` (a checkpoint folder, hub id or loaded model) with its connector
        when it fits (``reuse_connector``). ``processor``: from ``Idefics3Processor.from_text_model`` (or a
        tokenizer holding ``<image>``); the embeddings grow to its tokenizer's length as
        ``resize_token_embeddings(len(tokenizer), pad_to_multiple_of, mean_resizing)`` does. ``seed`` seeds the
        new weights (default: ``ferrovlm.set_seed``'s stream). See ``ferrovlm.composition``."""
        from .composition import model_from_text_model

        return model_from_text_model(
            cls, text_model, processor, vision_config=vision_config, vision_model=vision_model,
            scale_factor=scale_factor, image_size=image_size, reuse_connector=reuse_connector,
            mean_resizing=mean_resizing, pad_to_multiple_of=pad_to_multiple_of, seed=seed,
        )

    def resize_token_embeddings(
        self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None, mean_resizing: bool = True
    ) -> int:
        """transformers' ``resize_token_embeddings`` (mean resizing, tied or untied head, ``pad_to_multiple_of``);
        returns the new number of rows (transformers returns the embedding module)."""
        from .composition import resize_token_embeddings

        return resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)

    @classmethod
    def _from_gguf(
        cls, name_or_path: Any, gguf_file: Any, dtype: Any, attn: Optional[str], hub: dict[str, Any],
        mmproj_file: Any = None,
    ) -> Idefics3ForConditionalGeneration:
        """``from_pretrained(dir, gguf_file=..., mmproj_file=...)``: a Llama language model from its GGUF
        file (config from the file's metadata, as transformers does), or a SmolVLM from the text GGUF file
        plus the ``mmproj`` GGUF file (llama.cpp's pair), or from the hub-layout folder ``dir`` with its
        text model replaced by the GGUF file. Quantized weights stay in their blocks (the products use
        their exact dequantized values, which is what transformers computes with)."""
        from .gguf import load_gguf_core

        auto = issubclass(cls, _AutoBase)
        kinds = cls._model_types if auto else frozenset({cls.config_class.model_type})
        want_vlm = "llama" not in kinds
        model_type = "smolvlm" if kinds == {"smolvlm"} else "idefics3"
        core, folder, path, mmproj = load_gguf_core(
            name_or_path, gguf_file, mmproj_file, _dtype_name(dtype, {"dtype": "float32"}), want_vlm, model_type, hub
        )
        resolved = json.loads(core.config_json)
        model_type = resolved["model_type"]
        if auto and model_type not in kinds:
            raise ValueError(f"{cls.__name__} cannot hold a '{model_type}' model (config of {folder})")
        config = CONFIG_CLASSES[model_type].from_dict(resolved)
        config._name_or_path = os.fspath(name_or_path)
        config._attn_implementation = attn or "eager"
        target = _MODEL_CLASSES[model_type] if auto else cls
        gen = GenerationConfig.from_pretrained(folder, config) if folder else GenerationConfig.from_model_config(config)
        model = target(core, config, gen)
        model._gguf_file, model._mmproj_file = path, mmproj
        return model

    # The GGUF files a model was read from (an export reuses their vocabulary and image settings).
    _gguf_file: Optional[str] = None
    _mmproj_file: Optional[str] = None

    def save_pretrained_gguf(
        self, save_directory: str | os.PathLike[str], tokenizer: Any = None, quantization_method: Any = "f16",
        **kwargs: Any,
    ) -> list[str]:
        """Writes the model as GGUF files for llama.cpp (Unsloth's API): the text model and, for a VLM, the
        ``mmproj`` file; returns their paths (see ``ferrovlm.gguf`` for the names). ``quantization_method``:
        "f16", "q8_0", "q4_k_m" or "f32" (or a list of them). Adapters must be merged first
        (``merge_and_unload()``), or call this on the ``PeftModel``, which exports a merged copy."""
        from .gguf import save_pretrained_gguf

        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, **kwargs)

    # -- torch-like surface ------------------------------------------------------------------------
    @property
    def device(self) -> Any:
        """Where the weights are: ``torch.device("cuda:0")`` when torch is installed, else a
        ``ferrovlm.device.device`` (``.type``, ``.index``, ``str()`` as torch's)."""
        return as_device(self._core.device)

    @property
    def dtype(self) -> Any:
        name = self._core.dtype
        try:
            import torch

            return getattr(torch, name)
        except ImportError:
            return name

    def to(self, *args: Any, **kwargs: Any) -> Idefics3ForConditionalGeneration:
        if self.is_quantized and (kwargs.get("dtype") is not None or any(_is_dtype(a) for a in args)):
            raise ValueError(
                "`.to` is not supported for `4-bit` or `8-bit` bitsandbytes models. Please use the model as it is, "
                "since the model has already been set to the correct devices and casted to the correct `dtype`."
            )
        targets = [a for a in args if is_device_arg(a)] + [kwargs[k] for k in ("device",) if kwargs.get(k) is not None]
        for t in targets:  # the weights move in place (a DeviceError when the device cannot be had)
            self._core.to_device(device_spec(t))
        return self

    def eval(self) -> Idefics3ForConditionalGeneration:
        return self.train(False)

    def train(self, mode: bool = True) -> Idefics3ForConditionalGeneration:
        self.training = mode
        _core.set_training(self._core, bool(mode))
        return self

    def num_parameters(self) -> int:
        return self._core.num_parameters

    # -- quantization (transformers' bitsandbytes integration) ------------------------------------
    @property
    def is_quantized(self) -> bool:
        """bitsandbytes-quantized (a GGUF model's blocks are not: transformers holds them dequantized)."""
        return self._core.quantization[0] not in (None, "gguf")

    @property
    def is_loaded_in_4bit(self) -> bool:
        return self._core.quantization[0] == "4bit"

    @property
    def is_loaded_in_8bit(self) -> bool:
        return self._core.quantization[0] == "8bit"

    @property
    def quantization_method(self) -> Optional[str]:
        return "bitsandbytes" if self.is_quantized else None

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and buffers) as transformers counts them: dense tensors in the model's
        dtype, a 4-bit weight as its packed bytes (its block scales are not parameters), an int8 weight
        as one byte per value."""
        _, _, qbytes, qlogical = self._core.quantization
        itemsize = 2 if self._core.dtype in ("bfloat16", "float16") else 4
        mem = (self.num_parameters() - qlogical) * itemsize + qbytes
        if return_buffers:
            text = self.config.get_text_config()
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            mem += 2 * (head_dim // 2) * 4  # the rotary embedding's inv_freq and original_inv_freq (float32)
        return int(mem)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        max_shard_size: int | str = "50GB",
        **kwargs: Any,
    ) -> None:
        """``config.json``, ``generation_config.json`` and the weights (transformers' keys; a quantized model
        in bitsandbytes' serialized form, which transformers + bitsandbytes load): ``model.safetensors``, or,
        past ``max_shard_size`` (bytes, or "5GB", "500MB", ...; transformers' default "50GB"),
        ``model-00001-of-0000N.safetensors`` shards and ``model.safetensors.index.json`` split as
        transformers splits them."""
        os.makedirs(save_directory, exist_ok=True)
        self._core.save_weights(os.fspath(save_directory), max_shard_size)
        cfg = self.config.to_dict()
        cfg.pop("_name_or_path", None)
        cfg.pop("_attn_implementation", None)
        cfg["dtype"] = self._core.dtype
        cfg.pop("torch_dtype", None)
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(save_directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.generation_config.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # -- adapters (transformers' PEFT integration) ------------------------------------------------
    _peft_model: Any = None
    is_gradient_checkpointing: bool = False

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """Attaches a fresh LoRA adapter (``model.add_adapter(LoraConfig(...))``)."""
        from .peft import PeftModel

        if self._peft_model is not None:
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        PeftModel(self, adapter_config, adapter_name)

    def load_adapter(
        self, peft_model_id: Any, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Loads a PEFT adapter directory (or hub id) onto this model."""
        from .peft import PeftModel

        PeftModel.from_pretrained(self, peft_model_id, adapter_name, is_trainable=is_trainable, **kwargs)

    def enable_adapters(self) -> None:
        _core.set_adapters_enabled(self._core, True)

    def disable_adapters(self) -> None:
        _core.set_adapters_enabled(self._core, False)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        """Recompute each text layer in the backward (lower peak memory, identical gradients)."""
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.is_gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        """Accepted for PEFT/TRL compatibility: gradients reach adapters below frozen layers anyway."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_type={self.config.model_type!r}, dtype={self._core.dtype}, "
            f"params={self.num_parameters():,})"
        )

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        labels: Any = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> ModelOutput:
        """Logits [B, L, V] (or the last ``logits_to_keep``) and, with ``labels``, the mean token loss.

        Unlike transformers, ``labels`` may be combined with ``logits_to_keep``: the loss still covers
        every labelled position."""
        unsupported = set(kwargs) - _IGNORED_FORWARD_KWARGS
        if unsupported:
            raise TypeError(f"forward() got unsupported arguments: {sorted(unsupported)}")
        if input_ids is None:
            raise TypeError("forward() needs input_ids")
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise TypeError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        want_torch = any(is_torch_tensor(x) for x in (input_ids, attention_mask, pixel_values, labels))
        logits, loss, _ = self._core.forward(
            to_numpy(input_ids, np.int64, "input_ids"),
            to_numpy(attention_mask, np.int64, "attention_mask"),
            to_numpy(pixel_values, np.float32, "pixel_values"),
            to_numpy(pixel_attention_mask, np.bool_, "pixel_attention_mask"),
            to_numpy(labels, np.int64, "labels"),
            int(logits_to_keep),
        )
        if loss is not None:
            loss = like_inputs(np.asarray(loss, dtype=np.float32), want_torch)
        return ModelOutput(loss=loss, logits=like_inputs(logits, want_torch))

    __call__ = forward

    def generate(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        generation_config: Optional[GenerationConfig] = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Returns prompt + generated ids [B, T] (numpy, or torch when the inputs were torch), like
        transformers' ``generate``: greedy, sampling (``do_sample``, ``temperature``, ``top_k``,
        ``top_p``), beam search (``num_beams``, ``length_penalty``, ``early_stopping``),
        ``repetition_penalty``, ``max_new_tokens`` / ``max_length`` / ``min_new_tokens``, any of the EOS
        ids; left-padded batches; ``streamer`` receives tokens as they come (batch 1, no beams)."""
        if input_ids is None:
            raise TypeError("generate() needs input_ids")
        cfg = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = cfg.update(**kwargs)
        if unused:
            warnings.warn(
                f"The following generation flags are not valid and may be ignored: {sorted(unused)}", stacklevel=2
            )
        want_torch = any(is_torch_tensor(x) for x in (input_ids, attention_mask, pixel_values))
        ids = to_numpy(input_ids, np.int64, "input_ids")
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {ids.shape}")
        settings = resolve(cfg, ids.shape[1], self.config.get_text_config().max_position_embeddings)
        on_token = None
        if streamer is not None:
            if ids.shape[0] != 1:
                raise ValueError("streamers only support batch size 1")
            if settings["num_beams"] > 1:
                raise ValueError("`streamer` cannot be used with beam search")
            streamer.put(ids)

            def on_token(tokens):
                streamer.put(np.asarray(tokens, dtype=np.int64))
                return True

        try:
            out = _core.generate_ids(
                self._core,
                ids,
                to_numpy(attention_mask, np.int64, "attention_mask"),
                to_numpy(pixel_values, np.float32, "pixel_values"),
                to_numpy(pixel_attention_mask, np.bool_, "pixel_attention_mask"),
                settings,
                on_token,
            )
        finally:
            if streamer is not None:
                streamer.end()
        return like_inputs(out, want_torch)

    def get_image_features(self, pixel_values: Any, pixel_attention_mask: Any = None) -> Any:
        """Connector outputs [N_real_images, T, hidden] (padding frames dropped)."""
        _, _, feats = self._core.image_features(
            to_numpy(pixel_values, np.float32, "pixel_values"),
            to_numpy(pixel_attention_mask, np.bool_, "pixel_attention_mask"),
        )
        return like_inputs(feats, is_torch_tensor(pixel_values))


class SmolVLMForConditionalGeneration(Idefics3ForConditionalGeneration):
    """SmolVLM2 (``model_type: smolvlm``): the same math as Idefics3."""

    config_class = CONFIG_CLASSES["smolvlm"]


class LlamaForCausalLM(Idefics3ForConditionalGeneration):
    """A Llama language model alone (SmolLM2): the VLM's text model and head, without a vision tower.

    Forward, loss, ``generate``, LoRA and training work as for the VLM, on ``input_ids`` only; its
    modules have transformers' ``LlamaForCausalLM`` names (``model.layers.0.self_attn.q_proj``).
    """

    config_class = CONFIG_CLASSES["llama"]


class _AutoBase(Idefics3ForConditionalGeneration):
    """Auto classes: ``from_pretrained`` picks the class from the checkpoint's ``model_type``."""

    _model_types: frozenset[str] = frozenset({"idefics3", "smolvlm"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not meant to be instantiated; use from_pretrained()")


class AutoModelForVision2Seq(_AutoBase):
    pass


class AutoModelForImageTextToText(_AutoBase):
    pass


class AutoModelForCausalLM(_AutoBase):
    _model_types = frozenset({"llama"})


_MODEL_CLASSES = {
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "llama": LlamaForCausalLM,
}
