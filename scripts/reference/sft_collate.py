"""Reference outputs of TRL 1.16's ``DataCollatorForVisionLanguageModeling`` and of PEFT 0.21's LoRA target
resolution / ``adapter_config.json`` (dev only).

    python scripts/reference/sft_collate.py  # in an environment with torch, transformers, peft, trl, Pillow
    python scripts/reference/sft_collate.py --print-field-table  # the defaults training_args.py, sft_config.py
                                                                  # and dpo_config.py declare

Writes tests/fixtures/sft_collate/:
  images/*.png            deterministic RGB images used by the rows
  cases.json              per case: the rows (images as file names), collator arguments, array names
  <case>.npz              the collated arrays (input_ids, attention_mask, labels, pixel_values, ...)
  peft/modules.json       the tiny SmolVLM's module names (all, and the nn.Linear ones)
  peft/<case>/adapter_config.json + targets.json   what PEFT writes and which modules it wraps

The processor is assembled like the ``tiny_smolvlm`` fixture in tests/conftest.py (SmolVLM tokenizer +
tests/fixtures/processor/config) with transformers' PIL image processor; model weights are not needed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "sft_collate"
sys.path.insert(0, str(ROOT / "scripts"))


def build_processor(tmp: Path):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

    dst = tmp / "smolvlm-tiny"
    shutil.copytree(FIX / "tokenizer" / "smolvlm", dst)
    for f in (FIX / "processor" / "config").iterdir():
        shutil.copy(f, dst / f.name)
    tok = PreTrainedTokenizerFast.from_pretrained(dst)
    ip = Idefics3ImageProcessorPil.from_pretrained(dst)
    template = json.loads((dst / "chat_template.json").read_text())["chat_template"]
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)


def make_images() -> dict:
    from PIL import Image

    (OUT / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    sizes = {"a_40x30.png": (40, 30), "b_70x50.png": (70, 50), "c_33x64.png": (33, 64), "d_20x20.png": (20, 20)}
    out = {}
    for name, (w, h) in sizes.items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(OUT / "images" / name)
        img = Image.open(OUT / "images" / name)
        img.load()
        out[name] = img
    return out


def cases() -> dict:
    """Rows with image file names in place of images; arguments for the collator."""
    U = lambda s: {"role": "user", "content": s}  # noqa: E731
    A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
    T = lambda s: {"type": "text", "text": s}  # noqa: E731
    lm_rows = [
        {"images": ["a_40x30.png"], "messages": [U("What is in this picture?"), A("Noise, mostly.")]},
        {
            "images": ["b_70x50.png"],
            "messages": [U("Describe it."), A("A wide rectangle of random colored pixels, nothing else.")],
        },
        {"images": ["c_33x64.png"], "messages": [U("Tall?"), A("Yes."), U("How tall?"), A("Sixty-four pixels tall.")]},
    ]
    structured = [
        {"images": ["d_20x20.png"], "messages": [
            {"role": "system", "content": [T("You are a careful assistant.")]},
            {"role": "user", "content": [{"type": "image"}, T("Count the colors.")]},
            {"role": "assistant", "content": [T("Too many to count.")]}]},
        {"images": ["a_40x30.png", "b_70x50.png"], "messages": [
            {"role": "user", "content": [T("Compare"), {"type": "image"}, T("and"), {"type": "image"}]},
            {"role": "assistant", "content": [T("The second is larger.")]}]},
    ]
    pc_conv = [
        {"images": ["a_40x30.png"], "prompt": [U("What is this?")], "completion": [A("Random pixels.")]},
        {
            "images": ["b_70x50.png"],
            "prompt": [U("Give a long description of the image please.")],
            "completion": [A("It is an image.")],
        },
        {
            "images": ["c_33x64.png"],
            "prompt": [U("Hi")],
            "completion": [A("Hello! The image is taller than it is wide, with noise.")],
        },
    ]
    pc_str = [
        {"images": ["a_40x30.png"], "prompt": "<image>Caption:", "completion": " random noise"},
        {
            "images": ["d_20x20.png"],
            "prompt": "<image>A longer prompt for the second image. Caption:",
            "completion": " a small square",
        },
    ]
    pc_noimg = [
        {"images": [], "prompt": [U("Say hi.")], "completion": [A("Hi.")]},
        {"images": [], "prompt": [U("Name a colour.")], "completion": [A("Blue, like the sky at noon.")]},
    ]
    text_rows = [
        {"images": ["a_40x30.png"], "text": "<image>A noisy picture."},
        {"images": ["d_20x20.png"], "text": "<image>Another noisy picture with a longer caption."},
    ]
    noimg_lm = [{"images": [], "messages": r["messages"]} for r in lm_rows]
    mixed = [
        {"images": ["a_40x30.png"], "messages": [U("What is in this picture?"), A("Noise.")]},
        {"images": [], "messages": [U("No picture here, just text."), A("Understood.")]},
    ]
    return {
        "lm": dict(rows=lm_rows, args={}),
        # transformers 5.24's Idefics3Processor raises TypeError (char_to_token -> None) as soon as truncation
        # shortens any row of a batch with images, so the truncation references use text-only rows.
        "lm_maxlen": dict(rows=noimg_lm, args={"max_length": 12}),
        "lm_pad_multiple": dict(rows=lm_rows, args={"pad_to_multiple_of": 16}),
        "lm_structured": dict(rows=structured, args={}),
        "lm_mixed_images": dict(rows=mixed, args={}),
        "assistant_only": dict(rows=lm_rows + structured, args={"assistant_only_loss": True}),
        "assistant_only_maxlen": dict(rows=noimg_lm, args={"assistant_only_loss": True, "max_length": 22}),
        "pc_conv": dict(rows=pc_conv, args={"completion_only_loss": True}),
        "pc_conv_full_loss": dict(rows=pc_conv, args={"completion_only_loss": False}),
        "pc_conv_maxlen": dict(rows=pc_conv, args={"completion_only_loss": True, "max_length": 40}),
        "pc_str": dict(rows=pc_str, args={"completion_only_loss": True}),
        "pc_noimg": dict(rows=pc_noimg, args={"completion_only_loss": True}),
        "text": dict(rows=text_rows, args={}),
    }


def with_images(rows, images):
    out = copy.deepcopy(rows)
    for r in out:
        r["images"] = [images[n] for n in r["images"]]
    return out


def collate_all(processor, images) -> None:
    import torch
    from trl.chat_template_utils import get_training_chat_template
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    manifest = {}
    for name, case in cases().items():
        args = dict(case["args"])
        if args.get("assistant_only_loss"):
            args["chat_template"] = get_training_chat_template(processor)  # what SFTTrainer swaps in
        coll = DataCollatorForVisionLanguageModeling(processor=processor, **args)
        batch = coll(with_images(case["rows"], images))
        arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in batch.items()}
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        manifest[name] = {"rows": case["rows"], "args": case["args"],
                          "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}}
        print(name, {k: v.shape for k, v in arrays.items()})
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=1))


def peft_reference() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from tiny_checkpoint import TINY_SMOLVLM

    def fresh():
        torch.manual_seed(0)
        cfg = Idefics3Config(**{k: v for k, v in TINY_SMOLVLM.items() if k not in ("architectures", "torch_dtype")})
        m = Idefics3ForConditionalGeneration(cfg)
        m.name_or_path = "HuggingFaceTB/SmolVLM-256M-Instruct"  # what from_pretrained would record
        return m

    base = fresh()
    mods = {
        "all": [n for n, _ in base.named_modules()],
        "linear": [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)],
        "output_embeddings": next(n for n, m in base.named_modules() if m is base.get_output_embeddings()),
    }
    (OUT / "peft").mkdir(parents=True, exist_ok=True)
    (OUT / "peft" / "modules.json").write_text(json.dumps(mods, indent=1))
    configs = {
        "all_linear": dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        "list": dict(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=["down_proj", "o_proj", "k_proj", "q_proj",
                                                                          "gate_proj", "up_proj", "v_proj"],
                     use_dora=True, init_lora_weights="gaussian"),
        "regex": dict(r=2, lora_alpha=4, target_modules=r".*text_model.*\.(q_proj|v_proj)", bias="none",
                      task_type="CAUSAL_LM"),
        "exclude_save": dict(r=4, target_modules=["q_proj", "v_proj", "fc1", "proj"],
                             exclude_modules=["model.vision_model.encoder.layers.0.self_attn.q_proj"],
                             modules_to_save=["lm_head"]),
        "layers": dict(r=4, target_modules=["q_proj", "k_proj"], layers_to_transform=[1], layers_pattern="layers"),
        "full_name": dict(r=4, target_modules=["model.text_model.layers.0.mlp.up_proj", "out_proj"],
                          rank_pattern={"out_proj": 2}, alpha_pattern={"up_proj": 16}, use_rslora=True),
        "default": dict(),
    }
    for name, kw in configs.items():
        d = OUT / "peft" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kwargs.json").write_text(json.dumps(kw, indent=1))
        if name == "default":
            LoraConfig(**kw).save_pretrained(d)  # a bare config, never applied to a model
            continue
        pm = get_peft_model(fresh(), LoraConfig(**kw))
        pm.save_pretrained(d)  # PeftModel.save_pretrained: inference_mode=true, auto_mapping when task_type is None
        for f in d.glob("adapter_model.*"):
            f.unlink()  # only the config is a fixture
        (d / "README.md").unlink(missing_ok=True)
        targets = sorted(pm.base_model.targeted_module_names)
        saved = sorted({n.split(".modules_to_save")[0] for n, _ in pm.named_modules() if n.endswith("modules_to_save")})
        (d / "targets.json").write_text(json.dumps({"targeted": targets, "modules_to_save_wrapped": saved}, indent=1))
        print(name, len(targets))


def print_field_table() -> None:
    """Prints the TrainingArguments / SFTConfig / DPOConfig field tables as Python literals."""
    from enum import Enum

    from transformers import TrainingArguments
    from trl import DPOConfig, SFTConfig

    def default(f):
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            v = None
        if isinstance(v, Enum):
            v = v.value
        if isinstance(v, tuple):
            v = list(v)
        return v

    ta = {f.name: default(f) for f in dataclasses.fields(TrainingArguments) if f.init}
    print("_TRAINING_ARGUMENTS = {")
    for k, v in ta.items():
        print(f"    {k!r}: {v!r},")
    print("}")
    for cls in (SFTConfig, DPOConfig):
        print(f"_{cls.__name__.upper()}_FIELDS = {{")
        for f in dataclasses.fields(cls):
            if f.init and (f.name not in ta or default(f) != ta[f.name]):
                print(f"    {f.name!r}: {default(f)!r},")
        print("}")


def main() -> None:
    if "--print-field-table" in sys.argv:
        print_field_table()
        return
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    images = make_images()
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(Path(tmp))
        collate_all(processor, images)
    peft_reference()


if __name__ == "__main__":
    main()
