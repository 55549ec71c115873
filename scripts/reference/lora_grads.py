"""Reference LoRA / DoRA / modules_to_save gradients from PEFT on the tiny SmolVLM (dev only).

    python scripts/reference/lora_grads.py  # in an environment with torch, transformers, peft, Pillow

Builds the same hub folder as the `tiny_smolvlm` pytest fixture (tests/conftest.py: SmolVLM tokenizer +
tests/fixtures/processor/config + `write_checkpoint(dst, TINY_SMOLVLM, seed=3)` + generation_config.json) in a
temp dir, loads it with transformers (fp32, eager attention), wraps it with PEFT and writes, per case, into
tests/fixtures/lora/<case>/:

  adapter/        PEFT `save_pretrained` of the (non-trivial, randomly filled) initial adapter
  inputs.npz      the processor batch (right padding) + labels (= input_ids, -100 where attention_mask == 0)
  expected.npz    `loss` (mean over label tokens, eval mode) and `grad/<key>` for every trainable parameter,
                  <key> being the parameter's key in adapter/adapter_model.safetensors

plus tests/fixtures/lora/images/*.png (the pixels behind inputs.npz) and tests/fixtures/lora/cases.json.
The folder is emptied (except README.md) and rewritten on every run. See tests/fixtures/lora/README.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "lora"
sys.path.insert(0, str(ROOT / "scripts"))

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
TEXT_QV = r".*text_model.*\.(q_proj|v_proj)"
BASE_NAME = "tiny_smolvlm"  # written as adapter_config.base_model_name_or_path (instead of a temp path)


# --------------------------------------------------------------------------------------------
# shared helpers (also imported by sft_trajectory.py)
# --------------------------------------------------------------------------------------------


def build_tiny_smolvlm(dst: Path) -> Path:
    """Exactly the folder the `tiny_smolvlm` fixture of tests/conftest.py builds."""
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    shutil.copytree(FIX / "tokenizer" / "smolvlm", dst)
    for f in (FIX / "processor" / "config").iterdir():
        shutil.copy(f, dst / f.name)
    write_checkpoint(dst, TINY_SMOLVLM, seed=3)
    (dst / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 49279, "pad_token_id": 2, "bos_token_id": 1})
    )
    return dst


def load_tiny(path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(path)
    assert model.dtype == torch.float32
    return model, processor


def shape_image(w: int, h: int, seed: int) -> Image.Image:
    """A deterministic RGB picture: background gradient + a few flat coloured shapes (compresses well)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = ((xx + yy) / max(1, w + h - 2))[..., None]
    bg = (c0 * (1 - t) + c1 * t).round().astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    for k in range(3):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = int(rng.integers(x0 + 3, w + 1)), int(rng.integers(y0 + 3, h + 1))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        [d.ellipse, d.rectangle, d.polygon][k % 3](
            [(x0, y0), (x1, y0), (x0, y1)] if k % 3 == 2 else [x0, y0, x1 - 1, y1 - 1], fill=col)
    return img


