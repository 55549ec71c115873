"""LlamaForCausalLM / AutoModelForCausalLM: a language model alone (SmolLM2), matching transformers'
logits, loss and greedy ids on a tiny random checkpoint (scripts/reference/llama_tiny.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES, IDEFICS3
from ferrovlm import (
    AutoModelForCausalLM,
    AutoModelForVision2Seq,
    Idefics3ForConditionalGeneration,
    InputError,
    LlamaConfig,
    LlamaForCausalLM,
    LoraConfig,
    get_peft_model,
)

LLAMA = FIXTURES / "llama_tiny"
INPUTS = dict(np.load(LLAMA / "inputs.npz"))
EXPECTED = dict(np.load(LLAMA / "expected.npz"))


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(LLAMA / "checkpoint", dtype="float32")


def test_auto_class_picks_llama_and_its_config(model):
    assert type(model) is LlamaForCausalLM
    assert isinstance(model.config, LlamaConfig)
    assert model.config.hidden_size == 48 and model.config.num_key_value_heads == 2
    assert not hasattr(model.config, "vision_config")
    assert model.generation_config.eos_token_id == 299


def test_logits_and_loss_match_transformers(model):
    out = model(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"], labels=INPUTS["labels"])
    mask = INPUTS["attention_mask"].astype(bool)
    np.testing.assert_allclose(out.logits[mask], EXPECTED["logits"][mask], rtol=1e-4, atol=1e-4)
    assert out.loss == pytest.approx(float(EXPECTED["loss"]), rel=1e-5)


def test_greedy_ids_match_transformers(model):
    out = model.generate(input_ids=INPUTS["left_ids"], attention_mask=INPUTS["left_mask"], max_new_tokens=8)
    np.testing.assert_array_equal(out[:, INPUTS["left_ids"].shape[1] :], EXPECTED["generated"])


def test_module_names_are_llamas_and_lora_attaches():
    base = LlamaForCausalLM.from_pretrained(LLAMA / "checkpoint", dtype="float32")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = list(peft.named_trainable_parameters())  # PEFT's saved keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert not any("text_model" in n or "vision" in n for n in names)
    # B starts at zero: the adapted model computes what the base does
    out = peft(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"])
    mask = INPUTS["attention_mask"].astype(bool)
    np.testing.assert_allclose(out.logits[mask], EXPECTED["logits"][mask], rtol=1e-4, atol=1e-4)


def test_pixel_values_are_refused_with_a_clear_error(model):
    px = np.zeros((1, 1, 3, 8, 8), np.float32)
    with pytest.raises(InputError, match="without a vision tower"):
        model(input_ids=INPUTS["input_ids"][:1], pixel_values=px)


def test_wrong_classes_refuse_the_checkpoint():
    with pytest.raises(ValueError, match="Unrecognized configuration class LlamaConfig"):
        AutoModelForVision2Seq.from_pretrained(LLAMA / "checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded into Idefics3ForConditionalGeneration"):
        Idefics3ForConditionalGeneration.from_pretrained(LLAMA / "checkpoint")
    with pytest.raises(ValueError, match="Unrecognized configuration class Idefics3Config"):
        AutoModelForCausalLM.from_pretrained(IDEFICS3 / "checkpoint")
