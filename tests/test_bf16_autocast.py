"""bf16=True on the CPU means what transformers/accelerate's CPU autocast means, and stays as close to TRL's own
bf16=True run as TRL's bf16 run is to its fp32 run (issue 13, item 4).

Fixtures (scripts/reference/sft_trajectory.py, dpo_trajectory.py): `sft/messages_bf16` is `sft/messages` and
`dpo/sigmoid_bf16` is `dpo/sigmoid` with `bf16=True`: the same rows, initial adapter, seed and data order; the
model, the LoRA parameters, their gradients and the AdamW state stay fp32 and only the forward runs under
`torch.autocast("cpu", dtype=torch.bfloat16)` (matmuls/linears/convs in bf16; see "bf16=True" in
tests/fixtures/sft/README.md). Their `steps.json["bf16_vs_fp32"]` holds TRL's per-step |bf16 - fp32| of every
logged value against the fp32 twin case.

Tolerance of ferrovlm's bf16 run against TRL's bf16 run, for every logged key k and every logged step:

    |ours_bf16 - trl_bf16| <= tol_k = max(2 * D_k, FLOOR_RTOL * max_steps |trl_bf16| + ATOL, one_count_k)

- D_k = max over the logged steps of |trl_bf16 - trl_fp32| (read from the fixture, so it follows a regeneration).
  The rounding errors of two correct bf16 implementations (TRL's and ours round the same values to bf16, but not
  with the same kernels, accumulation orders or fused steps) are of the same size but independent: their
  difference is typically sqrt(2) x the size of one, and we take the largest step and a factor 2. Measured (TRL
  1.16, torch 2.15): SFT loss 2.2e-3 (1.6e-4 relative), grad_norm 1.9e-2, entropy 1.7e-3; DPO loss 3.3e-3,
  grad_norm 1.3e-2, rewards/margins 9.0e-3, logps/rejected 0.10 (9e-4 relative).
- D_k is pooled over the keys that measure the same kind of quantity (GROUPS: the chosen and rejected
  completions' summed log-probs, their mean logits, the three rewards): bf16 rounds both completions of a pair
  alike, so their differences are draws of one size, and the larger draw measures it (TRL's step-1 logps/chosen
  moved 5.5e-3, its logps/rejected 0.10; ferrovlm's logps/chosen moves 0.03).
- FLOOR_RTOL = 2e-4 (with ATOL, the fp32 tests' atol): for keys whose TRL difference happened to be tiny or 0.
  bf16 has a unit roundoff of 2^-9 = 1.95e-3; each logged value is a mean or sum over hundreds of bf16-rounded
  terms (337 label tokens per SFT step, 637 tokens per DPO step), whose independent errors shrink as 1/sqrt(n),
  to about 2^-9 / sqrt(100) = 2e-4; the measured relative differences of loss/entropy/logps are 1.6e-4 to 9e-4.
  It is also twice the fp32 tests' rtol (1e-4), so no key is held tighter than in fp32. Keys bf16 does not touch
  (learning_rate, num_tokens, epoch, step) have D = 0 and get just this floor.
- one_count_k, for mean_token_accuracy only (a count of tokens whose label is the argmax, divided by the number of
  label tokens): one token, 1 / (label tokens of the step). bf16 may flip a near-tie of the argmax that TRL's
  rounding happened not to flip (TRL flipped none here: D = 0).
  `rewards/accuracies` gets no such allowance: at step 1 policy == reference exactly (every reward is 0, also in
  TRL's bf16 run, the two forwards being the same computation) and later margins are far above bf16 noise.
- train_loss (the mean of the step losses) gets the loss tolerance (D = the larger of D_loss and its own).
- adapter_final: || ours_bf16 - trl_bf16 ||_2 <= 2 * || trl_bf16 - trl_fp32 ||_2 over all LoRA tensors together
  (TRL: 9.8e-3 SFT, 1.7e-2 DPO, against an update of L2 norm 0.19). Not per element: Adam turns a near-zero
  gradient whose sign bf16 flips into opposite lr-sized steps (TRL's single elements differ by up to 5.6e-3).

Separately, ferrovlm's fp32 run of the same case folder (bf16=False) must still match TRL's fp32 twin to the
fp32 trajectory tests' tolerances (rtol 1e-4), so the bf16 run's distance to TRL's bf16 run is not slack borrowed
from an fp32 mismatch; and the bf16 run must differ from our fp32 run (by at least a tenth of TRL's bf16-vs-fp32
difference in some key): an implementation that ignores bf16=True reproduces its fp32 numbers exactly and would
pass the tolerance above trivially (|ours_fp32 - trl_bf16| ~ D < 2 D).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import test_dpo_trajectory as dpo
import test_sft_trajectory as sft
from conftest import FIXTURES
from ferrovlm import _core

# kind -> (fixture folder, bf16 case, its fp32 twin, trajectory test module, fp32 atol of that module)
KINDS = {
    "sft": (FIXTURES / "sft", "messages_bf16", "messages", sft, 1e-7),
    "dpo": (FIXTURES / "dpo", "sigmoid_bf16", "sigmoid", dpo, 2e-5),
}
FP32_RTOL = 1e-4  # test_sft_trajectory / test_dpo_trajectory
FLOOR_RTOL = 2e-4  # see the module docstring
COUNT_KEYS = ("mean_token_accuracy",)
# keys whose bf16 differences are draws of one size (see the module docstring): D is their maximum
GROUPS = (("logps/chosen", "logps/rejected"), ("logits/chosen", "logits/rejected"),
          ("rewards/chosen", "rewards/rejected", "rewards/margins"))
# keys that bf16 rounding moves (the "bf16 is not ignored" check looks at these)
ROUNDED_KEYS = ("loss", "grad_norm", "entropy", "logps/chosen", "logps/rejected")


def read_json(path):
    return json.loads(path.read_text())


def token_counts(steps: dict, kind: str) -> list[int]:
    """Per micro-batch, the number of tokens mean_token_accuracy averages over."""
    if kind == "sft":
        return [m["label_tokens_shifted"] for m in steps["micro_batches"]]
    # DPO: the chosen completion tokens (the first half of the 2B sequences)
    return [sum(m["completion_tokens_shifted_per_row"][: len(m["rows"])]) for m in steps["micro_batches"]]


def tolerances(kind: str) -> dict:
    """tol_k of the module docstring, per logged key (and "train_loss"), from the fixtures."""
    folder, case, _, mod, atol = KINDS[kind]
    steps = read_json(folder / case / "steps.json")
    args = read_json(folder / case / "args.json")
    want = read_json(folder / case / "log_history.json")
    d = dict(steps["bf16_vs_fp32"]["max_abs_diff"])
    for group in GROUPS:
        pooled = max(d.get(k, 0.0) for k in group)
        d.update({k: pooled for k in group if k in d})
    # the largest logged magnitude of each key over the steps (the floor is relative to it)
    mag = {k: max(abs(e[k]) for e in want[:-1]) for k in mod.KEYS}
    tol = {k: max(2 * d.get(k, 0.0), FLOOR_RTOL * mag[k] + atol) for k in mod.KEYS}
    per_step_micro = args["gradient_accumulation_steps"]
    one_token = 1.0 / (min(token_counts(steps, kind)) * per_step_micro)
    for k in COUNT_KEYS:
        tol[k] = max(tol[k], one_token)
    d_train = max(d["loss"], steps["bf16_vs_fp32"]["train_loss_abs_diff"])
    tol["train_loss"] = max(2 * d_train, FLOOR_RTOL * abs(want[-1]["train_loss"]) + atol)
    return tol


def l2(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2) for k in a)))


def load_final(kind: str, case: str) -> dict:
    folder = KINDS[kind][0]
    return _core.load_safetensors(folder / case / "adapter_final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def run(tiny_smolvlm, tmp_path_factory):
    """run(kind, bf16) -> (log_history, trainable parameters after training) of ferrovlm's trainer on the bf16
    case folder, built exactly as the fp32 trajectory tests build theirs; each run once per module."""
    cache = {}

    def get(kind: str, bf16: bool):
        if (kind, bf16) not in cache:
            _, case, _, mod, _ = KINDS[kind]
            tmp = tmp_path_factory.mktemp(f"{kind}_{'bf16' if bf16 else 'fp32'}")
            trainer = mod.make_trainer(tiny_smolvlm, case, tmp, bf16=bf16)
            trainer.train()
            assert trainer.args.bf16 is bf16
            cache[kind, bf16] = (trainer.state.log_history, trainer.model.named_trainable_parameters())
        return cache[kind, bf16]

    return get


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_fp32_run_of_the_bf16_case_matches_trl_fp32(run, kind):
    """bf16=False on the bf16 case folder (same rows, adapter, args otherwise) reproduces TRL's fp32 twin to the
    fp32 trajectory tests' tolerances."""
    folder, _, twin, mod, atol = KINDS[kind]
    got, params = run(kind, False)
    want = read_json(folder / twin / "log_history.json")
    if kind == "sft":
        mod.assert_history_matches(got, want)
    else:
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
            for k in mod.KEYS:
                np.testing.assert_allclose(g[k], w[k], rtol=FP32_RTOL, atol=atol, err_msg=f"step {i + 1} {k}")
    for k, v in load_final(kind, twin).items():
        np.testing.assert_allclose(params[k], v, rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bf16_run_is_as_close_to_trl_bf16_as_trl_bf16_is_to_trl_fp32(run, kind):
    folder, case, twin, mod, _ = KINDS[kind]
    got, params = run(kind, True)
    ours_fp32, _ = run(kind, False)
    want = read_json(folder / case / "log_history.json")
    tol = tolerances(kind)
    assert len(got) == len(want)
    bad = []
    for i, (g, w, f) in enumerate(zip(got[:-1], want[:-1], ours_fp32[:-1])):
        for k in mod.KEYS:
            assert k in g, f"step {i + 1} lacks {k}: {g}"
            if not abs(g[k] - w[k]) <= tol[k]:
                bad.append(f"step {i + 1} {k}: ours bf16 {g[k]!r}, TRL bf16 {w[k]!r}, |diff| {abs(g[k] - w[k]):.3g}"
                           f" > tol {tol[k]:.3g} (ours fp32 {f[k]!r})")
    g, w = got[-1]["train_loss"], want[-1]["train_loss"]
    if not abs(g - w) <= tol["train_loss"]:
        bad.append(f"train_loss: ours bf16 {g!r}, TRL bf16 {w!r}, |diff| {abs(g - w):.3g} > {tol['train_loss']:.3g}")
    assert not bad, "\n".join(bad)

    trl_bf16, trl_fp32 = load_final(kind, case), load_final(kind, twin)
    bound = 2 * l2(trl_bf16, trl_fp32)
    dist = l2({k: params[k] for k in trl_bf16}, trl_bf16)
    assert dist <= bound, (
        f"adapter_final: ||ours bf16 - TRL bf16||_2 = {dist:.3g} > 2 ||TRL bf16 - TRL fp32||_2 = {bound:.3g}"
    )


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bf16_is_not_ignored(run, kind):
    """bf16=True changes the numbers by a bf16-sized amount: in at least one of the keys bf16 rounding moves, our
    bf16 and fp32 runs differ somewhere by a tenth of TRL's own largest bf16-vs-fp32 difference of that key or more
    (exactly 0 when bf16=True is ignored)."""
    if not _core.cpu_features()["avx512bf16"]:
        pytest.skip("no AVX512-BF16 on this CPU: bf16=True computes in f32 here (more precise than autocast)")
    folder, case, _, _, _ = KINDS[kind]
    d = read_json(folder / case / "steps.json")["bf16_vs_fp32"]["max_abs_diff"]
    bf16, _ = run(kind, True)
    fp32, _ = run(kind, False)
    ours = {k: max(abs(b[k] - f[k]) for b, f in zip(bf16[:-1], fp32[:-1])) for k in ROUNDED_KEYS if k in d}
    ratio = {k: ours[k] / d[k] for k in ours}
    trl = {k: d[k] for k in ours}
    assert max(ratio.values()) >= 0.1, (
        f"bf16=True left the trajectory (nearly) as in fp32: max over steps |ours bf16 - ours fp32| per key {ours}; "
        f"TRL's |bf16 - fp32| {trl}"
    )
