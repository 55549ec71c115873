"""LoraConfig / SFTConfig / DPOConfig against PEFT 0.21 / TRL 1.16 (fixtures from
scripts/reference/sft_collate.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ferrovlm.peft_config import (
    LoraConfig,
    TaskType,
    resolve_modules_to_save,
    resolve_target_modules,
    saved_target_modules,
)
from ferrovlm.sft_config import DPOConfig, SFTConfig

PEFT = Path(__file__).parent / "fixtures" / "sft_collate" / "peft"
MODULES = json.loads((PEFT / "modules.json").read_text())
CASES = sorted(p.name for p in PEFT.iterdir() if p.is_dir())


def _norm(d):
    d = dict(d)
    for k in ("target_modules", "exclude_modules"):
        if isinstance(d.get(k), list):
            d[k] = sorted(d[k])
    return d


# ---- LoraConfig -----------------------------------------------------------------------------------------------

def test_lora_defaults_and_typeerror():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules, c.bias, c.task_type) == (8, 8, 0.0, None, "none", None)
    assert (c.use_dora, c.use_rslora, c.init_lora_weights, c.modules_to_save) == (False, False, True, None)
    with pytest.raises(TypeError, match="lora_alpah"):
        LoraConfig(lora_alpah=16)
    c = LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert c.target_modules == {"q_proj", "v_proj"} and c.task_type == TaskType.CAUSAL_LM == "CAUSAL_LM"
    with pytest.raises(ValueError):
        LoraConfig(task_type="NOPE")
    with pytest.raises(ValueError):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


@pytest.mark.parametrize("case", CASES)
def test_adapter_config_json_matches_peft(case):
    kw = json.loads((PEFT / case / "kwargs.json").read_text())
    want = json.loads((PEFT / case / "adapter_config.json").read_text())
    cfg = LoraConfig(**kw)
    if case == "default":
        got = cfg.to_dict()
    else:
        targeted = resolve_target_modules(cfg, MODULES["linear"], all_module_names=MODULES["all"])
        cfg.target_modules = saved_target_modules(cfg, targeted, MODULES["all"])
        got = cfg.adapter_config("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert _norm(got) == _norm(want)
    # and back
    assert _norm(LoraConfig.from_dict(want).to_dict()) == _norm(want)
    assert set(json.loads(cfg.to_json_string())) == set(want)


@pytest.mark.parametrize("case", [c for c in CASES if c != "default"])
def test_targets_match_peft(case):
    kw = json.loads((PEFT / case / "kwargs.json").read_text())
    want = json.loads((PEFT / case / "targets.json").read_text())
    cfg = LoraConfig(**kw)
    got = resolve_target_modules(cfg, MODULES["linear"], output_layer_names=[MODULES["output_embeddings"]])
    assert sorted(got) == want["targeted"]
    wrapped = ["base_model.model." + n for n in resolve_modules_to_save(cfg, MODULES["all"])]
    assert wrapped == want["modules_to_save_wrapped"]


def test_all_linear_includes_vision_and_connector():
    got = resolve_target_modules(LoraConfig(target_modules="all-linear"), MODULES["linear"])
    assert "lm_head" not in got and "model.connector.modality_projection.proj" in got
    assert any(".vision_model." in n for n in got) and len(got) == len(MODULES["linear"]) - 1


def test_lora_from_pretrained_and_save(tmp_path):
    cfg = LoraConfig.from_pretrained(PEFT / "regex")
    assert cfg.r == 2 and cfg.target_modules == r".*text_model.*\.(q_proj|v_proj)" and cfg.inference_mode is True
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == json.loads(
        (PEFT / "regex" / "adapter_config.json").read_text()
    )
    with pytest.raises(ValueError):
        resolve_target_modules(LoraConfig(target_modules=["nothing_like_this"]), MODULES["linear"])


# ---- SFTConfig / DPOConfig ------------------------------------------------------------------------------------

def test_sft_defaults():
    c = SFTConfig(output_dir="out")
    assert c.learning_rate == 2e-5 and c.logging_steps == 10 and c.max_length == 1024
    assert c.gradient_checkpointing is True and c.bf16 is True and c.completion_only_loss is None
    assert c.assistant_only_loss is False and c.dataset_text_field == "text" and c.pad_to_multiple_of is None
    assert (
        c.report_to == [] and c.save_strategy == "steps" and c.eval_strategy == "no" and c.optim == "adamw_torch_fused"
    )
    assert c.per_device_train_batch_size == 8 and c.num_train_epochs == 3.0 and c.seed == 42 and c.max_grad_norm == 1.0
    assert SFTConfig().output_dir == "trainer_output"
    assert SFTConfig("pos").output_dir == "pos"


def test_sft_typeerror_mutable_and_derived():
    with pytest.raises(TypeError, match="per_device_train_batchsize"):
        SFTConfig(output_dir="o", per_device_train_batchsize=2)
    c = SFTConfig(output_dir="o", eval_strategy="steps", logging_steps=0.25, fp16=False, bf16=False, save_steps=0.5)
    assert c.eval_steps == 0.25 and c.do_eval is True
    assert c.resolved_steps(100) == {"logging_steps": 25, "eval_steps": 25, "save_steps": 50}
    c.max_length = 77
    assert c.max_length == 77
    with pytest.raises(ValueError):
        SFTConfig(output_dir="o", fp16=True, bf16=True)
    with pytest.raises(ValueError):
        SFTConfig(output_dir="o", logging_steps=2.5)
    assert SFTConfig(output_dir="o", fp16=True).bf16 is False


def test_legacy_spellings_and_no_effect_warning():
    with pytest.warns(FutureWarning):
        c = SFTConfig(output_dir="o", warmup_ratio=0.1)
    assert c.warmup_steps == 0.1 and c.get_warmup_steps(95) == 10
    assert SFTConfig(output_dir="o", warmup_steps=7).get_warmup_steps(95) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert SFTConfig(output_dir="o", max_seq_length=256).max_length == 256
        assert SFTConfig(output_dir="o", evaluation_strategy="epoch").eval_strategy == "epoch"
    with pytest.warns(UserWarning, match="changes nothing"):
        SFTConfig(output_dir="o", dataloader_num_workers=4)
    with warnings.catch_warnings():  # the data-parallel settings do change something (distributed.py)
        warnings.simplefilter("error")
        DPOConfig(output_dir="o", ddp_backend="gloo", ddp_timeout=60, ddp_bucket_cap_mb=1)


def test_dpo_config():
    d = DPOConfig(output_dir="o")
    assert d.beta == 0.1 and d.loss_type == ["sigmoid"] and d.loss_weights is None and d.label_smoothing == 0.0
    assert d.learning_rate == 1e-6 and d.precompute_ref_log_probs is False and d.max_length == 1024
    assert DPOConfig(output_dir="o", loss_type="ipo").loss_type == ["ipo"]
    with pytest.raises(ValueError):
        DPOConfig(output_dir="o", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = DPOConfig(output_dir="o", rpo_alpha=0.5)
    assert r.loss_type == ["sigmoid", "sft"] and r.loss_weights == [1.0, 0.5] and r.rpo_alpha_weight == 0.5
    with pytest.raises(TypeError, match="betta"):
        DPOConfig(output_dir="o", betta=0.2)


def test_dpo_config_accepts_exactly_the_core_losses():
    """The supported loss names come from the core (one list); TRL's losses that the core does not implement
    are refused when the config is built, not at the first training step."""
    from ferrovlm import _core

    supported = _core.dpo_loss_types()
    assert {"sigmoid", "ipo", "hinge", "robust", "sft"} <= set(supported)
    for name in supported:
        assert DPOConfig(output_dir="o", loss_type=name).loss_type == [name]
    for name in ("exo_pair", "bco_pair", "discopop", "nonsense"):
        with pytest.raises(ValueError, match=f"Unsupported DPO loss_type \\['{name}'\\]"):
            DPOConfig(output_dir="o", loss_type=["sigmoid", name])
