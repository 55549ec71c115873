"""QLoRA: SFTTrainer on a bitsandbytes-quantized base reproduces TRL + PEFT + bitsandbytes (fixtures from
scripts/reference/qlora_trajectory.py: the tiny model loaded in NF4 (double quant) or LLM.int8, PEFT's
prepare_model_for_kbit_training, the same starting LoRA adapter, rows and SFTConfig), and learns a task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    LoraConfig,
    PeftModel,
    SFTConfig,
    SFTTrainer,
    _core,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from test_sft_trainer import _colour_rows, colour_accuracy

QLORA = FIXTURES / "qlora"
# "nf4" and "int8" (TRL as is: it casts a quantized model's adapter to bfloat16 in SFTTrainer.__init__) stay in
# the fixtures for the record; ferrovlm keeps float32 adapters (README: QLoRA), compared here with TRL run so.
CASES = ["nf4_fp32_adapter", "int8_fp32_adapter"]
RTOL = 1e-3  # issue 11: loss and grad_norm per step within 1e-3 relative
NF4 = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
)


def quant_facts(case: str) -> dict:
    return json.loads((QLORA / case / "quant.json").read_text())


def load_rows():
    rows = json.loads((QLORA / "rows.json").read_text())
    for r in rows:
        r["images"] = [Image.open(QLORA / p).convert("RGB") for p in r["images"]]
    return rows


def load_base(tiny_smolvlm, case: str):
    return AutoModelForImageTextToText.from_pretrained(
        tiny_smolvlm, quantization_config=BitsAndBytesConfig(**quant_facts(case)["bnb_config_kwargs"])
    )


def saved_quantized_modules(model, tmp_path: Path) -> list[str]:
    """The modules a save_pretrained writes in bitsandbytes' quantized form (4-bit: `<m>.weight.quant_state.*`,
    LLM.int8: `<m>.SCB`), read from the safetensors header."""
    out = tmp_path / "saved"
    model.save_pretrained(out)
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    names = set()
    for k in header:
        if ".weight.quant_state." in k:
            names.add(k.split(".weight.quant_state.")[0])
        elif k.endswith(".SCB"):
            names.add(k[: -len(".SCB")])
    return sorted(names)


@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_quantized_modules_and_footprint_match_transformers(tiny_smolvlm, tmp_path, case):
    facts = quant_facts(case)
    model = load_base(tiny_smolvlm, case)
    assert (
        model.is_quantized
        and model.is_loaded_in_4bit == facts["is_loaded_in_4bit"]
        and model.is_loaded_in_8bit == facts["is_loaded_in_8bit"]
    )
    assert model._core.quantization[1] == len(facts["quantized_modules"])
    assert saved_quantized_modules(model, tmp_path) == sorted(facts["quantized_modules"])
    assert model.get_memory_footprint(return_buffers=False) == facts["memory_footprint_no_buffers"]
    assert model.get_memory_footprint() == facts["memory_footprint"]


def make_trainer(tiny_smolvlm, case: str, tmp_path):
    facts = quant_facts(case)
    args = json.loads((QLORA / case / "args.json").read_text())
    base = prepare_model_for_kbit_training(load_base(tiny_smolvlm, case), **facts["prepare_model_for_kbit_training"])
    model = PeftModel.from_pretrained(base, QLORA / "adapter", is_trainable=True)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path / "out"), **args),
        train_dataset=load_rows(),
        processing_class=processor,
    )
    if facts["adapter"] == "float32":
        # the reference put the adapter's float32 values back after SFTTrainer.__init__ (TRL casts a quantized
        # model's adapter to bfloat16 there); ferrovlm's adapters are float32 already
        assert facts["adapter_dtypes_trained"] == ["torch.float32"]
    return trainer


@pytest.mark.parametrize("case", CASES)
def test_log_history_matches_trl(tiny_smolvlm, tmp_path, case):
    trainer = make_trainer(tiny_smolvlm, case, tmp_path)
    out = trainer.train()
    got, want = trainer.state.log_history, json.loads((QLORA / case / "log_history.json").read_text())
    assert out.global_step == 3 and len(got) == len(want)
    table = "\n".join(
        f"step {i + 1}: loss {g.get('loss')} vs {w['loss']}, grad_norm {g.get('grad_norm')} vs {w['grad_norm']}"
        for i, (g, w) in enumerate(zip(got[:-1], want[:-1]))
    )
    for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for k in ("loss", "grad_norm", "entropy"):
            np.testing.assert_allclose(g[k], w[k], rtol=RTOL, err_msg=f"step {i + 1} {k}\n{table}")
        for k in ("learning_rate", "num_tokens", "epoch", "step"):
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, err_msg=f"step {i + 1} {k}")
        # argmax accuracy over ~340 label tokens: allow one token to flip on a near tie
        np.testing.assert_allclose(
            g["mean_token_accuracy"], w["mean_token_accuracy"], atol=1.01 / 330, err_msg=f"step {i + 1}"
        )
    np.testing.assert_allclose(got[-1]["train_loss"], want[-1]["train_loss"], rtol=RTOL)
    assert got[-1]["total_flos"] == want[-1]["total_flos"]  # a 4-bit weight counts its logical elements
    if quant_facts(case)["adapter"] == "float32":
        # Adam moves a weight by ~lr per step in the direction of its gradient's sign, whatever the gradient's size, so
        # a weight whose gradient is ~0 may move the other way on a tiny numerical difference: allow a few of those
        init = _core.load_safetensors(QLORA / "adapter" / "adapter_model.safetensors")
        final = _core.load_safetensors(QLORA / case / "adapter_final" / "adapter_model.safetensors")
        params = trainer.model.named_trainable_parameters()
        assert sorted(params) == sorted(final)
        off = {k: int((np.abs(params[k] - v) > 1e-4 + 1e-3 * np.abs(v)).sum()) for k, v in final.items()}
        n = sum(v.size for v in final.values())
        assert sum(off.values()) <= 0.005 * n, f"{sum(off.values())} of {n} adapter weights off: {off}"
        for k, v in final.items():  # and nothing moved further than 3 steps of lr the other way
            np.testing.assert_allclose(params[k], v, atol=3 * 2 * args_lr(case), err_msg=k)
            assert np.abs(v - init[k]).max() <= 3 * args_lr(case) * 1.01


def args_lr(case: str) -> float:
    return json.loads((QLORA / case / "args.json").read_text())["learning_rate"]


# -- QLoRA learns: the colour task of test_sft_trainer.py on an NF4 base ---------------------------------------------

def test_qlora_learns_a_generated_colour_task(tiny_smolvlm, tmp_path):
    rng = np.random.default_rng(0)
    train, held_out = _colour_rows(rng, 32), _colour_rows(rng, 16)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = False
    base = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, quantization_config=BitsAndBytesConfig(**NF4))
    assert base.is_loaded_in_4bit
    base = prepare_model_for_kbit_training(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        bf16=False,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=[{k: v for k, v in r.items() if k != "answer"} for r in train],
        processing_class=processor,
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0], losses
    assert trainer.model.base_model.model.is_loaded_in_4bit  # still the quantized base
    assert colour_accuracy(trainer.model, processor, held_out) >= 0.75  # chance is 0.25
