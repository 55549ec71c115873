"""The VLMs that tests/test_vlm_from_parts.py builds from parts with ferrovlm, and the inputs it gives them.

Shared with scripts/reference/vlm_from_parts.py, which runs this file (``python tests/vlm_parts_cases.py --case
NAME --out DIR``, with ferrovlm installed) to write a case's checkpoint and processor, then loads them with
transformers to record the expected values in tests/fixtures/vlm_parts/.

Cases:
  llama_tiny  tests/fixtures/llama_tiny (vocab 300, hidden 48, untied head) with the 300-token tokenizer of
              tests/fixtures/vlm_parts/tokenizer_tiny; 64 px tiles, patch 16, scale 2 (4 image tokens), image
              splitting on; vision tower 32 hidden / 64 MLP / 2 layers / 4 heads; seed 0.
  smollm2     SmolLM2-135M-Instruct from its Q4_1 GGUF (env SMOLLM2_GGUF; tied head) with the file's tokenizer;
              128 px tiles, patch 16, scale 2 (16 image tokens), no splitting; vision tower 96 / 384 / 2 / 4;
              seed 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "vlm_parts"
LLAMA_TINY = ROOT / "tests" / "fixtures" / "llama_tiny" / "checkpoint"

CASES: dict[str, dict[str, Any]] = {
    "llama_tiny": {
        "processor": {"image_size": 64, "patch_size": 16, "scale_factor": 2, "do_image_splitting": True},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "seed": 0,
    },
    "smollm2": {
        "processor": {"image_size": 128, "patch_size": 16, "scale_factor": 2, "do_image_splitting": False},
        "vision_config": {
            "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4
        },
        "seed": 0,
    },
}


def image_arrays() -> list[np.ndarray]:
    """Two deterministic RGB images (uint8, HWC): 60x100 and 80x48 pixels."""
    out = []
    for h, w, k in ((60, 100, 1), (80, 48, 2)):
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 7 * k + y * 3) % 256, (y * 5 + 40 * k) % 256, ((x ^ y) * 11) % 256], axis=-1)
        out.append(rgb.astype(np.uint8))
    return out


def images() -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in image_arrays()]


def conversations() -> list[list[dict[str, Any]]]:
    """A batch of two prompts, an image first in one and after the text in the other."""
    return [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Describe it in 3 words:"}, {"type": "image"}]}],
    ]


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SMOLLM2_GGUF."""
    path = os.environ["SMOLLM2_GGUF"]
    return os.path.dirname(path), os.path.basename(path)


def build(case: str, seed: Any = "case") -> tuple[Any, Any]:
    """(model, processor) of ``case`` built with ferrovlm; ``seed`` overrides the case's."""
    import ferrovlm

    spec = CASES[case]
    if case == "llama_tiny":
        lm = ferrovlm.AutoModelForCausalLM.from_pretrained(LLAMA_TINY)
        tok = ferrovlm.AutoTokenizer.from_pretrained(FIXTURES / "tokenizer_tiny")
    else:
        folder, name = smollm2_gguf()
        lm = ferrovlm.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tok = ferrovlm.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    processor = ferrovlm.Idefics3Processor.from_text_model(tok, **spec["processor"])
    model = ferrovlm.Idefics3ForConditionalGeneration.from_text_model(
        lm, processor, vision_config=spec["vision_config"], seed=spec["seed"] if seed == "case" else seed
    )
    return model, processor


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model, processor = build(args.case)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
