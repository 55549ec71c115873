"""SFTTrainer on text data (TRL's dataset preparation + DataCollatorForLanguageModeling) reproduces TRL 1.16:
the prepared rows, every collated micro-batch and log_history step for step (fixtures from
scripts/reference/sft_text_trajectory.py: the same model, initial LoRA adapter, rows and SFTConfig).

SmolLM2 cases need the real GGUF file (SMOLLM2_GGUF, skipped otherwise); the llama_tiny cases always run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from ferrovlm import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LoraConfig,
    PeftModel,
    SFTConfig,
    SFTTrainer,
    _core,
)
from tiny_checkpoint import llama_lora_modules, write_lora_adapter

SFT = FIXTURES / "sft_text"
GGUF = os.environ.get("SMOLLM2_GGUF", "")
HAVE_GGUF = Path(GGUF).is_file()
KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step")
SMOLLM2_CASES = ["messages", "prompt_completion", "prompt_completion_plain", "text", "messages_assistant_only"]
TINY_CASES = ["tiny_pretokenized", "tiny_padding_free"]


def _param(case: str):
    marks = [] if case in TINY_CASES or HAVE_GGUF else [pytest.mark.skip(reason="SMOLLM2_GGUF is not set")]
    return pytest.param(case, marks=marks)


ALL_CASES = [_param(c) for c in SMOLLM2_CASES + TINY_CASES]


def load_case(name: str) -> dict:
    return json.loads((SFT / name / "case.json").read_text())


def load_model(model: str):
    if model == "smollm2":
        path = Path(GGUF)
        return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name),
                AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    return (AutoModelForCausalLM.from_pretrained(FIXTURES / "llama_tiny" / "checkpoint"),
            AutoTokenizer.from_pretrained(FIXTURES / "tokenizer" / "smolvlm"))


def make_trainer(name: str, tmp_path: Path, **overrides) -> SFTTrainer:
    case = load_case(name)
    base, tok = load_model(case["model"])
    if case.get("chat_template"):
        tok.chat_template = case["chat_template"]
    args = SFTConfig(output_dir=str(tmp_path / "out"), **{**case["args"], **overrides})
    if "peft_config" in case:
        return SFTTrainer(model=base, args=args, train_dataset=case["rows"], processing_class=tok,
                          peft_config=LoraConfig(**case["peft_config"]))
    recipe = case["adapter"]
    write_lora_adapter(tmp_path / "adapter", llama_lora_modules(base.config, recipe["target_modules"]), r=recipe["r"],
                       lora_alpha=recipe["lora_alpha"], target_modules=recipe["target_modules"], seed=recipe["seed"],
                       b_std=recipe["b_std"])
    model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    return SFTTrainer(model=model, args=args, train_dataset=case["rows"], processing_class=tok)


def trl_batches(name: str) -> list[dict[str, np.ndarray]]:
    data = np.load(SFT / name / "batches.npz")
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        k, field = key.split(".", 1)
        out.setdefault(int(k), {})[field] = data[key]
    return [out[k] for k in sorted(out)]


def steps(name: str) -> dict:
    return json.loads((SFT / name / "steps.json").read_text())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ---- preparation and collation: exact ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_CASES)
def test_prepared_rows_match_trl(tmp_path, name):
    trainer = make_trainer(name, tmp_path)
    want = json.loads((SFT / name / "prepared.json").read_text())
    got = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    assert got == want
    assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
    assert trainer.completion_only_loss == steps(name)["completion_only_loss"]
    assert trainer.data_collator.pad_token_id == steps(name)["pad_token_id"]


@pytest.mark.parametrize("name", ALL_CASES)
def test_every_collated_batch_matches_trl(tmp_path, name):
    trainer = make_trainer(name, tmp_path)
    info = steps(name)
    batches = trl_batches(name)
    assert len(batches) == len(info["micro_batches"])
    for k, (mb, want) in enumerate(zip(info["micro_batches"], batches)):
        got = trainer.data_collator(trainer._rows(trainer.train_dataset, mb["rows"]))
        assert sorted(k2 for k2, v in got.items() if isinstance(v, np.ndarray)) == sorted(want), k
        for key, v in want.items():
            np.testing.assert_array_equal(got[key], v, err_msg=f"micro-batch {k} {key}")
            assert got[key].dtype == v.dtype, (k, key, got[key].dtype, v.dtype)


@pytest.mark.parametrize("name", ALL_CASES)
def test_data_order_matches_trl(tmp_path, name):
    from ferrovlm.trainer import epoch_order

    trainer = make_trainer(name, tmp_path)
    info = steps(name)
    bs = trainer.args.per_device_train_batch_size
    n = len(trainer.train_dataset)
    order = []
    epoch = 0
    while len(order) < len(info["micro_batches"]):
        perm = epoch_order(n, trainer.args.seed, epoch)
        order += [perm[i : i + bs] for i in range(0, n, bs)]
        epoch += 1
    assert order[: len(info["micro_batches"])] == [mb["rows"] for mb in info["micro_batches"]]


# ---- training: TRL's numbers ---------------------------------------------------------------------------------

# llama_tiny: f32 weights on both sides (differences ~1e-7). SmolLM2: ferrovlm multiplies by the Q4_1 / Q8_0 blocks
# while transformers multiplies by their f32 dequantization; the sums round differently (the last-position logits
# agree to ~1e-3 absolute, see test_gguf_smollm2.py), which moves entropy and grad_norm by up to ~9e-5 relative.
RTOL = {"smollm2": 2e-4, "llama_tiny": 1e-4}


def _history_diffs(got: list[dict], want: list[dict], rtol: float) -> dict[str, float]:
    assert len(got) == len(want)
    worst: dict[str, float] = {}
    for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for k in KEYS:
            assert k in g, f"entry {i} lacks {k}: {g}"
            worst[k] = max(worst.get(k, 0.0), _rel(g[k], w[k]))
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=1e-7, err_msg=f"step {i + 1} {k}")
    np.testing.assert_allclose(got[-1]["train_loss"], want[-1]["train_loss"], rtol=rtol)
    assert got[-1]["total_flos"] == want[-1]["total_flos"]
    return worst


@pytest.mark.parametrize("name", ALL_CASES)
def test_trajectory_matches_trl(tmp_path, name):
    trainer = make_trainer(name, tmp_path)
    out = trainer.train()
    want = json.loads((SFT / name / "log_history.json").read_text())
    rtol = RTOL[load_case(name)["model"]]
    worst = _history_diffs(trainer.state.log_history, want, rtol)
    assert out.global_step == trainer.args.max_steps
    # the adapter after training: TRL's per-tensor norms
    got = trainer.model.named_trainable_parameters()
    adapter = steps(name)["adapter"]
    assert sorted(got) == sorted(k.replace(".default", "") for k in adapter)
    norm_diff = 0.0
    for k, (shape, _, final) in adapter.items():
        v = got[k.replace(".default", "")]
        assert list(v.shape) == shape
        norm_diff = max(norm_diff, _rel(float(np.linalg.norm(v.astype(np.float64))), final))
    assert norm_diff < rtol, norm_diff
    print(f"\n[{name}] max relative difference to TRL: {worst}, adapter norms {norm_diff:.2e}")


def test_saved_adapter_loads_back_and_matches_trl(tmp_path):
    name = "tiny_pretokenized"
    trainer = make_trainer(name, tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    trained = trainer.model.named_trainable_parameters()
    base, _ = load_model("llama_tiny")
    again = PeftModel.from_pretrained(base, tmp_path / "saved")
    loaded = again.named_trainable_parameters()
    assert sorted(loaded) == sorted(trained)
    for k, v in trained.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    # TRL's adapter after the same run (PEFT save_pretrained)
    want = _core.load_safetensors(SFT / name / "adapter_final" / "adapter_model.safetensors")
    assert sorted(want) == sorted(trained)
    for k, v in want.items():
        np.testing.assert_allclose(trained[k], v, rtol=1e-3, atol=2e-6, err_msg=k)
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


@pytest.mark.skipif(not HAVE_GGUF, reason="SMOLLM2_GGUF is not set")
def test_peft_config_path_first_step_matches_trl(tmp_path):
    """SFTTrainer(model=LlamaForCausalLM, peft_config=LoraConfig(...)): a fresh adapter (B = 0, so the first
    step's loss is the base model's) on PEFT's modules; the random A differs from torch's, so only step 1's loss
    and the parameter names are TRL's."""
    name = "peft_config"
    trainer = make_trainer(name, tmp_path)
    want_names = sorted(k.replace(".default", "") for k in steps(name)["adapter"])
    assert sorted(trainer.model.named_trainable_parameters()) == want_names
    trainer.train()
    want = json.loads((SFT / name / "log_history.json").read_text())
    got = trainer.state.log_history
    assert len(got) == len(want)
    np.testing.assert_allclose(got[0]["loss"], want[0]["loss"], rtol=1e-4)
    for k in ("entropy", "mean_token_accuracy", "num_tokens", "learning_rate"):
        np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-4, err_msg=k)
    assert all(np.isfinite(e["loss"]) and np.isfinite(e["grad_norm"]) for e in got[:-1])


