"""Type stubs of the native module ``ferrovlm._core`` (hand-written; keep in sync with src/python/)."""

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class FerroVLMError(Exception): ...
class ConfigError(FerroVLMError): ...
class CheckpointError(FerroVLMError): ...
class ModelNotCachedError(CheckpointError): ...
class InputError(FerroVLMError): ...
class ProcessorError(FerroVLMError): ...
class InternalError(FerroVLMError): ...

def resolve_model_dir(id_or_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None, marker: str = "config.json") -> str: ...
def hub_cache_dir() -> str: ...
def load_config_json(dir: str) -> str: ...

class VlmModel:
    @staticmethod
    def load(dir: str, dtype: str = "float32", quantization_config: Optional[str] = None) -> "VlmModel": ...
    @property
    def quantization(self) -> Tuple[Optional[str], int, int, int]: ...
    def save_weights(self, dir: str) -> None: ...
    @property
    def config_json(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_parameters(self) -> int: ...
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
        labels: Optional[npt.NDArray[np.int64]] = None,
        logits_to_keep: int = 0,
    ) -> Tuple[npt.NDArray[np.float32], Optional[float], int]: ...
    def image_features(
        self,
        pixel_values: npt.NDArray[np.float32],
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
    ) -> Tuple[List[int], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

def generate_ids(
    model: VlmModel,
    input_ids: npt.NDArray[np.int64],
    attention_mask: Optional[npt.NDArray[np.int64]],
    pixel_values: Optional[npt.NDArray[np.float32]],
    pixel_attention_mask: Optional[npt.NDArray[np.bool_]],
    config: Dict[str, Any],
    on_token: Optional[Callable[[List[int]], Optional[bool]]] = None,
) -> npt.NDArray[np.int64]: ...

class Tokenizer:
    @staticmethod
    def from_dir(dir: str, model_type: Optional[str] = None) -> "Tokenizer": ...
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]: ...
    def encode_batch(
        self,
        texts: List[str],
        add_special_tokens: bool = True,
        padding: str = "do_not_pad",
        truncation: bool = False,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        truncation_side: Optional[str] = None,
    ) -> Tuple[List[List[int]], List[List[int]]]: ...
    def tokenize(self, text: str) -> List[str]: ...
    def decode(self, ids: List[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: Optional[bool] = None) -> str: ...
    def batch_decode(self, batch: List[List[int]], skip_special_tokens: bool = False, clean_up_tokenization_spaces: Optional[bool] = None) -> List[str]: ...
    def convert_tokens_to_ids(self, token: str) -> Optional[int]: ...
    def convert_ids_to_tokens(self, ids: List[int], skip_special_tokens: bool = False) -> List[Optional[str]]: ...
    def __len__(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def special_tokens_map(self) -> List[Tuple[str, str]]: ...
    @property
    def extra_special_tokens(self) -> List[str]: ...
    @property
    def all_special_tokens(self) -> List[str]: ...
    @property
    def all_special_ids(self) -> List[int]: ...
    @property
    def added_tokens(self) -> List[Tuple[int, str, bool]]: ...
    padding_side: str
    truncation_side: str
    @property
    def model_max_length(self) -> Optional[int]: ...
    @property
    def clean_up_tokenization_spaces(self) -> bool: ...

class ChatTemplate:
    def __init__(self, source: str) -> None: ...
    @property
    def source(self) -> str: ...
    def render(
        self,
        messages_json: str,
        add_generation_prompt: bool = False,
        continue_final_message: Optional[str] = None,
        normalize_image_urls: bool = False,
        variables_json: Optional[str] = None,
        tools_json: Optional[str] = None,
        documents_json: Optional[str] = None,
    ) -> str: ...

def load_chat_templates(dir: str, kind: str) -> Optional[List[Tuple[str, str]]]: ...

PilTuple = Tuple[str, int, int, bytes, Optional[bytes], Optional[str], Any]

def process_images(
    images: List[List[PilTuple]], config_json: str
) -> Tuple[npt.NDArray[np.float32], Optional[npt.NDArray[np.bool_]], List[List[int]], List[List[int]]]: ...
def decode_image_bytes(data: bytes, max_pixels: Optional[int] = None) -> Tuple[str, int, int, bytes]: ...
def expand_image_tokens(
    texts: List[str],
    rows: List[List[int]],
    cols: List[List[int]],
    image_seq_len: int,
    image_token: str = "<image>",
    fake_image_token: str = "<fake_token_around_image>",
    global_image_token: str = "<global-img>",
) -> List[str]: ...

# -- adapters (crate::lora, crate::checkpoint::peft) ---------------------------------------------

def linear_names(model: VlmModel) -> List[str]: ...
def add_adapters(
    model: VlmModel,
    targets: List[str],
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: str = "true",
    seed: int = 0,
    modules_to_save: List[str] = ...,
) -> None: ...
def remove_adapters(model: VlmModel, merge: bool = False) -> None: ...
def set_adapters_enabled(model: VlmModel, enabled: bool) -> None: ...
def upcast_dense_layers(model: VlmModel) -> None: ...
def set_training(model: VlmModel, on: bool) -> None: ...
def quantized_linear_names(model: VlmModel) -> List[str]: ...
def adapters_enabled(model: VlmModel) -> bool: ...
def trainable_shapes(model: VlmModel) -> List[Tuple[str, List[int]]]: ...
def adapter_state(model: VlmModel) -> Dict[str, npt.NDArray[np.float32]]: ...
def load_adapter_state(model: VlmModel, state: Dict[str, npt.NDArray[np.float32]], strict: bool = True) -> None: ...
def save_safetensors(path: str, state: Dict[str, npt.NDArray[np.float32]]) -> None: ...
def load_safetensors(path: str) -> Dict[str, npt.NDArray[np.float32]]: ...

# -- training (crate::train, crate::optim) --------------------------------------------------------

class TrainSession:
    def __init__(
        self,
        model: VlmModel,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        no_decay: List[str] = ...,
        feature_cache_mb: int = 1024,
    ) -> None: ...
    @property
    def param_names(self) -> List[str]: ...
    @property
    def cached_images(self) -> int: ...
    def forward_backward(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
        loss_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        dropout_seed: int = 0,
    ) -> Dict[str, Any]: ...
    def evaluate(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
    ) -> Dict[str, Any]: ...
    def sequence_logps(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
        average: bool = False,
    ) -> List[float]: ...
    def dpo_step(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        ref_logps: List[float],
        losses: List[Tuple[str, float]],
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
        loss_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        dropout_seed: int = 0,
        backward: bool = True,
    ) -> Dict[str, Any]: ...
    def grads(self) -> Dict[str, npt.NDArray[np.float32]]: ...
    def zero_grad(self) -> None: ...
    def optimizer_step(self, lr: float, max_grad_norm: float) -> float: ...
    def optimizer_state(self) -> Dict[str, Any]: ...
    def load_optimizer_state(self, state: Dict[str, Any]) -> None: ...

def lr_multiplier(kind: str, step: int, total: int, warmup: int) -> float: ...

def sequence_logps(
    model: VlmModel,
    input_ids: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    attention_mask: Optional[npt.NDArray[np.int64]] = None,
    pixel_values: Optional[npt.NDArray[np.float32]] = None,
    pixel_attention_mask: Optional[npt.NDArray[np.bool_]] = None,
    average: bool = False,
) -> List[float]: ...
