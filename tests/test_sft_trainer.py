"""SFTTrainer behaviours beyond the TRL trajectories: resuming, checkpoints, gradient checkpointing,
the cookbook's code path, learning a real (generated) task, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from conftest import FIXTURES
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LoraConfig,
    PeftModel,
    SFTConfig,
    SFTTrainer,
    TrainingError,
    _core,
    get_peft_model,
)
from ferrovlm.trainer import sorted_checkpoints
from test_sft_trajectory import KEYS, load_rows, make_trainer

SFT = FIXTURES / "sft"


def _strip(history):
    return [{k: e[k] for k in KEYS if k in e} for e in history if "loss" in e]


def test_resume_continues_the_same_trajectory(tiny_smolvlm, tmp_path):
    full = make_trainer(tiny_smolvlm, "messages_accum", tmp_path / "a")
    full.train()
    # A run that saved after every step and was cut off after step 1 (the later checkpoints never made it).
    cut = make_trainer(tiny_smolvlm, "messages_accum", tmp_path / "b", save_strategy="steps", save_steps=1)
    cut.train()
    out = tmp_path / "b" / "out"
    assert [p.name for p in sorted_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(out / name)
    (out / "checkpoint-7").mkdir()  # a crash mid-save: no trainer_state.json, so not a checkpoint
    for f in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.safetensors"):
        assert (out / "checkpoint-1" / f).is_file()
    resumed = make_trainer(tiny_smolvlm, "messages_accum", tmp_path / "b", save_strategy="steps", save_steps=1)
    out2 = resumed.train(resume_from_checkpoint=True)
    assert out2.global_step == 3
    got, want = _strip(resumed.state.log_history), _strip(full.state.log_history)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, err_msg=k)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log_history"]) >= 3


def _batch(tiny_smolvlm, case="messages"):
    trainer = make_trainer(tiny_smolvlm, case, FIXTURES / "unused")
    return trainer, trainer._collate(trainer._rows(trainer.train_dataset, [0, 1, 2, 3]))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_identical_gradients(tiny_smolvlm, dropout):
    grads = []
    for ckpt in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights="gaussian", target_modules="all-linear"
        )
        peft = get_peft_model(model, cfg)
        state = {
            k: (np.random.default_rng(1).standard_normal(v.shape) * 0.1).astype(np.float32)
            for k, v in _core.adapter_state(peft._core).items()
        }
        _core.load_adapter_state(peft._core, state)
        trainer, batch = _batch(tiny_smolvlm)
        session = _core.TrainSession(peft._core)
        session.forward_backward(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
                                 loss_scale=0.01, gradient_checkpointing=ckpt, dropout_seed=5)
        grads.append(session.grads())
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 0
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-8, err_msg=k)


def test_step_checkpoints_and_one_after_the_last_step(tiny_smolvlm, tmp_path):
    """save_strategy="steps": a checkpoint every save_steps steps and one after the last step, as transformers'
    DefaultFlowCallback saves when training stops."""
    trainer = make_trainer(tiny_smolvlm, "messages", tmp_path, save_strategy="steps", save_steps=2, max_steps=3)
    trainer.train()
    out = tmp_path / "out"
    assert [p.name for p in sorted_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_smolvlm, tmp_path):
    trainer = make_trainer(tiny_smolvlm, "messages", tmp_path, save_strategy="steps", save_steps=1, max_steps=3)

    class Poison:
        def on_log(self, args, state, control, logs=None):
            if state.global_step == 1:
                bad = {k: np.full_like(v, np.nan) for k, v in _core.adapter_state(trainer.model._core).items()}
                _core.load_adapter_state(trainer.model._core, bad)

    trainer.callbacks.append(Poison())
    with pytest.raises(TrainingError, match=r"step 2: the loss is not finite.*checkpoint-1"):
        trainer.train()
    assert [p.name for p in sorted_checkpoints(tmp_path / "out")] == ["checkpoint-1"]


def test_rows_without_labels_are_a_clear_error(tiny_smolvlm, tmp_path):
    # max_length cuts every completion away: nothing is left to learn from.
    trainer = make_trainer(tiny_smolvlm, "prompt_completion", tmp_path, max_length=20)
    with pytest.raises(TrainingError, match="no row of this step has a label token"):
        trainer.train()


def test_adapter_for_another_base_names_the_module(tiny_smolvlm):
    other = AutoModelForImageTextToText.from_pretrained(FIXTURES / "idefics3_gqa" / "checkpoint")
    with pytest.raises(ferrovlm.FerroVLMError, match=r"q_proj|no Linear module|shape"):
        PeftModel.from_pretrained(other, FIXTURES / "lora" / "text" / "adapter")


def test_save_pretrained_writes_peft_files_that_load_back(tiny_smolvlm, tmp_path):
    src = FIXTURES / "lora" / "dora" / "adapter"
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), src, is_trainable=True)
    model.save_pretrained(tmp_path / "a")
    ours, peft = (
        _core.load_safetensors(tmp_path / "a" / "adapter_model.safetensors"),
        _core.load_safetensors(src / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(peft)
    for k in peft:
        np.testing.assert_array_equal(ours[k], peft[k])
    cfg_ours = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg_peft = json.loads((src / "adapter_config.json").read_text())
    cfg_ours["base_model_name_or_path"] = cfg_peft["base_model_name_or_path"]
    assert cfg_ours == cfg_peft


def test_merge_and_unload_and_disable_adapter(tiny_smolvlm):
    _, batch = _batch(tiny_smolvlm)

    def fwd(m):
        return m(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            pixel_attention_mask=batch["pixel_attention_mask"],
        ).logits

    base_logits = fwd(AutoModelForImageTextToText.from_pretrained(tiny_smolvlm))
    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), FIXTURES / "lora" / "dora" / "adapter"
    )
    adapted = fwd(model)
    assert np.abs(adapted - base_logits).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_allclose(fwd(model), base_logits, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(fwd(merged), adapted, rtol=1e-4, atol=1e-4)


def _cookbook_collate(processor, return_tensors):
    image_token_id = processor.tokenizer.additional_special_tokens_ids[
        processor.tokenizer.additional_special_tokens.index("<image>")
    ]

    def collate_fn(examples):
        texts = [processor.apply_chat_template(example["messages"], tokenize=False) for example in examples]
        image_inputs = [[example["images"][0]] for example in examples]
        batch = processor(text=texts, images=image_inputs, return_tensors=return_tensors, padding=True)
        labels = batch["input_ids"].clone() if return_tensors == "pt" else batch["input_ids"].copy()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch

    return collate_fn


@pytest.mark.parametrize("return_tensors", ["np", "pt"])
def test_cookbook_sft_code_path(tiny_smolvlm, tmp_path, return_tensors):
    """The cookbook "Fine-tuning SmolVLM with TRL" notebook: its collate_fn, SFTConfig fields, the double
    get_peft_model / peft_config wrap, train() and save_model(), with only the imports changed."""
    if return_tensors == "pt":
        pytest.importorskip("torch")
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_smolvlm, torch_dtype="float32", _attn_implementation="eager"
    )
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    peft_config = LoraConfig(
        r=8,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
        use_dora=True,
        init_lora_weights="gaussian",
    )
    peft_model = get_peft_model(model, peft_config)
    peft_model.print_trainable_parameters()
    training_args = SFTConfig(
        output_dir=str(tmp_path / "smolvlm-sft"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=1,
        learning_rate=1e-4,
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        optim="adamw_torch_fused",
        bf16=True,
        push_to_hub=False,
        report_to="none",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=1024,
    )
    trainer = SFTTrainer(model=peft_model, args=training_args, train_dataset=load_rows("messages"),
                         data_collator=_cookbook_collate(processor, return_tensors), peft_config=peft_config,
                         processing_class=processor.tokenizer)
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
    # One adapter (not two): A, B and a magnitude on 20 layers, the 14 text ones and, as PEFT matches a
    # list by suffix, the vision q/k/v_proj of both vision layers.
    assert len(_core.trainable_shapes(trainer.model._core)) == 3 * 20
    trainer.save_model(training_args.output_dir)
    assert (tmp_path / "smolvlm-sft" / "adapter_model.safetensors").is_file()
    assert [p.name for p in sorted_checkpoints(tmp_path / "smolvlm-sft")] == ["checkpoint-1"]


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _colour_rows(rng, n):
    rows = []
    names = list(COLOURS)
    for i in range(n):
        name = names[i % len(names)]
        rgb = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, size=3), 0, 255)
        img = Image.fromarray(np.tile(rgb.astype(np.uint8), (32, 32, 1)))
        rows.append(
            {
                "images": [img],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": name}]}],
                "answer": name,
            }
        )
    return rows


def colour_accuracy(model, processor, held_out):
    """Share of held-out colour rows whose greedy answer starts with the right colour."""
    right = 0
    for r in held_out:
        text = processor.apply_chat_template(r["prompt"], add_generation_prompt=True)
        inputs = processor(text=text, images=r["images"], return_tensors="np")
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        right += (
            processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            .strip()
            .startswith(r["answer"])
        )
    return right / len(held_out)


def test_learns_a_generated_colour_task(tiny_smolvlm, tmp_path):
    rng = np.random.default_rng(0)
    train, held_out = _colour_rows(rng, 32), _colour_rows(rng, 16)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = False
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
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
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses
    assert colour_accuracy(trainer.model, processor, held_out) >= 0.75  # chance is 0.25


def test_evaluate_reports_the_model_loss(tiny_smolvlm, tmp_path):
    trainer = make_trainer(tiny_smolvlm, "messages", tmp_path, per_device_eval_batch_size=4)
    rows = load_rows("messages")
    metrics = trainer.evaluate(rows)
    batch = trainer._collate(rows)
    want = trainer.model(**{k: v for k, v in batch.items() if v is not None}).loss
    np.testing.assert_allclose(metrics["eval_loss"], want, rtol=1e-5)
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0 and metrics["eval_entropy"] > 0
    assert trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]


def test_evaluation_schedule_and_uneven_last_batch(tiny_smolvlm, tmp_path):
    """transformers' schedule: every eval_steps-th step and after the last one, from eval_delay on; eval_loss is
    the batch losses weighted by their rows (the last batch has 1 row of 3), and eval_num_tokens is TRL's
    training token count so far."""
    rows = load_rows("messages")[:3]

    def evals(**kw):
        trainer = make_trainer(tiny_smolvlm, "messages", tmp_path / str(len(kw)), eval_strategy="steps", eval_steps=2,
                               per_device_eval_batch_size=2, **kw)
        trainer.eval_dataset = rows
        trainer.train()
        hist = trainer.state.log_history
        train_tokens = {e["step"]: e["num_tokens"] for e in hist if "loss" in e}
        for e in hist:
            if "eval_loss" in e:
                assert e["eval_num_tokens"] == train_tokens[e["step"]]
        return trainer, [e["step"] for e in hist if "eval_loss" in e]

    trainer, steps = evals()
    assert steps == [2, 3]  # max_steps=3: the last step is evaluated too
    assert evals(eval_delay=3)[1] == [3]
    metrics = trainer.evaluate(rows)
    loss = [trainer.model(**{k: v for k, v in trainer._collate(b).items() if v is not None}).loss
            for b in (rows[:2], rows[2:])]
    np.testing.assert_allclose(metrics["eval_loss"], (2 * float(loss[0]) + float(loss[1])) / 3, rtol=1e-5)


def test_images_missing_for_placeholders_names_the_rows(tiny_smolvlm, tmp_path):
    trainer = make_trainer(tiny_smolvlm, "messages", tmp_path)
    trainer.train_dataset[2]["images"] = []
    with pytest.raises(ValueError, match=r"train_dataset rows \[.*2.*\]"):
        trainer.train()


def _cookbook_rows(rows, same_objects=True):
    """The HF cookbook's SFT rows (trained with TRL <= 0.22): a system turn, and each image both in "images" and in
    the user turn as {"type": "image", "image": img} (the same object; a copy when rows come from `datasets`)."""
    out = []
    for r in rows:
        imgs = iter(r["images"] if same_objects else [im.copy() for im in r["images"]])
        msgs = [{"role": "system", "content": [{"type": "text", "text": "You are a vision assistant."}]}]
        for m in r["messages"]:
            msgs.append(
                {
                    **m,
                    "content": [
                        ({"type": "image", "image": next(imgs)} if p["type"] == "image" else p) for p in m["content"]
                    ],
                }
            )
        out.append({"images": r["images"], "messages": msgs})
    return out


def _placeholder_rows(rows):
    """The same rows with the images only in "images" (TRL 1.16's form)."""
    return [
        {
            "images": r["images"],
            "messages": [
                {**m, "content": [({"type": "image"} if p["type"] == "image" else p) for p in m["content"]]}
                for m in r["messages"]
            ],
        }
        for r in rows
    ]


def _trainer_on(tiny_smolvlm, rows, tmp_path):
    args = json.loads((SFT / "messages" / "args.json").read_text())
    args.update(max_steps=2)
    base = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)
    model = PeftModel.from_pretrained(base, SFT / "messages" / "adapter", is_trainable=True)
    return SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "out"), **args), train_dataset=rows,
                      processing_class=AutoProcessor.from_pretrained(tiny_smolvlm))