@pytest.mark.skipif(not HAVE_GGUF, reason="SMOLLM2_GGUF is not set")
def test_assistant_only_loss_needs_generation_markers(tmp_path):
    """SmolLM2's own template has no {% generation %}: TRL cannot patch it and raises."""
    base, tok = load_model("smollm2")
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none")
    with pytest.raises(ValueError, match="not training-compatible"):
        SFTTrainer(model=base, args=args, train_dataset=load_case("messages")["rows"], processing_class=tok,
                   peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


# ---- rules on llama_tiny (always run; the SmolVLM tokenizer of the fixtures, ChatML templates below) -----------

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_GEN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


def tiny(tmp_path, rows, template=CHATML, **args):
    base, tok = load_model("llama_tiny")
    tok.chat_template = template
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", **args)
    return SFTTrainer(model=base, args=cfg, train_dataset=rows, processing_class=tok,
                      peft_config=LoraConfig(r=2, target_modules=["q_proj"]))


def test_collator_follows_trls_docstring_examples():
    c = DataCollatorForLanguageModeling(pad_token_id=0)
    out = c([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert list(out) == ["input_ids", "labels", "attention_mask"]
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 3], [4, 5, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(out["labels"], [[1, 2, 3], [4, 5, -100]])
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    np.testing.assert_array_equal(c(rows)["labels"], [[-100, 2, 3], [-100, 5, -100]])
    out = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert list(out) == ["input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                         "max_length_k", "seq_idx"]
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(out["labels"], [[-100, 2, 3, -100, 5]])
    np.testing.assert_array_equal(out["cu_seq_lens_q"], [0, 3, 5])
    assert out["cu_seq_lens_q"].dtype == np.int32 and out["max_length_q"] == 3
    np.testing.assert_array_equal(out["seq_idx"], [[0, 0, 0, 1, 1]])
    out = DataCollatorForLanguageModeling(pad_token_id=9, pad_to_multiple_of=4, return_position_ids=True)(rows)
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 3, 9], [4, 5, 9, 9]])
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 0], [0, 1, 0, 0]])
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]}])
    np.testing.assert_array_equal(packed["position_ids"], [[0, 1, 0, 1, 2]])
    np.testing.assert_array_equal(packed["labels"], [[-100, 2, -100, 4, 5]])


