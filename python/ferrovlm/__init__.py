"""ferrovlm: SmolVLM / Idefics3 vision-language models from Python, computed in Rust.

Change ``from transformers import ...`` to ``from ferrovlm import ...``; the rest of the code runs as is.
"""

import os as _os

# candle runs its elementwise ops on a spinning thread pool of its own, next to the rayon pool that
# the matmuls and ferrovlm's kernels use; on few cores the two pools' spinning threads starve each
# other (a LoRA training step ran 2x slower). One candle thread keeps those ops inline; every other
# kernel still uses all cores. Set CANDLE_NUM_THREADS before importing ferrovlm to override.
_os.environ.setdefault("CANDLE_NUM_THREADS", "1")

from . import _native  # noqa: E402, F401  (imports _core; a CUDA build finds its CUDA runtime first)
from ._core import __version__  # noqa: E402
from .batch import BatchEncoding, BatchFeature
from .cli import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config
from .configuration import Idefics3Config, LlamaConfig, PretrainedConfig, SmolVLMConfig
from .data_collator import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling
from .distributed import DistributedError
from .dpo_collator import DataCollatorForVisionPreference
from .dpo_config import DPOConfig
from .dpo_trainer import DPOTrainer
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    FerroVLMError,
    InputError,
    InternalError,
    ModelNotCachedError,
    ProcessorError,
)
from .generation import GenerationConfig, set_seed
from .image_processing import Idefics3ImageProcessor, load_image
from .modeling import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForVision2Seq,
    Idefics3ForConditionalGeneration,
    LlamaForCausalLM,
    ModelOutput,
    SmolVLMForConditionalGeneration,
)
from .peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from .peft_config import LoraConfig, TaskType
from .pipelines import ImageTextToTextPipeline, pipeline
from .processing import AutoProcessor, Idefics3Processor, SmolVLMProcessor
from .quantization_config import BitsAndBytesConfig
from .sft_config import SFTConfig
from .sft_trainer import SFTTrainer
from .streamers import TextIteratorStreamer, TextStreamer
from .tokenization import AutoTokenizer, PreTrainedTokenizerFast
from .trainer import TrainerState, TrainingError, TrainOutput
from .training_args import TrainingArguments

__all__ = [
    "BitsAndBytesConfig",
    "prepare_model_for_kbit_training",
    "LoraConfig",
    "TaskType",
    "PeftModel",
    "get_peft_model",
    "SFTConfig",
    "DPOConfig",
    "TrainingArguments",
    "SFTTrainer",
    "DPOTrainer",
    "DataCollatorForVisionPreference",
    "DataCollatorForVisionLanguageModeling",
    "DataCollatorForLanguageModeling",
    "TrlParser",
    "ScriptArguments",
    "ModelConfig",
    "get_peft_config",
    "get_quantization_config",
    "TrainerState",
    "TrainOutput",
    "TrainingError",
    "DistributedError",
    "__version__",
    "AutoModelForImageTextToText",
    "AutoModelForCausalLM",
    "LlamaForCausalLM",
    "LlamaConfig",
    "AutoModelForVision2Seq",
    "Idefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
    "ModelOutput",
    "GenerationConfig",
    "AutoProcessor",
    "AutoTokenizer",
    "Idefics3Processor",
    "SmolVLMProcessor",
    "Idefics3ImageProcessor",
    "PreTrainedTokenizerFast",
    "BatchFeature",
    "BatchEncoding",
    "load_image",
    "pipeline",
    "ImageTextToTextPipeline",
    "set_seed",
    "TextStreamer",
    "TextIteratorStreamer",
    "PretrainedConfig",
    "Idefics3Config",
    "SmolVLMConfig",
    "FerroVLMError",
    "ConfigError",
    "DeviceError",
    "CheckpointError",
    "ModelNotCachedError",
    "InputError",
    "InternalError",
    "ProcessorError",
]
