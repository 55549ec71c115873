"""Reference outputs of transformers' Idefics3Processor (PIL image processor) for whole processor calls:
chat template -> prompt expansion -> tokenizer + image processor (dev only).

    python scripts/reference/processor.py  # in an environment with transformers, Pillow

Builds tests/fixtures/processor/checkpoint/ (the SmolVLM tokenizer + chat template from
tests/fixtures/tokenizer/smolvlm, small image sizes so that arrays stay small) and writes the
outputs of a set of calls to tests/fixtures/processor/expected.npz (+ calls.json describing them).
Images come from tests/fixtures/processor_images/images/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
IMAGES = FIX / "processor_images" / "images"


def build_checkpoint(dst: Path) -> Path:
    """Writes the processor's own config files into dst (the tokenizer files are not duplicated: tests
    assemble a checkpoint from tests/fixtures/tokenizer/smolvlm plus these with assemble())."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tok_cfg = json.loads((FIX / "tokenizer" / "smolvlm" / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    (dst / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 96}, "resample": 1,
        "do_image_splitting": True, "max_image_size": {"longest_edge": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": True, "processor_class": "Idefics3Processor",
    }, indent=2))
    (dst / "processor_config.json").write_text(
        json.dumps({"image_seq_len": 4, "processor_class": "Idefics3Processor"}, indent=2)
    )
    return dst


def assemble(config_dir: Path, dst: Path) -> Path:
    """A full processor checkpoint: the SmolVLM tokenizer files plus the processor configs."""
    shutil.copytree(FIX / "tokenizer" / "smolvlm", dst)
    for f in config_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def main(fixtures: Path = FIX) -> None:
    import tempfile

    config_dir = build_checkpoint(fixtures / "processor" / "config")
    old = fixtures / "processor" / "checkpoint"
    if old.exists():
        shutil.rmtree(old)
    tmp = tempfile.mkdtemp()
    ckpt = assemble(config_dir, Path(tmp) / "checkpoint")
    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    ip = Idefics3ImageProcessorPil.from_pretrained(ckpt)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                             chat_template=json.loads((ckpt / "chat_template.json").read_text())["chat_template"])
    img = {
        n: Image.open(IMAGES / n)
        for n in ("rgb_100x70.png", "rgb_37x53.png", "rgba_61x47.png", "p_50x40.png", "l_45x30.png", "rgb_1x1.png")
    }
    for v in img.values():
        v.load()
    user = lambda *content: [{"role": "user", "content": list(content)}]  # noqa: E731
    T = lambda s: {"type": "text", "text": s}  # noqa: E731
    I = {"type": "image"}  # noqa: E741
    prompts = {
        "describe": proc.apply_chat_template(user(I, T("Can you describe this image?")), add_generation_prompt=True),
        "compare": proc.apply_chat_template(user(T("Compare"), I, T("and"), I), add_generation_prompt=True),
        "text_only": proc.apply_chat_template(user(T("Tell me a joke.")), add_generation_prompt=True),
    }
    calls = {
        "single": dict(text=prompts["describe"], images=[img["rgb_100x70.png"]]),
        "batch_mixed_right": dict(
            text=[prompts["describe"], prompts["text_only"], prompts["compare"]],
            images=[[img["rgba_61x47.png"]], [], [img["p_50x40.png"], img["l_45x30.png"]]],
            padding=True,
        ),
        "batch_flat_left": dict(
            text=[prompts["compare"], prompts["describe"]],
            images=[img["rgb_37x53.png"], img["rgb_1x1.png"], img["rgb_100x70.png"]],
            padding=True,
            padding_side="left",
        ),
        "no_split": dict(text=prompts["describe"], images=[img["rgb_37x53.png"]], do_image_splitting=False),
        "pad_max_length": dict(
            text=[prompts["describe"], prompts["text_only"]],
            images=[[img["rgb_100x70.png"]], []],
            padding="max_length",
            max_length=200,
        ),
        "truncate_text": dict(
            text=[prompts["text_only"], "plain text that is long enough to be cut"],
            padding="max_length",
            truncation=True,
            max_length=8,
        ),
        "text_only": dict(text=[prompts["text_only"], "plain text"], padding=True),
    }
    out, meta = {}, {"prompts": prompts, "calls": {}}
    for name, kw in calls.items():
        res = proc(**kw, return_tensors="np")
        for k, v in res.items():
            out[f"{name}.{k}"] = np.asarray(v)
        meta["calls"][name] = {k: v for k, v in kw.items() if k not in ("images",)}
        ims = kw.get("images")
        meta["calls"][name]["images"] = (
            None
            if ims is None
            else [[_name(img, x) for x in s] for s in ims]
            if ims and isinstance(ims[0], list)
            else [_name(img, x) for x in ims]
        )
        print(name, {k: np.asarray(v).shape for k, v in res.items()})
    dst = fixtures / "processor"
    np.savez_compressed(dst / "expected.npz", **out)
    (dst / "calls.json").write_text(json.dumps(meta, indent=2))


def _name(table, image):
    return next(k for k, v in table.items() if v is image)


if __name__ == "__main__":
    main()
