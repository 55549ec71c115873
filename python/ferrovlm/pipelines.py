"""``pipeline("image-text-to-text", model=...)``, as in transformers."""

from __future__ import annotations

import os
from typing import Any, Optional

from .modeling import AutoModelForImageTextToText, Idefics3ForConditionalGeneration
from .processing import AutoProcessor


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


class ImageTextToTextPipeline:
    """Chat in, text out: ``pipe(text=messages, max_new_tokens=..., return_full_text=False)``."""

    def __init__(self, model: Idefics3ForConditionalGeneration, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def __call__(self, images: Any = None, text: Any = None, max_new_tokens: Optional[int] = None,
                 return_full_text: Optional[bool] = None, continue_final_message: Optional[bool] = None,
                 generate_kwargs: Optional[dict[str, Any]] = None, skip_special_tokens: bool = True,
                 **kwargs: Any) -> Any:
        if images is not None and text is None and (_is_chat(images) or isinstance(images, dict)):
            images, text = None, images  # pipe(messages)
        gen = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            gen["max_new_tokens"] = max_new_tokens
        gen.update(kwargs)
        batch = (
            isinstance(text, (list, tuple))
            and len(text) > 0
            and (_is_chat(text[0]) or isinstance(text[0], str))
            and not _is_chat(text)
        )
        items = list(text) if batch else [text]
        results = [
            self._one(images, t, return_full_text, continue_final_message, gen, skip_special_tokens) for t in items
        ]
        return results if batch else results[0]

    def _one(self, images: Any, text: Any, return_full_text: Optional[bool], continue_final: Optional[bool],
             gen: dict[str, Any], skip_special_tokens: bool) -> list[dict[str, Any]]:
        full = True if return_full_text is None else return_full_text
        if _is_chat(text):
            messages = list(text)
            cont = continue_final if continue_final is not None else messages[-1]["role"] == "assistant"
            inputs = self.processor.apply_chat_template(
                messages, add_generation_prompt=not cont, continue_final_message=cont, tokenize=True,
                return_dict=True, return_tensors="np",
            )
        else:
            messages, cont = None, False
            inputs = self.processor(images=images, text=text, return_tensors="np")
        out = self.model.generate(**inputs, **gen)
        decoded = self.processor.batch_decode(out, skip_special_tokens=skip_special_tokens)[0]
        prompt = self.processor.batch_decode(inputs["input_ids"], skip_special_tokens=skip_special_tokens)[0]
        at = decoded.find(prompt)
        new_text = decoded[at + len(prompt):] if 0 <= at <= 2 else decoded
        if not full:
            generated: Any = new_text
        elif messages is None:
            generated = text + new_text
        elif cont:
            last = dict(messages[-1])
            content = last["content"]
            if isinstance(content, str):
                last["content"] = content + new_text
            else:
                item = dict(content[-1])
                item["text"] = item.get("text", "") + new_text
                last["content"] = list(content[:-1]) + [item]
            generated = messages[:-1] + [last]
        else:
            generated = messages + [{"role": "assistant", "content": new_text}]
        return [{"input_text": messages if messages is not None else text, "generated_text": generated}]


def pipeline(
    task: str, model: Any = None, processor: Any = None, tokenizer: Any = None, **kwargs: Any
) -> ImageTextToTextPipeline:
    """Only ``"image-text-to-text"`` is provided. ``model`` is a loaded model or a dir / hub id."""
    if task != "image-text-to-text":
        raise ValueError(f"unsupported task {task!r}; ferrovlm provides 'image-text-to-text'")
    if model is None:
        raise ValueError("pipeline() needs model=")
    model_kwargs = {
        k: kwargs.pop(k) for k in ("torch_dtype", "dtype", "device_map", "revision", "cache_dir") if k in kwargs
    }
    kwargs.pop("device", None)
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
    if isinstance(model, (str, os.PathLike)):
        source = model
        model = AutoModelForImageTextToText.from_pretrained(model, **model_kwargs)
    else:
        source = model.config._name_or_path
    if processor is None:
        processor = AutoProcessor.from_pretrained(source)
    return ImageTextToTextPipeline(model, processor)