def test_collator_torch_tensors():
    torch = pytest.importorskip("torch")
    out = DataCollatorForLanguageModeling(pad_token_id=0, return_tensors="pt")([{"input_ids": [1, 2]}])
    assert isinstance(out["input_ids"], torch.Tensor) and out["input_ids"].dtype == torch.int64


def test_text_rows_get_eos_and_full_labels(tmp_path):
    rows = [{"text": "hello world"}, {"text": "already ends<end_of_utterance>"}]
    tr = tiny(tmp_path, rows)
    tok = tr.processing_class
    eos = tok.eos_token_id
    a, b = tr.train_dataset
    assert a["input_ids"] == tok("hello world<end_of_utterance>")["input_ids"] and a["input_ids"][-1] == eos
    assert b["input_ids"].count(eos) == 1
    assert a["labels"] == a["input_ids"] and not tr.completion_only_loss


def test_dataset_text_field_and_formatting_func(tmp_path):
    tr = tiny(tmp_path, [{"body": "abc"}], dataset_text_field="body")
    assert tr.train_dataset[0]["input_ids"] == tr.processing_class("abc<end_of_utterance>")["input_ids"]
    base, tok = load_model("llama_tiny")
    cfg = SFTConfig(output_dir=str(tmp_path / "f"), report_to="none")
    tr = SFTTrainer(model=base, args=cfg, train_dataset=[{"q": "x", "a": "y"}], processing_class=tok,
                    peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
                    formatting_func=lambda r: f"Q: {r['q']} A: {r['a']}")
    assert tr.train_dataset[0]["input_ids"] == tok("Q: x A: y<end_of_utterance>")["input_ids"]


