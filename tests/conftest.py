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


@pytest.fixture
def checkpoint_copy(tmp_path):
    """Copies a fixture checkpoint into tmp_path so a test may damage it."""

    def make(case: str = "idefics3_gqa") -> Path:
        dst = tmp_path / case
        shutil.copytree(FIXTURES / case / "checkpoint", dst)
        return dst

    return make
