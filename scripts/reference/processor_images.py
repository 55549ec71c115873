#!/usr/bin/env python
"""Reference fixtures for ferrovlm's Rust image processor (tests/image_processor.rs).

Dev-only tool; needs Pillow, numpy and transformers:

    python scripts/reference/processor_images.py [FIXTURES_DIR]

or `from processor_images import main; main(Path(...))`. It rewrites FIXTURES_DIR
(default tests/fixtures/processor_images/) with:

  images/*.png, *.tiff, *.jpg  deterministic synthetic test images (gradients + noise) in PIL modes
                               RGB, RGBA, L, LA, P (+ tRNS), 1, I;16, RGB/L with a tRNS key, CMYK,
                               one PNG with an EXIF orientation, one JPEG.
  cases.json                   what every npz holds (configs, image lists, keys); the Rust test is
                               driven by it.
  processor/<case>.npz         transformers' Idefics3ImageProcessorPil outputs:
                               pixel_values f32 [B,F,3,H,W] (or, for the big real-size cases,
                               pixel_u8 u8 [B,F,3,H,W] + value_table f32 [3,256]: value =
                               value_table[c][u8] where the mask is 1, else 0.0; checked exact here),
                               pixel_attention_mask bool [B,F,H,W], rows / cols int64 [n_images]
                               (flattened, samples in order), images_per_sample int64 [B].
  pil_inputs.npz               PIL's view of the non-RGB images (mode, tobytes(), palette,
                               info["transparency"]) for RawImage::from_pil: <name>_bytes,
                               <name>_palette, <name>_trns.
  resize.npz                   PIL Image.resize per filter: r<i>_in u8 [H,W,C], r<i>_out u8 [h,w,C].
  convert.npz                  transformers' convert_to_rgb on exhaustive / random pixels:
                               <key>_in (tobytes), <key>_pal, <key>_trns, <key>_out u8 [H,W,3].
  decode.npz                   what transformers sees for each file: <name> u8 [H,W,3] =
                               convert_to_rgb(exif_transpose(Image.open(f))), and
                               <name>_load u8 [H,W,3] = np.array(load_image(f)) (alpha dropped).

Images are opened with Image.open + ImageOps.exif_transpose (modes preserved) and passed to the
processor as PIL images, as a user would. The processor is the PIL ("slow") class, not the
torchvision one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import transformers
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "tests" / "fixtures" / "processor_images"


# ----------------------------------------------------------------------------------------------
# Synthetic images


def pattern(w: int, h: int, c: int, seed: int, noise: int = 40, ripple: bool = True) -> np.ndarray:
    """Smooth gradients + a ripple + uniform noise, uint8 [h, w, c]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for ch in range(c):
        base = 127.5 + 100 * np.sin((x / max(w, 1)) * (2 + ch) * np.pi + ch) * np.cos(
            (y / max(h, 1)) * (1 + ch) * np.pi
        )
        base += 20 * np.sin((x + 2 * y) / (3.0 + ch)) if ripple else 0
        base += rng.integers(-noise, noise + 1, size=(h, w)) if noise else 0
        out.append(base)
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def make_images() -> dict[str, Image.Image]:
    """name -> PIL image (saved as images/<name>)."""
    ims: dict[str, Image.Image] = {}
    ims["rgb_37x53.png"] = Image.fromarray(pattern(37, 53, 3, 1))
    ims["rgb_1x1.png"] = Image.fromarray(np.array([[[200, 30, 90]]], np.uint8))
    ims["rgb_10x2000.png"] = Image.fromarray(pattern(10, 2000, 3, 2, noise=6))
    ims["rgb_2000x10.png"] = Image.fromarray(pattern(2000, 10, 3, 3, noise=6))
    ims["rgb_511x513.png"] = Image.fromarray(pattern(511, 513, 3, 4, noise=2))
    ims["rgb_128x64.png"] = Image.fromarray(pattern(128, 64, 3, 5))
    ims["rgb_300x200.png"] = Image.fromarray(pattern(300, 200, 3, 6, noise=8))
    ims["rgb_100x70.png"] = Image.fromarray(pattern(100, 70, 3, 7))
    ims["rgb_900x40.png"] = Image.fromarray(pattern(900, 40, 3, 20, noise=0, ripple=False))
    rgba = pattern(61, 47, 4, 8)
    rgba[:10, :, 3] = 0  # fully transparent band
    rgba[10:20, :, 3] = 255  # opaque band
    ims["rgba_61x47.png"] = Image.fromarray(rgba, "RGBA")
    ims["l_45x30.png"] = Image.fromarray(pattern(45, 30, 1, 9)[..., 0], "L")
    ims["la_33x20.png"] = Image.fromarray(pattern(33, 20, 2, 10), "LA")
    pal = pattern(16, 1, 3, 11, noise=60).reshape(-1).tolist()
    idx = (pattern(50, 40, 1, 12)[..., 0] // 16).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal)
    ims["p_50x40.png"] = p
    p2 = Image.fromarray(idx[:30, :40].copy(), "P")
    p2.putpalette(pal)
    p2.info["transparency"] = bytes([255, 0, 128, 255, 30, 255, 255, 200, 0, 255, 255, 64, 255, 255, 255, 1])
    ims["p_trns_40x30.png"] = p2
    p3 = Image.fromarray(idx[:20, :25].copy(), "P")
    p3.putpalette(pal)
    p3.info["transparency"] = 3
    ims["p_key_25x20.png"] = p3
    bits = pattern(29, 31, 1, 13)[..., 0] > 127
    ims["one_29x31.png"] = Image.fromarray(bits).convert("1")
    i16 = (pattern(23, 19, 1, 14)[..., 0].astype(np.uint16) * 3).astype(np.uint16)
    ims["i16_23x19.png"] = Image.fromarray(i16)  # mode I;16: values above 255 clip
    rgbk = pattern(25, 17, 3, 15)
    rgbk[3:9, 4:12] = (10, 20, 30)
    im = Image.fromarray(rgbk)
    im.info["transparency"] = (10, 20, 30)
    ims["rgb_key_25x17.png"] = im
    lk = pattern(27, 15, 1, 16)[..., 0]
    lk[2:7, 5:15] = 77
    im = Image.fromarray(lk, "L")
    im.info["transparency"] = 77
    ims["l_key_27x15.png"] = im
    ims["cmyk_40x24.tiff"] = Image.fromarray(pattern(40, 24, 4, 17), "CMYK")
    # EXIF orientation 6 (rotate 90 CW to display) on a 30x20 PNG -> 20x30 after exif_transpose.
    ex = Image.fromarray(pattern(30, 20, 3, 18))
    exif = Image.Exif()
    exif[0x0112] = 6
    ex.info["exif"] = exif.tobytes()
    ims["exif6_30x20.png"] = ex
    ims["jpeg_64x48.jpg"] = Image.fromarray(pattern(64, 48, 3, 19, noise=10))
    return ims


def save(im: Image.Image, path: Path) -> None:
    kw = {}
    if "transparency" in im.info:
        kw["transparency"] = im.info["transparency"]
    if "exif" in im.info:
        kw["exif"] = im.info["exif"]
    if path.suffix == ".jpg":
        kw["quality"] = 90
    if path.suffix == ".tiff":
        kw["compression"] = "tiff_lzw"
    im.save(path, **kw)


def open_like_user(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return ImageOps.exif_transpose(im)


# ----------------------------------------------------------------------------------------------
# Processor cases

SMALL = {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}}
TINY = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
SMOLVLM_256M = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1}
SMOLVLM_2B = {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}, "resample": 1}
CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}

