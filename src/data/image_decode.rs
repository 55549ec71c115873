//! Decoding encoded images (PNG, JPEG, GIF, BMP, WebP, TIFF) into [`RawImage`]s, like
//! `PIL.Image.open` + `ImageOps.exif_transpose` (transformers' `load_image` before its
//! `convert("RGB")`).
//!
//! Mode mapping (same pixels as Pillow where noted):
//! - 8-bit gray / gray+alpha / RGB / RGBA -> "L" / "LA" / "RGB" / "RGBA" (exact for PNG, BMP, GIF);
//! - PNG palettes and low bit depths are expanded by the decoder: palette -> "RGB" (or "RGBA"
//!   with a tRNS chunk), 1/2/4-bit gray -> "L" scaled to 0..255, a tRNS key -> an alpha band.
//!   [`RawImage::to_rgb`] of these equals transformers' `convert_to_rgb` of Pillow's "P"/"1"/"L"
//!   image with `info["transparency"]`;
//! - 16-bit gray -> "I;16" (Pillow's mode); 16-bit gray+alpha / RGB / RGBA -> the high byte of
//!   each sample, as Pillow's "LA;16B"/"RGB;16B"/"RGBA;16B" readers;
//! - GIF: the first frame as "RGBA".
//!
//! JPEG goes through zune-jpeg and WebP through image-webp, not libjpeg-turbo / libwebp:
//! pixels may differ slightly from Pillow's (a few levels on JPEG); CMYK JPEG/TIFF are converted
//! to RGB by the `image` crate, not with Pillow's `cmyk2rgb` (off by up to 1).
//!
//! A decompression-bomb guard rejects images with more than `max_pixels` pixels before the
//! pixel data is decoded (default [`DEFAULT_MAX_PIXELS`], Pillow's error threshold).

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::image::{img_err, PilMode, RawImage};
use crate::error::Result;

/// Pillow raises `DecompressionBombError` above `2 * Image.MAX_IMAGE_PIXELS` (2 * 89478485).
pub const DEFAULT_MAX_PIXELS: u64 = 2 * 89_478_485;

/// Decodes `bytes` (format guessed from the content) and applies the EXIF orientation.
///
/// `max_pixels`: largest accepted `width * height` (`None`: [`DEFAULT_MAX_PIXELS`];
/// `Some(u64::MAX)` disables the guard). Errors ([`crate::error::DataError::Image`]) say what
/// failed: empty input, unknown format, unreadable header, size over the limit, corrupt or
/// truncated data.
pub fn decode_image(bytes: &[u8], max_pixels: Option<u64>) -> Result<RawImage> {
    decode_labeled(bytes, max_pixels, &format!("image data ({} bytes)", bytes.len()))
}

/// Reads and decodes the file at `path` (see [`decode_image`]); errors name the file.
pub fn decode_image_file(path: &Path, max_pixels: Option<u64>) -> Result<RawImage> {
    let bytes = std::fs::read(path).map_err(|e| img_err(format!("{}: cannot read: {e}", path.display())))?;
    decode_labeled(&bytes, max_pixels, &path.display().to_string())
}

fn decode_labeled(bytes: &[u8], max_pixels: Option<u64>, label: &str) -> Result<RawImage> {
    let limit = max_pixels.unwrap_or(DEFAULT_MAX_PIXELS);
    // Decoders are third-party code: a panic on hostile input becomes an error, not an abort.
    match catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, limit))) {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(msg)) => Err(img_err(format!("{label}: {msg}"))),
        Err(_) => Err(img_err(format!("{label}: the image decoder crashed on this data (corrupt image?)"))),
    }
}

fn decode_inner(bytes: &[u8], limit: u64) -> std::result::Result<RawImage, String> {
    if bytes.is_empty() {
        return Err("empty input (0 bytes), not an image".into());
    }
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    let Some(format) = reader.format() else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "unknown image format (first bytes {}); supported: PNG, JPEG, GIF, BMP, WebP, TIFF",
            head.join(" ")
        ));
    };
    // Pixel count is checked below; let the decoders allocate what a legal image needs.
    let mut limits = Limits::default();
    limits.max_alloc = Some(limit.saturating_mul(16).saturating_add(1 << 30));
    reader.limits(limits);
    let mut decoder =
        reader.into_decoder().map_err(|e| format!("cannot read the {format:?} header (corrupt or truncated?): {e}"))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("{format:?} image is empty ({w}x{h})"));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limit {
        return Err(format!(
            "{format:?} image of {w}x{h} = {pixels} pixels exceeds the limit of {limit} pixels \
             (decompression bomb guard; raise max_pixels to accept it)"
        ));
    }
    // A broken EXIF block is ignored, as ImageOps.exif_transpose ignores what it cannot parse.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| format!("cannot decode the {format:?} image of {w}x{h} (corrupt or truncated?): {e}"))?;
    img.apply_orientation(orientation);
    to_raw(img)
}

/// Keeps the high byte of each big sample (Pillow's ";16B" raw modes).
fn high_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().map(|&s| (s >> 8) as u8).collect()
}

fn to_raw(img: DynamicImage) -> std::result::Result<RawImage, String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (mode, data) = match img {
        DynamicImage::ImageLuma8(b) => (PilMode::L, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => (PilMode::La, b.into_raw()),
        DynamicImage::ImageRgb8(b) => (PilMode::Rgb, b.into_raw()),
        DynamicImage::ImageRgba8(b) => (PilMode::Rgba, b.into_raw()),
        DynamicImage::ImageLuma16(b) => (PilMode::I16, b.into_raw().iter().flat_map(|v| v.to_le_bytes()).collect()),
        DynamicImage::ImageLumaA16(b) => (PilMode::La, high_bytes(&b.into_raw())),
        DynamicImage::ImageRgb16(b) => (PilMode::Rgb, high_bytes(&b.into_raw())),
        DynamicImage::ImageRgba16(b) => (PilMode::Rgba, high_bytes(&b.into_raw())),
        other => return Err(format!("unsupported pixel format {:?}", other.color())),
    };
    let raw = RawImage { mode, width: w, height: h, data, palette: None, transparency: None };
    raw.validate().map_err(|e| e.to_string())?;
    Ok(raw)
}
