"""Writes random SmolVLM / Idefics3 checkpoints in the hub layout with numpy only (no torch).

Used by the demo and the benchmarks. The reference fixtures for tests are made by
scripts/make_reference.py with transformers itself; this file never produces expected values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# SmolVLM-256M-Instruct's architecture (../shared/spec/smolvlm.md), random weights.
SMOLVLM_256M = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 49190,
    "scale_factor": 4,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "model_type": "idefics3_vision", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 512, "patch_size": 16, "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "pad_token_id": 2,
    },
}

# A small model for the demo: the same structure, a few MB.
TINY = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 250,
    "scale_factor": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 8, "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 1024, "pad_token_id": 2,
    },
}

# A complete tiny SmolVLM for end-to-end tests and the demo: the real SmolVLM vocabulary (49280, with
# <image> = 49190) so that it works with the SmolVLM tokenizer in tests/fixtures/tokenizer/smolvlm, and
# 32 px tiles with 4 image tokens, matching tests/fixtures/processor/config.
TINY_SMOLVLM = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 49190,
    "scale_factor": 2,
    "tie_word_embeddings": True,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "llama", "vocab_size": 49280, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "rope_theta": 100000.0, "max_position_embeddings": 2048, "pad_token_id": 2, "eos_token_id": 49279},
}


def tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Every tensor name of the hub layout with its shape."""
    v, t = cfg["vision_config"], cfg["text_config"]
    d, p, c = v["hidden_size"], v["patch_size"], v.get("num_channels", 3)
    n = v["image_size"] // p
    s = cfg["scale_factor"]
    h = t["hidden_size"]
    hd = t.get("head_dim") or h // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t.get("num_key_value_heads", t["num_attention_heads"]) * hd
    out = {
        "model.vision_model.embeddings.patch_embedding.weight": (d, c, p, p),
        "model.vision_model.embeddings.patch_embedding.bias": (d,),
        "model.vision_model.embeddings.position_embedding.weight": (n * n, d),
        "model.vision_model.post_layernorm.weight": (d,),
        "model.vision_model.post_layernorm.bias": (d,),
        "model.connector.modality_projection.proj.weight": (h, d * s * s),
        "model.text_model.embed_tokens.weight": (t["vocab_size"], h),
        "model.text_model.norm.weight": (h,),
    }
    for i in range(v["num_hidden_layers"]):
        pre = f"model.vision_model.encoder.layers.{i}"
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{pre}.{ln}.weight"] = (d,)
            out[f"{pre}.{ln}.bias"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{pre}.self_attn.{proj}.weight"] = (d, d)
            out[f"{pre}.self_attn.{proj}.bias"] = (d,)
        out[f"{pre}.mlp.fc1.weight"] = (v["intermediate_size"], d)
        out[f"{pre}.mlp.fc1.bias"] = (v["intermediate_size"],)
        out[f"{pre}.mlp.fc2.weight"] = (d, v["intermediate_size"])
        out[f"{pre}.mlp.fc2.bias"] = (d,)
    for i in range(t["num_hidden_layers"]):
        pre = f"model.text_model.layers.{i}"
        out[f"{pre}.input_layernorm.weight"] = (h,)
        out[f"{pre}.post_attention_layernorm.weight"] = (h,)
        out[f"{pre}.self_attn.q_proj.weight"] = (q, h)
        out[f"{pre}.self_attn.k_proj.weight"] = (kv, h)
        out[f"{pre}.self_attn.v_proj.weight"] = (kv, h)
        out[f"{pre}.self_attn.o_proj.weight"] = (h, q)
        out[f"{pre}.mlp.gate_proj.weight"] = (t["intermediate_size"], h)
        out[f"{pre}.mlp.up_proj.weight"] = (t["intermediate_size"], h)
        out[f"{pre}.mlp.down_proj.weight"] = (h, t["intermediate_size"])
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (t["vocab_size"], h)
    return out


def _bf16_bytes(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes, round to nearest even (like torch)."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Minimal safetensors writer (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        data = _bf16_bytes(arr) if dtype == "bfloat16" else arr.astype("<f4").tobytes()
        header[name] = {
            "dtype": "BF16" if dtype == "bfloat16" else "F32",
            "shape": list(arr.shape),
            "data_offsets": [off, off + len(data)],
        }
        blobs.append(data)
        off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_checkpoint(folder: str | Path, cfg: dict, seed: int = 0, dtype: str = "float32") -> Path:
    """Random weights (norms near 1, linears ~ N(0, 1/fan_in)) for ``cfg``, saved in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(cfg).items():
        if "norm" in name.split(".")[-2] and name.endswith("weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            arr = 0.05 * rng.standard_normal(shape)
        elif "embed" in name:
            arr = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        tensors[name] = arr.astype(np.float32)
    write_safetensors(folder / "model.safetensors", tensors, dtype)
    cfg = json.loads(json.dumps(cfg))
    cfg["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def write_lora_adapter(folder: str | Path, modules: dict[str, tuple[int, int]], r: int, lora_alpha: float,
                       target_modules: list[str], seed: int, b_std: float = 0.02,
                       base_model_name_or_path: str = "base") -> Path:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) with random weights:
    for each module (name -> (in_features, out_features)), in sorted name order, ``lora_A ~ N(0, 1/in)`` [r, in]
    then ``lora_B ~ N(0, b_std^2)`` [out, r] (B non-zero, so both get gradients), from one
    ``np.random.default_rng(seed)``. Keys are PEFT's (``base_model.model.<module>.lora_A.weight``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in sorted(modules):
        fan_in, fan_out = modules[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = (rng.standard_normal((r, fan_in)) / np.sqrt(fan_in)
                                                            ).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (b_std * rng.standard_normal((fan_out, r))
                                                            ).astype(np.float32)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "target_modules": sorted(target_modules),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "use_rslora": False,
        "modules_to_save": None, "inference_mode": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def llama_lora_modules(config: Any, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each ``model.layers.<i>.{self_attn,mlp}.<name>`` Linear of a Llama model
    (``config``: an object with transformers' LlamaConfig attributes) whose name is in ``target_modules``."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    io = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
          "up_proj": (h, inter), "down_proj": (inter, h)}
    out = {}
    for i in range(config.num_hidden_layers):
        for m in target_modules:
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"model.layers.{i}.{part}.{m}"] = io[m]
    return out
