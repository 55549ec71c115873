"""Reference QLoRA trajectories (TRL SFTTrainer, LoRA on a bitsandbytes-quantized tiny SmolVLM, CPU) (dev only).

    python scripts/reference/qlora_trajectory.py  # with torch, transformers, peft, trl, datasets, bitsandbytes

Builds the `tiny_smolvlm` test checkpoint (see lora_grads.build_tiny_smolvlm) in a temp dir and, per case, loads it
with `from_pretrained(..., quantization_config=BitsAndBytesConfig(...), dtype=float32, attn_implementation="eager")`,
runs PEFT's `prepare_model_for_kbit_training`, wraps it with a non-trivial LoRA adapter (r=4, alpha=8, text
q/k/v/o/gate/up/down, B != 0) via `PeftModel.from_pretrained(base, adapter, is_trainable=True)` and trains it with
`trl.SFTTrainer` for 3 optimizer steps. Written into tests/fixtures/qlora/:

  adapter/             the initial adapter (shared by the cases; PEFT save_pretrained)
  images/*.png         the dataset images (shared)
  rows.json            the dataset rows (shared), image file names in place of the PIL images
  (cases: nf4 / int8 = TRL as is, i.e. bfloat16 adapter; nf4_fp32_adapter / int8_fp32_adapter = float32 adapter)
  <case>/args.json     every SFTConfig kwarg passed (output_dir excluded: a temp dir)
  <case>/quant.json    BitsAndBytesConfig kwargs and to_dict(), the modules transformers replaced with
                       bnb.nn.Linear4bit / Linear8bitLt, get_memory_footprint() (with and without buffers),
                       the prepare_model_for_kbit_training kwargs, versions
  <case>/log_history.json   trainer.state.log_history verbatim (the last entry has wall-clock timings)
  <case>/adapter_final/     the adapter after the 3 optimizer steps

bitsandbytes 0.50 on a CPU with AVX512-BF16: an eval-mode Linear4bit forward repacks the weight for a packed
bf16 kernel that asserts on widths that are not multiples of 32 (the tiny model's k/v_proj are 16 wide); every
Linear4bit gets `support_avx512bf16_for_cpu = False` before any forward, so it dequantizes and multiplies in the
compute dtype (float32) as on other CPUs.

bitsandbytes 0.50's CPU kernel for `dequantize_4bit` (fp32/bf16/fp16 output, even widths) finds an element's block
as `row * (in // blocksize) + col // blocksize`, which is wrong when `in_features` is not a multiple of the block size
(64): a 32-wide layer then scales every row with the first block's absmax. Its quantizer, its generic
implementation (`backends/default/ops.py: _dequantize_4bit_compute`) and the CUDA kernel use flat blocks of 64
consecutive weights. Most tiny-model layers are 32 wide (SmolVLM-256M's are all multiples of 64, where the kernels
agree), so the CPU kernel of the `bitsandbytes::dequantize_4bit` op (behind every 4-bit forward, backward and
`F.dequantize_4bit`) is replaced here by the generic implementation (`patch_bnb_cpu_dequantize_4bit`; checked by
`check_flat_blocks`; quant.json records it).

The folder is emptied (except README.md) and rewritten on every run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_grads import (  # noqa: E402
    FIX,
    TEXT_TARGETS,
    build_tiny_smolvlm,
    clean_dir_keep_readme,
    dir_size,
    fill_adapter_,
    fresh_dir,
    lora_config,
    normalize_perms,
    save_adapter,
)
from sft_trajectory import (  # noqa: E402
    COMMON_ARGS,
    GREEDY_TOKENS,
    ROWS,
    TIMING_KEYS,
    extend_answers,
    make_rows,
)

OUT = FIX / "qlora"
ADAPTER_SEED = 301

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# BitsAndBytesConfig kwargs (dtype values as strings; turned into torch dtypes when used)
NF4 = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
)
INT8 = dict(load_in_8bit=True)
# adapter: "trl" = what SFTTrainer does to a quantized model's adapter (trl 1.16, sft_trainer.py: every trainable
# parameter but DoRA magnitudes is cast to bfloat16 in __init__, "following the QLoRA paper"), "float32" = the
# adapter's float32 values put back right after SFTTrainer.__init__ (the optimizer is made in train()).
CASES = {
    "nf4": dict(bnb=NF4, adapter="trl"),
    "nf4_fp32_adapter": dict(bnb=NF4, adapter="float32"),
    "int8": dict(bnb=INT8, adapter="trl"),
    "int8_fp32_adapter": dict(bnb=INT8, adapter="float32"),
}
PREPARE_KWARGS = dict(use_gradient_checkpointing=True)


def patch_bnb_cpu_dequantize_4bit() -> None:
    """See the module docstring: the CPU kernel of `bitsandbytes::dequantize_4bit` (which every 4-bit forward, backward
    and `F.dequantize_4bit` goes through) replaced by bitsandbytes' own generic implementation (flat blocks; for
    float32 output and widths that are whole blocks it gives the CPU kernel's values bit for bit)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def flat_blocks(A, absmax, blocksize, quant_type, shape, dtype):
        a8 = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(
            a8.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device), blocksize, shape, dtype
        )

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", flat_blocks)


