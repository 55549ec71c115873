"""Type stubs of the native module ``ferrovlm._core`` (hand-written; keep in sync with src/python/)."""

from typing import Any, Callable, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__", "FerroVLMError", "ConfigError", "CheckpointError", "ModelNotCachedError", "InputError",
    "ProcessorError", "InternalError", "DeviceError", "resolve_model_dir", "hub_cache_dir", "load_config_json",
    "VlmModel",
    "quantized_linear_names", "compose_vlm", "resize_embeddings", "generate_ids", "Tokenizer", "ChatTemplate",
    "load_chat_templates", "process_images",
    "decode_image_bytes", "expand_image_tokens", "linear_names", "add_adapters", "remove_adapters",
    "set_adapters_enabled", "upcast_dense_layers", "set_training", "adapters_enabled", "saved_module_params",
    "trainable_shapes",
    "adapter_state", "load_adapter_state", "save_safetensors", "load_safetensors", "TrainSession", "lr_multiplier",
    "sequence_logps", "module_names", "dpo_loss_types", "cpu_features", "GGUF_QUANTIZATION_METHODS",
    "reference_ops", "set_reference_ops", "cuda_built", "cuda_available", "resolve_device",
]

__version__: str

class FerroVLMError(Exception): ...
class ConfigError(FerroVLMError): ...
class CheckpointError(FerroVLMError): ...
class ModelNotCachedError(CheckpointError): ...
class InputError(FerroVLMError): ...
class ProcessorError(FerroVLMError): ...
class DeviceError(FerroVLMError): ...
class InternalError(FerroVLMError): ...

GGUF_QUANTIZATION_METHODS: tuple[str, ...]

def resolve_model_dir(
    id_or_path: str, revision: str | None = None, cache_dir: str | None = None, marker: str = "config.json"
) -> str: ...
def hub_cache_dir() -> str: ...
def load_config_json(dir: str) -> str: ...