def save_png(img: Image.Image, path: Path) -> Image.Image:
    """Saves and reloads, so the caller uses exactly the decoded pixels the Rust side will see."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    out = Image.open(path)
    out.load()
    return out


def fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def clean_dir_keep_readme(p: Path) -> Path:
    """Empties p except its hand-written README.md."""
    p.mkdir(parents=True, exist_ok=True)
    for f in p.iterdir():
        if f.name == "README.md":
            continue
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return p


def normalize_perms(p: Path) -> None:
    for f in p.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def fill_adapter_(peft_model, seed: int, b_std: float = 0.1) -> None:
    """Makes the adapter non-trivial: lora_A ~ N(0, 1/in), lora_B ~ N(0, b_std^2) (B non-zero), DoRA magnitudes
    = ||W||_row * (1 + 0.1 N(0,1)), modules_to_save copies = original + 0.05 N(0,1). Modules in sorted name order."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    gen = torch.Generator().manual_seed(seed)
    mods = dict(peft_model.named_modules())
    with torch.no_grad():
        for name in sorted(mods):
            m = mods[name]
            if isinstance(m, LoraLayer):
                for an in m.lora_A:
                    a, b = m.lora_A[an].weight, m.lora_B[an].weight
                    a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
                    b.copy_(torch.randn(b.shape, generator=gen) * b_std)
                    if an in m.lora_magnitude_vector:
                        mag = m.lora_magnitude_vector[an].weight
                        w = m.get_base_layer().weight
                        mag.copy_(torch.linalg.norm(w, dim=1) * (1.0 + 0.1 * torch.randn(mag.shape, generator=gen)))
            elif isinstance(m, ModulesToSaveWrapper):
                for copy in m.modules_to_save.values():
                    for _, p in sorted(copy.named_parameters()):
                        p.add_(0.05 * torch.randn(p.shape, generator=gen))


def save_adapter(peft_model, dst: Path) -> None:
    """PEFT save_pretrained with a fixed base_model_name_or_path; only adapter_config.json + safetensors kept."""
    peft_model.save_pretrained(dst)
    for f in dst.iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            f.unlink()
    # the temp dir path would make the file differ on every run; rewritten afterwards (setting it before saving
    # makes PEFT look the name up on the hub)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    if isinstance(cfg.get("target_modules"), list):  # "all-linear" is saved as a list made from a set: sort it
        cfg["target_modules"] = sorted(cfg["target_modules"])
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    normalize_perms(dst)