def test_plain_prompt_completion_masks_the_prompt(tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."}]
    tr = tiny(tmp_path, rows)
    tok = tr.processing_class
    r = tr.train_dataset[0]
    p = tok("The sky is")["input_ids"]
    assert r["input_ids"] == tok("The sky is blue.<end_of_utterance>")["input_ids"]
    assert r["labels"] == [-100] * len(p) + r["input_ids"][len(p):]
    tr = tiny(tmp_path, rows, completion_only_loss=False)
    assert tr.train_dataset[0]["labels"] == r["input_ids"]


def test_conversational_prompt_completion_uses_the_generation_prompt(tmp_path):
    rows = [{"prompt": CONV[:1], "completion": CONV[1:2]}]
    tr = tiny(tmp_path, rows)
    tok = tr.processing_class
    r = tr.train_dataset[0]
    p = tok.apply_chat_template(CONV[:1], add_generation_prompt=True)["input_ids"]
    assert r["input_ids"] == tok.apply_chat_template(CONV[:2])["input_ids"]  # no eos appended
    assert r["labels"][: len(p)] == [-100] * len(p) and r["labels"][len(p):] == r["input_ids"][len(p):]


def test_sharegpt_rows_are_converted_to_chatml(tmp_path):
    rows = [{"conversations": [{"from": m["role"], "value": m["content"]} for m in CONV]}]
    tr = tiny(tmp_path, rows)
    assert tr.train_dataset[0]["input_ids"] == tr.processing_class.apply_chat_template(CONV)["input_ids"]


def test_max_length_truncates_and_drops_fully_masked_rows(tmp_path):
    rows = [{"input_ids": list(range(3, 23)), "completion_mask": [0] * 18 + [1] * 2},
            {"input_ids": list(range(40, 52)), "completion_mask": [0] * 4 + [1] * 8}]
    tr = tiny(tmp_path, rows, completion_only_loss=True, max_length=10)
    assert [r["input_ids"] for r in tr.train_dataset] == [list(range(40, 50))]
    assert tr.train_dataset[0]["labels"] == [-100] * 4 + list(range(44, 50))
    tr = tiny(tmp_path, rows, completion_only_loss=True, max_length=10, truncation_mode="keep_end")
    assert [r["input_ids"] for r in tr.train_dataset] == [list(range(13, 23)), list(range(42, 52))]
    # labels given: used as they are
    tr = tiny(tmp_path, [{"input_ids": [5, 6, 7], "labels": [-100, 6, -100]}])
    assert tr.train_dataset[0]["labels"] == [-100, 6, -100]


def test_assistant_only_loss_masks_what_generation_blocks_render(tmp_path):
    tr = tiny(tmp_path, [{"messages": CONV}], template=CHATML_GEN, assistant_only_loss=True)
    tok = tr.processing_class
    r = tr.train_dataset[0]
    kept = [t for t in r["labels"] if t != -100]
    assert tok.decode(kept) == "Hello, friend.<|im_end|>See you.<|im_end|>"
    out = tok.apply_chat_template(CONV, chat_template=CHATML_GEN, return_assistant_tokens_mask=True)
    assert out["input_ids"] == r["input_ids"]
    assert [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])] == r["labels"]


def test_assistant_only_loss_errors_like_trl(tmp_path):
    with pytest.raises(ValueError, match="not training-compatible"):
        tiny(tmp_path, [{"messages": CONV}], template=CHATML, assistant_only_loss=True)
    with pytest.raises(ValueError, match="not conversational"):
        tiny(tmp_path, [{"text": "abc"}], template=CHATML_GEN, assistant_only_loss=True)
    no_assistant = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                    "{% if false %}{% generation %}{% endgeneration %}{% endif %}")
    with pytest.raises(RuntimeError, match="no assistant tokens"):
        tiny(tmp_path, [{"messages": CONV}], template=no_assistant, assistant_only_loss=True)


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        tiny(tmp_path, [{"input_ids": [5, 6]}], padding_free=True)
    with pytest.raises(NotImplementedError, match="packing"):
        tiny(tmp_path, [{"input_ids": [5, 6]}], packing=True, max_length=8)
    with pytest.raises(ValueError, match="eos_token"):
        tiny(tmp_path, [{"text": "a"}], eos_token="<not a token>")


def test_evaluate_prepares_a_text_eval_dataset(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11]}]
    tr = tiny(tmp_path, rows, eval_strategy="no")
    m = tr.evaluate(eval_dataset=[{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [12, 13]}])
    assert np.isfinite(m["eval_loss"]) and "eval_entropy" in m


def test_assistant_tokens_mask_matches_transformers():
    """apply_chat_template(return_assistant_tokens_mask=True): transformers' masks (every token overlapping a
    {% generation %} span, by its offsets) for padding and truncation on both sides."""
    ref = json.loads((SFT / "assistant_masks.json").read_text())
    for case in ref["cases"]:
        tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer" / "smolvlm")
        tok.padding_side, tok.truncation_side = case["padding_side"], case["truncation_side"]
        out = tok.apply_chat_template(ref["conversations"], chat_template=ref["chat_template"], tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True, **case["kwargs"])
        assert [list(r) for r in out["input_ids"]] == case["input_ids"], case["kwargs"]
        assert [list(r) for r in out["assistant_masks"]] == case["assistant_masks"], case
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer" / "smolvlm")
    with pytest.raises(ValueError, match="return_dict"):
        tok.apply_chat_template(ref["conversations"][0], chat_template=ref["chat_template"], tokenize=False,
                                return_assistant_tokens_mask=True)
