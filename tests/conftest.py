"""Shared test helpers: the fixture checkpoints written by scripts/make_reference.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

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


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> dict:
    """The README demo (ferrovlm.demo) at CI size, run once per session: tests/test_demo.py checks what it
    learnt, the notebooks use the model it saved (results["out"] / "model"). Needs the real SmolLM2 weights."""
    if not os.environ.get("SMOLLM2_GGUF"):
        pytest.skip("SMOLLM2_GGUF is not set")
    from ferrovlm import demo

    out = tmp_path_factory.mktemp("demo") / "out"
    results = demo.main(demo.Settings(out=str(out), train_rows=480, eval_rows=8, stage1_steps=10, stage2_steps=30,
                                      stage2_lr=1e-3, show=1, plot=False))
    results["out"] = out
    return results


def load_case(case: str, suffix: str):
    inputs = dict(np.load(FIXTURES / case / f"inputs{suffix}.npz"))
    expected = dict(np.load(FIXTURES / case / f"expected{suffix}.npz"))
    return inputs, expected


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory) -> Path:
    """A complete hub-layout checkpoint: the SmolVLM tokenizer and chat template, the processor configs
    (32 px tiles, 4 image tokens), and random model weights (numpy-made, no reference values)."""
    import json

    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    dst = tmp_path_factory.mktemp("tiny") / "smolvlm-tiny"
    shutil.copytree(FIXTURES / "tokenizer" / "smolvlm", dst)
    for f in (FIXTURES / "processor" / "config").iterdir():
        shutil.copy(f, dst / f.name)
    write_checkpoint(dst, TINY_SMOLVLM, seed=3)
    (dst / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 49279, "pad_token_id": 2, "bos_token_id": 1})
    )
    return dst


@pytest.fixture
def checkpoint_copy(tmp_path):
    """Copies a fixture checkpoint into tmp_path so a test may damage it."""

    def make(case: str = "idefics3_gqa") -> Path:
        dst = tmp_path / case
        shutil.copytree(FIXTURES / case / "checkpoint", dst)
        return dst

    return make
