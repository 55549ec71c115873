//! Images as PIL holds them ([`RawImage`]) and their conversion to RGB the way transformers does it.
//!
//! `transformers.image_transforms.convert_to_rgb` (used by the Idefics3 PIL processor *before* any
//! resizing) does, for a PIL image:
//! - if the image has an alpha band ("LA", "PA", "RGBA") or `info["transparency"]`:
//!   `convert("RGBA")` (honouring the transparency key / palette alphas), then
//!   `Image.alpha_composite(white, image)` and `convert("RGB")`;
//! - otherwise `convert("RGB")`.
//!
//! [`RawImage::to_rgb`] reproduces that bit for bit (Pillow's integer compositing and its
//! `cmyk2rgb`), [`RawImage::to_rgb_plain`] is a bare `convert("RGB")` (what
//! `transformers.image_utils.load_image` applies to files and URLs: alpha is dropped, not
//! composited). Decoding files lives in `image_decode.rs`, the processor in `image_processor.rs`.

use rayon::prelude::*;

pub use super::image_decode::{decode_image, decode_image_file, DEFAULT_MAX_PIXELS};
pub use super::image_processor::{process, BatchPixels, ImageProcessorConfig, ResizeTarget};
use super::resample::ImageU8;
use crate::error::{DataError, Error, Result};

/// The PIL modes ferrovlm understands (`PIL.Image.Image.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PilMode {
    /// "1": bilevel; stored unpacked, one byte per pixel, 0 or 255 (as in Pillow's memory).
    One,
    /// "L": 8-bit gray.
    L,
    /// "LA": gray + alpha, 2 bytes per pixel.
    La,
    /// "P": 8-bit palette index.
    P,
    /// "PA": palette index + alpha, 2 bytes per pixel.
    Pa,
    /// "RGB".
    Rgb,
    /// "RGBA" (straight alpha).
    Rgba,
    /// "RGBX": RGB plus a padding byte.
    Rgbx,
    /// "CMYK".
    Cmyk,
    /// "I;16" / "I;16L": 16-bit gray, little-endian, 2 bytes per pixel.
    I16,
    /// "I;16B": 16-bit gray, big-endian.
    I16B,
}

impl PilMode {
    /// Parses a PIL mode string. Unsupported modes (e.g. "YCbCr", "I", "F") are an error that says
    /// to `convert("RGB")` first.
    pub fn parse(mode: &str) -> Result<PilMode> {
        Ok(match mode {
            "1" => PilMode::One,
            "L" => PilMode::L,
            "LA" => PilMode::La,
            "P" => PilMode::P,
            "PA" => PilMode::Pa,
            "RGB" => PilMode::Rgb,
            "RGBA" => PilMode::Rgba,
            "RGBX" => PilMode::Rgbx,
            "CMYK" => PilMode::Cmyk,
            "I;16" | "I;16L" => PilMode::I16,
            "I;16B" => PilMode::I16B,
            other => {
                return Err(img_err(format!(
                    "unsupported PIL image mode '{other}' (supported: 1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, \
                     I;16, I;16B); convert it with image.convert(\"RGB\") first"
                )))
            }
        })
    }

    /// The PIL mode string.
    pub fn as_str(self) -> &'static str {
        match self {
            PilMode::One => "1",
            PilMode::L => "L",
            PilMode::La => "LA",
            PilMode::P => "P",
            PilMode::Pa => "PA",
            PilMode::Rgb => "RGB",
            PilMode::Rgba => "RGBA",
            PilMode::Rgbx => "RGBX",
            PilMode::Cmyk => "CMYK",
            PilMode::I16 => "I;16",
            PilMode::I16B => "I;16B",
        }
    }

    /// Bytes per pixel of [`RawImage::data`] (mode "1" is stored unpacked: 1).
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PilMode::One | PilMode::L | PilMode::P => 1,
            PilMode::La | PilMode::Pa | PilMode::I16 | PilMode::I16B => 2,
            PilMode::Rgb => 3,
            PilMode::Rgba | PilMode::Rgbx | PilMode::Cmyk => 4,
        }
    }

    /// Whether `getbands()` contains "A".
    pub fn has_alpha_band(self) -> bool {
        matches!(self, PilMode::La | PilMode::Pa | PilMode::Rgba)
    }

    fn is_palette(self) -> bool {
        matches!(self, PilMode::P | PilMode::Pa)
    }
}

