"""bitsandbytes reference values for ferrovlm's quantization (dev only).

    python scripts/reference/bnb_quant.py  # in an environment with torch, transformers, bitsandbytes

Writes tests/fixtures/bnb/:
  quant.npz           per case (weights with odd sizes): bitsandbytes' 4-bit codes, absmax, nested
                      state and dequantized weight (NF4 / FP4, with and without double quantization);
                      LLM.int8 CB / SCB; Linear4bit / Linear8bitLt outputs for an input with outliers
                      (eval mode: LLM.int8's product; train mode: dequantize-then-matmul).
  base/               a tiny random Idefics3 checkpoint (f32) whose Linear row lengths are multiples of
                      64, and inputs.npz (two rows, one image)
  <case>/checkpoint/  base loaded by transformers with that BitsAndBytesConfig and saved (bitsandbytes'
                      serialized form)
  <case>/expected.npz logits of transformers + bitsandbytes on base/inputs.npz (fp32, eager)
  <case>/facts.json   the modules transformers quantized, get_memory_footprint()
  torch_mean.npz      torch's f32 mean of arrays of many sizes (one thread)
bitsandbytes' AVX512-BF16 4-bit inference kernel is switched off (it asserts on tiny layer widths and
is not what training uses); the product is then bitsandbytes' dequantize + matmul.

Row lengths: bitsandbytes 0.50.2's CPU 4-bit dequantize kernel reads the wrong block scale when a row
length is a multiple of 16 but not of 64 (e.g. 32, 48, 80, 96; see the note in src/quant/four_bit.rs),
so the model here keeps every Linear's input size a multiple of 64 (SmolVLM's real sizes all are).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import torch
from transformers import BitsAndBytesConfig, Idefics3ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from tiny_checkpoint import write_checkpoint  # noqa: E402

BASE_CFG = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 300,
    "scale_factor": 2,
    "tie_word_embeddings": False,
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "rope_theta": 10000.0, "max_position_embeddings": 256, "pad_token_id": 2},
}
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "bnb"
torch.manual_seed(0)
torch.set_num_threads(1)

SHAPES = {"a": (7, 100), "b": (3, 33), "c": (48, 128)}  # row lengths clear of the CPU kernel bug (module doc)


def quant_cases() -> dict:
    out = {}
    g = torch.Generator().manual_seed(11)
    for name, shape in SHAPES.items():
        w = torch.randn(shape, generator=g) * 0.3
        w[0, :5] = 0.0  # zeros inside a block
        if name == "c":
            w[5:7, :] = 0.0  # a whole zero block
        out[f"{name}/w"] = w.numpy()
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                tag = f"{name}/{qt}{'_dq' if nested else ''}"
                packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=qt)
                out[f"{tag}/packed"] = packed.numpy().reshape(-1)
                out[f"{tag}/absmax"] = st.absmax.numpy()
                if nested:
                    out[f"{tag}/nested_absmax"] = st.state2.absmax.numpy()
                    out[f"{tag}/nested_map"] = st.state2.code.numpy()
                    out[f"{tag}/offset"] = np.array([st.offset.item()], np.float32)
                out[f"{tag}/dequant"] = F.dequantize_4bit(packed, st).numpy()
                # the product of a Linear4bit (train mode: dequantize + matmul), f32 and bf16 compute
                for cd in ("float32", "bfloat16"):
                    lin = bnb.nn.Linear4bit(
                        shape[1],
                        shape[0],
                        bias=True,
                        compute_dtype=getattr(torch, cd),
                        quant_type=qt,
                        compress_statistics=nested,
                    )
                    lin.weight = bnb.nn.Params4bit(
                        w.clone(), requires_grad=False, quant_type=qt, compress_statistics=nested, blocksize=64
                    )
                    lin.weight._quantize("cpu") if hasattr(lin.weight, "_quantize") else None
                    lin.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, shape[0]))
                    lin.support_avx512bf16_for_cpu = False
                    x = torch.randn(5, shape[1], generator=g)
                    out[f"{tag}/{cd}/x"] = x.numpy()
                    out[f"{tag}/{cd}/y"] = lin(x).detach().float().numpy()
        # LLM.int8
        tag = f"{name}/int8"
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        out[f"{tag}/cb"] = cb.numpy().astype(np.int64)  # candle reads no int8 npy
        out[f"{tag}/scb"] = scb.numpy()
        lin = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=True, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        lin.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, shape[0]))
        lin = lin.to("cpu")
        x = torch.randn(4, shape[1], generator=g) * 2
        x[1, 2] = 9.0  # an outlier column
        x[3, 2] = -7.5
        out[f"{tag}/x"] = x.numpy()
        lin.eval()
        out[f"{tag}/y_eval"] = lin(x).detach().float().numpy()
        lin.train()
        out[f"{tag}/y_train"] = lin(x).detach().float().numpy()
    return out


MODEL_CASES = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True),
    "int8": dict(load_in_8bit=True),
}


def model_case(name: str, kwargs: dict) -> None:
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src = OUT / "base"
    cfg = BitsAndBytesConfig(**kwargs)
    model = Idefics3ForConditionalGeneration.from_pretrained(
        src, quantization_config=cfg, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    quantized = []
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            quantized.append(n)
        elif isinstance(m, bnb.nn.Linear8bitLt):
            quantized.append(n)
    inputs = dict(np.load(OUT / "base" / "inputs.npz"))
    feed = {
        k: torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    }
    with torch.no_grad():
        logits = model(**feed).logits.float().numpy()
    np.savez_compressed(d / "expected.npz", logits=logits)
    facts = {
        "quantized_modules": quantized,
        "memory_footprint": model.get_memory_footprint(),
        "quantization_config": cfg.to_dict(),
    }
    (d / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
    model.save_pretrained(d / "checkpoint")


def base() -> None:
    d = OUT / "base"
    shutil.rmtree(d, ignore_errors=True)
    write_checkpoint(d, BASE_CFG, seed=5)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "pad_token_id": 2, "bos_token_id": 1}))
    rng = np.random.default_rng(7)
    img = 300
    ids = np.array([[1, 11, 12, img, img, img, img, 13, 14, 15, 16, 17],
                    [1, 21, 22, 23, 24, 25, 26, 27, 2, 2, 2, 2]], np.int64)
    am = (ids != 2).astype(np.int64)
    px = np.zeros((2, 1, 3, 32, 32), np.float32)
    px[0] = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    pam = np.zeros((2, 1, 32, 32), bool)
    pam[0] = True
    labels = np.where(am == 1, ids, -100)
    np.savez(
        d / "inputs.npz", input_ids=ids, attention_mask=am, pixel_values=px, pixel_attention_mask=pam, labels=labels
    )


def torch_means() -> None:
    """torch_mean.npz: x<n> and torch's f32 x.mean() on one thread (the double-quantization offset)."""
    torch.set_num_threads(1)
    out = {}
    g = torch.Generator().manual_seed(5)
    for n in [1, 3, 5, 7, 8, 11, 16, 17, 31, 32, 33, 64, 100, 144, 256, 257, 1000, 1536, 4096, 9000, 20000, 40000]:
        a = (torch.rand(n, generator=g) * 3).float()
        out[f"x{n}"] = a.numpy()
        out[f"m{n}"] = a.mean().reshape(1).numpy()
    np.savez(OUT / "torch_mean.npz", **out)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch_means()
    base()
    np.savez_compressed(OUT / "quant.npz", **quant_cases())
    for name, kw in MODEL_CASES.items():
        model_case(name, kw)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
