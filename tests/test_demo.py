"""The README's main job at a smaller size: a VLM built from the real SmolLM2-135M-Instruct and a fresh vision
tower learns to answer questions about images it has never seen (held-out accuracy well above chance after the
two stages; honest learning, not a fixed output). Needs the real weights (SMOLLM2_GGUF, set by scripts/test.sh)."""

from __future__ import annotations

import os

import pytest

import demo

pytestmark = pytest.mark.skipif(not os.environ.get("SMOLLM2_GGUF"), reason="SMOLLM2_GGUF is not set")


def test_scenes_are_deterministic_and_varied():
    a, b = demo.make_split(64, 5, 64), demo.make_split(64, 5, 64)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert {s.kind for s in a} == set(demo.CHANCE)
    assert len({s.answer for s in a}) >= 8
    assert demo.make_split(8, 6, 64)[0].image.tobytes() != a[0].image.tobytes()


def test_demo_learns_to_see(tmp_path):
    s = demo.Settings(out=str(tmp_path / "out"), train_rows=480, eval_rows=48, stage1_steps=30, stage2_steps=20,
                      show=1, plot=False)
    r = demo.main(s)
    assert r["stage2"] >= r["chance"] + 0.25, r
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