/// PIL's `image.info["transparency"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transparency {
    /// An int: the transparent gray value (modes "1", "L", "I;16") or palette index ("P").
    Value(i64),
    /// A tuple `(r, g, b)`: the transparent colour of an "RGB" image.
    Rgb(i64, i64, i64),
    /// Bytes: one alpha per palette entry ("P").
    PaletteAlpha(Vec<u8>),
}

/// An image as PIL holds it: `mode`, size and `tobytes()` pixels, plus the palette of "P"/"PA"
/// images and the `info["transparency"]` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImage {
    pub mode: PilMode,
    pub width: usize,
    pub height: usize,
    /// `[height, width, mode.bytes_per_pixel()]`, PIL's in-memory layout (mode "1" unpacked to
    /// one byte per pixel, 0 or 255).
    pub data: Vec<u8>,
    /// "P" / "PA" palette as RGBA entries (4 bytes each, at most 256 entries).
    pub palette: Option<Vec<u8>>,
    pub transparency: Option<Transparency>,
}

pub(crate) fn img_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Image(msg.into()))
}

impl RawImage {
    /// Builds an image from what Python's PIL gives: `img.mode`, `img.size`, `img.tobytes()`,
    /// `img.getpalette(rawmode)` and that palette's rawmode ("RGB", the default, or "RGBA").
    ///
    /// Mode "1" takes PIL's packed `tobytes()` (rows padded to whole bytes, most significant bit
    /// first). "P"/"PA" need a palette: `None` is an error; an empty palette is allowed and maps
    /// every index to black, as PIL does (pass `img.getpalette() or b""` to mimic PIL exactly).
    /// Set [`RawImage::transparency`] from `img.info.get("transparency")` for exact results on
    /// images that carry one.
    pub fn from_pil(
        mode: &str,
        width: usize,
        height: usize,
        bytes: Vec<u8>,
        palette: Option<Vec<u8>>,
        palette_mode: Option<&str>,
    ) -> Result<RawImage> {
        let mode = PilMode::parse(mode)?;
        let data = if mode == PilMode::One {
            let stride = width.div_ceil(8);
            let want = stride.checked_mul(height);
            if want != Some(bytes.len()) {
                return Err(img_err(format!(
                    "mode 1 image of {width}x{height} needs {} packed bytes, got {}",
                    want.map_or_else(|| "too many".into(), |n| n.to_string()),
                    bytes.len()
                )));
            }
            let mut out = vec![0u8; width * height];
            if stride > 0 {
                out.par_chunks_mut(width.max(1)).zip(bytes.par_chunks(stride)).for_each(|(dst, src)| {
                    for (x, d) in dst.iter_mut().enumerate() {
                        *d = if src[x / 8] & (0x80 >> (x % 8)) != 0 { 255 } else { 0 };
                    }
                });
            }
            out
        } else {
            bytes
        };
        let palette = if mode.is_palette() {
            let pal = palette
                .ok_or_else(|| img_err(format!("mode {} image of {width}x{height} has no palette", mode.as_str())))?;
            Some(normalize_palette(&pal, palette_mode.unwrap_or("RGB"))?)
        } else {
            None
        };
        let img = RawImage { mode, width, height, data, palette, transparency: None };
        img.validate()?;
        Ok(img)
    }

    /// An "RGB" image from `[height, width, 3]` bytes.
    pub fn from_rgb8(width: usize, height: usize, data: Vec<u8>) -> Result<RawImage> {
        let img = RawImage { mode: PilMode::Rgb, width, height, data, palette: None, transparency: None };
        img.validate()?;
        Ok(img)
    }

