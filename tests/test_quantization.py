"""bitsandbytes quantization: BitsAndBytesConfig, quantizing while loading, bitsandbytes' files in and out,
QLoRA surface. Reference values: scripts/reference/bnb_quant.py (transformers 5.24 + bitsandbytes 0.50.2 on
CPU, fp32, eager attention) in tests/fixtures/bnb/."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import ferrovlm
from conftest import FIXTURES
from ferrovlm import AutoModelForVision2Seq, BitsAndBytesConfig, CheckpointError, LoraConfig, get_peft_model

BNB = FIXTURES / "bnb"
BASE = BNB / "base"
CASES = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True),
    "int8": dict(load_in_8bit=True),
}


def _inputs():
    inp = dict(np.load(BASE / "inputs.npz"))
    feed = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    return feed, inp["attention_mask"].astype(bool)


def _facts(case):
    return json.loads((BNB / case / "facts.json").read_text())


# -- BitsAndBytesConfig -------------------------------------------------------------------------------


def test_config_defaults_and_dict_form_match_transformers():
    c = BitsAndBytesConfig(load_in_4bit=True)
    assert (c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant, c.bnb_4bit_compute_dtype) == ("fp4", False, "float32")
    assert (c.llm_int8_threshold, c.llm_int8_skip_modules, c.bnb_4bit_quant_storage) == (6.0, None, "uint8")
    d = c.to_dict()
    # the exact key set transformers writes into config.json
    assert set(d) == set(_facts("fp4")["quantization_config"])
    assert d["quant_method"] == "bitsandbytes" and d["load_in_4bit"] is True and d["_load_in_4bit"] is True
    again = BitsAndBytesConfig.from_dict(d)
    assert again == c and again.quantization_method() == "fp4"
    assert BitsAndBytesConfig.from_dict(_facts("nf4_dq")["quantization_config"]).quantization_method() == "nf4"


def test_compute_dtype_accepts_strings_and_torch_dtypes():
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16").bnb_4bit_compute_dtype == "bfloat16"
    torch = pytest.importorskip("torch")
    c = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    assert c.to_dict()["bnb_4bit_compute_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), ValueError, "both True"),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf3"), ValueError, "bnb_4bit_quant_type"),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype="int8"), ValueError, "bnb_4bit_compute_dtype"),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype=3), ValueError, "bnb_4bit_compute_dtype"),
        (dict(load_in_8bit=True, llm_int8_threshold=6), TypeError, "llm_int8_threshold"),
        (dict(load_in_8bit=True, llm_int8_skip_modules="lm_head"), TypeError, "llm_int8_skip_modules"),
        (dict(load_in_4bit="yes"), TypeError, "load_in_4bit"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BitsAndBytesConfig(**kwargs)


def test_setting_the_other_mode_later_is_refused():
    c = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="both True"):
        c.load_in_8bit = True


# -- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_checkpoint_saved_by_transformers_and_bitsandbytes_loads_without_requantizing(case):
    feed, valid = _inputs()
    want = np.load(BNB / case / "expected.npz")["logits"]
    model = AutoModelForVision2Seq.from_pretrained(BNB / case / "checkpoint")
    assert (
        model.is_quantized
        and model.is_loaded_in_4bit == (case != "int8")
        and model.is_loaded_in_8bit == (case == "int8")
    )
    got = model(**feed).logits
    # 4-bit: the same dequantized weights, so only the f32 summation order differs (1e-5).
    # int8: LLM.int8's int32 products are exact; rescaling and the outlier columns are f32 (1e-4).
    tol = 1e-4 if case == "int8" else 2e-5
    np.testing.assert_allclose(got[valid], want[valid], rtol=tol, atol=tol)
    assert model.get_memory_footprint() == _facts(case)["memory_footprint"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantizing_while_loading_matches_transformers(case):
    feed, valid = _inputs()
    want = np.load(BNB / case / "expected.npz")["logits"]
    model = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(**CASES[case]))
    got = model(**feed).logits
    # FP4 / NF4 codes and absmax are bitsandbytes' bit for bit; with double quantization bitsandbytes'
    # CPU kernel rounds ~1 in 100 absmax codes lying near a midpoint the other way (tests/quant.rs),
    # which moves those blocks' scales by one step of the 8-bit map: 1e-3 on these logits.
    tol = {"fp4": 2e-5, "nf4_dq": 1e-3, "int8": 1e-4}[case]
    np.testing.assert_allclose(got[valid], want[valid], rtol=tol, atol=tol)
    assert model.get_memory_footprint() == _facts(case)["memory_footprint"]
    assert model.config.quantization_config["quant_method"] == "bitsandbytes"


def test_quantized_modules_are_those_transformers_quantizes():
    """Every Linear of the vision tower, connector and text model; never lm_head (nor llm_int8_skip_modules)."""
    for case in CASES:
        m = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(**CASES[case]))
        assert ferrovlm._core.quantized_linear_names(m._core) == _facts(case)["quantized_modules"]
    skip = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_model", "o_proj"])
    names = ferrovlm._core.quantized_linear_names(
        AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=skip)._core
    )
    assert names and not any("vision_model" in n or n.endswith("o_proj") for n in names)


def test_nf4_weights_take_a_fifth_of_fp32s_bytes():
    fp32 = AutoModelForVision2Seq.from_pretrained(BASE)
    nf4 = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(**CASES["nf4_dq"]))
    lin32 = fp32.get_memory_footprint() - nf4.get_memory_footprint()
    assert lin32 > 0 and nf4.get_memory_footprint() < fp32.get_memory_footprint()


def test_legacy_load_in_4bit_keyword_and_dict_config():
    with pytest.warns(FutureWarning, match="deprecated"):
        m = AutoModelForVision2Seq.from_pretrained(BASE, load_in_4bit=True)
    assert m.is_loaded_in_4bit and m.config.quantization_config["bnb_4bit_quant_type"] == "fp4"
    m = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config={"load_in_8bit": True})
    assert m.is_loaded_in_8bit
    with pytest.raises(ValueError, match="at the same time"):
        AutoModelForVision2Seq.from_pretrained(
            BASE, load_in_4bit=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
        )


def test_tutorial_load_cells_run():
    """The tutorials' 4-bit load (device_map, bf16 dtype, flash attention asked for) then .to(device)."""
    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"
    )
    with pytest.warns(UserWarning, match="flash_attention_2"):
        model = ferrovlm.Idefics3ForConditionalGeneration.from_pretrained(
            BASE,
            device_map="auto",
            torch_dtype="bfloat16",
            quantization_config=cfg,
            _attn_implementation="flash_attention_2",
        )
    assert model.to("cpu") is model
    with pytest.raises(ValueError, match="not supported for `4-bit`"):
        model.to("float16")
    feed, valid = _inputs()
    out = model(**feed).logits
    assert np.isfinite(out[valid]).all()