MODE_IMAGES = [
    "rgba_61x47.png", "l_45x30.png", "la_33x20.png", "p_50x40.png", "p_trns_40x30.png",
    "p_key_25x20.png", "one_29x31.png", "i16_23x19.png", "rgb_key_25x17.png", "l_key_27x15.png",
    "cmyk_40x24.tiff",
]
SIZE_IMAGES = [
    "rgb_37x53.png", "rgb_1x1.png", "rgb_10x2000.png", "rgb_2000x10.png", "rgb_511x513.png",
    "rgb_128x64.png", "rgb_300x200.png", "exif6_30x20.png",
]


def cases() -> list[dict]:
    out = []

    def add(name, config, images, encoding="f32"):
        out.append({"name": name, "config": config, "images": images, "encoding": encoding})

    for im in SIZE_IMAGES:
        stem = im.rsplit(".", 1)[0]
        add(f"split_{stem}", dict(SMALL), [[im]])
        add(f"nosplit_{stem}", dict(SMALL, do_image_splitting=False), [[im]])
    for im in MODE_IMAGES:
        add(f"mode_{im.rsplit('.', 1)[0]}", dict(TINY), [[im]])
    add("tiny_multiple_64x32", dict(TINY), [["rgb_128x64.png"]])
    for code, fname in [(0, "nearest"), (2, "bilinear"), (3, "bicubic"), (4, "box"), (5, "hamming"), (7, "mks2021")]:
        add(f"resample_{fname}", dict(TINY, resample=code), [["rgb_37x53.png"], ["rgb_300x200.png"]])
        add(f"resample_{fname}_nosplit", dict(TINY, resample=code, do_image_splitting=False), [["rgb_100x70.png"]])
    add("clip_norm", dict(TINY, **CLIP_NORM), [["rgb_37x53.png", "rgba_61x47.png"]])
    add("rescale_only", dict(TINY, do_normalize=False), [["rgb_100x70.png"]])
    add(
        "normalize_only",
        dict(TINY, do_rescale=False, image_mean=[127.0, 100.0, 3.5], image_std=[64.0, 50.0, 2.0]),
        [["rgb_100x70.png"]],
    )
    add("no_resize_split", dict(TINY, do_resize=False), [["rgb_100x70.png"]])
    add("no_resize_nosplit", dict(TINY, do_resize=False, do_image_splitting=False), [["rgb_37x53.png"]])
    add(
        "exact_size", {"size": {"height": 50, "width": 70}, "max_image_size": {"longest_edge": 32}}, [["rgb_37x53.png"]]
    )
    add("batch_1_0_2", dict(SMALL), [["rgb_37x53.png"], [], ["l_45x30.png", "rgba_61x47.png"]])
    add(
        "batch_mixed_nopad_sizes",
        dict(TINY, do_image_splitting=False),
        [["rgb_1x1.png", "p_50x40.png"], ["one_29x31.png"]],
    )
    add("real_256m_split_900x40", dict(SMOLVLM_256M), [["rgb_900x40.png"]], "u8")
    add("real_256m_nosplit_37x53", dict(SMOLVLM_256M, do_image_splitting=False), [["rgb_37x53.png"]], "u8")
    add("real_2b_split_10x2000", dict(SMOLVLM_2B), [["rgb_10x2000.png"]], "u8")
    return out


