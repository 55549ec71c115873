"""``Idefics3ImageProcessor`` (the slow, PIL-exact path, computed in Rust) and ``load_image``."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import _core
from .batch import BatchFeature
from .errors import ProcessorError

# Pillow's Image.MAX_IMAGE_PIXELS error threshold (it raises above twice its warning limit).
MAX_IMAGE_PIXELS: Optional[int] = 2 * 89_478_485

_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"longest_edge": 4 * 364},
    "resample": 1,  # LANCZOS
    "do_image_splitting": True,
    "max_image_size": {"longest_edge": 364},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pad": True,
}


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "tobytes") and hasattr(x, "mode")


def is_image(x: Any) -> bool:
    """PIL images, HWC uint8 numpy arrays (and torch tensors of those) count as images."""
    if _is_pil(x):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim in (2, 3)
    return type(x).__module__.startswith("torch") and getattr(x, "ndim", 0) in (2, 3)


def load_image(image: Any, timeout: Optional[float] = None) -> Any:
    """An RGB image from a path, an http(s) URL, raw bytes or a PIL image, with the EXIF orientation
    applied (like transformers' ``load_image``). Returns a PIL image when Pillow is installed,
    otherwise an HWC uint8 numpy array."""
    if _is_pil(image):
        from PIL import ImageOps

        return ImageOps.exif_transpose(image).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        s = os.fspath(image)
        if s.startswith(("http://", "https://")):
            import urllib.request

            try:
                with urllib.request.urlopen(s, timeout=timeout) as r:  # noqa: S310 (user-given URL)
                    data = r.read()
            except Exception as err:
                raise ProcessorError(f"cannot download image {s}: {err}") from None
        else:
            try:
                data = Path(s).read_bytes()
            except OSError as err:
                raise ProcessorError(f"cannot read image {s}: {err}") from None
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        raise TypeError(f"load_image takes a path, URL, bytes or PIL image, not {type(image).__name__}")
    try:
        from PIL import Image, ImageOps

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Image.DecompressionBombError as err:
            raise ProcessorError(str(err)) from None
        except Exception as err:
            raise ProcessorError(f"cannot decode image: {err}") from None
        return ImageOps.exif_transpose(img).convert("RGB")
    except ImportError:
        mode, w, h, px = _core.decode_image_bytes(data, MAX_IMAGE_PIXELS)
        arr = np.frombuffer(px, dtype=np.uint8).reshape(h, w, -1)
        return arr[..., :3] if arr.shape[2] >= 3 else np.repeat(arr[..., :1], 3, axis=2)


def to_pil_tuple(image: Any, where: str) -> tuple:
    """What the Rust processor takes: (mode, width, height, bytes, palette, palette mode, transparency)."""
    if _is_pil(image):
        w, h = image.size
        if MAX_IMAGE_PIXELS is not None and w * h > MAX_IMAGE_PIXELS:
            raise ProcessorError(f"{where}: image of {w}x{h} = {w * h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                                 "(ferrovlm.image_processing.MAX_IMAGE_PIXELS, like Pillow's decompression-bomb guard)")
        palette = palette_mode = None
        if image.mode in ("P", "PA"):
            palette_mode = getattr(getattr(image, "palette", None), "mode", "RGB") or "RGB"
            palette = bytes(image.getpalette(palette_mode) or b"")
        tr = image.info.get("transparency") if hasattr(image, "info") else None
        if isinstance(tr, list):
            tr = tuple(tr)
        return (image.mode, w, h, image.tobytes(), palette, palette_mode, tr)
    arr = image
    if type(arr).__module__.startswith("torch"):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ProcessorError(f"{where}: numpy images must be uint8 (HWC), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    mode = {2: "L"}.get(arr.ndim) or {3: "RGB", 4: "RGBA"}.get(arr.shape[2])
    if mode is None:
        raise ProcessorError(f"{where}: cannot read an image of shape {arr.shape}")
    h, w = arr.shape[:2]
    return (mode, w, h, np.ascontiguousarray(arr).tobytes(), None, None, None)


class Idefics3ImageProcessor:
    """Resizing, splitting into tiles + global image, RGB conversion, rescale, normalise and padding,
    bit-exact with transformers' PIL image processor. Settings are attributes (assignable)."""

    model_input_names = ["pixel_values", "pixel_attention_mask"]

    def __init__(self, **kwargs: Any) -> None:
        for k, v in _DEFAULTS.items():
            setattr(self, k, copy.deepcopy(v))
        for k, v in kwargs.items():
            setattr(self, k, v)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Idefics3ImageProcessor:
        return cls(**{k: v for k, v in data.items() if k not in ("image_processor_type", "processor_class")})

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["image_processor_type"] = type(self).__name__
        return d

    def _config_json(self, overrides: dict[str, Any]) -> str:
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        return json.dumps(d, default=_jsonable)

    def __call__(
        self, images: Any, return_tensors: Optional[str] = None, return_row_col_info: bool = False, **kwargs: Any
    ) -> BatchFeature:
        nested = nest_images(images)
        pv, mask, rows, cols = self.process(nested, **kwargs)
        data: dict[str, Any] = {"pixel_values": pv}
        if mask is not None:
            data["pixel_attention_mask"] = mask
        if return_row_col_info:
            data["rows"], data["cols"] = rows, cols
        return BatchFeature(data, tensor_type=return_tensors)

    preprocess = __call__

    def process(self, nested: list[list[Any]], **overrides: Any):
        """(pixel_values, pixel_attention_mask or None, rows, cols) for images grouped per sample."""
        tuples = [
            [to_pil_tuple(img, f"sample {s}, image {i}") for i, img in enumerate(sample)]
            for s, sample in enumerate(nested)
        ]
        return _core.process_images(tuples, self._config_json(overrides))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, default=_jsonable)}"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "value"):  # PIL.Image.Resampling enums
        return int(v.value)
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {v!r}")


def nest_images(images: Any) -> list[list[Any]]:
    """A single image, a flat list (one sample with those images) or per-sample lists -> per-sample
    lists (transformers' ``make_nested_list_of_images``)."""
    if images is None:
        return []
    if is_image(images):
        return [[images]]
    if isinstance(images, (list, tuple)):
        if all(isinstance(x, (list, tuple)) for x in images):
            return [list(x) for x in images]
        return [list(images)]
    raise TypeError(f"images must be an image, a list of images or a list of lists, not {type(images).__name__}")