def check_flat_blocks() -> None:
    """The patched dequantize_4bit decodes a [32, 32] weight (2 rows per block) as the generic kernel does."""
    import bitsandbytes.functional as F

    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    flat = F.get_4bit_type("nf4", device="cpu")
    codes = torch.stack([q.flatten() >> 4, q.flatten() & 15], 1).flatten().long()
    want = (flat[codes] * qs.absmax.repeat_interleave(64)).reshape(32, 32)
    assert torch.equal(F.dequantize_4bit(q, qs), want)


def bnb_config(kw: dict):
    from transformers import BitsAndBytesConfig

    kw = dict(kw)
    if "bnb_4bit_compute_dtype" in kw:
        kw["bnb_4bit_compute_dtype"] = getattr(torch, kw["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kw)


def load_quantized(ckpt: Path, kw: dict):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(ckpt, quantization_config=bnb_config(kw), dtype=torch.float32,
                                                        attn_implementation="eager")
    names = []
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see the module docstring
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            names.append(name)
    return model, AutoProcessor.from_pretrained(ckpt), names


def run_case(name: str, spec: dict, ckpt: Path, described: list, rows: list) -> None:
    import bitsandbytes
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    kw = spec["bnb"]
    case = fresh_dir(OUT / name)
    base, processor, quantized = load_quantized(ckpt, kw)
    quant = {
        "bnb_config_kwargs": kw,
        "bnb_config_dict": json.loads(base.config.quantization_config.to_json_string(use_diff=False)),
        "quantized_modules": quantized,
        "memory_footprint": base.get_memory_footprint(),
        "memory_footprint_no_buffers": base.get_memory_footprint(return_buffers=False),
        "is_loaded_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
        "is_loaded_in_8bit": bool(getattr(base, "is_loaded_in_8bit", False)),
        "prepare_model_for_kbit_training": PREPARE_KWARGS,
        "bnb_cpu_dequantize_4bit_patched_to_flat_blocks": True,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__},
    }
    base = prepare_model_for_kbit_training(base, **PREPARE_KWARGS)
    model = PeftModel.from_pretrained(base, OUT / "adapter", is_trainable=True)
    quant["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    kwargs = dict(COMMON_ARGS)
    (case / "args.json").write_text(json.dumps(kwargs, indent=2, sort_keys=True) + "\n")
    tmp_out = tempfile.mkdtemp()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=tmp_out, **kwargs),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    quant["adapter"] = spec["adapter"]
    quant["adapter_dtypes_after_trainer_init"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    if spec["adapter"] == "float32":
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                if p.requires_grad:
                    p.data = initial[n].clone()
    else:
        assert spec["adapter"] == "trl"
    quant["adapter_dtypes_trained"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    trainer.train()
    quant["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    log_history = trainer.state.log_history
    (case / "log_history.json").write_text(json.dumps(log_history, indent=2) + "\n")
    (case / "quant.json").write_text(json.dumps(quant, indent=2) + "\n")

    trainer.model.save_pretrained(case / "adapter_final")
    for f in (case / "adapter_final").iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            f.unlink()
    cfg = json.loads((case / "adapter_final" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny_smolvlm"
    (case / "adapter_final" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    shutil.rmtree(tmp_out, ignore_errors=True)
    normalize_perms(case)
    print(f"[{name}] {len(quantized)} quantized modules, footprint {quant['memory_footprint']}")
    for e in log_history:
        print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})


def main() -> None:
    from peft import get_peft_model

    patch_bnb_cpu_dequantize_4bit()
    check_flat_blocks()
    clean_dir_keep_readme(OUT)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_tiny_smolvlm(tmp / "smolvlm-tiny")

    # the initial adapter (made on the nf4 base; it only depends on the layer shapes and the seed) and the answers
    # that base + adapter continues greedily (so that mean_token_accuracy is not 0)
    base, processor, _ = load_quantized(ckpt, NF4)
    torch.manual_seed(ADAPTER_SEED)
    init = get_peft_model(base, lora_config(target_modules=TEXT_TARGETS))
    fill_adapter_(init, ADAPTER_SEED)
    save_adapter(init, OUT / "adapter")
    answers = extend_answers(init, processor, tmp / "images")
    print(f"[qlora] answers (+{GREEDY_TOKENS} greedy tokens):", answers)
    del init, base
    rows, described = make_rows("messages", OUT / "images", answers)
    (OUT / "rows.json").write_text(json.dumps(described, indent=2) + "\n")
    assert len(rows) == len(ROWS)

    for name, spec in CASES.items():
        run_case(name, spec, ckpt, described, rows)
    normalize_perms(OUT)
    shutil.rmtree(tmp)
    print(f"[qlora] folder size {dir_size(OUT)} bytes")


if __name__ == "__main__":
    main()
