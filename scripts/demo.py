"""The main job, for now: build a small SmolVLM-shaped checkpoint (the real SmolVLM tokenizer and chat
template shipped in tests/fixtures, random weights since nothing can be fetched from the hub here), run
the processor on an image prompt, print the most likely next tokens and stream a short greedy answer.
The weights are random, so the words mean nothing yet; everything else is the real path. The
fine-tuning demo replaces this once training exists."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from ferrovlm import AutoModelForVision2Seq, AutoProcessor, TextStreamer  # noqa: E402
from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint  # noqa: E402

FIX = ROOT / "tests" / "fixtures"


def make_image() -> np.ndarray:
    """A 'photo': a colour gradient with a red square, HWC uint8."""
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([x * 2, y * 2, 255 - x * 2], axis=-1).astype(np.uint8)
    img[24:48, 32:64] = [255, 0, 0]
    return img


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smolvlm-tiny"
        shutil.copytree(FIX / "tokenizer" / "smolvlm", ckpt)
        for f in (FIX / "processor" / "config").iterdir():
            shutil.copy(f, ckpt / f.name)
        write_checkpoint(ckpt, TINY_SMOLVLM, seed=0)
        (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 49279, "pad_token_id": 2}))

        t0 = time.perf_counter()
        model = AutoModelForVision2Seq.from_pretrained(ckpt, torch_dtype="float32")
        processor = AutoProcessor.from_pretrained(ckpt)
        print(f"loaded {model} and its processor in {time.perf_counter() - t0:.2f}s")
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the red square?"}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[make_image()], return_tensors="np")
        print(
            f"prompt: {prompt!r} -> {inputs['input_ids'].shape[1]} tokens, pixel_values {inputs['pixel_values'].shape}"
        )

        t0 = time.perf_counter()
        logits = model(**inputs).logits[0, -1].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        print(f"forward in {(time.perf_counter() - t0) * 1000:.1f} ms; most likely next tokens:")
        for t in np.argsort(-probs)[:5]:
            print(f"  {t:6d} {processor.tokenizer.convert_ids_to_tokens(int(t))!r:24} p={probs[t]:.4f}")
        print("greedy answer (streamed): ", end="")
        model.generate(
            **inputs,
            max_new_tokens=12,
            streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True),
        )


if __name__ == "__main__":
    main()
