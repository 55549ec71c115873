"""On a GPU (a ferrovlm built with the `cuda` feature, on a machine with an NVIDIA driver and GPU; skipped
elsewhere): the forward logits, greedy generation, and 3-step LoRA SFT and DPO trajectories on cuda:0 equal
the CPU's within 1e-4 in f32 (issue 17, item 2). scripts/gpu_check.sh runs this file on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest

import ferrovlm
from conftest import REFERENCE_CASES
from device_cases import DPO_KEYS, SFT_KEYS, compare_runs, dpo, forward, generate, logits_diff, sft
from ferrovlm import _core

pytestmark = [
    pytest.mark.skipif(not _core.cuda_built(), reason="ferrovlm was built without the cuda feature"),
    pytest.mark.skipif(_core.cuda_built() and not _core.cuda_available(), reason="no CUDA driver or GPU here"),
]


def test_model_lives_on_the_gpu(tiny_smolvlm):
    name = "model.text_model.layers.0.self_attn.q_proj.weight"
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map="cuda")
    assert (model.device.type, model.device.index, str(model.device)) == ("cuda", 0, "cuda:0")
    moved = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    want = moved._core.parameter(name)
    assert moved.to("cuda") is moved and str(moved.device) == "cuda:0"
    for m in (model, moved):
        np.testing.assert_array_equal(m._core.parameter(name), want)
    assert str(moved.to("cpu").device) == "cpu"
    np.testing.assert_array_equal(moved._core.parameter(name), want)


@pytest.mark.parametrize("case,suffix", REFERENCE_CASES)
def test_forward_equals_the_cpu(case, suffix):
    want, got = forward(case, suffix, "cpu"), forward(case, suffix, "cuda")
    diff = logits_diff(got, want)
    print(f"\n{case}{suffix}: GPU vs CPU logits, max |diff| / max |logit| = {diff:.2e}")
    assert diff <= 1e-4
    assert abs(got["loss"] - want["loss"]) <= 1e-4 * abs(want["loss"])


def test_greedy_generation_equals_the_cpu():
    np.testing.assert_array_equal(generate("cuda"), generate("cpu"))


def test_sft_trajectory_equals_the_cpu(tiny_smolvlm, tmp_path):
    worst = compare_runs(sft(tiny_smolvlm, tmp_path / "gpu", "cuda"), sft(tiny_smolvlm, tmp_path / "cpu", "cpu"),
                         SFT_KEYS, "SFT GPU vs CPU")
    print(f"\nSFT (3 LoRA steps): GPU vs CPU, max relative difference {worst:.2e}")


def test_dpo_trajectory_equals_the_cpu(tiny_smolvlm, tmp_path):
    worst = compare_runs(dpo(tiny_smolvlm, tmp_path / "gpu", "cuda"), dpo(tiny_smolvlm, tmp_path / "cpu", "cpu"),
                         DPO_KEYS, "DPO GPU vs CPU", atol=2e-5)
    print(f"\nDPO (3 LoRA steps): GPU vs CPU, max relative difference {worst:.2e}")
