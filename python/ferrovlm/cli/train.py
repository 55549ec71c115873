"""``ferrovlm sft`` and ``ferrovlm dpo``: TRL's ``trl sft`` / ``trl dpo`` scripts on ferrovlm's trainers.

Flags are the fields of ``ScriptArguments``, ``SFTConfig`` / ``DPOConfig`` and ``ModelConfig``, parsed as TRL
parses them (parser.py). The model is loaded with ``--dtype`` and the ``--load_in_4bit`` / ``--load_in_8bit``
quantization (plus ``--model_init_kwargs``), trained, and saved to ``--output_dir``. Ctrl-C stops the run;
checkpoints are written atomically, so the last one is complete, and the command prints how to resume from it
and exits with status 130."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from ..dpo_config import DPOConfig
from ..sft_config import SFTConfig
from .args import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config
from .data import load_splits, pick_split
from .parser import HelpFormatter, TrlParser

EXAMPLES = {
    "sft": """examples:
  ferrovlm sft --model_name_or_path HuggingFaceTB/SmolVLM-256M-Instruct --dataset_name data/train.jsonl \\
      --output_dir out --use_peft --lora_r 8 --lora_target_modules q_proj v_proj --max_steps 100
  ferrovlm sft --config sft.yaml --learning_rate 1e-4      (flags override the YAML file)""",
    "dpo": """examples:
  ferrovlm dpo --model_name_or_path HuggingFaceTB/SmolVLM-256M-Instruct --dataset_name data/pairs.jsonl \\
      --output_dir out --use_peft --beta 0.1 --learning_rate 5e-6""",
}
DESCRIPTION = {
    "sft": "Supervised fine-tuning (TRL's `trl sft`): rows {images, messages} or {images, prompt, completion}.",
    "dpo": "Direct preference optimization (TRL's `trl dpo`): rows {images, prompt, chosen, rejected}.",
}


def make_parser(command: str, prog: str) -> TrlParser:
    config = SFTConfig if command == "sft" else DPOConfig
    return TrlParser((ScriptArguments, config, ModelConfig), prog=prog, description=DESCRIPTION[command],
                     epilog=EXAMPLES[command], formatter_class=HelpFormatter)


def load_model(command: str, model_args: ModelConfig, training_args: Any) -> Any:
    """The model of ``--model_name_or_path`` as TRL's scripts load it: ``--dtype``, ``--model_revision``,
    ``--attn_implementation``, the quantization flags, then ``--model_init_kwargs`` on top. A Llama text model
    (SFT only) loads as ``AutoModelForCausalLM``."""
    from ..hub import resolve_pretrained
    from ..modeling import AutoModelForCausalLM, AutoModelForImageTextToText

    name = model_args.model_name_or_path
    kwargs: dict[str, Any] = {"revision": model_args.model_revision, "dtype": model_args.dtype,
                              "attn_implementation": model_args.attn_implementation}
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    kwargs.update(training_args.model_init_kwargs or {})
    folder = resolve_pretrained(name, revision=kwargs.get("revision"))
    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    cls = AutoModelForCausalLM if command == "sft" and model_type == "llama" else AutoModelForImageTextToText
    return cls.from_pretrained(name, **kwargs)


def run(command: str, argv: list[str], prog: str) -> int:
    parser = make_parser(command, prog)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not model_args.model_name_or_path:
        parser.error("the following arguments are required: --model_name_or_path")
    if not script_args.dataset_name:
        parser.error("the following arguments are required: --dataset_name")
    try:
        peft_config = get_peft_config(model_args)
    except NotImplementedError as err:
        parser.error(str(err))
    if script_args.ignore_bias_buffers:
        print(f"{prog}: --ignore_bias_buffers changes nothing in ferrovlm (one process)", file=sys.stderr)

    splits = load_splits(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    train_dataset = pick_split(splits, script_args.dataset_train_split, script_args.dataset_name,
                               "--dataset_train_split")
    eval_dataset = None
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no":
        eval_dataset = pick_split(splits, script_args.dataset_test_split, script_args.dataset_name,
                                  "--dataset_test_split")
    model = load_model(command, model_args, training_args)
    if command == "sft":
        from ..sft_trainer import SFTTrainer as Trainer
    else:
        from ..dpo_trainer import DPOTrainer as Trainer  # type: ignore[assignment]
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      peft_config=peft_config, callbacks=[PrintLogs()])
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except KeyboardInterrupt:
        return interrupted(trainer, training_args, command, argv)
    print("Training completed.")
    trainer.save_model(training_args.output_dir)
    # transformers' Trainer.save_model writes the processing class next to the weights: the folder is complete
    processing_class = getattr(trainer, "processing_class", None)
    if hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(training_args.output_dir)
    print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        print("Model pushed to the hub.")
    return 0


class PrintLogs:
    """Prints each log entry as transformers' progress callback does (``total_flos`` left out, the epoch rounded
    to 2 digits), above the progress bar."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        entry = {k: v for k, v in (logs or {}).items() if k != "total_flos"}
        if "epoch" in entry:
            entry["epoch"] = round(entry["epoch"], 2)
        try:
            from tqdm.auto import tqdm

            tqdm.write(str(entry))
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(entry)


def interrupted(trainer: Any, training_args: Any, command: str, argv: list[str]) -> int:
    """After Ctrl-C: removes this process's half-written checkpoint folder (if the interrupt came while one was
    being written; complete checkpoints are never touched), says where the run stopped and how to resume."""
    from ..trainer import sorted_checkpoints

    out = Path(training_args.output_dir)
    for tmp in out.glob(".checkpoint-*.tmp-*") if out.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    state = getattr(trainer, "state", None)
    step = getattr(state, "global_step", 0)
    total = getattr(state, "max_steps", 0)
    print(f"\nInterrupted after step {step} of {total}.", file=sys.stderr)
    checkpoints = sorted_checkpoints(out)
    if not checkpoints:
        print(f"No checkpoint was written to {out} yet (--save_strategy {_value(training_args.save_strategy)}, "
              f"--save_steps {training_args.save_steps}); there is nothing to resume from.", file=sys.stderr)
        return 130
    last = checkpoints[-1]
    print(f"The last checkpoint is {last}. To resume from it, run:", file=sys.stderr)
    print("  " + resume_command(command, argv, str(last)), file=sys.stderr)
    return 130


def resume_command(command: str, argv: list[str], checkpoint: str) -> str:
    """The command line of this run with ``--resume_from_checkpoint <checkpoint>`` (replacing any earlier one)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = True
            continue
        if a.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            continue
        args.append(a)
    return shlex.join(["ferrovlm", command, *args, "--resume_from_checkpoint", checkpoint])


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


__all__ = ["make_parser", "load_model", "run", "resume_command"]
