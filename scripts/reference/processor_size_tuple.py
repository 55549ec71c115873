"""Reference outputs of transformers' processor for the smol-course video cell (dev only):

    processor.image_processor.size = (384, 384)   # a tuple, not a dict
    processor.image_processor.do_resize = False
    inputs = processor(text=prompt, images=frames, return_tensors="pt")

plus the other non-dict sizes transformers' `get_size_dict` accepts (a (height, width) tuple and an
int, with do_resize on), on the processor fixture (tests/fixtures/processor/config + the SmolVLM
tokenizer; 32 px tiles, 4 image tokens) and small images so that the arrays stay small.

    python scripts/reference/processor_size_tuple.py  # in an environment with transformers, Pillow

Writes tests/fixtures/processor_size_tuple/expected.npz and calls.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from processor import assemble

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
IMAGES = FIX / "processor_images" / "images"

# name -> (image processor attributes set by the user, image files); every call uses one image per frame.
CALLS = {
    "video_cell": ({"size": (384, 384), "do_resize": False}, ["rgb_37x53.png", "rgba_61x47.png"]),
    "tuple_resize": ({"size": (64, 48), "do_resize": True}, ["rgb_100x70.png"]),
    "int_resize": ({"size": 40, "do_resize": True}, ["rgb_37x53.png"]),
}


def prompt_for(n_frames: int) -> list:
    content = [{"type": "text", "text": "Describe the video."}] + [{"type": "image"} for _ in range(n_frames)]
    return [{"role": "user", "content": content}]


def main(fixtures: Path = FIX) -> None:
    tmp = tempfile.mkdtemp()
    ckpt = assemble(fixtures / "processor" / "config", Path(tmp) / "checkpoint")
    out, meta = {}, {"calls": {}}
    for name, (attrs, files) in CALLS.items():
        processor = AutoProcessor.from_pretrained(ckpt)
        assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil", type(processor.image_processor)
        for k, v in attrs.items():
            setattr(processor.image_processor, k, v)
        frames = []
        for f in files:
            img = Image.open(IMAGES / f)
            img.load()
            frames.append(img)
        prompt = processor.apply_chat_template(prompt_for(len(frames)), add_generation_prompt=True)
        res = processor(text=prompt, images=frames, return_tensors="np")
        for k, v in res.items():
            out[f"{name}.{k}"] = np.asarray(v)
        meta["calls"][name] = {"attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
                               "size_is_tuple": isinstance(attrs["size"], tuple), "images": files, "prompt": prompt}
        print(name, {k: np.asarray(v).shape for k, v in res.items()})
    dst = fixtures / "processor_size_tuple"
    dst.mkdir(exist_ok=True)
    np.savez_compressed(dst / "expected.npz", **out)
    (dst / "calls.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
