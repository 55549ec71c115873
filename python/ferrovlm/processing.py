"""``Idefics3Processor`` / ``SmolVLMProcessor`` and ``AutoProcessor``: chat template, prompt expansion,
tokenizer and image processor, producing exactly transformers' inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from . import _core
from .batch import BatchFeature
from .errors import ProcessorError
from .hub import resolve_pretrained_kwargs
from .image_processing import Idefics3ImageProcessor, is_image, load_image
from .tokenization import PreTrainedTokenizerFast, _model_type, _templates_value, render_conversations


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as err:
        raise ProcessorError(f"{path}: invalid JSON: {err}") from None


class Idefics3Processor:
    """Turns chat text and images into ``input_ids``, ``attention_mask``, ``pixel_values`` and
    ``pixel_attention_mask`` for Idefics3 / SmolVLM models."""

    def __init__(self, image_processor: Idefics3ImageProcessor, tokenizer: PreTrainedTokenizerFast,
                 image_seq_len: int = 169, chat_template: Any = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = image_seq_len
        self.chat_template = chat_template
        self.fake_image_token = "<fake_token_around_image>"
        self.image_token = "<image>"
        self.end_of_utterance_token = "<end_of_utterance>"
        self.global_image_tag = "<global-img>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(self.fake_image_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Idefics3Processor:
        path = resolve_pretrained_kwargs(pretrained_model_name_or_path, kwargs, marker="tokenizer.json")
        d = Path(path)
        proc_cfg = _read_json(d / "processor_config.json")
        img_cfg = _read_json(d / "preprocessor_config.json")
        nested = proc_cfg.get("image_processor")  # newer saves nest the image processor here
        if isinstance(nested, dict):
            img_cfg = {**img_cfg, **nested}
        img_cfg.update({k: kwargs.pop(k) for k in list(kwargs) if k in Idefics3ImageProcessor().__dict__})
        image_processor = Idefics3ImageProcessor.from_dict(img_cfg)
        core = _core.Tokenizer.from_dir(path, _model_type(path))
        tokenizer = PreTrainedTokenizerFast(core, os.fspath(pretrained_model_name_or_path),
                                            _templates_value(_core.load_chat_templates(path, "tokenizer")))
        if "padding_side" in kwargs:
            tokenizer.padding_side = kwargs.pop("padding_side")
        image_seq_len = int(kwargs.pop("image_seq_len", proc_cfg.get("image_seq_len", 169)))
        chat_template = _templates_value(_core.load_chat_templates(path, "processor"))
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        return cls(image_processor, tokenizer, image_seq_len, chat_template)

    @classmethod
    def from_text_model(cls, tokenizer: Any, image_size: int, *, patch_size: int = 16, scale_factor: int = 2,
                        image_seq_len: Optional[int] = None, do_image_splitting: bool = False,
                        longest_edge: Optional[int] = None, chat_template: Optional[str] = None,
                        **image_processor_kwargs: Any) -> Idefics3Processor:
        """The processor of a VLM built from a language model (``Idefics3ForConditionalGeneration.from_text_model``):
        a copy of ``tokenizer`` with SmolVLM's image tokens added as transformers adds them and
        ``<end_of_utterance>`` as EOS, SmolVLM's chat template (or ``chat_template``), and an image processor for
        ``image_size`` x ``image_size`` tiles (``max_image_size``; ``size`` is ``longest_edge``, by default
        ``image_size``, or 4x that with ``do_image_splitting``) of ``(image_size // patch_size)**2 //
        scale_factor**2`` image tokens each. See ``ferrovlm.composition``."""
        from .composition import processor_from_text_model

        return processor_from_text_model(
            cls, tokenizer, image_size, patch_size=patch_size, scale_factor=scale_factor,
            image_seq_len=image_seq_len, do_image_splitting=do_image_splitting, longest_edge=longest_edge,
            chat_template=chat_template, **image_processor_kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> list[str]:
        """The tokenizer's files, ``processor_config.json`` (image processor nested, ``image_seq_len``) and
        ``chat_template.jinja``, as transformers 5 writes them; returns the paths."""
        from .composition import save_processor

        return save_processor(self, os.fspath(save_directory))

    # -- main call -------------------------------------------------------------------------------
    def __call__(self, images: Any = None, text: Any = None, *args: Any, return_tensors: Optional[str] = None,
                 padding: Any = False, truncation: Any = None, max_length: Optional[int] = None,
                 padding_side: Optional[str] = None, add_special_tokens: bool = True,
                 image_seq_len: Optional[int] = None, **kwargs: Any) -> BatchFeature:
        # Positional (text, images) as older tutorials write it, or (images, text) as transformers 5 does.
        if args:
            raise TypeError("pass at most images and text positionally")
        if _looks_like_text(images) and not _looks_like_text(text):
            images, text = text, images
        images_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in self.image_processor.__dict__}
        kwargs.pop("return_row_col_info", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if text is None and images is None:
            raise ValueError("You must provide either `text` or `images`.")
        texts = None if text is None else ([text] if isinstance(text, str) else list(text))
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        nested = self._layout(images, texts)
        data: dict[str, Any] = {}
        seq_len = image_seq_len if image_seq_len is not None else self.image_seq_len
        if nested is not None:
            if texts is not None:
                counts = [t.count(self.image_token) for t in texts]
                given = [len(s) for s in nested]
                if counts != given:
                    bad = (
                        next(i for i, (a, b) in enumerate(zip(counts, given)) if a != b)
                        if len(counts) == len(given)
                        else min(len(counts), len(given))
                    )
                    raise ProcessorError(
                        f"sample {bad}: the number of {self.image_token} tokens in each prompt must equal the "
                        f"number of images; found {counts} {self.image_token} tokens and {given} images per sample"
                    )
            pv, mask, rows, cols = self.image_processor.process(nested, **images_kwargs)
            data["pixel_values"] = pv
            if mask is not None:
                data["pixel_attention_mask"] = mask
            if texts is not None:
                texts = _core.expand_image_tokens(texts, rows, cols, seq_len, self.image_token,
                                                  self.fake_image_token, self.global_image_tag)
        if texts is not None:
            enc = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                                 max_length=max_length, padding_side=padding_side)
            data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **data}
        return BatchFeature(data, tensor_type=return_tensors)

    def _layout(self, images: Any, texts: Optional[list[str]]) -> Optional[list[list[Any]]]:
        """Images grouped per sample, as transformers' ``prepare_inputs_layout`` groups them."""
        if images is None:
            return None
        if is_image(images) or isinstance(images, (str, os.PathLike)):
            images = [[images]]
        elif isinstance(images, (list, tuple)) and images and not all(isinstance(x, (list, tuple)) for x in images):
            flat = list(images)
            if texts is not None:
                counts = [t.count(self.image_token) for t in texts]
                groups, start = [], 0
                for c in counts:
                    groups.append(flat[start : start + c])
                    start += c
                if start < len(flat):
                    groups.append(flat[start:])
                images = groups
            else:
                images = [flat]
        elif not isinstance(images, (list, tuple)):
            raise TypeError(
                f"images must be an image, a list of images or a list of lists, not {type(images).__name__}"
            )
        return [[load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in sample] for sample in images]

    # -- tokenizer passthroughs ---------------------------------------------------------------
    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: Optional[str] = None, tools: Any = None,
                            documents: Any = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: Optional[str] = None, padding: Any = False,
                            **kwargs: Any) -> Any:
        """Renders the processor's chat template; with ``tokenize=True`` also runs the processor on the
        text and on the images found in the messages (``{"type": "image", "image" | "url" | "path": ...}``)."""
        processor_kwargs = {k: kwargs.pop(k) for k in ("truncation", "max_length", "padding_side") if k in kwargs}
        texts, batched = render_conversations(
            self,
            conversation,
            chat_template,
            tools,
            documents,
            add_generation_prompt,
            continue_final_message,
            normalize_image_urls=True,
            kwargs=kwargs,
        )
        if not tokenize:
            return texts if batched else texts[0]
        convs = conversation if batched else [conversation]
        images = [_images_in(conv) for conv in convs]
        out = self(images=images if any(images) else None, text=texts, return_tensors=return_tensors,
                   padding=padding, add_special_tokens=False, **processor_kwargs)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_seq_len={self.image_seq_len}, image_processor={self.image_processor!r})"


def _looks_like_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x))


def _images_in(conversation: Any) -> list[Any]:
    found = []
    for m in conversation:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if isinstance(item, dict) and item.get("type") in ("image", "image_url"):
                # the first key present (an image may be a numpy array, which has no truth value)
                src = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
                if src is None and isinstance(item.get("image_url"), dict):
                    src = item["image_url"].get("url")
                if src is not None:
                    found.append(load_image(src) if isinstance(src, (str, os.PathLike)) else src)
    return found


class SmolVLMProcessor(Idefics3Processor):
    """SmolVLM2's processor: the same image layout and tokens for images."""


class AutoProcessor:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Idefics3Processor:
        path = resolve_pretrained_kwargs(pretrained_model_name_or_path, kwargs, marker="tokenizer.json")
        cls_name = _read_json(Path(path) / "processor_config.json").get("processor_class", "")
        cls = SmolVLMProcessor if "SmolVLM" in cls_name or _model_type(path) == "smolvlm" else Idefics3Processor
        return cls.from_pretrained(path, **kwargs)
