//! Pillow-exact resizing of 8-bit images (`PIL.Image.resize` on modes L / RGB / CMYK-like buffers).
//!
//! The convolution filters follow Pillow's `libImaging/Resample.c`: per output pixel the filter
//! weights are computed in `f64` (`center = (i + 0.5) * scale`, `support = filter_support *
//! max(scale, 1)`, window `[(int)(center - support + 0.5), (int)(center + support + 0.5))`),
//! normalised to sum 1, then turned into fixed point with 22 fractional bits (rounding half away
//! from zero). Two passes with a `u8` buffer in between; accumulators are `i32` starting at
//! `1 << 21`, results `acc >> 22` clamped to 0..=255. Pass order is Pillow 13's: the vertical pass
//! goes first iff `in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`; otherwise the
//! horizontal pass goes first, over only the source rows the vertical pass reads (Pillow <= 12
//! always went horizontal first: [`resize_pillow12`]). A pass whose dimension does not change is
//! skipped, and a resize to the same size is a plain copy (as in Pillow).
//!
//! NEAREST is Pillow's affine "scale" path (`Geometry.c`): source index `(int)x` with `x`
//! starting at `scale / 2` and advancing by `scale` (accumulated in `f64`).
//!
//! Pillow resizes "RGBA" / "LA" through premultiplied alpha and "P" / "1" always with NEAREST;
//! these functions do neither: they treat every channel independently (Pillow's behaviour for
//! "L", "RGB", "CMYK", "RGBX", ...). Callers convert first.

use rayon::prelude::*;

use super::image_kernels::{horizontal, recycle_u8, vertical, Coeffs};
use crate::error::{DataError, Error, Result};

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `NEAREST` (0).
    Nearest,
    /// `LANCZOS` (1): 3-lobe windowed sinc.
    Lanczos,
    /// `BILINEAR` (2): triangle filter.
    Bilinear,
    /// `BICUBIC` (3): cubic convolution with a = -0.5.
    Bicubic,
    /// `BOX` (4).
    Box,
    /// `HAMMING` (5).
    Hamming,
    /// `MKS2013` (6, Pillow >= 13): Magic Kernel Sharp 2013.
    Mks2013,
    /// `MKS2021` (7, Pillow >= 13): Magic Kernel Sharp 2021.
    Mks2021,
}

impl Filter {
    /// The filter for a PIL resampling code (0..=7).
    pub fn from_pil(code: i64) -> Result<Filter> {
        Ok(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            6 => Filter::Mks2013,
            7 => Filter::Mks2021,
            _ => {
                return Err(Error::Data(DataError::Invalid(format!(
                    "unsupported resample filter {code}: expected a PIL code 0 (NEAREST), 1 (LANCZOS), \
                     2 (BILINEAR), 3 (BICUBIC), 4 (BOX), 5 (HAMMING), 6 (MKS2013) or 7 (MKS2021)"
                ))))
            }
        })
    }

    /// The PIL resampling code of this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
            Filter::Mks2013 => 6,
            Filter::Mks2021 => 7,
        }
    }

    /// Half-width of the filter kernel at scale 1 (Pillow's `support`).
    pub(crate) fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
            Filter::Mks2013 => 2.5,
            Filter::Mks2021 => 4.5,
        }
    }

    /// The kernel, written with the same floating-point operations as Pillow's C code.
    pub(crate) fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // C: `sin(x) / x * (0.54f + 0.46f * cos(x))` (float literals promoted to double).
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            // C uses pow(v, 2), which compilers turn into v * v.
            Filter::Mks2013 => {
                let x = x.abs();
                if x < 0.5 {
                    17.0 / 16.0 - 7.0 / 4.0 * (x * x)
                } else if x < 1.5 {
                    (1.0 - x) * (7.0 / 4.0 - x)
                } else if x < 2.5 {
                    let d = x - 5.0 / 2.0;
                    -1.0 / 8.0 * (d * d)
                } else {
                    0.0
                }
            }
            Filter::Mks2021 => {
                let x = x.abs();
                if x < 0.5 {
                    577.0 / 576.0 - 239.0 / 144.0 * (x * x)
                } else if x < 1.5 {
                    35.0 / 36.0 * (x - 1.0) * (x - 239.0 / 140.0)
                } else if x < 2.5 {
                    1.0 / 6.0 * (x - 2.0) * (65.0 / 24.0 - x)
                } else if x < 3.5 {
                    1.0 / 36.0 * (x - 3.0) * (x - 15.0 / 4.0)
                } else if x < 4.5 {
                    let d = x - 9.0 / 2.0;
                    -1.0 / 288.0 * (d * d)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// An owned interleaved 8-bit image: `data` is `[height, width, channels]` row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageU8 {
    pub width: usize,
    pub height: usize,
    /// 1..=4 interleaved channels.
    pub channels: usize,
    pub data: Vec<u8>,
}

/// A borrowed interleaved 8-bit image (`data` is `[height, width, channels]`).
#[derive(Clone, Copy, Debug)]
pub struct ImageView<'a> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: &'a [u8],
}

