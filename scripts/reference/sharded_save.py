"""How transformers' `save_pretrained(..., max_shard_size=...)` shards the tiny checkpoints (dev only):

    python scripts/reference/sharded_save.py  # in an environment with torch, transformers, safetensors

Loads `idefics3_gqa` (untied, float32) and `smolvlm_tied` (tied embeddings, bfloat16) from tests/fixtures/ and
saves each with several `max_shard_size` values (strings in huggingface_hub's units and ints in bytes; the
largest fits one file). Writes tests/fixtures/sharded_save/expected.json: per case the files written (sorted),
the `model.safetensors.index.json` text exactly as written (or null for one file), and per weight file its
`__metadata__` and tensor names (sorted), plus transformers' own default `max_shard_size`.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from pathlib import Path

import safetensors
import torch
import transformers
from transformers import AutoModelForImageTextToText

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"

# case -> (fixture checkpoint, dtype it is loaded and saved in, max_shard_size values)
CASES = {
    "idefics3_gqa": ("idefics3_gqa", torch.float32, ["100KB", "0.2MB", 150000, "1MB"]),
    "smolvlm_tied": ("smolvlm_tied", torch.bfloat16, ["40KB", "25kb", 60000, "5GB"]),
}


def main(fixtures: Path = FIX) -> None:
    out: dict = {
        "transformers": transformers.__version__,
        "default_max_shard_size": inspect.signature(
            transformers.PreTrainedModel.save_pretrained
        ).parameters["max_shard_size"].default,
        "cases": {},
    }
    tmp = Path(tempfile.mkdtemp())
    try:
        for case, (fixture, dtype, sizes) in CASES.items():
            model = AutoModelForImageTextToText.from_pretrained(fixtures / fixture / "checkpoint", dtype=dtype)
            for size in sizes:
                d = tmp / f"{case}_{size}"
                model.save_pretrained(d, max_shard_size=size)
                weights = sorted(p.name for p in d.glob("*.safetensors"))
                index = d / "model.safetensors.index.json"
                shards = {}
                for w in weights:
                    with safetensors.safe_open(d / w, "pt") as f:
                        shards[w] = {"metadata": f.metadata(), "tensors": sorted(f.keys())}
                out["cases"][f"{case}/{size}"] = {
                    "fixture": fixture,
                    "dtype": str(dtype).removeprefix("torch."),
                    "max_shard_size": size,
                    "files": sorted(p.name for p in d.iterdir() if p.suffix in (".safetensors", ".json")),
                    "index": index.read_text() if index.exists() else None,
                    "weights": shards,
                }
                print(f"[sharded_save] {case} {size!r}: {len(weights)} weight file(s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dest = fixtures / "sharded_save"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "expected.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
