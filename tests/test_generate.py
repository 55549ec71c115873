"""generate() reproduces transformers' token ids on the fixture checkpoint (greedy and beam search),
and behaves like it for batches, EOS, streaming hooks and bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ferrovlm
from conftest import FIXTURES, IDEFICS3
from ferrovlm import AutoModelForVision2Seq, InputError

EXPECTED = dict(np.load(FIXTURES / "generation" / "expected.npz"))
CASES = json.loads((FIXTURES / "generation" / "cases.json").read_text())


@pytest.fixture(scope="module")
def model():
    return AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint", dtype="float32")


def case_inputs(name):
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    return {k: EXPECTED[f"{name}.{k}"] for k in keys if f"{name}.{k}" in EXPECTED}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_match_transformers(model, name):
    out = model.generate(**case_inputs(name), **CASES[name])
    np.testing.assert_array_equal(out, EXPECTED[f"{name}.output"])


def test_prompt_is_returned_first(model):
    inputs = case_inputs("one_image")
    out = model.generate(**inputs, max_new_tokens=3)
    prompt_len = inputs["input_ids"].shape[1]
    np.testing.assert_array_equal(out[:, :prompt_len], inputs["input_ids"])
    assert out.shape[1] == prompt_len + 3


def test_on_token_streaming_hook_sees_each_token(model):
    seen = []

    class Collect:
        def put(self, value):
            seen.append(np.asarray(value).reshape(-1).tolist())

        def end(self):
            seen.append("end")

    inputs = case_inputs("one_image")
    out = model.generate(**inputs, max_new_tokens=5, streamer=Collect())
    assert seen[0] == inputs["input_ids"][0].tolist() and seen[-1] == "end"
    assert [t for s in seen[1:-1] for t in s] == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_seeded_sampling_is_reproducible(model):
    inputs = case_inputs("one_image")
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    ferrovlm.set_seed(7)
    a = model.generate(**inputs, **kw)
    ferrovlm.set_seed(7)
    b = model.generate(**inputs, **kw)
    ferrovlm.set_seed(8)
    c = model.generate(**inputs, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_min_new_tokens_suppresses_eos(model):
    inputs = case_inputs("eos_stop")
    eos = CASES["eos_stop"]["eos_token_id"]
    out = model.generate(**inputs, max_new_tokens=10, eos_token_id=eos, pad_token_id=2, min_new_tokens=6)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert not set(new[:6].tolist()) & set(eos)


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_max_new_tokens(model, bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**case_inputs("one_image"), max_new_tokens=bad)


def test_prompt_longer_than_positions(model):
    ids = np.full((1, 600), 5, np.int64)  # max_position_embeddings is 512
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_pixels_without_image_tokens(model):
    inputs = case_inputs("one_image")
    inputs["input_ids"] = np.where(inputs["input_ids"] == 290, 5, inputs["input_ids"])
    with pytest.raises(InputError, match="image tokens"):
        model.generate(**inputs, max_new_tokens=2)


def test_unknown_generation_kwargs_warn(model):
    with pytest.warns(UserWarning, match="not valid"):
        model.generate(**case_inputs("text_only"), max_new_tokens=1, bogus_flag=3)


def test_generation_config_file_is_read():
    cfg = AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint").generation_config
    assert cfg.eos_token_id is not None


def test_threads_generating_at_once_get_the_sequential_ids(model):
    # Each call runs on rayon's workers (the decoding step as one team of them); calls from several
    # Python threads at once share the workers without deadlock and give the same ids.
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(n for n in CASES if CASES[n].get("num_beams", 1) == 1)[:2] * 2
    want = [model.generate(**case_inputs(n), **CASES[n]) for n in names]
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: model.generate(**case_inputs(n), **CASES[n]), names))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