@final
class VlmModel:
    @staticmethod
    def load(
        dir: str, dtype: str = "float32", quantization_config: str | None = None, device: str = "cpu"
    ) -> VlmModel: ...
    @staticmethod
    def load_gguf(
        path: str,
        dtype: str = "float32",
        mmproj: str | None = None,
        config_dir: str | None = None,
        model_type: str = "idefics3",
        device: str = "cpu",
    ) -> VlmModel: ...
    def save_gguf(
        self,
        directory: str,
        quantization_method: str = "f16",
        name_or_path: str = "",
        assets_dir: str | None = None,
        tokenizer_gguf: str | None = None,
        merge_adapters: bool = False,
        mmproj_gguf: str | None = None,
    ) -> tuple[str, str | None]: ...
    @property
    def quantization(self) -> tuple[str | None, int, int, int]: ...
    def save_weights(self, dir: str, max_shard_size: int | str | None = None) -> list[str]: ...
    @property
    def config_json(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    def to_device(self, device: str) -> None: ...
    @property
    def num_parameters(self) -> int: ...
    def named_parameters(self) -> list[tuple[str, list[int], str, bool]]: ...
    def parameter(self, name: str) -> npt.NDArray[np.float32]: ...
    def set_parameter(self, name: str, value: npt.NDArray[np.float32]) -> None: ...
    def snapshot(self) -> VlmModel: ...
    def trainable_copy(self, trainable: list[str]) -> VlmModel: ...
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64] | None = None,
        pixel_values: npt.NDArray[np.float32] | None = None,
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
        labels: npt.NDArray[np.int64] | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[npt.NDArray[np.float32], float | None, int]: ...
    def image_features(
        self,
        pixel_values: npt.NDArray[np.float32],
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[list[int], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

def compose_vlm(
    text_model: VlmModel,
    image_token_id: int,
    vocab_size: int,
    vision_config_json: str | None = None,
    vision_dir: str | None = None,
    vision_model: VlmModel | None = None,
    model_type: str = "idefics3",
    scale_factor: int = 2,
    reuse_connector: bool | None = None,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
    seed: int = 0,
) -> VlmModel: ...
def resize_embeddings(
    model: VlmModel,
    new_num_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
    seed: int = 0,
) -> int: ...

def generate_ids(
    model: VlmModel,
    input_ids: npt.NDArray[np.int64],
    attention_mask: npt.NDArray[np.int64] | None,
    pixel_values: npt.NDArray[np.float32] | None,
    pixel_attention_mask: npt.NDArray[np.bool_] | None,
    config: dict[str, Any],
    on_token: Callable[[list[int]], bool | None] | None = None,
) -> npt.NDArray[np.int64]: ...

@final
class Tokenizer:
    @staticmethod
    def from_dir(dir: str, model_type: str | None = None) -> Tokenizer: ...
    @staticmethod
    def from_gguf(path: str) -> tuple[Tokenizer, str | None]: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def encode_batch(
        self,
        texts: list[str],
        add_special_tokens: bool = True,
        padding: str = "do_not_pad",
        truncation: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]: ...
    def tokenize(self, text: str) -> list[str]: ...
    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str: ...
    def batch_decode(
        self,
        batch: list[list[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]: ...
    def convert_tokens_to_ids(self, token: str) -> int | None: ...
    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list[str | None]: ...
    def __len__(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def special_tokens_map(self) -> list[tuple[str, str]]: ...
    @property
    def extra_special_tokens(self) -> list[str]: ...
    @property
    def all_special_tokens(self) -> list[str]: ...
    @property
    def all_special_ids(self) -> list[int]: ...
    @property
    def added_tokens(self) -> list[tuple[int, str, bool]]: ...
    padding_side: str
    truncation_side: str
    @property
    def model_max_length(self) -> int | None: ...
    @property
    def clean_up_tokenization_spaces(self) -> bool: ...
    def copy(self) -> Tokenizer: ...
    def add_tokens(self, tokens: list[str], special: bool = False) -> int: ...
    def add_special_tokens(self, named: list[tuple[str, str]], extra: list[str], replace_extra: bool = True) -> int: ...
    def save_tokenizer_json(self, dir: str) -> None: ...
    def config_json(self, processor_class: str | None = None) -> str: ...

@final
class ChatTemplate:
    def __new__(cls, source: str) -> ChatTemplate: ...
    @property
    def source(self) -> str: ...
    def render(
        self,
        messages_json: str,
        add_generation_prompt: bool = False,
        continue_final_message: str | None = None,
        normalize_image_urls: bool = False,
        variables_json: str | None = None,
        tools_json: str | None = None,
        documents_json: str | None = None,
    ) -> str: ...

def load_chat_templates(dir: str, kind: str) -> list[tuple[str, str]] | None: ...

_PilTuple = tuple[str, int, int, bytes, bytes | None, str | None, Any]

def process_images(
    images: list[list[_PilTuple]], config_json: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None, list[list[int]], list[list[int]]]: ...
def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> tuple[str, int, int, bytes]: ...
def expand_image_tokens(
    texts: list[str],
    rows: list[list[int]],
    cols: list[list[int]],
    image_seq_len: int,
    image_token: str = "<image>",
    fake_image_token: str = "<fake_token_around_image>",
    global_image_token: str = "<global-img>",
) -> list[str]: ...

# -- adapters (crate::lora, crate::checkpoint::peft) ---------------------------------------------

def linear_names(model: VlmModel) -> list[str]: ...
def module_names(model: VlmModel) -> list[str]: ...
def add_adapters(
    model: VlmModel,
    targets: list[str],
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: str = "true",
    seed: int = 0,
    modules_to_save: list[str] = ...,
    saved_params: list[str] = ...,
) -> None: ...
def remove_adapters(model: VlmModel, merge: bool = False) -> None: ...
def set_adapters_enabled(model: VlmModel, enabled: bool) -> None: ...
def upcast_dense_layers(model: VlmModel) -> None: ...
def set_training(model: VlmModel, on: bool) -> None: ...
def quantized_linear_names(model: VlmModel) -> list[str]: ...
def adapters_enabled(model: VlmModel) -> bool: ...
def saved_module_params(model: VlmModel) -> list[str]: ...
def trainable_shapes(model: VlmModel) -> list[tuple[str, list[int]]]: ...
def adapter_state(model: VlmModel) -> dict[str, npt.NDArray[np.float32]]: ...
def load_adapter_state(model: VlmModel, state: dict[str, npt.NDArray[np.float32]], strict: bool = True) -> None: ...
def save_safetensors(path: str, state: dict[str, npt.NDArray[np.float32]]) -> None: ...
def load_safetensors(path: str) -> dict[str, npt.NDArray[np.float32]]: ...

# -- training (crate::train, crate::optim) --------------------------------------------------------

@final
class TrainSession:
    def __new__(
        cls,
        model: VlmModel,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        no_decay: list[str] = ...,
        feature_cache_mb: int = 1024,
        bf16: bool = False,
        trainable: list[str] = ...,
    ) -> TrainSession: ...
    @property
    def param_names(self) -> list[str]: ...
    @property
    def cached_images(self) -> int: ...
    @property
    def numel(self) -> int: ...
    def flat_grads(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...
    def set_flat_grads(
        self, flat: npt.NDArray[np.float32], present: npt.NDArray[np.bool_], scale: float = 1.0
    ) -> None: ...
    def flat_parameters(self) -> npt.NDArray[np.float32]: ...
    def set_flat_parameters(self, flat: npt.NDArray[np.float32]) -> None: ...
    def forward_backward(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64] | None = None,
        pixel_values: npt.NDArray[np.float32] | None = None,
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
        loss_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        dropout_seed: int = 0,
    ) -> dict[str, Any]: ...
    def evaluate(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64] | None = None,
        pixel_values: npt.NDArray[np.float32] | None = None,
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
    ) -> dict[str, Any]: ...
    def sequence_logps(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64] | None = None,
        pixel_values: npt.NDArray[np.float32] | None = None,
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
        average: bool = False,
    ) -> list[float]: ...
    def dpo_step(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        ref_logps: list[float],
        losses: list[tuple[str, float]],
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        attention_mask: npt.NDArray[np.int64] | None = None,
        pixel_values: npt.NDArray[np.float32] | None = None,
        pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
        loss_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        dropout_seed: int = 0,
        backward: bool = True,
    ) -> dict[str, Any]: ...
    def grads(self) -> dict[str, npt.NDArray[np.float32]]: ...
    def zero_grad(self) -> None: ...
    def optimizer_step(self, lr: float, max_grad_norm: float) -> float: ...
    def optimizer_state(self) -> dict[str, Any]: ...
    def load_parameters(self, state: dict[str, npt.NDArray[np.float32]]) -> None: ...
    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

def lr_multiplier(kind: str, step: int, total: int, warmup: int) -> float: ...
def dpo_loss_types() -> list[str]: ...

def sequence_logps(
    model: VlmModel,
    input_ids: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    attention_mask: npt.NDArray[np.int64] | None = None,
    pixel_values: npt.NDArray[np.float32] | None = None,
    pixel_attention_mask: npt.NDArray[np.bool_] | None = None,
    average: bool = False,
) -> list[float]: ...

def cpu_features() -> dict[str, bool | str]: ...
def reference_ops() -> bool: ...
def set_reference_ops(on: bool) -> None: ...
def cuda_built() -> bool: ...
def cuda_available() -> bool: ...
def resolve_device(spec: str) -> str: ...