    /// Checks sizes, buffer length, palette presence and transparency kind.
    pub fn validate(&self) -> Result<()> {
        let what = || format!("mode {} image of {}x{}", self.mode.as_str(), self.width, self.height);
        if self.width == 0 || self.height == 0 {
            return Err(img_err(format!("{} is empty (zero width or height)", what())));
        }
        let want = self.width.checked_mul(self.height).and_then(|p| p.checked_mul(self.mode.bytes_per_pixel()));
        if want != Some(self.data.len()) {
            return Err(img_err(format!(
                "{} needs {} bytes of pixel data, got {}",
                what(),
                want.map_or_else(|| "too many".into(), |n| n.to_string()),
                self.data.len()
            )));
        }
        if self.mode.is_palette() {
            match &self.palette {
                None => return Err(img_err(format!("{} has no palette", what()))),
                Some(p) if p.len() % 4 != 0 || p.len() > 1024 => {
                    return Err(img_err(format!(
                        "{}: palette must hold at most 256 RGBA entries, got {} bytes",
                        what(),
                        p.len()
                    )))
                }
                _ => {}
            }
        }
        match (&self.transparency, self.mode) {
            (None, _) => {}
            (Some(Transparency::Value(_)), PilMode::One | PilMode::L | PilMode::I16 | PilMode::I16B | PilMode::P) => {}
            (Some(Transparency::Rgb(..)), PilMode::Rgb) => {}
            (Some(Transparency::PaletteAlpha(_)), PilMode::P) => {}
            // PIL ignores the key once the image has real alpha (or is CMYK / RGBX).
            (Some(_), PilMode::La | PilMode::Pa | PilMode::Rgba | PilMode::Rgbx | PilMode::Cmyk) => {}
            (Some(t), m) => {
                return Err(img_err(format!("{}: transparency {t:?} does not apply to mode {}", what(), m.as_str())))
            }
        }
        Ok(())
    }

    /// transformers' `convert_to_rgb`: alpha (band or transparency key) is composited over white
    /// with Pillow's integer `alpha_composite`; everything else is `convert("RGB")`.
    /// Returns `[height, width, 3]`.
    pub fn to_rgb(&self) -> Result<ImageU8> {
        self.validate()?;
        if !(self.mode.has_alpha_band() || self.transparency.is_some()) {
            return self.to_rgb_plain();
        }
        let table = self.palette_table(true);
        let t = self.transparency.as_ref();
        let key = |v: u8| matches!(t, Some(Transparency::Value(k)) if *k == v as i64);
        let data = match self.mode {
            PilMode::One | PilMode::L => {
                map_px::<1>(&self.data, |p| over_white([p[0]; 3], if key(p[0]) { 0 } else { 255 }))
            }
            PilMode::I16 | PilMode::I16B => {
                let big = self.mode == PilMode::I16B;
                map_px::<2>(&self.data, |p| {
                    let v = clip16(p, big);
                    over_white([v; 3], if key(v) { 0 } else { 255 })
                })
            }
            PilMode::La => map_px::<2>(&self.data, |p| over_white([p[0]; 3], p[1])),
            PilMode::P => map_px::<1>(&self.data, |p| {
                let e = table[p[0] as usize];
                over_white([e[0], e[1], e[2]], e[3])
            }),
            PilMode::Pa => map_px::<2>(&self.data, |p| {
                let e = table[p[0] as usize];
                over_white([e[0], e[1], e[2]], p[1])
            }),
            PilMode::Rgb => {
                let k = match t {
                    Some(Transparency::Rgb(r, g, b)) => Some((*r, *g, *b)),
                    _ => None,
                };
                map_px::<3>(&self.data, |p| {
                    let hit = k == Some((p[0] as i64, p[1] as i64, p[2] as i64));
                    over_white([p[0], p[1], p[2]], if hit { 0 } else { 255 })
                })
            }
            PilMode::Rgba => map_px::<4>(&self.data, |p| over_white([p[0], p[1], p[2]], p[3])),
            // Opaque after convert("RGBA"): compositing is the identity.
            PilMode::Rgbx => map_px::<4>(&self.data, |p| [p[0], p[1], p[2]]),
            PilMode::Cmyk => map_px::<4>(&self.data, cmyk_to_rgb),
        };
        Ok(ImageU8 { width: self.width, height: self.height, channels: 3, data })
    }

