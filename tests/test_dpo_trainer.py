"""DPOTrainer behaviours beyond the TRL trajectories: the hybrid SFT -> DPO workflow, learning generated
preferences, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoProcessor,
    DPOConfig,
    DPOTrainer,
    LoraConfig,
    PeftModel,
    SFTConfig,
    SFTTrainer,
    _core,
)
from test_dpo_trajectory import load_rows, make_trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _pairs(rng, n):
    names = list(COLOURS)
    rows = []
    for i in range(n):
        name = names[i % 4]
        wrong = names[(i + 1 + rng.integers(0, 3)) % 4]
        rgb = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, size=3), 0, 255).astype(np.uint8)
        rows.append(
            {
                "images": [Image.fromarray(np.tile(rgb, (32, 32, 1)))],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": name}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
            }
        )
    return rows


def test_learns_generated_preferences(tiny_smolvlm, tmp_path):
    rng = np.random.default_rng(0)
    train, held_out = _pairs(rng, 32), _pairs(rng, 16)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = False
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=10,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        bf16=False,
        beta=0.5,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=processor,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer.train()
    metrics = trainer.evaluate(held_out)
    assert metrics["eval_rewards/accuracies"] >= 0.8, metrics  # chance is 0.5


def test_reference_log_probs_are_computed_once_per_pair(tiny_smolvlm, tmp_path):
    """The reference is frozen, so over 3 epochs each pair's reference pass runs once (the first epoch), and the
    run logs the same numbers as with TRL's explicit precompute_ref_log_probs=True."""
    rng = np.random.default_rng(1)
    train = _pairs(rng, 8)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = False

    def run(precompute):
        args = DPOConfig(output_dir=str(tmp_path / f"out{precompute}"), per_device_train_batch_size=4,
                         num_train_epochs=3, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                         report_to="none", save_strategy="no", bf16=False, precompute_ref_log_probs=precompute)
        trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), args=args,
                             train_dataset=train, processing_class=processor,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        passes = []
        pass_ = trainer._reference_pass
        trainer._reference_pass = lambda batch: passes.append(len(batch["input_ids"])) or pass_(batch)
        trainer.train()
        return passes, [e for e in trainer.state.log_history if "loss" in e]

    passes, logs = run(False)
    assert passes == [8, 8], "2 batches of 4 pairs (8 sequences) in epoch 1, none later"
    _, logs_pre = run(True)
    assert len(logs) == 6
    for a, b in zip(logs, logs_pre):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)


def test_hybrid_sft_then_dpo_with_the_sft_adapter_as_reference(tiny_smolvlm, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    pairs = load_rows("sigmoid")
    sft_rows = [{"images": r["images"], "prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    sft = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(tiny_smolvlm),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            bf16=False,
        ),
        train_dataset=sft_rows,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    sft.train()
    sft.save_model(tmp_path / "sft-adapter")
    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), tmp_path / "sft-adapter", is_trainable=True
    )
    dpo = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            bf16=False,
            logging_steps=1,
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, 1.0],
        ),
        train_dataset=pairs,
        processing_class=processor,
    )
    dpo.train()
    first = dpo.state.log_history[0]
    # The reference is the SFT adapter as it was: at the first step policy == reference.
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] > np.log(2)  # sigmoid's log 2 plus the chosen NLL (the "sft" term)
    assert dpo.state.log_history[1]["rewards/margins"] != 0.0


def test_bad_rows_are_named(tiny_smolvlm, tmp_path):
    trainer = make_trainer(tiny_smolvlm, "sigmoid", tmp_path)
    del trainer.train_dataset[1]["rejected"]
    with pytest.raises(KeyError, match=r"train_dataset rows \[2, 3, 0, 1\].*row 3 of the batch has no"):
        trainer.train()
    trainer = make_trainer(tiny_smolvlm, "sigmoid", tmp_path)
    trainer.train_dataset[0]["images"] = trainer.train_dataset[0]["images"] * 2  # two images, one placeholder
    with pytest.raises(ValueError, match=r"train_dataset rows"):
        trainer.train()
    trainer = make_trainer(tiny_smolvlm, "sigmoid", tmp_path, max_steps=1)
    trainer.train_dataset[3]["rejected"] = trainer.train_dataset[3]["chosen"]
    with pytest.warns(UserWarning, match="identical chosen and rejected"):
        trainer.train()


def test_rpo_alpha_is_the_hybrid_loss():
    cfg = DPOConfig(output_dir="x", rpo_alpha=0.5)
    assert list(cfg.loss_type) == ["sigmoid", "sft"] and list(cfg.loss_weights) == [1.0, 0.5]


