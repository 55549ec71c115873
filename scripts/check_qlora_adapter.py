"""Dev check: an adapter saved from a QLoRA model in ferrovlm loads with PEFT on a bitsandbytes-quantized base and
on the full-precision base, and gives ferrovlm's logits there.

    .venv/bin/python scripts/check_qlora_adapter.py --ref-python REF_PYTHON

Phase 1 (this interpreter, ferrovlm): tests/fixtures/bnb/base loaded in NF4 with double quantization, LoRA r=4 on
every Linear but lm_head with random values, saved with save_pretrained; logits with and without quantization.
Phase 2 (--ref-python: torch, transformers, peft, bitsandbytes): PEFT loads that adapter onto the same base quantized by
transformers + bitsandbytes, and onto the fp32 base; the logits are compared at real tokens.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "bnb" / "base"
QUANT = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def inputs():
    b = dict(np.load(BASE / "inputs.npz"))
    return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}, b[
        "attention_mask"
    ].astype(bool)


def ours(out: Path) -> None:
    import ferrovlm
    from ferrovlm import _core

    feed, _ = inputs()
    q = ferrovlm.AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=ferrovlm.BitsAndBytesConfig(**QUANT))
    pm = ferrovlm.get_peft_model(q, ferrovlm.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    rng = np.random.default_rng(0)
    _core.load_adapter_state(
        pm._core,
        {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in _core.adapter_state(pm._core).items()},
    )
    pm.save_pretrained(out / "adapter")
    np.save(out / "ours_nf4.npy", pm(**feed).logits)
    full = ferrovlm.PeftModel.from_pretrained(ferrovlm.AutoModelForVision2Seq.from_pretrained(BASE), out / "adapter")
    np.save(out / "ours_fp32.npy", full(**feed).logits)


def reference(out: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, Idefics3ForConditionalGeneration

    feed, valid = inputs()
    feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    res = {}
    for name, kw in (("nf4", dict(quantization_config=BitsAndBytesConfig(**QUANT))), ("fp32", {})):
        base = Idefics3ForConditionalGeneration.from_pretrained(
            BASE, dtype=torch.float32, attn_implementation="eager", **kw
        )
        for m in base.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, out / "adapter").eval()
        with torch.no_grad():
            theirs = model(**feed).logits.numpy()
        mine = np.load(out / f"ours_{name}.npy")
        res[name] = {
            "max_abs_diff": float(np.abs(mine - theirs)[valid].max()),
            "max_abs_logit": float(np.abs(theirs)[valid].max()),
        }
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-python", default=sys.executable)
    ap.add_argument("--phase", default="all", choices=["all", "ours", "reference"])
    ap.add_argument("--out")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp())
    if a.phase in ("all", "ours"):
        ours(out)
    if a.phase == "reference":
        reference(out)
    if a.phase == "all":
        r = subprocess.run(
            [a.ref_python, __file__, "--phase", "reference", "--out", str(out)], capture_output=True, text=True
        )
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        print(
            "PEFT on transformers + bitsandbytes NF4 base / fp32 base vs ferrovlm:",
            line[-1] if line else r.stderr[-2000:],
        )


if __name__ == "__main__":
    main()
