"""A VLM from parts: ``Idefics3Processor.from_text_model`` + ``Idefics3ForConditionalGeneration.from_text_model``.

The models of tests/vlm_parts_cases.py are built here (seeded) and compared with what transformers computed on
the same build saved to a folder (tests/fixtures/vlm_parts, scripts/reference/vlm_from_parts.py).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import ferrovlm
import vlm_parts_cases as cases
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    ConfigError,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaForCausalLM,
)
from ferrovlm.composition import IMAGE_TOKENS

FIX = cases.FIXTURES
needs_smollm2 = pytest.mark.skipif(not os.environ.get("SMOLLM2_GGUF"), reason="SMOLLM2_GGUF is not set")


@pytest.fixture(scope="module")
def tiny():
    return cases.build("llama_tiny")


def _fixture(case):
    inputs = dict(np.load(FIX / f"{case}.inputs.npz"))
    expected = dict(np.load(FIX / f"{case}.expected.npz"))
    meta = json.loads((FIX / f"{case}.json").read_text())
    return inputs, expected, meta


def _inputs(processor):
    prompts = processor.apply_chat_template(cases.conversations(), add_generation_prompt=True, tokenize=False)
    return prompts, processor(text=prompts, images=[[im] for im in cases.images()], return_tensors="np", padding=True)


def _check_tokenizer(processor, meta):
    tok = processor.tokenizer
    assert len(tok) == meta["len_tokenizer"]
    assert {t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS} == meta["token_ids"]
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == meta["bos_eos_pad_unk"]
    assert tok.eos_token_id == meta["eos_token_id"]
    assert tok.extra_special_tokens == meta["extra_special_tokens"]
    assert processor.image_seq_len == meta["image_seq_len"]
    ip = meta["image_processor"]
    assert processor.image_processor.size["longest_edge"] == ip["size_longest_edge"]
    assert processor.image_processor.max_image_size == ip["max_image_size"]
    assert processor.image_processor.do_image_splitting == ip["do_image_splitting"]


def _check_parity(model, processor, case, atol=1e-4):
    """Our processor gives transformers' inputs exactly, our model its logits within atol and its tokens."""
    inputs, expected, meta = _fixture(case)
    prompts, ours = _inputs(processor)
    assert prompts == meta["prompts"]
    for k, v in inputs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    logits = model(**inputs).logits
    if "logits" in expected:
        mask = inputs["attention_mask"].astype(bool)
        diff = np.abs(logits - expected["logits"])[mask].max()
    else:
        last = inputs["attention_mask"].sum(1) - 1
        diff = max(np.abs(logits[np.arange(len(last)), last] - expected["last"]).max(),
                   np.abs(logits[:, :, expected["col_ids"]] - expected["cols"]).max())
    assert diff < atol, diff
    one = processor(text=prompts[:1], images=[[cases.images()[0]]], return_tensors="np")
    out = model.generate(**one, max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(out[:, one["input_ids"].shape[1]:], expected["generated"])
    return diff


def test_tokenizer_gains_smolvlm_tokens():
    tok = AutoTokenizer.from_pretrained(FIX / "tokenizer_tiny")
    processor = Idefics3Processor.from_text_model(tok, **cases.CASES["llama_tiny"]["processor"])
    _check_tokenizer(processor, _fixture("llama_tiny")[2])
    assert processor.image_processor.size == {"longest_edge": 256}  # 4 x image_size with splitting
    new = processor.tokenizer
    assert [new.convert_tokens_to_ids(t) for t in IMAGE_TOKENS] == list(range(300, 340))
    assert new.encode("a<image>b<row_2_col_3>") == new.encode("a") + [338] + new.encode("b") + [309]
    assert new.decode([338, 339, 5], skip_special_tokens=True) == new.decode([5])
    assert len(tok) == 300 and tok.eos_token == "<|im_end|>"  # the tokenizer given is left as it was
    assert processor.image_seq_len == 4
    assert processor.chat_template == new.chat_template == ferrovlm.composition.SMOLVLM_CHAT_TEMPLATE
    plain = Idefics3Processor.from_text_model(tok, image_size=64)
    assert plain.image_processor.size == {"longest_edge": 64} and not plain.image_processor.do_image_splitting


def test_built_model_runs_and_matches_transformers(tiny):
    model, processor = tiny
    assert type(model) is Idefics3ForConditionalGeneration
    meta = _fixture("llama_tiny")[2]
    assert model.config.image_token_id == meta["config"]["image_token_id"] == 338
    assert model.config.text_config.vocab_size == meta["config"]["vocab_size"] == 340
    assert model.config.vision_config.patch_size == 16  # from the processor's image_seq_len
    assert model.generation_config.eos_token_id == meta["generation_eos_token_id"] == 339
    _check_parity(model, processor, "llama_tiny")
    loss = model(**_inputs(processor)[1], labels=_inputs(processor)[1]["input_ids"]).loss
    assert np.isfinite(loss)


def test_text_part_is_the_language_model(tiny, tmp_path):
    model, _ = tiny
    lm = LlamaForCausalLM.from_pretrained(cases.LLAMA_TINY)
    ids = np.array([[1, 40, 7, 250, 99, 2]])
    np.testing.assert_array_equal(model(input_ids=ids).logits[..., :300], lm(input_ids=ids).logits)
    # added rows: the old rows' mean (plus 1e-9-covariance noise), embedding and untied head alike
    model.save_pretrained(tmp_path)
    w = ferrovlm._core.load_safetensors(str(tmp_path / "model.safetensors"))
    for name in ("model.text_model.embed_tokens.weight", "lm_head.weight"):
        rows = w[name]
        assert rows.shape == (340, 48)
        np.testing.assert_allclose(rows[300:], np.broadcast_to(rows[:300].mean(0), (40, 48)), atol=2e-3, rtol=0)
    assert _fixture("llama_tiny")[2]["resize_vs_transformers"] < 2e-3


def test_save_and_reload(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    files = processor.save_pretrained(tmp_path)
    assert sorted(os.path.basename(f) for f in files) == [
        "chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["image_seq_len"] == 4 and cfg["processor_class"] == "Idefics3Processor"
    assert cfg["image_processor"]["max_image_size"] == {"longest_edge": 64}
    tcfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<end_of_utterance>" and tcfg["tokenizer_class"] == "TokenizersBackend"
    back = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(back) is Idefics3ForConditionalGeneration and type(proc) is Idefics3Processor
    _check_tokenizer(proc, _fixture("llama_tiny")[2])
    _, a = _inputs(processor)
    _, b = _inputs(proc)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(model(**a).logits, back(**b).logits)
    assert back.generation_config.eos_token_id == 339


def test_vision_tower_from_a_checkpoint():
    gqa = cases.ROOT / "tests" / "fixtures" / "idefics3_gqa" / "checkpoint"
    lm = LlamaForCausalLM.from_pretrained(cases.LLAMA_TINY)
    tok = AutoTokenizer.from_pretrained(FIX / "tokenizer_tiny")
    processor = Idefics3Processor.from_text_model(tok, image_size=64, patch_size=16, scale_factor=2)
    donor = Idefics3ForConditionalGeneration.from_pretrained(gqa)
    for source in (gqa, donor):
        model = Idefics3ForConditionalGeneration.from_text_model(lm, processor, vision_model=source, seed=1)
        _, inputs = _inputs(processor)
        px = inputs["pixel_values"][:1, :1]
        np.testing.assert_array_equal(model.get_image_features(px), donor.get_image_features(px))
    fresh = Idefics3ForConditionalGeneration.from_text_model(lm, processor, vision_model=gqa, reuse_connector=False)
    assert not np.array_equal(fresh.get_image_features(px), donor.get_image_features(px))
    with pytest.raises(ValueError, match="image_size=128"):
        Idefics3ForConditionalGeneration.from_text_model(lm, processor, vision_model=gqa, image_size=128)


def test_resize_token_embeddings():
    lm = LlamaForCausalLM.from_pretrained(cases.LLAMA_TINY)
    before = lm(input_ids=np.array([[1, 5, 9]])).logits
    assert lm.resize_token_embeddings(305, pad_to_multiple_of=8) == 312
    assert lm.config.vocab_size == 312
    after = lm(input_ids=np.array([[1, 5, 9]])).logits
    assert after.shape == (1, 3, 312)
    np.testing.assert_array_equal(after[..., :300], before)
    assert lm.resize_token_embeddings(200) == 200


def test_trains_with_sft_trainer(tiny, tmp_path):
    model, processor = tiny
    rows = [{"images": [im], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]}]} for im in cases.images()]
    trainer = ferrovlm.SFTTrainer(
        model=model, processing_class=processor, train_dataset=rows,
        args=ferrovlm.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1),
        peft_config=ferrovlm.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    out = trainer.train()
    assert out.global_step == 2 and np.isfinite(out.training_loss)


