"""The ``ferrovlm`` command (TRL's CLI: ``ferrovlm sft`` / ``dpo`` / ``generate`` / ``export``), run as a subprocess
(``python -m ferrovlm``) so that exit statuses and output are the real ones, on the tiny SmolVLM checkpoint and
JSONL datasets of PNG images written here.

- sft: the flags make the same run as the Python API (same adapter weights and log history), then ``generate``
  from the saved adapter prints what ``model.generate`` decodes, ``export`` merges it into safetensors (same
  logits) and writes GGUF files; dpo likewise; a ``--config`` YAML file with a command-line override;
  a folder of ``<split>.jsonl`` files with evaluation on the test split.
- Bad flags and values: argparse's error, exit status 2. Bad dataset rows: the row and the path, exit status 1.
- Ctrl-C: exit status 130, the checkpoints on disk complete, the printed resume command resumes.
- ``--help`` lists every SFTConfig / DPOConfig / ModelConfig / ScriptArguments field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ferrovlm
from ferrovlm import (
    AutoModelForImageTextToText,
    AutoProcessor,
    DPOConfig,
    LoraConfig,
    ModelConfig,
    PeftModel,
    ScriptArguments,
    SFTConfig,
    SFTTrainer,
    _core,
    load_image,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "Which colour is this?"
PACKAGE_ROOT = str(Path(ferrovlm.__file__).resolve().parent.parent)


def cli(*args, cwd=None, timeout=300):
    """Runs ``python -m ferrovlm args...`` with this ferrovlm; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ferrovlm", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def user(text=QUESTION):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/img/<colour>.png, data/train.jsonl (messages rows) and data/pairs.jsonl (preference rows), with image
    paths relative to the files."""
    d = tmp_path_factory.mktemp("cli") / "data"
    (d / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    sft, dpo = [], []
    for i, name in enumerate(names):
        px = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 21, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(d / "img" / f"{name}.png")
        image = [f"img/{name}.png"]
        sft.append({"images": image, "messages": user() + assistant(name)})
        dpo.append({"images": image, "prompt": user(), "chosen": assistant(name),
                    "rejected": assistant(names[(i + 1) % 4])})
    write_jsonl(d / "train.jsonl", sft)
    write_jsonl(d / "pairs.jsonl", dpo)
    return d


SFT_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2",
             "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
             "--save_steps", "1"]


def test_sft_then_generate_then_export(tiny_smolvlm, data, tmp_path):
    out = tmp_path / "out"
    run = cli("sft", "--model_name_or_path", tiny_smolvlm, "--dataset_name", data / "train.jsonl",
              "--output_dir", out, *SFT_FLAGS)
    assert run.returncode == 0, run.stderr
    assert "'loss'" in run.stdout and "Training completed." in run.stdout
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "processor_config.json"):
        assert (out / f).is_file(), f
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "checkpoint-1" / "trainer_state.json").is_file()
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 32 and adapter_cfg["lora_dropout"] == 0.05

    # The same run through the Python API (TRL's defaults for what the flags leave out) gives the same adapter.
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["images"] = [load_image(data / p) for p in r["images"]]
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype="float32"),
        args=SFTConfig(output_dir=str(tmp_path / "api"), max_steps=2, per_device_train_batch_size=2,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no"),
        train_dataset=rows,
        peft_config=LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert [h["loss"] for h in state["log_history"][:2]] == pytest.approx(
        [h["loss"] for h in trainer.state.log_history[:2]], rel=1e-6)
    saved = _core.load_safetensors(out / "adapter_model.safetensors")
    mine = trainer.model.named_trainable_parameters()
    assert saved.keys() == mine.keys()
    for k, v in saved.items():
        np.testing.assert_allclose(v, mine[k], rtol=1e-6, atol=1e-7, err_msg=k)

    # generate from the saved adapter (the base model is the one adapter_config.json names) prints what
    # model.generate decodes
    run = cli("generate", "--adapter", out, "--image", data / "img" / "red.png", "--prompt", QUESTION,
              "--max_new_tokens", "6")
    assert run.returncode == 0, run.stderr
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_smolvlm), out)
    prompt = processor.apply_chat_template(user(), add_generation_prompt=True)
    inputs = processor(text=prompt, images=[load_image(data / "img" / "red.png")], return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=6)
    want = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert want.strip() and run.stdout.strip() == want.strip()

    # export: merged safetensors (the adapter's logits), then GGUF text + mmproj files
    run = cli("export", "--adapter", out, "--output_dir", tmp_path / "merged")
    assert run.returncode == 0, run.stderr
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    AutoProcessor.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(merged(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    run = cli("export", "--adapter", out, "--output_dir", tmp_path / "gguf", "--format", "gguf",
              "--quantization_method", "q8_0")
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert len(files) == 2 and any(f.startswith("mmproj-") for f in files), files
    assert all(f.endswith("Q8_0.gguf") and (tmp_path / "gguf" / f).read_bytes()[:4] == b"GGUF" for f in files)


def test_dpo_then_generate(tiny_smolvlm, data, tmp_path):
    out = tmp_path / "dpo"
    run = cli("dpo", "--model_name_or_path", tiny_smolvlm, "--dataset_name", data / "pairs.jsonl", "--output_dir",
              out, "--use_peft", "--lora_target_modules", "all-linear", "--max_steps", "2", "--beta", "0.2",
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2")
    assert run.returncode == 0, run.stderr
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    first = state["log_history"][0]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)  # a fresh adapter: policy == reference
    assert "rewards/margins" in first
    assert json.loads((out / "training_args.json").read_text())["beta"] == 0.2
    run = cli("generate", "--adapter", out, "--image", data / "img" / "blue.png", "--prompt", QUESTION,
              "--max_new_tokens", "3")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr


def test_yaml_config_and_a_command_line_override(tiny_smolvlm, data, tmp_path):
    (tmp_path / "sft.yaml").write_text(
        f"model_name_or_path: {tiny_smolvlm}\ndataset_name: {data / 'train.jsonl'}\noutput_dir: from_yaml\n"
        "use_peft: true\nlora_r: 2\nlora_target_modules: [q_proj, k_proj]\nlearning_rate: 2e-4\nmax_steps: 1\n"
        "per_device_train_batch_size: 2\nenv:\n  FERROVLM_CLI_TEST: '1'\n"
    )
    run = cli("sft", "--config", "sft.yaml", "--lora_r", "3", "--save_steps", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "from_yaml"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 3 and sorted(adapter["target_modules"]) == ["k_proj", "q_proj"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["learning_rate"] == 2e-4 and args["max_steps"] == 1  # "2e-4" is a string to YAML
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_a_folder_of_split_files_and_evaluation(tiny_smolvlm, data, tmp_path):
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["images"] = [str(data / p) for p in r["images"]]  # absolute paths
    write_jsonl(tmp_path / "train.jsonl", rows[:2])
    write_jsonl(tmp_path / "test.jsonl", rows[2:])
    common = ["--model_name_or_path", tiny_smolvlm, "--dataset_name", tmp_path, "--output_dir", tmp_path / "out",
              "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "1"]
    run = cli("sft", *common, "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1")
    assert run.returncode == 0, run.stderr
    history = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)
    run = cli("sft", *common, "--dataset_train_split", "validation")
    assert run.returncode == 1
    assert "'validation'" in run.stderr and "(it has: test, train)" in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["sft", "--learning_rate", "abc"], "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
        (["sft", "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
        (["sft", "--use_peft", "maybe"], "expected a boolean"),
        (["dpo", "--loss_type", "kto"], "argument --loss_type/--loss-type: invalid choice: 'kto'"),
        (["sft", "--eval_strategy", "steps", "--logging_steps", "0"], "requires either non-zero --eval_steps"),
        (["sft", "--load_in_4bit", "--load_in_8bit"], "can't use 8 bit and 4 bit precision at the same time"),
        (["sft", "--dataset_name", "d.jsonl"], "the following arguments are required: --model_name_or_path"),
        (["sft", "--config", "missing.yaml"], "--config: cannot read missing.yaml"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "--prompt", "hi", "--max_new_tokens", "0"], "expected a positive integer, got '0'"),
        (["generate", "--prompt", "hi", "--image", "missing.png"], "--image: no such file: missing.png"),
        (["export", "--output_dir", "x", "--quantization_method", "q8_0"], "applies to --format gguf only"),
    ],
)
def test_bad_flags_are_argparse_errors(args, message, tmp_path):
    run = cli(*args, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "usage: ferrovlm" in run.stderr
    assert "Traceback" not in run.stderr


def test_unknown_yaml_keys_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nlearnig_rate: 2e-4\n")
    run = cli("sft", "--config", "c.yaml", cwd=tmp_path)
    assert run.returncode == 2 and "unknown keys in c.yaml: learnig_rate" in run.stderr


def test_bad_dataset_rows_name_the_row_and_the_path(tiny_smolvlm, data, tmp_path):
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    base = ["sft", "--model_name_or_path", tiny_smolvlm, "--output_dir", tmp_path / "out", "--max_steps", "1",
            "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--per_device_train_batch_size", "2"]

    rows_missing = [dict(r) for r in rows]
    rows_missing[2] = {**rows[2], "images": ["img/missing.png"]}
    run = cli(*base, "--dataset_name", write_jsonl(data / "missing.jsonl", rows_missing))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "row 2: image file 'img/missing.png' not found" in run.stderr and "missing.jsonl" in run.stderr

    (data / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + "{not json\n")
    run = cli(*base, "--dataset_name", data / "broken.jsonl")
    assert run.returncode == 1 and "broken.jsonl: line 3 is not valid JSON" in run.stderr

    # a file that is there but is no image: found when the trainer reads the row
    (data / "img" / "text.png").write_text("not a png")
    rows_bad = [rows[0], {**rows[1], "images": ["img/text.png"]}]
    run = cli(*base, "--dataset_name", write_jsonl(data / "undecodable.jsonl", rows_bad))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "row 1: cannot load image" in run.stderr and "text.png" in run.stderr


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(tiny_smolvlm, data, tmp_path):
    out = tmp_path / "run"
    args = ["sft", "--model_name_or_path", str(tiny_smolvlm), "--dataset_name", str(data / "train.jsonl"),
            "--output_dir", str(out), "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "500",
            "--per_device_train_batch_size", "1", "--save_steps", "1", "--save_total_limit", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
    # SIGINT's default action in the child even when this test runs with SIGINT ignored (a shell's background job)
    proc = subprocess.Popen([sys.executable, "-m", "ferrovlm", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240

    def saved_twice() -> bool:  # checkpoint-2 or a later one (rotation removes the old ones within a few steps)
        return any(int(p.name.split("-")[1]) >= 2 for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())

    while not saved_twice() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and not list(out.glob(".checkpoint-*"))  # no half-written folder left behind
    last = checkpoints[-1]
    for f in ("trainer_state.json", "adapter_model.safetensors", "optimizer.safetensors", "scheduler.json"):
        assert (last / f).is_file(), last / f
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert f"The last checkpoint is {last}" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:2] == ["ferrovlm", "sft"] and command[-2:] == ["--resume_from_checkpoint", str(last)]

    # the printed command resumes (with fewer steps to go: the last --max_steps wins)
    run = cli(*command[1:], "--max_steps", step + 1)
    assert run.returncode == 0, run.stderr
    state = json.loads((out / f"checkpoint-{step + 1}" / "trainer_state.json").read_text())
    assert state["global_step"] == step + 1


def test_help_lists_every_field():
    for command, config in (("sft", SFTConfig), ("dpo", DPOConfig)):
        run = cli(command, "--help")
        assert run.returncode == 0, run.stderr
        names = config.field_names() + [f.name for f in dataclasses.fields(ModelConfig)]
        names += [f.name for f in dataclasses.fields(ScriptArguments)] + ["config"]
        missing = [n for n in names if f"--{n} " not in run.stdout and f"--{n}\n" not in run.stdout]
        assert not missing, missing
    run = cli("--help")
    assert run.returncode == 0 and all(c in run.stdout for c in ("sft", "dpo", "generate", "export", "demo"))
    for command in ("generate", "export"):
        run = cli(command, "--help")
        assert run.returncode == 0 and "--model_name_or_path" in run.stdout and "--adapter" in run.stdout
    run = cli("demo", "--help")  # ferrovlm.demo's own flags
    assert run.returncode == 0 and run.stdout.startswith("usage: ferrovlm demo")
    run = cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"ferrovlm {ferrovlm.__version__}"


def test_trl_parser_reads_values_as_hf_argument_parser_does():
    """In-process: TrlParser's bool / list / Optional / enum handling (what TRL's scripts call directly)."""
    parser = ferrovlm.TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    script, cfg, model = parser.parse_args_and_config(
        ["--model_name_or_path", "m", "--use_peft", "--lora_target_modules", "all-linear", "--bf16", "false",
         "--gradient_checkpointing", "no", "--eval_steps", "none", "--max_length", "null", "--save_strategy",
         "epoch", "--dataset-train-split", "dev", "--no_remove_unused_columns", "--lr_scheduler_kwargs",
         '{"num_cycles": 2}', "--report_to", "none"])
    assert script.dataset_train_split == "dev"
    assert model.use_peft is True and model.lora_target_modules == "all-linear"  # one name: the value itself
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False and cfg.remove_unused_columns is False
    assert cfg.eval_steps is None and cfg.max_length is None and cfg.save_strategy.value == "epoch"
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 2} and cfg.report_to == []
    assert ferrovlm.get_peft_config(model).target_modules == "all-linear"
    model = parser.parse_args_and_config(["--load_in_4bit", "--dtype", "bfloat16"])[2]
    q = ferrovlm.get_quantization_config(model)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and ferrovlm.get_peft_config(model) is None
