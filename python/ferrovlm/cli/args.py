"""TRL's script dataclasses (``ScriptArguments``, ``ModelConfig``) with TRL 1.16's field names and defaults, and
the two helpers TRL's scripts build the quantization and LoRA configs with (``get_quantization_config``,
``get_peft_config``). ``TrlParser`` (parser.py) turns these and ``SFTConfig`` / ``DPOConfig`` into flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..peft_config import LoraConfig
from ..quantization_config import BitsAndBytesConfig


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ScriptArguments:
    """Where the training data comes from (TRL's ``ScriptArguments``)."""

    dataset_name: Optional[str] = field(default=None, metadata=_help(
        "The training data: a JSONL file (one row per line, image paths relative to the file), a folder of "
        "<split>.jsonl files, a folder written by datasets' save_to_disk, or a hub dataset id (needs `datasets`)."))
    dataset_config: Optional[str] = field(default=None, metadata=_help(
        "The configuration name of a hub dataset (the `name` argument of datasets.load_dataset)."))
    dataset_train_split: str = field(default="train", metadata=_help("The split to train on."))
    dataset_test_split: str = field(default="test", metadata=_help(
        "The split to evaluate on (used when --eval_strategy is not 'no')."))
    dataset_streaming: bool = field(default=False, metadata=_help(
        "Stream a hub dataset (refused: the trainers need the dataset's length)."))
    ignore_bias_buffers: bool = field(default=False, metadata=_help(
        "A distributed-training workaround in TRL; accepted, changes nothing in ferrovlm."))


@dataclass
class ModelConfig:
    """The model, its quantization and the LoRA adapter (TRL's ``ModelConfig``)."""

    model_name_or_path: Optional[str] = field(default=None, metadata=_help(
        "The model to fine-tune: a checkpoint folder or a hub id."))
    model_revision: str = field(default="main", metadata=_help("The hub revision (branch, tag or commit)."))
    dtype: Optional[str] = field(default="float32", metadata=_help(
        "The dtype the model is loaded in ('auto': the checkpoint's).",
        choices=["auto", "bfloat16", "float16", "float32"]))
    attn_implementation: Optional[str] = field(default=None, metadata=_help(
        "Accepted for compatibility; ferrovlm has one attention implementation."))
    use_peft: bool = field(default=False, metadata=_help("Train a LoRA adapter instead of the whole model."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (the scaling is alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch's input."))
    lora_target_modules: Optional[list[str]] = field(default=None, metadata=_help(
        "The modules that get adapters: names ('q_proj v_proj'), one regex, or 'all-linear' "
        "(default: PEFT's choice for the model type)."))
    lora_target_parameters: Optional[list[str]] = field(default=None, metadata=_help(
        "PEFT's target_parameters (parameters of MoE experts): not supported by ferrovlm."))
    lora_modules_to_save: Optional[list[str]] = field(default=None, metadata=_help(
        "Modules trained in full next to the adapters (Linear layers)."))
    lora_task_type: str = field(default="CAUSAL_LM", metadata=_help("The PEFT task type."))
    use_rslora: bool = field(default=False, metadata=_help("Rank-stabilized LoRA: scaling alpha / sqrt(r)."))
    use_dora: bool = field(default=False, metadata=_help("DoRA: weight-decomposed low-rank adaptation."))
    load_in_8bit: bool = field(default=False, metadata=_help("Load the base model in 8 bit (LLM.int8); LoRA only."))
    load_in_4bit: bool = field(default=False, metadata=_help("Load the base model in 4 bit (QLoRA); LoRA only."))
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("The 4-bit code.", choices=["fp4", "nf4"]))
    use_bnb_nested_quant: bool = field(default=False, metadata=_help(
        "Double quantization (the 4-bit absmax values quantized again)."))
    bnb_4bit_quant_storage: Optional[str] = field(default=None, metadata=_help("The 4-bit storage dtype."))

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("You can't use 8 bit and 4 bit precision at the same time")
        # TRL: one name given on the command line is the value itself ("all-linear", a regex)
        if isinstance(self.lora_target_modules, (list, tuple)) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]


def get_quantization_config(model_args: ModelConfig) -> Optional[BitsAndBytesConfig]:
    """The ``BitsAndBytesConfig`` that ``--load_in_4bit`` / ``--load_in_8bit`` ask for (the 4-bit compute dtype is
    the model's ``--dtype``, as in TRL), or None."""
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=model_args.dtype,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def get_peft_config(model_args: ModelConfig) -> Optional[LoraConfig]:
    """The ``LoraConfig`` of the ``--lora_*`` flags when ``--use_peft`` is on, else None."""
    if not model_args.use_peft:
        return None
    if model_args.lora_target_parameters:
        raise NotImplementedError("lora_target_parameters (PEFT's target_parameters) is not supported by ferrovlm: "
                                  "SmolVLM has no parameter-only experts; use lora_target_modules")
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        target_modules=model_args.lora_target_modules,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        bias="none",
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        modules_to_save=model_args.lora_modules_to_save,
    )


__all__ = ["ScriptArguments", "ModelConfig", "get_quantization_config", "get_peft_config"]