def test_bad_inputs():
    lm = LlamaForCausalLM.from_pretrained(cases.LLAMA_TINY)
    tok = AutoTokenizer.from_pretrained(FIX / "tokenizer_tiny")
    processor = Idefics3Processor.from_text_model(tok, image_size=64, patch_size=16, scale_factor=2)
    vc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    build = Idefics3ForConditionalGeneration.from_text_model
    with pytest.raises(ValueError, match="no '<image>' token"):
        build(lm, tok, vision_config=vc)
    with pytest.raises(TypeError, match="processor"):
        build(lm, vision_config=vc)
    with pytest.raises(ValueError, match="image_seq_len is 4"):
        build(lm, processor, vision_config={**vc, "patch_size": 8})
    with pytest.raises(ValueError, match="max_image_size is 64"):
        build(lm, processor, vision_config=vc, image_size=128)
    with pytest.raises(ValueError, match="scale_factor=3"):
        Idefics3Processor.from_text_model(tok, image_size=64, patch_size=16, scale_factor=3)
    with pytest.raises(ValueError, match="image_seq_len=5"):
        Idefics3Processor.from_text_model(tok, image_size=64, image_seq_len=5)
    with pytest.raises(ValueError, match="not both"):
        build(lm, processor, vision_config=vc, vision_model=cases.LLAMA_TINY)
    with pytest.raises(ValueError, match="'llama' model has no Idefics3 vision tower"):
        build(lm, processor, vision_model=cases.LLAMA_TINY)
    with pytest.raises(ConfigError, match="vision_config.num_attention_heads"):
        build(lm, processor, vision_config={**vc, "num_attention_heads": 5})
    vlm = build(lm, processor, vision_config=vc, seed=0)
    with pytest.raises(TypeError, match="language model alone"):
        build(vlm, processor, vision_config=vc)
    gqa = cases.ROOT / "tests" / "fixtures" / "idefics3_gqa" / "checkpoint"
    with pytest.raises(ConfigError, match="reuse_connector.*scale_factor is 2"):
        build(lm, Idefics3Processor.from_text_model(tok, image_size=64, scale_factor=4), vision_model=gqa,
              scale_factor=4, reuse_connector=True)
    with pytest.raises(ValueError, match="not a valid special token"):
        tok.add_special_tokens({"image_token": "<image>"})
    with pytest.raises(ValueError, match="positive integer"):
        lm.resize_token_embeddings(0)


@needs_smollm2
def test_smollm2_from_gguf(tmp_path):
    model, processor = cases.build("smollm2")
    meta = _fixture("smollm2")[2]
    assert meta["resize_vs_transformers"] < 1e-3
    _check_tokenizer(processor, meta)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 49190  # SmolVLM's id
    assert model.config.tie_word_embeddings and model.config.text_config.vocab_size == 49192
    assert model._core.quantization[0] is None  # GGUF blocks dequantized: a dense, trainable model
    _check_parity(model, processor, "smollm2")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    _check_tokenizer(proc, meta)
    inputs = _fixture("smollm2")[0]
    np.testing.assert_array_equal(model(**inputs).logits, back(**inputs).logits)