    /// PIL's `convert("RGB")`: alpha and transparency are dropped. Returns `[height, width, 3]`.
    pub fn to_rgb_plain(&self) -> Result<ImageU8> {
        self.validate()?;
        let table = self.palette_table(false);
        let data = match self.mode {
            PilMode::Rgb => self.data.clone(),
            PilMode::One | PilMode::L => map_px::<1>(&self.data, |p| [p[0]; 3]),
            PilMode::I16 => map_px::<2>(&self.data, |p| [clip16(p, false); 3]),
            PilMode::I16B => map_px::<2>(&self.data, |p| [clip16(p, true); 3]),
            PilMode::La => map_px::<2>(&self.data, |p| [p[0]; 3]),
            PilMode::P => map_px::<1>(&self.data, |p| rgb_of(table[p[0] as usize])),
            PilMode::Pa => map_px::<2>(&self.data, |p| rgb_of(table[p[0] as usize])),
            PilMode::Rgba | PilMode::Rgbx => map_px::<4>(&self.data, |p| [p[0], p[1], p[2]]),
            PilMode::Cmyk => map_px::<4>(&self.data, cmyk_to_rgb),
        };
        Ok(ImageU8 { width: self.width, height: self.height, channels: 3, data })
    }

    /// PIL's `convert("RGB")` as a new "RGB" [`RawImage`]: what transformers' `load_image` hands
    /// the processor for a path or URL (EXIF-transposed by [`decode_image`], alpha dropped).
    pub fn convert_rgb(&self) -> Result<RawImage> {
        let rgb = self.to_rgb_plain()?;
        RawImage::from_rgb8(rgb.width, rgb.height, rgb.data)
    }

    /// 256 RGBA entries: the palette (missing entries opaque black), with the transparency key
    /// applied when `with_transparency` (PIL's `putpalettealpha` / `putpalettealphas`).
    fn palette_table(&self, with_transparency: bool) -> Vec<[u8; 4]> {
        if !self.mode.is_palette() {
            return Vec::new();
        }
        let mut table = vec![[0u8, 0, 0, 255]; 256];
        if let Some(p) = &self.palette {
            for (dst, src) in table.iter_mut().zip(p.chunks_exact(4)) {
                dst.copy_from_slice(src);
            }
        }
        if with_transparency && self.mode == PilMode::P {
            match &self.transparency {
                Some(Transparency::Value(i)) if (0..256).contains(i) => table[*i as usize][3] = 0,
                Some(Transparency::PaletteAlpha(a)) => {
                    for (dst, &v) in table.iter_mut().zip(a) {
                        dst[3] = v;
                    }
                }
                _ => {}
            }
        }
        table
    }
}

/// Palette bytes in `palette_mode` ("RGB" or "RGBA") -> RGBA entries.
fn normalize_palette(pal: &[u8], palette_mode: &str) -> Result<Vec<u8>> {
    let n = match palette_mode {
        "RGB" => 3,
        "RGBA" => 4,
        other => return Err(img_err(format!("unsupported palette mode '{other}' (expected RGB or RGBA)"))),
    };
    if !pal.len().is_multiple_of(n) || pal.len() / n > 256 {
        return Err(img_err(format!("palette of {} bytes is not at most 256 {palette_mode} entries", pal.len())));
    }
    Ok(pal.chunks_exact(n).flat_map(|e| [e[0], e[1], e[2], if n == 4 { e[3] } else { 255 }]).collect())
}

fn rgb_of(e: [u8; 4]) -> [u8; 3] {
    [e[0], e[1], e[2]]
}

/// "I;16" -> 8 bit as Pillow converts it: values above 255 clip to 255.
#[inline(always)]
fn clip16(p: &[u8], big_endian: bool) -> u8 {
    let v = if big_endian { u16::from_be_bytes([p[0], p[1]]) } else { u16::from_le_bytes([p[0], p[1]]) };
    v.min(255) as u8
}

/// Pillow's `cmyk2rgb`: `nk = 255 - k; out = clip(nk - MULDIV255(c, nk))`.
#[inline(always)]
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let f = |c: u8| {
        let tmp = c as i32 * nk + 128;
        (nk - (((tmp >> 8) + tmp) >> 8)).clamp(0, 255) as u8
    };
    [f(p[0]), f(p[1]), f(p[2])]
}