# -- saving ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_pretrained_writes_bitsandbytes_form_that_loads_back(case, tmp_path):
    from safetensors.numpy import load_file

    m = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(**CASES[case]))
    m.save_pretrained(tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    theirs = load_file(BNB / case / "checkpoint" / "model.safetensors")
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        if k.endswith("quant_state.bitsandbytes__nf4") or k.endswith("quant_state.bitsandbytes__fp4"):
            a, b = json.loads(bytes(ours[k])), json.loads(bytes(v))
            assert a.keys() == b.keys() and {x: a[x] for x in a if x != "nested_offset"} == {
                x: b[x] for x in b if x != "nested_offset"
            }
    if case == "fp4":  # no double quantization: every byte equals transformers' file
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[k], v, err_msg=k)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    feed, _ = _inputs()
    again = AutoModelForVision2Seq.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(**feed).logits, m(**feed).logits)


def test_prequantized_checkpoint_missing_a_quant_state_key_names_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(BNB / "nf4_dq" / "checkpoint", dst)
    t = load_file(dst / "model.safetensors")
    del t["model.text_model.layers.1.mlp.up_proj.weight.nested_absmax"]
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.text_model.layers.1.mlp.up_proj.weight.nested_absmax"):
        AutoModelForVision2Seq.from_pretrained(dst)


def test_prequantized_checkpoint_with_a_wrong_shape_names_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(BNB / "int8" / "checkpoint", dst)
    t = load_file(dst / "model.safetensors")
    t["model.text_model.layers.0.self_attn.q_proj.SCB"] = t["model.text_model.layers.0.self_attn.q_proj.SCB"][:-1]
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj\.SCB.*shape"):
        AutoModelForVision2Seq.from_pretrained(dst)


# -- QLoRA surface -----------------------------------------------------------------------------------------


def test_full_fine_tuning_of_a_quantized_model_is_refused(tmp_path):
    m = AutoModelForVision2Seq.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(**CASES["nf4_dq"]))
    with pytest.raises(ValueError, match="purely quantized models"):
        ferrovlm.SFTTrainer(
            model=m,
            args=ferrovlm.SFTConfig(output_dir=str(tmp_path), report_to="none"),
            train_dataset=[{"messages": []}],
            processing_class=object(),
        )


def test_prepare_model_for_kbit_training_then_dora_as_the_cookbook(tmp_path):
    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"
    )
    m = AutoModelForVision2Seq.from_pretrained(BASE, torch_dtype="bfloat16", quantization_config=cfg)
    m = ferrovlm.prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    assert m.is_gradient_checkpointing
    peft_config = LoraConfig(
        r=8,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
        use_dora=True,
        init_lora_weights="gaussian",
    )
    pm = get_peft_model(m, peft_config)
    shapes = dict(ferrovlm._core.trainable_shapes(pm._core))
    assert any(k.endswith("lora_magnitude_vector") for k in shapes)
    feed, valid = _inputs()
    assert np.isfinite(pm(**feed).logits[valid]).all()
    # PEFT's merge into a bitsandbytes layer: the merged weight is quantized again
    merged = pm.merge_and_unload()
    assert merged.is_loaded_in_4bit