def saved_key_map(peft_model) -> dict[str, str]:
    """parameter name (named_parameters) -> key in adapter_model.safetensors, for every trainable parameter.
    Found by storage identity with PEFT's own get_peft_model_state_dict (what save_pretrained writes)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    by_ptr = {}
    for k, v in sd.items():
        by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    out = {}
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        keys = by_ptr.get((p.data_ptr(), tuple(p.shape)), [])
        assert len(keys) == 1, (n, keys)
        out[n] = keys[0]
    assert len(set(out.values())) == len(out) == len(sd), (len(out), len(sd))
    return out


def capture_print_trainable(peft_model) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

CONVERSATIONS = [
    ("img_32x32.png", "What is in the image?", "A red circle and a square."),
    ("img_48x40.png", "Describe this picture briefly.", "Shapes on a gradient, drawn small."),
    (None, "Tell me a joke.", "No."),
]


def make_inputs(processor, img_dir: Path):
    images = {
        "img_32x32.png": save_png(shape_image(32, 32, 11), img_dir / "img_32x32.png"),
        "img_48x40.png": save_png(shape_image(48, 40, 12), img_dir / "img_48x40.png"),
    }
    texts, imgs, convs = [], [], []
    for img_name, q, a in CONVERSATIONS:
        user = ([{"type": "image"}] if img_name else []) + [{"type": "text", "text": q}]
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
        imgs.append([images[img_name]] if img_name else [])
        convs.append({"image": img_name, "messages": msgs})
    enc = processor(text=texts, images=imgs, padding=True, padding_side="right", add_special_tokens=False,
                    return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    inputs = {
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].to(torch.int64),
        "pixel_values": enc["pixel_values"].to(torch.float32),
        "pixel_attention_mask": enc["pixel_attention_mask"].to(torch.bool),
        "labels": labels,
    }
    return inputs, {"texts": texts, "conversations": convs}


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def lora_config(**kw):
    from peft import LoraConfig

    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian", bias="none")
    base.update(kw)
    return LoraConfig(**base)


CASES = {
    "text": dict(target_modules=TEXT_TARGETS),
    "vision": dict(target_modules=VISION_TARGETS),
    "dora": dict(target_modules=TEXT_TARGETS, use_dora=True),
    "modules_to_save": dict(target_modules=TEXT_QV, modules_to_save=["connector"]),
    "all_linear": dict(target_modules="all-linear"),
    "rslora": dict(target_modules=TEXT_TARGETS, use_rslora=True),
}


def run_case(name: str, kw: dict, ckpt: Path, inputs: dict, seed: int) -> dict:
    from peft import PeftModel, get_peft_model

    case = fresh_dir(OUT / name)
    base, _ = load_tiny(ckpt)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(**kw))
    fill_adapter_(model, seed)
    save_adapter(model, case / "adapter")
    trainable_line_orig = capture_print_trainable(model)

    # reload from disk, exactly as a user (and the Rust side) would
    base2, _ = load_tiny(ckpt)
    model2 = PeftModel.from_pretrained(base2, case / "adapter", is_trainable=True)
    model2.eval()
    keymap = saved_key_map(model2)
    trainable_line = capture_print_trainable(model2)
    assert trainable_line == trainable_line_orig, (trainable_line, trainable_line_orig)

    model2.zero_grad(set_to_none=True)
    out = model2(**inputs, use_cache=False)
    loss = out.loss
    loss.backward()

    # independent loss re-computation: causal shift, mean over labels != -100
    lg = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lb = inputs["labels"][:, 1:].reshape(-1)
    check = torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100)
    assert torch.allclose(check, loss, atol=1e-6), (check, loss)

    # the original (in-memory) model gives the same loss
    model.eval()
    with torch.no_grad():
        loss_orig = model(**inputs, use_cache=False).loss
    assert torch.allclose(loss_orig, loss, atol=1e-6, rtol=0), (loss_orig, loss)

    expected = {"loss": np.asarray(loss.item(), dtype=np.float32)}
    for n, p in model2.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            expected[f"grad/{keymap[n]}"] = p.grad.detach().float().numpy().copy()
    np.savez_compressed(case / "expected.npz", **expected)
    np.savez_compressed(case / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})

    from safetensors.numpy import load_file

    saved = load_file(case / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(keymap.values()), sorted(set(saved) ^ set(keymap.values()))
    targeted = sorted(model2.base_model.targeted_module_names)
    cfg = json.loads((case / "adapter" / "adapter_config.json").read_text())
    n_tr = sum(p.numel() for p in model2.parameters() if p.requires_grad)
    info = {
        "lora_kwargs": {k: (sorted(v) if isinstance(v, set) else v) for k, v in kw.items()},
        "scaling": {m: float(model2.base_model.model.get_submodule(m).scaling["default"]) for m in targeted[:1]},
        "print_trainable_parameters": trainable_line,
        "trainable_params": n_tr,
        "loss": float(loss.item()),
        "num_label_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
        "targeted_module_names": targeted,
        "saved_keys": sorted(saved),
        "adapter_config_target_modules": cfg["target_modules"],
        "adapter_config_modules_to_save": cfg.get("modules_to_save"),
        "seed": seed,
    }
    if name == "all_linear":
        (case / "targeted_modules.json").write_text(json.dumps(targeted, indent=2) + "\n")
    normalize_perms(case)
    print(f"[{name}] loss={loss.item():.6f} trainable={n_tr} keys={len(saved)} targeted={len(targeted)}")
    print(f"  {trainable_line}")
    return info


def main() -> None:
    import peft
    import transformers

    clean_dir_keep_readme(OUT)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_tiny_smolvlm(tmp / "smolvlm-tiny")
    _, processor = load_tiny(ckpt)
    inputs, described = make_inputs(processor, OUT / "images")
    cases = {}
    for i, (name, kw) in enumerate(CASES.items()):
        cases[name] = run_case(name, kw, ckpt, inputs, seed=100 + i)
    meta = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__},
        "inputs": {**described, "shapes": {k: list(v.shape) for k, v in inputs.items()}},
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")
    normalize_perms(OUT)
    shutil.rmtree(tmp)
    print(f"[lora] folder size {dir_size(OUT)} bytes")


if __name__ == "__main__":
    main()