def value_table(config: dict) -> np.ndarray:
    """f32 [3, 256]: transformers' rescale (f64 then f32) and normalize (f32) of each u8 value."""
    v = np.arange(256, dtype=np.uint8)
    x = np.stack([v] * 3)  # [3, 256] as CHW
    if config.get("do_rescale", True):
        x = (x.astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if config.get("do_normalize", True):
        mean = np.array(config.get("image_mean", [0.5] * 3), dtype=np.float32)
        std = np.array(config.get("image_std", [0.5] * 3), dtype=np.float32)
        x = ((x.T - mean) / std).T
    return x.astype(np.float32)


def encode_u8(pv: np.ndarray, mask: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Invert value_table per channel; assert it reproduces pv exactly."""
    out = np.zeros(pv.shape, np.uint8)
    for c in range(3):
        order = np.argsort(table[c], kind="stable")
        vals = pv[:, :, c]
        pos = np.clip(np.searchsorted(table[c][order], vals), 0, 255)
        out[:, :, c] = order[pos].astype(np.uint8)
    m = mask[:, :, None, :, :].astype(bool)
    back = np.where(m, table[np.arange(3)[None, None, :, None, None], out], np.float32(0))
    assert np.array_equal(back.view(np.uint32), pv.view(np.uint32)), "u8 encoding is not exact"
    return out


def run_case(case: dict, img_dir: Path) -> dict[str, np.ndarray]:
    proc = Idefics3ImageProcessorPil(**case["config"])
    batch = [[open_like_user(img_dir / f) for f in sample] for sample in case["images"]]
    out = proc(images=batch, return_tensors="np", return_row_col_info=True)
    pv = np.asarray(out["pixel_values"], dtype=np.float32)
    mask = np.asarray(out["pixel_attention_mask"]).astype(bool)
    res = {
        "pixel_attention_mask": mask,
        "rows": np.array([r for s in out["rows"] for r in s], np.int64),
        "cols": np.array([c for s in out["cols"] for c in s], np.int64),
        "images_per_sample": np.array([len(s) for s in case["images"]], np.int64),
    }
    if case["encoding"] == "u8":
        table = value_table(case["config"])
        res["pixel_u8"] = encode_u8(pv, mask, table)
        res["value_table"] = table
    else:
        res["pixel_values"] = pv
    return res


# ----------------------------------------------------------------------------------------------
# PIL-level fixtures


def pil_record(im: Image.Image, name: str, arrays: dict) -> dict:
    """Mode/size/bytes/palette/transparency as the Python front hands them to RawImage::from_pil."""
    meta = {"mode": im.mode, "size": list(im.size)}
    arrays[f"{name}_bytes"] = np.frombuffer(im.tobytes(), np.uint8)
    if im.mode in ("P", "PA"):
        pmode = im.palette.mode if im.palette is not None else "RGB"
        pal = im.getpalette(pmode) or []
        meta["palette_mode"] = pmode
        arrays[f"{name}_palette"] = np.array(pal, np.uint8)
    t = im.info.get("transparency")
    if isinstance(t, bytes):
        arrays[f"{name}_trns"] = np.frombuffer(t, np.uint8)
        meta["transparency"] = {"bytes": f"{name}_trns"}
    elif isinstance(t, tuple):
        meta["transparency"] = {"rgb": list(t)}
    elif t is not None:
        meta["transparency"] = {"int": int(t)}
    return meta


def resize_cases(arrays: dict) -> list[dict]:
    # Includes shapes where Pillow 13 runs the vertical pass first (height shrinks > 2x more).
    sizes = [((37, 23), (80, 50)), ((64, 48), (17, 13)), ((53, 41), (120, 7)), ((40, 30), (13, 61)),
             ((1, 1), (5, 3)), ((7, 1), (1, 1)), ((33, 20), (33, 45)), ((33, 20), (70, 20)),
             ((150, 100), (37, 29)), ((5, 4), (5, 4)), ((2, 300), (3, 17)), ((20, 90), (18, 30)), ((12, 54), (1, 15))]
    modes = {1: "L", 3: "RGB", 4: "CMYK"}
    meta = []
    k = 0
    for si, ((w, h), (nw, nh)) in enumerate(sizes):
        for filt in range(8):  # 6, 7: MKS2013 / MKS2021 (Pillow >= 13)
            c = [1, 3, 4][(si + filt) % 3]
            arr = pattern(w, h, c, 100 + k, noise=60)
            im = Image.fromarray(arr[..., 0] if c == 1 else arr, modes[c])
            res = np.asarray(im.resize((nw, nh), resample=filt)).reshape(nh, nw, c)
            arrays[f"r{k}_in"] = arr.reshape(h, w, c)
            arrays[f"r{k}_out"] = res
            meta.append({"key": f"r{k}", "filter": filt, "mode": modes[c]})
            k += 1
    return meta


def convert_cases(arrays: dict) -> list[dict]:
    y, x = np.mgrid[0:256, 0:256]
    ims = {}
    rgba = np.stack([x, 255 - x, (x * 7 + y) & 255, y], -1).astype(np.uint8)
    ims["rgba_all"] = Image.fromarray(rgba, "RGBA")
    ims["la_all"] = Image.fromarray(np.stack([x, y], -1).astype(np.uint8), "LA")
    rng = np.random.default_rng(7)
    ims["cmyk_rand"] = Image.fromarray(rng.integers(0, 256, (96, 96, 4), dtype=np.uint8), "CMYK")
    ims["cmyk_all_k"] = Image.fromarray(np.stack([x, x, 255 - x, y], -1).astype(np.uint8), "CMYK")
    p = Image.fromarray((x[:16, :16] * 16 + y[:16, :16]).T.astype(np.uint8), "P")
    p.putpalette(rng.integers(0, 256, 256 * 4, dtype=np.uint8).tobytes(), "RGBA")
    ims["p_rgba_pal"] = p
    p2 = p.copy()
    p2.info["transparency"] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    ims["p_rgba_pal_trns"] = p2
    p3 = Image.fromarray((x[:16, :16] * 16 + y[:16, :16]).astype(np.uint8), "P")
    p3.putpalette(rng.integers(0, 256, 100 * 3, dtype=np.uint8).tolist())  # short palette
    p3.info["transparency"] = 42
    ims["p_short_key"] = p3
    ims["i16_ramp"] = Image.fromarray((np.arange(64 * 16, dtype=np.uint16) * 64 + 3).reshape(16, 64))
    ims["one_bits"] = Image.fromarray(rng.integers(0, 2, (13, 21)).astype(bool)).convert("1")
    pa = Image.frombytes(
        "PA", (16, 16), np.stack([(x[:16, :16] * 16 + y[:16, :16]), x[:16, :16] * 17], -1).astype(np.uint8).tobytes()
    )
    pa.putpalette(rng.integers(0, 256, 256 * 3, dtype=np.uint8).tolist())
    ims["pa_img"] = pa
    meta = []
    for key, im in ims.items():
        m = pil_record(im, key, arrays)
        arrays[f"{key}_out"] = convert_to_rgb(im, return_numpy=True)
        m["key"] = key
        meta.append(m)
    return meta


# ----------------------------------------------------------------------------------------------


def main(fixtures_dir: Path | None = None) -> None:
    out_dir = Path(fixtures_dir) if fixtures_dir is not None else DEFAULT_DIR
    if out_dir.exists():
        shutil.rmtree(out_dir)
    img_dir = out_dir / "images"
    (out_dir / "processor").mkdir(parents=True)
    img_dir.mkdir()

    images = make_images()
    for name, im in images.items():
        save(im, img_dir / name)

    meta: dict = {
        "generator": "scripts/reference/processor_images.py",
        "versions": {"transformers": transformers.__version__, "Pillow": Image.__version__, "numpy": np.__version__},
        "cases": [],
    }

    pil_arrays: dict = {}
    meta["pil_inputs"] = {}
    decode_arrays: dict = {}
    for name in images:
        im = open_like_user(img_dir / name)
        if im.mode != "RGB":
            meta["pil_inputs"][name] = pil_record(im, name, pil_arrays)
        if im.mode != "RGB" or name.startswith(("exif", "jpeg", "rgb_37")):  # big RGB PNGs: trivial
            decode_arrays[name] = convert_to_rgb(im, return_numpy=True)
            decode_arrays[name + "_load"] = np.asarray(load_image(str(img_dir / name)))
    np.savez_compressed(out_dir / "pil_inputs.npz", **pil_arrays)
    np.savez_compressed(out_dir / "decode.npz", **decode_arrays)

    for case in cases():
        arrays = run_case(case, img_dir)
        np.savez_compressed(out_dir / "processor" / f"{case['name']}.npz", **arrays)
        meta["cases"].append(case)

    resize_arrays: dict = {}
    meta["resize"] = resize_cases(resize_arrays)
    np.savez_compressed(out_dir / "resize.npz", **resize_arrays)

    convert_arrays: dict = {}
    meta["convert"] = convert_cases(convert_arrays)
    np.savez_compressed(out_dir / "convert.npz", **convert_arrays)

    (out_dir / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out_dir / "README.md").write_text(
        "# Image processor fixtures\n\nGenerated by `scripts/reference/processor_images.py` with "
        f"transformers {transformers.__version__}, Pillow {Image.__version__}, numpy {np.__version__}; "
        "do not edit by hand, rerun the script. Pillow >= 13 runs the vertical resize pass first when "
        "the height shrinks by more than twice as many pixels as the width; fixtures made with an older "
        "Pillow differ there.\n\n```\n" + (__doc__ or "").strip() + "\n```\n"
    )
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(f"wrote {out_dir} ({total / 1e6:.2f} MB, {len(meta['cases'])} processor cases)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