/// `Image.alpha_composite(white, px).convert("RGB")` for one pixel: Pillow's integer formula with
/// 7 extra bits of precision and rounded divisions by 255.
#[inline(always)]
pub(crate) fn over_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    if a == 0 {
        return [255; 3];
    }
    const PREC: u32 = 7;
    let a = a as u32;
    let blend = 255 * (255 - a); // dst alpha 255
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let f = |v: u8| {
        let tmp = v as u32 * coef1 + 255 * coef2 + (0x80 << PREC);
        ((((tmp >> 8) + tmp) >> 8) >> PREC) as u8
    };
    [f(rgb[0]), f(rgb[1]), f(rgb[2])]
}

/// Applies `f` to every `N`-byte pixel of `data`, producing RGB bytes (rayon over chunks).
fn map_px<const N: usize>(data: &[u8], f: impl Fn(&[u8]) -> [u8; 3] + Sync) -> Vec<u8> {
    const CHUNK: usize = 16 * 1024;
    let n = data.len() / N;
    let mut out = vec![0u8; n * 3];
    out.par_chunks_mut(CHUNK * 3).zip(data.par_chunks(CHUNK * N)).for_each(|(dst, src)| {
        for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(N)) {
            d.copy_from_slice(&f(s));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_unpacks_msb_first() {
        // PIL: 10x2 image with (0,0) and (9,1) set -> b'\x80\x00\x00\x40'
        let img = RawImage::from_pil("1", 10, 2, vec![0x80, 0, 0, 0x40], None, None).unwrap();
        let mut want = vec![0u8; 20];
        want[0] = 255;
        want[19] = 255;
        assert_eq!(img.data, want);
        assert!(RawImage::from_pil("1", 10, 2, vec![0; 3], None, None).is_err());
    }

    #[test]
    fn palette_rules() {
        // PIL: palette [10,20,30, 40,50,60]; indices beyond the palette are black.
        let mut img =
            RawImage::from_pil("P", 4, 1, vec![0, 1, 5, 200], Some(vec![10, 20, 30, 40, 50, 60]), None).unwrap();
        assert_eq!(img.to_rgb().unwrap().data, [10, 20, 30, 40, 50, 60, 0, 0, 0, 0, 0, 0]);
        img.transparency = Some(Transparency::Value(1));
        assert_eq!(img.to_rgb().unwrap().data, [10, 20, 30, 255, 255, 255, 0, 0, 0, 0, 0, 0]);
        assert!(RawImage::from_pil("P", 1, 1, vec![0], None, None).is_err());
        assert!(RawImage::from_pil("P", 1, 1, vec![0], Some(vec![1, 2]), None).is_err());
        assert!(RawImage::from_pil("YCbCr", 1, 1, vec![0; 3], None, None).is_err());
    }

    #[test]
    fn gray_key_and_i16() {
        let mut l = RawImage::from_pil("L", 3, 1, vec![0, 5, 255], None, None).unwrap();
        l.transparency = Some(Transparency::Value(5));
        assert_eq!(l.to_rgb().unwrap().data, [0, 0, 0, 255, 255, 255, 255, 255, 255]);
        assert_eq!(l.to_rgb_plain().unwrap().data, [0, 0, 0, 5, 5, 5, 255, 255, 255]);
        let i16 = RawImage::from_pil("I;16", 3, 1, vec![100, 0, 0, 1, 255, 255], None, None).unwrap();
        assert_eq!(i16.to_rgb().unwrap().data, [100, 100, 100, 255, 255, 255, 255, 255, 255]);
    }

    #[test]
    fn composite_extremes() {
        assert_eq!(over_white([10, 20, 30], 255), [10, 20, 30]);
        assert_eq!(over_white([10, 20, 30], 0), [255, 255, 255]);
    }

    #[test]
    fn zero_size_rejected() {
        assert!(RawImage::from_rgb8(0, 5, vec![]).is_err());
        assert!(RawImage::from_rgb8(2, 2, vec![0; 11]).is_err());
    }
}
