"""Shared test helpers: the fixture checkpoints written by scripts/make_reference.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
IDEFICS3 = FIXTURES / "idefics3_gqa"
SMOLVLM = FIXTURES / "smolvlm_tied"

# (case folder, inputs/expected suffix)
REFERENCE_CASES = [
    ("idefics3_gqa", ""),
    ("idefics3_gqa", "_leftpad"),
    ("idefics3_gqa", "_patchmask"),
    ("smolvlm_tied", ""),
    ("smolvlm_tied", "_patchmask"),
]


def load_case(case: str, suffix: str):
    inputs = dict(np.load(FIXTURES / case / f"inputs{suffix}.npz"))
    expected = dict(np.load(FIXTURES / case / f"expected{suffix}.npz"))
    return inputs, expected


TINY_SMOLVLM = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 49190,
    "scale_factor": 2,
    "tie_word_embeddings": True,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "llama", "vocab_size": 49280, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "rope_theta": 100000.0, "max_position_embeddings": 2048, "pad_token_id": 2, "eos_token_id": 49279},
}


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory) -> Path:
    """A complete hub-layout checkpoint: the SmolVLM tokenizer and chat template, the processor configs
    (32 px tiles, 4 image tokens), and random model weights (numpy-made, no reference values)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from tiny_checkpoint import write_checkpoint

    dst = tmp_path_factory.mktemp("tiny") / "smolvlm-tiny"
    shutil.copytree(FIXTURES / "tokenizer" / "smolvlm", dst)
    for f in (FIXTURES / "processor" / "config").iterdir():
        shutil.copy(f, dst / f.name)
    write_checkpoint(dst, TINY_SMOLVLM, seed=3)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": 49279, "pad_token_id": 2, "bos_token_id": 1}))
    return dst


@pytest.fixture
def checkpoint_copy(tmp_path):
    """Copies a fixture checkpoint into tmp_path so a test may damage it."""

    def make(case: str = "idefics3_gqa") -> Path:
        dst = tmp_path / case
        shutil.copytree(FIXTURES / case / "checkpoint", dst)
        return dst

    return make