@pytest.mark.parametrize("same_objects", [True, False])
def test_cookbook_rows_with_images_in_images_and_in_the_messages(tiny_smolvlm, tmp_path, same_objects):
    from test_sft_trajectory import load_rows as load_sft_rows

    cookbook = _cookbook_rows(load_sft_rows("messages"), same_objects)
    plain = _placeholder_rows(cookbook)
    a = _trainer_on(tiny_smolvlm, cookbook, tmp_path / "a")
    b = _trainer_on(tiny_smolvlm, plain, tmp_path / "b")
    ba = a._collate(a._rows(a.train_dataset, [0, 1, 2, 3]))
    bb = b._collate(b._rows(b.train_dataset, [0, 1, 2, 3]))
    assert sorted(ba) == sorted(bb)
    for k in bb:
        np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)
    # each row's image counted once: one <image> expansion per row, frames of one image only
    single = b._collate(b._rows(b.train_dataset, [0]))
    assert ba["pixel_values"].shape[1] == single["pixel_values"].shape[1]
    a.train()
    b.train()
    got, want = _strip(a.state.log_history), _strip(b.state.log_history)
    assert len(got) == len(want) == 2
    assert got == want
    # the rows themselves are left as they were
    assert (
        cookbook[0]["messages"][1]["content"][0]["type"] == "image"
        and "image" in cookbook[0]["messages"][1]["content"][0]
    )


