"""The Python tokenizer and chat-template surface reproduces transformers on the SmolVLM tokenizer
(expected values from scripts/reference/tokenizer_templates.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES
from ferrovlm import AutoTokenizer, ProcessorError

EXPECTED = json.loads((FIXTURES / "tokenizer" / "expected.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizer" / "smolvlm")


@pytest.mark.parametrize("case", EXPECTED["encode"], ids=lambda c: repr(c["text"])[:30])
def test_encode(tok, case):
    assert tok.encode(case["text"], add_special_tokens=case["add_special_tokens"]) == case["ids"]


@pytest.mark.parametrize(
    "case",
    EXPECTED["decode"],
    ids=lambda c: f"{len(c['ids'])}-{c['skip_special_tokens']}-{c['clean_up_tokenization_spaces']}",
)
def test_decode(tok, case):
    got = tok.decode(np.array(case["ids"]), skip_special_tokens=case["skip_special_tokens"],
                     clean_up_tokenization_spaces=case["clean_up_tokenization_spaces"])
    assert got == case["text"]


@pytest.mark.parametrize(
    "case", EXPECTED["batch"], ids=lambda c: f"{c['padding']}-{c['padding_side']}-{c['truncation']}"
)
def test_padded_batches(tok, case):
    out = tok(case["texts"], padding={"longest": True, "do_not_pad": False}.get(case["padding"], case["padding"]),
              padding_side=case["padding_side"], max_length=case["max_length"], truncation=case["truncation"],
              pad_to_multiple_of=case["pad_to_multiple_of"])
    if case["truncation_side"]:
        pytest.skip("per-call truncation_side is covered by the Rust tests")
    assert out["input_ids"] == case["input_ids"] and out["attention_mask"] == case["attention_mask"]


def test_special_tokens(tok):
    t = EXPECTED["tokenizer"]
    assert len(tok) == t["len"] if "len" in t else len(tok) == 49280
    assert tok.eos_token == "<end_of_utterance>" and tok.eos_token_id == 49279
    assert tok.convert_tokens_to_ids(["<image>", "<global-img>"]) == [49190, 49152]
    assert tok.convert_ids_to_tokens(49190) == "<image>"
    assert "<image>" in tok.additional_special_tokens
    assert tok.additional_special_tokens_ids == [tok.convert_tokens_to_ids(t) for t in tok.additional_special_tokens]


SMOLVLM_RENDERS = [
    c
    for c in EXPECTED["template_render"]
    if c["template"] == "smolvlm" and c["source"] == "tokenizer" and c["error"] is None
]


@pytest.mark.parametrize("case", SMOLVLM_RENDERS, ids=lambda c: c["case"])
def test_chat_template_renders(tok, case):
    got = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"], tokenize=False)
    assert got == case["rendered"]


def test_tokenize_true_returns_encoding(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert enc["input_ids"] == tok.encode(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        tok.apply_chat_template([], tokenize=False)
    with pytest.raises(TypeError):
        tok(12)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ProcessorError, match="tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)
