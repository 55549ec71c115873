"""The reference compositions of candle primitives (what runs on a GPU, where the fused CPU kernels cannot)
compute what the fused CPU kernels compute: forced on the CPU (`FERROVLM_REFERENCE_OPS=1`, here
`_core.set_reference_ops(True)`), a forward, greedy generation, a 3-step LoRA SFT and a DPO run agree with
the fast path within 1e-4 (f32), and with TRL's own runs of the fixtures. This is the CPU-side evidence for
the CUDA build (tests/test_cuda.py runs the same on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ferrovlm
from conftest import FIXTURES, REFERENCE_CASES, load_case
from device_cases import DPO_KEYS, SFT_KEYS, compare_runs, dpo, forward, generate, logits_diff, reference_ops, sft
from ferrovlm import _core


def test_switch_is_process_wide_and_read_from_the_environment():
    with reference_ops(True):
        assert _core.reference_ops()
    with reference_ops(False):
        assert not _core.reference_ops()
    code = "from ferrovlm import _core; print(_core.reference_ops())"
    for value, want in (("1", "True"), ("0", "False")):
        env = dict(os.environ, FERROVLM_REFERENCE_OPS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


@pytest.mark.parametrize("case,suffix", REFERENCE_CASES)
def test_forward_matches_the_fast_path_and_transformers(case, suffix):
    with reference_ops(False):
        fast = forward(case, suffix)
    with reference_ops(True):
        ref = forward(case, suffix)
    diff = logits_diff(ref, fast)
    print(f"\n{case}{suffix}: reference vs fast logits, max |diff| / max |logit| = {diff:.2e}; "
          f"loss {ref['loss']:.8f} vs {fast['loss']:.8f}")
    assert diff <= 1e-4
    assert abs(ref["loss"] - fast["loss"]) <= 1e-4 * abs(fast["loss"])
    _, expected = load_case(case, suffix)  # and transformers' values
    assert np.abs(ref["logits"][ref["valid"]] - expected["logits"][ref["valid"]]).max() <= 1e-4 * np.abs(
        expected["logits"][ref["valid"]]).max()


def test_greedy_generation_is_the_same():
    with reference_ops(False):
        fast = generate()
    with reference_ops(True):
        ref = generate()
    np.testing.assert_array_equal(ref, fast)


def test_sft_trajectory_matches_the_fast_path(tiny_smolvlm, tmp_path):
    with reference_ops(False):
        fast = sft(tiny_smolvlm, tmp_path / "fast")
    with reference_ops(True):
        ref = sft(tiny_smolvlm, tmp_path / "ref")
    worst = compare_runs(ref, fast, SFT_KEYS, "SFT reference vs fast")
    print(f"\nSFT (3 LoRA steps): reference vs fast, max relative difference of the logged values {worst:.2e}")
    trl = json.loads((FIXTURES / "sft" / "messages" / "log_history.json").read_text())
    for g, w in zip(ref[0][:-1], trl[:-1]):  # and TRL's run
        for k in SFT_KEYS:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-7, err_msg=f"vs TRL: {k}")


def test_dpo_trajectory_matches_the_fast_path(tiny_smolvlm, tmp_path):
    with reference_ops(False):
        fast = dpo(tiny_smolvlm, tmp_path / "fast")
    with reference_ops(True):
        ref = dpo(tiny_smolvlm, tmp_path / "ref")
    worst = compare_runs(ref, fast, DPO_KEYS, "DPO reference vs fast", atol=2e-5)
    print(f"\nDPO (3 LoRA steps): reference vs fast, max relative difference of the logged values {worst:.2e}")
    # Step 1 sits at policy = reference (the same adapter), where log sigmoid's derivative must be exactly
    # 1/2 on both paths: compare_runs checked step 1's grad_norm; the loss there is ln 2.
    assert abs(ref[0][0]["loss"] - np.log(2)) < 1e-6
    trl = json.loads((FIXTURES / "dpo" / "sigmoid" / "log_history.json").read_text())
    for g, w in zip(ref[0][:-1], trl[:-1]):  # and TRL's run
        for k in DPO_KEYS:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=2e-5, err_msg=f"vs TRL: {k}")


@pytest.mark.skipif(_core.cuda_built(), reason="this build has CUDA: tests/test_cuda.py covers the device")
def test_moving_to_cuda_on_a_cpu_build_is_a_typed_error(tiny_smolvlm):
    from ferrovlm import DeviceError

    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    with pytest.raises(DeviceError, match="without CUDA"):
        model.to("cuda:0")
    assert str(model.device) == "cpu"  # nothing moved
