"""The main job, for now: build a small SmolVLM-shaped checkpoint, encode an image prompt, and print the
most likely next tokens. The weights are random (no hub access here), so the tokens mean nothing yet;
what runs is the real path: hub-layout checkpoint -> from_pretrained -> vision tower -> connector ->
image-token merge -> Llama -> logits. The fine-tuning demo replaces this once training exists."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import TINY, write_checkpoint  # noqa: E402

from ferrovlm import AutoModelForVision2Seq  # noqa: E402


def make_image(size: int) -> np.ndarray:
    """A 'photo': a colour gradient with a red square, normalised like the Idefics3 processor."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 1 - x], axis=0) * 255.0
    rgb[:, size // 4 : size // 2, size // 4 : size // 2] = np.array([255.0, 0, 0])[:, None, None]
    return (((rgb.round() / 255.0) - 0.5) / 0.5).astype(np.float32)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "tiny-smolvlm", TINY, seed=0)
        t0 = time.perf_counter()
        model = AutoModelForVision2Seq.from_pretrained(ckpt, torch_dtype="float32")
        print(f"loaded {model} in {time.perf_counter() - t0:.3f}s")
        cfg = model.config
        n = cfg.vision_config.image_size // cfg.vision_config.patch_size
        tokens_per_image = (n // cfg.scale_factor) ** 2
        fake, glob, img = 251, 252, cfg.image_token_id
        # "<|im_start|>User:" <fake><global-img><image>*T<fake> "What is in the square?<end_of_utterance>\nAssistant:"
        prompt = [1, 17, 42] + [fake, glob] + [img] * tokens_per_image + [fake] + [33, 57, 91, 12, 5, 77, 19]
        input_ids = np.array([prompt], dtype=np.int64)
        pixel_values = make_image(cfg.vision_config.image_size)[None, None]  # [B=1, F=1, 3, H, W]
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=np.ones_like(input_ids), pixel_values=pixel_values)
        dt = time.perf_counter() - t0
        logits = out.logits[0, -1].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        print(f"forward of {input_ids.shape[1]} tokens ({tokens_per_image} from the image) in {dt * 1000:.1f} ms")
        print("most likely next tokens (id: probability):")
        for t in top:
            print(f"  {t:4d}: {probs[t]:.4f}")


if __name__ == "__main__":
    main()
