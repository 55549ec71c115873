"""Reference PEFT `modules_to_save` of modules that are not Linear layers (dev only): TRL SFTTrainer + PEFT LoRA
with `modules_to_save` on the tiny SmolVLM (CPU, fp32, eager attention).

    python scripts/reference/modules_to_save.py  # with torch, transformers, peft, trl, datasets

Builds the `tiny_smolvlm` test checkpoint (tied embeddings; lora_grads.build_tiny_smolvlm) in a temp dir and, per
case, trains LoRA (r=4, alpha=8, q_proj / v_proj) plus the case's `modules_to_save` for 3 optimizer steps on the
rows and arguments of tests/fixtures/full_ft/sft/full (rows.json, images/, args.json). Writes
tests/fixtures/modules_to_save/<case>.json: the LoraConfig kwargs, the modules PEFT wrapped, the warnings, TRL's
log_history, and the adapter file PEFT saved before and after training (every key with its shape and L2 norm; exact
values for tensors up to 64 values) and <case>_lora0.npz, the initial LoRA tensors (the modules_to_save copies start
as the originals); plus, after training, the logits' checksum with the adapter on and with it off
(`disable_adapter()`: the original modules), and the original weights' norms (unchanged by training).
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_grads import FIX, build_tiny_smolvlm, load_tiny  # noqa: E402

OUT = FIX / "modules_to_save"
DATA = FIX / "full_ft" / "sft" / "full"

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
CASES = {
    # RMSNorm (text) and LayerNorm (vision post_layernorm): every module whose name ends with "norm"
    "norm": dict(modules_to_save=["norm"]),
    # the token embedding of a model with a tied head: PEFT trains a copy for the input side only
    "embed_tokens": dict(modules_to_save=["embed_tokens"]),
    # the head of a model with tied embeddings: a copy of the shared weight, for the output side only
    "lm_head": dict(modules_to_save=["lm_head"]),
    # the vision embeddings (patch Conv2d + position Embedding) and the connector
    "embeddings_connector": dict(modules_to_save=["embeddings", "connector"]),
}


def adapter_facts(path: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for k, v in sorted(load_file(str(path)).items()):
        d = {"shape": list(v.shape), "norm": float(np.linalg.norm(v.astype(np.float64)))}
        if v.size <= 64:
            d["values"] = v.astype(np.float64).ravel().tolist()
        out[k] = d
    return out


def run_case(name: str, spec: dict, ckpt: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    model, processor = load_tiny(ckpt)
    rows = json.loads((DATA / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(DATA / p).convert("RGB") for p in r["images"]]
    args = json.loads((DATA / "args.json").read_text())
    lora = {**LORA, **spec}
    tmp = Path(tempfile.mkdtemp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp / "out"), **args),
                             train_dataset=Dataset.from_list(rows), processing_class=processor,
                             peft_config=LoraConfig(**lora))
        pm = trainer.model
        wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                         if type(m).__name__ == "ModulesToSaveWrapper")
        pm.save_pretrained(tmp / "initial")
        trainer.train()
        pm.save_pretrained(tmp / "final")
    originals = {n.removeprefix("base_model.model.").replace(".original_module", ""): float(p.detach().norm())
                 for n, p in pm.named_parameters() if ".original_module." in n}
    batch = processor(text=[processor.apply_chat_template(rows[0]["messages"])], images=[rows[0]["images"]],
                      return_tensors="pt")
    pm.eval()
    with torch.no_grad():
        on = pm(**batch).logits.double()
        with pm.disable_adapter():
            off = pm(**batch).logits.double()
    out = {
        "lora_config": lora,
        "wrapped": wrapped,
        "warnings": sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught}),
        "log_history": trainer.state.log_history,
        "adapter_initial": adapter_facts(tmp / "initial" / "adapter_model.safetensors"),
        "adapter_final": adapter_facts(tmp / "final" / "adapter_model.safetensors"),
        "adapter_config_modules_to_save": json.loads((tmp / "final" / "adapter_config.json").read_text())[
            "modules_to_save"],
        "original_norms": originals,
        "logits_on": {"sum": float(on.sum()), "abs_sum": float(on.abs().sum())},
        "logits_off": {"sum": float(off.sum()), "abs_sum": float(off.abs().sum())},
        "logits_row0_text": processor.apply_chat_template(rows[0]["messages"]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import load_file

    initial = load_file(str(tmp / "initial" / "adapter_model.safetensors"))
    np.savez_compressed(OUT / f"{name}_lora0.npz", **{k: v for k, v in initial.items() if ".lora_" in k})
    (OUT / f"{name}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"[modules_to_save] {name}: wrapped {wrapped}; loss {[h.get('loss') for h in out['log_history']]}")


def main(names: list[str] | None = None) -> None:
    ckpt = build_tiny_smolvlm(Path(tempfile.mkdtemp()) / "smolvlm-tiny")
    for name, spec in CASES.items():
        if not names or name in names:
            run_case(name, spec, ckpt)


if __name__ == "__main__":
    main(sys.argv[1:])