def test_a_fresh_adapter_run_is_reproducible_from_args_seed(tiny_smolvlm, tmp_path):
    """The trainer seeds with args.seed before attaching the adapter (transformers' Trainer seeds in
    __init__ too), so two runs with the same seed give the same losses; another seed gives others."""
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    rows = load_rows("sigmoid")
    earlier_seeds = iter(range(100, 200))

    def losses(seed):
        ferrovlm.set_seed(next(earlier_seeds))  # whatever the caller seeded before, args.seed decides
        args = DPOConfig(
            output_dir=str(tmp_path / f"out{seed}"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            seed=seed,
        )
        trainer = DPOTrainer(
            model=AutoModelForImageTextToText.from_pretrained(tiny_smolvlm),
            args=args,
            train_dataset=rows,
            processing_class=processor,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    first = losses(3)
    assert losses(3) == first
    assert losses(4) != first


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "fc1", "out_proj"]])
def test_bf16_compute_first_step_is_exactly_log2_with_a_fresh_vision_lora(tiny_smolvlm, tmp_path, targets):
    """dtype="bfloat16" (the bf16 compute mode) with LoRA in the vision tower: a fresh adapter (lora_B = 0) makes
    the policy and the adapter-off reference the same function, so TRL logs loss ln 2 and zero rewards; the
    reference pass (untracked) must run the tracked policy pass's arithmetic, vision tower and text model alike."""
    rows = load_rows("sigmoid")
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="bfloat16")
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, report_to="none", save_strategy="no", bf16=True)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=AutoProcessor.from_pretrained(tiny_smolvlm),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    )
    assert any(".vision_model." in k for k in trainer.model.named_trainable_parameters())
    trainer.train()
    first = trainer.state.log_history[0]
    assert abs(first["loss"] - np.log(2)) < 1e-6, first
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0, (
        first
    )


def test_vision_lora_reference_does_not_reuse_features_of_other_passes(tiny_smolvlm, tmp_path):
    """With an adapter on the vision tower, image features depend on the adapter and on whether it is on: the
    reference pass (adapter off) must not reuse features that a pass with the adapter on left in the frozen-vision
    cache (an evaluation, say), and vice versa."""
    rows = load_rows("sigmoid")

    def trainer():
        args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                         save_strategy="no", bf16=False)
        t = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), args=args, train_dataset=rows,
                       processing_class=AutoProcessor.from_pretrained(tiny_smolvlm),
                       peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        rng = np.random.default_rng(1)
        _core.load_adapter_state(t.model._core, {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
                                                 for k, v in _core.adapter_state(t.model._core).items()})
        return t

    a, b = trainer(), trainer()
    batch = a._collate_rows(a.train_dataset, [0, 1, 2, 3], "train_dataset")
    kw = dict(
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        pixel_attention_mask=batch["pixel_attention_mask"],
    )
    policy = a.session.sequence_logps(batch["input_ids"], batch["labels"], **kw)  # adapter on
    reference = a._reference(batch)  # adapter off
    assert reference == b._reference(batch)
    assert a.session.sequence_logps(batch["input_ids"], batch["labels"], **kw) == policy
    assert policy != reference


@pytest.mark.parametrize(
    "quant",
    [
        dict(
            load_in_4bit=True,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype="bfloat16",
        ),
        dict(load_in_8bit=True),
    ],
)
def test_qlora_dpo_notebook_first_step_is_exactly_log2(tiny_smolvlm, tmp_path, quant):
    """The DPO notebook's QLoRA load (4-bit NF4, bf16 compute, or 8-bit), DPOConfig and DPOTrainer(model,
    ref_model=None, ...): a fresh adapter's first step logs ln 2 and zero rewards, as TRL, because the policy and
    the adapter-off reference run the same quantized arithmetic."""
    rows = load_rows("sigmoid")
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="bfloat16", device_map="auto",
                                                        quantization_config=ferrovlm.BitsAndBytesConfig(**quant))
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to="none", save_strategy="no", bf16=True, gradient_checkpointing=True)
    trainer = DPOTrainer(
        model,
        ref_model=None,
        args=args,
        train_dataset=rows,
        processing_class=AutoProcessor.from_pretrained(tiny_smolvlm),
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights="gaussian"
        ),
    )
    trainer.train()
    first, second = [e for e in trainer.state.log_history if "loss" in e][:2]
    assert abs(first["loss"] - np.log(2)) < 1e-6, first
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    assert second["loss"] != first["loss"] and np.isfinite(second["loss"])