impl ImageU8 {
    /// Wraps `data` (`[height, width, channels]`), checking its length and the channel count.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<ImageU8> {
        ImageView::new(width, height, channels, &data)?;
        Ok(ImageU8 { width, height, channels, data })
    }

    /// A borrowed view of this image.
    pub fn view(&self) -> ImageView<'_> {
        ImageView { width: self.width, height: self.height, channels: self.channels, data: &self.data }
    }
}

impl<'a> ImageView<'a> {
    /// Checks that `data` holds exactly `width * height * channels` bytes and `channels` is 1..=4.
    pub fn new(width: usize, height: usize, channels: usize, data: &'a [u8]) -> Result<ImageView<'a>> {
        if !(1..=4).contains(&channels) {
            return Err(bad(format!("image buffer has {channels} channels; expected 1 to 4")));
        }
        let want = width.checked_mul(height).and_then(|p| p.checked_mul(channels));
        if want != Some(data.len()) {
            return Err(bad(format!(
                "image buffer of {width}x{height}x{channels} needs {} bytes, got {}",
                want.map_or_else(|| "too many".to_string(), |n| n.to_string()),
                data.len()
            )));
        }
        Ok(ImageView { width, height, channels, data })
    }

    /// Copies the view into an owned image.
    pub fn to_owned_image(&self) -> ImageU8 {
        ImageU8 { width: self.width, height: self.height, channels: self.channels, data: self.data.to_vec() }
    }
}

fn bad(msg: String) -> Error {
    Error::Data(DataError::Image(msg))
}

/// Resizes `src` to `new_w` x `new_h` exactly like Pillow's `Image.resize((new_w, new_h), filter)`
/// for an 8-bit image whose channels are independent (modes "L", "RGB", "CMYK", ...).
///
/// Errors on zero-sized input or output, or on a malformed buffer.
pub fn resize(src: ImageView<'_>, new_w: usize, new_h: usize, filter: Filter) -> Result<ImageU8> {
    let src = check(src, new_w, new_h)?;
    if new_w == src.width && new_h == src.height {
        return Ok(src.to_owned_image());
    }
    if filter == Filter::Nearest {
        return Ok(nearest(src, new_w, new_h));
    }
    Ok(convolve(src, new_w, new_h, filter, PassOrder::Pillow13))
}

/// Like [`resize`], but always running the horizontal pass first, as Pillow up to 12.x did.
/// (Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width; both orders round through `u8` in between, so results differ slightly.)
pub fn resize_pillow12(src: ImageView<'_>, new_w: usize, new_h: usize, filter: Filter) -> Result<ImageU8> {
    let src = check(src, new_w, new_h)?;
    if new_w == src.width && new_h == src.height {
        return Ok(src.to_owned_image());
    }
    if filter == Filter::Nearest {
        return Ok(nearest(src, new_w, new_h));
    }
    Ok(convolve(src, new_w, new_h, filter, PassOrder::HorizontalFirst))
}

fn check(src: ImageView<'_>, new_w: usize, new_h: usize) -> Result<ImageView<'_>> {
    let src = ImageView::new(src.width, src.height, src.channels, src.data)?;
    if src.width == 0 || src.height == 0 {
        return Err(bad(format!("cannot resize an empty {}x{} image", src.width, src.height)));
    }
    if new_w == 0 || new_h == 0 {
        return Err(bad(format!(
            "cannot resize a {}x{} image to {new_w}x{new_h}: height and width must be > 0",
            src.width, src.height
        )));
    }
    // Pillow indexes with C ints (and fails with MemoryError on huge targets); refuse outputs over
    // 4 GiB instead of aborting on a failed allocation.
    let lim = i32::MAX as usize / 8;
    let out_bytes = (new_w as u128) * (new_h as u128) * (src.channels as u128);
    if new_w > lim || new_h > lim || src.width > lim || src.height > lim || out_bytes > 1 << 32 {
        return Err(bad(format!(
            "cannot resize {}x{} to {new_w}x{new_h}: the result would be too large",
            src.width, src.height
        )));
    }
    Ok(src)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PassOrder {
    /// Pillow >= 13: vertical first iff `in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`.
    Pillow13,
    HorizontalFirst,
}

/// Two-pass convolution (Pillow's `ImagingResampleInner`); a pass whose size is unchanged is skipped.
fn convolve(src: ImageView<'_>, new_w: usize, new_h: usize, filter: Filter, order: PassOrder) -> ImageU8 {
    let c = src.channels;
    let need_h = new_w != src.width;
    let need_v = new_h != src.height;
    let dy = src.height as i64 - new_h as i64;
    let dx = src.width as i64 - new_w as i64;
    let vertical_first = order == PassOrder::Pillow13 && dy > 0 && dy > dx * 2;
    let image = |data| ImageU8 { width: new_w, height: new_h, channels: c, data };
    if !need_v {
        return image(horizontal(src.data, src.width, c, &Coeffs::new(src.width, new_w, filter)));
    }
    let vco = Coeffs::new(src.height, new_h, filter);
    if !need_h {
        return image(vertical(src, &vco, 0));
    }
    let hco = Coeffs::new(src.width, new_w, filter);
    if vertical_first {
        // Vertical pass over the full width, then horizontal over the `new_h` rows.
        let mid = vertical(src, &vco, 0);
        let data = horizontal(&mid, src.width, c, &hco);
        recycle_u8(mid);
        return image(data);
    }
    // Horizontal pass over only the source rows the vertical pass reads.
    let (y_first, y_last) = vco.span();
    let row = src.width * c;
    let mid = horizontal(&src.data[y_first * row..y_last * row], src.width, c, &hco);
    let view = ImageView { width: new_w, height: y_last - y_first, channels: c, data: &mid };
    let data = vertical(view, &vco, y_first);
    recycle_u8(mid);
    image(data)
}

/// Pillow's NEAREST resize (`ImagingScaleAffine` with `a = [in_w / out_w, 0, 0, 0, in_h / out_h, 0]`).
fn nearest(src: ImageView<'_>, new_w: usize, new_h: usize) -> ImageU8 {
    let c = src.channels;
    let xs = nearest_table(src.width, new_w);
    let ys = nearest_table(src.height, new_h);
    let mut data = vec![0u8; new_w * new_h * c];
    let in_row = src.width * c;
    data.par_chunks_mut(new_w * c).zip(ys.par_iter()).for_each(|(dst, &yi)| {
        let Some(yi) = yi else { return };
        let row = &src.data[yi * in_row..(yi + 1) * in_row];
        for (out_px, &xi) in dst.chunks_exact_mut(c).zip(&xs) {
            if let Some(xi) = xi {
                out_px.copy_from_slice(&row[xi * c..(xi + 1) * c]);
            }
        }
    });
    ImageU8 { width: new_w, height: new_h, channels: c, data }
}

/// Source index per output index; `None` where Pillow's coordinate falls outside (left as 0).
fn nearest_table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
    let a = (in_size as f32 as f64) / out_size as f64;
    let mut pos = 0.0 + a * 0.5;
    let mut tab = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        // C `COORD(v)`: -1 when negative, else `(int)v`.
        let i = if pos < 0.0 { -1 } else { pos as i64 };
        tab.push(if i >= 0 && (i as usize) < in_size { Some(i as usize) } else { None });
        pos += a;
    }
    tab
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize, c: usize) -> ImageU8 {
        let data = (0..w * h * c).map(|i| ((i * 37 + i / 7) % 256) as u8).collect();
        ImageU8::new(w, h, c, data).unwrap()
    }