def test_cookbook_prompt_completion_rows_and_mismatched_images(tiny_smolvlm):
    from ferrovlm import DataCollatorForVisionLanguageModeling
    from test_sft_trajectory import load_rows as load_sft_rows

    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    rows = _cookbook_rows(load_sft_rows("messages"))
    pc = [{"images": r["images"], "prompt": r["messages"][:2], "completion": r["messages"][2:]} for r in rows]
    plain = [{**r, "prompt": _placeholder_rows([{"images": [], "messages": r["prompt"]}])[0]["messages"]} for r in pc]
    collate = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    x, y = collate(pc), collate(plain)
    for k in y:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    other = Image.new("RGB", (32, 32), (1, 2, 3))
    bad = [{**rows[0], "images": [other]}]  # the content holds a different image than "images"
    with pytest.raises(ValueError, match="does not match"):
        collate_lm = DataCollatorForVisionLanguageModeling(processor)
        collate_lm(bad)


def _greedy_by_forward(model, inputs, n):
    """Greedy decoding with a full forward pass per token (no generation session)."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                       pixel_attention_mask=inputs.get("pixel_attention_mask")).logits
        nxt = np.asarray(logits)[:, -1].argmax(-1)[:, None]
        ids = np.concatenate([ids, nxt.astype(ids.dtype)], axis=1)
        mask = np.concatenate([mask, np.ones_like(nxt, dtype=mask.dtype)], axis=1)
    return ids


def test_dora_generation_follows_the_trained_adapter(tiny_smolvlm, tmp_path):
    """generate computes DoRA's weight norms once per call (the weights cannot change during it): its tokens
    equal greedy decoding by full forward passes, before and after further training changes the adapter."""
    processor = ferrovlm.AutoProcessor.from_pretrained(tiny_smolvlm)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(ferrovlm.AutoModelForVision2Seq.from_pretrained(tiny_smolvlm), config)
    rows = _colour_rows(np.random.default_rng(3), 8)
    prompt = processor.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True)
    inputs = processor(text=prompt, images=rows[0]["images"], return_tensors="np")
    n = inputs["input_ids"].shape[1]
    for step in range(2):
        args = SFTConfig(output_dir=str(tmp_path / f"o{step}"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=5e-2, report_to="none", save_strategy="no")
        SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor).train()
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        want = _greedy_by_forward(model, inputs, 4)
        np.testing.assert_array_equal(got[:, n:], want[:, n:], err_msg=f"after training round {step}")
