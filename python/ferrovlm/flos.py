"""transformers' ``total_flos`` (``Trainer.floating_point_ops``): every micro-batch adds 6 x its ``input_ids``
elements (padding included) x ``model.num_parameters(exclude_embeddings=True)``. That count takes every parameter,
trainable or not, but the ``nn.Embedding`` weights (the token embedding, with a tied head counted once as it; the
vision position embedding); for a PEFT model the wrapped model's modules hold the LoRA tensors and the
``modules_to_save`` copies too, so they count, and so does TRL's frozen ``ref`` copy of a DPO adapter."""

from __future__ import annotations

import math
from typing import Any

from . import _core


def _embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "position_embedding.weight"))


def flos_parameters(model: Any, ref_adapter_copy: bool = False) -> int:
    """``num_parameters(exclude_embeddings=True)`` of the model a Trainer holds (a PeftModel counts its adapters;
    ``ref_adapter_copy``: TRL's DPOTrainer added a ``ref`` copy of the adapter)."""
    wrapped = getattr(getattr(model, "base_model", None), "model", None)
    inner = wrapped if wrapped is not None and hasattr(wrapped, "_core") else model
    count = sum(p.numel() for name, p in inner.named_parameters() if not _embedding(name))
    if inner is not model:
        core = inner._core
        # the LoRA tensors and the copies of Linear layers in modules_to_save (PEFT keys), then the copies of the
        # other modules_to_save parameters (an embedding's copy is an nn.Embedding too)
        adapter = sum(math.prod(s) for key, s in _core.trainable_shapes(core) if not _embedding(key))
        saved = set(_core.saved_module_params(core))
        adapter += sum(p.numel() for name, p in inner.named_parameters() if name in saved and not _embedding(name))
        count += adapter * (2 if ref_adapter_copy else 1)
    return count


def micro_batch_flos(batch: dict[str, Any], parameters: int) -> float:
    return 6.0 * float(batch["input_ids"].size) * parameters