    #[test]
    fn same_size_is_copy() {
        let a = img(5, 4, 3);
        for f in [Filter::Lanczos, Filter::Nearest, Filter::Box] {
            assert_eq!(resize(a.view(), 5, 4, f).unwrap(), a);
        }
    }

    #[test]
    fn constant_stays_constant() {
        let a = ImageU8::new(7, 3, 1, vec![200; 21]).unwrap();
        for f in [Filter::Lanczos, Filter::Bilinear, Filter::Bicubic, Filter::Box, Filter::Hamming, Filter::Nearest] {
            let r = resize(a.view(), 19, 2, f).unwrap();
            assert!(r.data.iter().all(|&v| v == 200), "{f:?}");
        }
    }

    #[test]
    fn bad_sizes_error() {
        let a = img(3, 3, 1);
        assert!(resize(a.view(), 0, 3, Filter::Lanczos).is_err());
        assert!(resize(a.view(), 100_000, 100_000, Filter::Lanczos).is_err());
        let empty = ImageView { width: 0, height: 3, channels: 1, data: &[] };
        assert!(resize(empty, 2, 2, Filter::Lanczos).is_err());
        let short = ImageView { width: 3, height: 3, channels: 1, data: &[0; 5] };
        assert!(resize(short, 2, 2, Filter::Lanczos).is_err());
        assert!(ImageU8::new(1, 1, 5, vec![0; 5]).is_err());
        assert!(Filter::from_pil(8).is_err());
    }

    #[test]
    fn one_pixel_upscale() {
        let a = ImageU8::new(1, 1, 3, vec![1, 2, 3]).unwrap();
        let r = resize(a.view(), 4, 3, Filter::Lanczos).unwrap();
        assert!(r.data.chunks(3).all(|p| p == [1, 2, 3]));
    }
}
