"""Image preprocessing throughput: 640x480 photos, splitting on, SmolVLM-256M's settings
(longest_edge 2048, max_image_size 512), ferrovlm's Rust processor vs transformers' PIL processor,
same images, same run; also checks the outputs are identical. Dev only (needs transformers, Pillow):

    python bench/bench_processor.py [--images 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CFG = {"do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2048}, "resample": 1,
       "do_image_splitting": True, "max_image_size": {"longest_edge": 512}, "do_rescale": True,
       "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
       "image_std": [0.5, 0.5, 0.5], "do_pad": True}


def photos(n: int):
    """Smooth colour fields with edges and noise: resampling work like a real photo."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:480, 0:640] / 100.0
        base = np.stack([np.sin(x + i) * 80 + 128, np.cos(y * 1.3 + i) * 80 + 128, np.sin(x * y * 0.2) * 60 + 128], -1)
        base[100:200, 150:400] = rng.integers(0, 255, 3)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "out" / "processor.json"))
    args = ap.parse_args()
    from transformers import Idefics3ImageProcessorPil

    from ferrovlm import Idefics3ImageProcessor

    imgs = photos(args.images)
    ours = Idefics3ImageProcessor(**CFG)
    theirs = Idefics3ImageProcessorPil(**CFG)
    a = ours([[im] for im in imgs], return_tensors="np")
    b = theirs([[im] for im in imgs], return_tensors="np")
    identical = bool(np.array_equal(a["pixel_values"], np.asarray(b["pixel_values"])))
    t_ours = best_of(lambda: ours([[im] for im in imgs], return_tensors="np"), args.repeats)
    t_theirs = best_of(lambda: theirs([[im] for im in imgs], return_tensors="np"), args.repeats)
    res = {"images": args.images, "ferrovlm_images_per_s": args.images / t_ours,
           "transformers_images_per_s": args.images / t_theirs, "speedup": t_theirs / t_ours,
           "pixel_values_identical": identical, "frames_per_image": int(np.asarray(a["pixel_values"]).shape[1])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
