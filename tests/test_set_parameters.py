"""Setting a parameter's values, as torch users do with ``param.copy_(x)`` under ``no_grad`` or ``param.data = x``
(for example to initialise a fresh module their own way): the model then computes exactly what the same
checkpoint with those values written into its safetensors file computes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ferrovlm

POS = "model.vision_model.embeddings.position_embedding.weight"
EMBED = "model.text_model.embed_tokens.weight"
Q = "model.text_model.layers.0.self_attn.q_proj.weight"
PATCH = "model.vision_model.embeddings.patch_embedding.weight"


def _inputs(path):
    processor = ferrovlm.AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    return dict(processor(text=[text], images=[[image]], return_tensors="np"))


def _logits(model, inputs):
    return np.asarray(model(**inputs).logits)


def test_set_values_compute_as_the_edited_checkpoint(tiny_smolvlm, tmp_path):
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="float32")
    rng = np.random.default_rng(1)
    new = {name: rng.normal(0, 0.3, size=model.get_parameter(name).shape).astype(np.float32)
           for name in (POS, EMBED, Q, PATCH)}
    model.get_parameter(POS).copy_(new[POS])
    model.get_parameter(EMBED).data = new[EMBED]  # tied: the output head follows
    model.get_parameter(Q).copy_(new[Q].tolist())  # any array-like
    model.get_parameter(PATCH).copy_(new[PATCH])  # a Conv2d weight, in its checkpoint shape

    edited = tmp_path / "edited"
    shutil.copytree(tiny_smolvlm, edited)
    tensors = load_file(edited / "model.safetensors")
    for name, value in new.items():
        assert tensors[name].shape == value.shape
        tensors[name] = value.astype(tensors[name].dtype)  # bf16 on disk: rounded as the model stores it
    save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    reference = ferrovlm.AutoModelForImageTextToText.from_pretrained(edited, dtype="float32")

    for name in new:
        np.testing.assert_array_equal(model.get_parameter(name).data, reference.get_parameter(name).data)
    inputs = _inputs(tiny_smolvlm)
    np.testing.assert_array_equal(_logits(model, inputs), _logits(reference, inputs))
    before = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="float32")
    assert np.abs(_logits(before, inputs) - _logits(model, inputs)).max() > 1e-3  # the values were used


def test_bad_values_are_refused_with_the_parameter_named(tiny_smolvlm):
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="float32")
    p = model.get_parameter(POS)
    before = p.data
    with pytest.raises(ferrovlm.InputError, match=rf"'{POS}' has shape \[{p.shape[0]}, {p.shape[1]}\]; the value "
                       rf"given has shape \[{p.shape[1]}, {p.shape[0]}\]"):
        p.copy_(np.zeros(p.shape[::-1], np.float32))
    np.testing.assert_array_equal(p.data, before)  # nothing changed
    quantized = ferrovlm.AutoModelForImageTextToText.from_pretrained(
        tiny_smolvlm, quantization_config=ferrovlm.BitsAndBytesConfig(load_in_4bit=True))
    q = quantized.get_parameter(Q)
    with pytest.raises(ferrovlm.InputError, match=f"'{Q}' is stored quantized"):
        q.copy_(np.zeros(q.shape, np.float32))
    with pytest.raises(ferrovlm.InputError, match="the model has no parameter 'model.nope.weight'"):
        model._core.set_parameter("model.nope.weight", np.zeros((2, 2), np.float32))
