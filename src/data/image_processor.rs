//! The Idefics3 / SmolVLM image processor (transformers' `Idefics3ImageProcessorPil`, the slow PIL
//! path), bit-exact.
//!
//! Per image, in this order (transformers 5.x `PilBackend.process_image` + `Idefics3ImageProcessorPil._preprocess`):
//! 1. `do_convert_rgb`: [`RawImage::to_rgb`] (alpha composited over white) on the *original* image,
//!    before any resize, so every resize below runs on an 8-bit RGB image with `resample`.
//! 2. `do_resize`: `size.longest_edge = L`: `ar = w / h` (f64); if `w >= h`: `w = L`,
//!    `h = int(w / ar)` else `h = L`, `w = int(h * ar)`; the computed side is bumped to even; both
//!    at least 1; then capped so the longest edge is at most 4096 (`int()` again, no even bump).
//!    `size = {height, width}` resizes to exactly that; so do `size = (height, width)` and
//!    `size = n` (n x n), which transformers' `get_size_dict` turns into that dict.
//!    With `do_resize` off, `size` is not used (the image keeps its size for step 3).
//! 3. `do_image_splitting` with `M = max_image_size.longest_edge`: resize to multiples of M
//!    (`ar = w / h`; if `w >= h`: `w = ceil(w / M) * M`, `h = ceil(int(w / ar) / M) * M`, else
//!    symmetric), then if `h > M or w > M`: `rows = (h - M) // M + 1` x `cols` tiles (row-major) plus
//!    the whole image resized to M x M as the last frame; otherwise the image itself is the only
//!    frame and rows = cols = 0. Without splitting: resize to M x M, rows = cols = 0.
//!    A resize to the current size is a no-op (Pillow returns a copy).
//! 4. `do_rescale`: `(v as f64 * rescale_factor) as f32`; `do_normalize`: `(x - mean) / std` in f32
//!    (mean/std cast to f32). Both are per-channel functions of the u8 value: a 256-entry table.
//! 5. `do_pad`: every sample gets `max_frames` frames of the largest frame size; missing frames and
//!    the bottom/right margins are 0.0 and masked out in `pixel_attention_mask`.

use rayon::prelude::*;

use super::image::{PilMode, RawImage};
use super::image_kernels::{hint_huge_pages, recycle_u8};
use super::resample::{resize, Filter, ImageU8, ImageView};
use crate::error::{DataError, Error, Result};

pub use super::image_processor_config::{ImageProcessorConfig, ResizeTarget};

/// transformers' `MAX_IMAGE_SIZE`: the longest edge after step 2 never exceeds this.
const MAX_IMAGE_SIZE: usize = 4096;

/// Output of [`process`].
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPixels {
    /// `[batch, max_frames, 3, height, width]`; padding frames and margins are 0.0.
    pub pixel_values: Vec<f32>,
    /// `[batch, max_frames, height, width]`, true on real pixels. `None` when `do_pad` is false
    /// (transformers returns no mask then).
    pub pixel_attention_mask: Option<Vec<bool>>,
    pub batch: usize,
    pub max_frames: usize,
    pub height: usize,
    pub width: usize,
    /// Per sample, per image: tile rows / columns (0 / 0 for an unsplit image).
    pub rows: Vec<Vec<usize>>,
    pub cols: Vec<Vec<usize>>,
    /// Real frames per sample (`rows * cols + 1` or 1 per image, summed).
    pub num_frames: Vec<usize>,
}

/// An image that is either the caller's RGB pixels or a resized copy.
enum Img<'a> {
    Borrowed(ImageView<'a>),
    Owned(ImageU8),
}

impl<'a> Img<'a> {
    fn view(&self) -> ImageView<'_> {
        match self {
            Img::Borrowed(v) => *v,
            Img::Owned(o) => o.view(),
        }
    }

    fn resized(self, w: usize, h: usize, f: Filter) -> Result<Img<'a>> {
        let v = self.view();
        if v.width == w && v.height == h {
            return Ok(self);
        }
        let out = Img::Owned(resize(v, w, h, f)?);
        self.recycle();
        Ok(out)
    }

    fn recycle(self) {
        if let Img::Owned(o) = self {
            recycle_u8(o.data);
        }
    }
}

/// One frame: a `w` x `h` window at (`x0`, `y0`) of the image's main or global picture.
#[derive(Clone, Copy)]
struct Frame {
    global: bool,
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

struct Prepared<'a> {
    main: Img<'a>,
    global: Option<ImageU8>,
    rows: usize,
    cols: usize,
    frames: Vec<Frame>,
}

/// Step 2: `_resize_output_size_rescale_to_max_len` then `_scale_below_upper_bound(4096)`.
/// Returns (height, width).
pub(crate) fn longest_edge_size(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let (mut h, mut w) = (height, width);
    let ar = width as f64 / height as f64;
    if w >= h {
        w = max_len;
        h = (w as f64 / ar) as usize;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * ar) as usize;
        if w % 2 != 0 {
            w += 1;
        }
    }
    let (h, w) = (h.max(1), w.max(1));
    let ar = w as f64 / h as f64;
    let (h, w) = if w >= h && w > MAX_IMAGE_SIZE {
        ((MAX_IMAGE_SIZE as f64 / ar) as usize, MAX_IMAGE_SIZE)
    } else if h > w && h > MAX_IMAGE_SIZE {
        (MAX_IMAGE_SIZE, (MAX_IMAGE_SIZE as f64 * ar) as usize)
    } else {
        (h, w)
    };
    (h.max(1), w.max(1))
}

/// Step 3 sizing: `resize_for_vision_encoder`. Returns (height, width), possibly 0 (an error).
pub(crate) fn vision_encoder_size(height: usize, width: usize, m: usize) -> (usize, usize) {
    let ar = width as f64 / height as f64;
    let up = |v: f64| (v / m as f64).ceil() as usize * m;
    if width >= height {
        let w = up(width as f64);
        let h = up(((w as f64 / ar) as usize) as f64);
        (h, w)
    } else {
        let h = up(height as f64);
        let w = up(((h as f64 * ar) as usize) as f64);
        (h, w)
    }
}

fn prepare<'a>(img: &'a RawImage, cfg: &ImageProcessorConfig) -> Result<Prepared<'a>> {
    img.validate()?;
    let f = cfg.resample;
    let plain_rgb = img.mode == PilMode::Rgb && (img.transparency.is_none() || !cfg.do_convert_rgb);
    let mut cur = if plain_rgb {
        Img::Borrowed(ImageView { width: img.width, height: img.height, channels: 3, data: &img.data })
    } else if cfg.do_convert_rgb {
        Img::Owned(img.to_rgb()?)
    } else {
        return Err(Error::Data(DataError::Image(format!(
            "mode {} image with do_convert_rgb=False: only RGB images can skip the RGB conversion",
            img.mode.as_str()
        ))));
    };
    if cfg.do_resize {
        let v = cur.view();
        let (h, w) = match cfg.size {
            ResizeTarget::LongestEdge(l) => longest_edge_size(v.height, v.width, l),
            ResizeTarget::Exact { height, width } => (height, width),
        };
        cur = cur.resized(w, h, f)?;
    }
    let m = cfg.max_image_size;
    if !cfg.do_image_splitting {
        let main = cur.resized(m, m, f)?;
        let frame = Frame { global: false, x0: 0, y0: 0, w: m, h: m };
        return Ok(Prepared { main, global: None, rows: 0, cols: 0, frames: vec![frame] });
    }
    let v = cur.view();
    let (h2, w2) = vision_encoder_size(v.height, v.width, m);
    if h2 == 0 || w2 == 0 {
        return Err(Error::Data(DataError::Image(format!(
            "a {}x{} image resizes to {w2}x{h2} for max_image_size {m}: height and width must be > 0",
            v.width, v.height
        ))));
    }
    let main = cur.resized(w2, h2, f)?;
    let (w, h) = (main.view().width, main.view().height);
    if h <= m && w <= m {
        let frame = Frame { global: false, x0: 0, y0: 0, w, h };
        return Ok(Prepared { main, global: None, rows: 0, cols: 0, frames: vec![frame] });
    }
    // Python: (height - max_height) // max_height + 1 (floor division).
    let splits = |n: usize| ((n as i64 - m as i64).div_euclid(m as i64) + 1).max(0) as usize;
    let (rows, cols) = (splits(h), splits(w));
    let mut frames = Vec::with_capacity(rows * cols + 1);
    for r in 0..rows {
        for c in 0..cols {
            let (x0, y0) = (c * m, r * m);
            frames.push(Frame { global: false, x0, y0, w: m.min(w - x0), h: m.min(h - y0) });
        }
    }
    let global = resize(main.view(), m, m, f)?;
    frames.push(Frame { global: true, x0: 0, y0: 0, w: m, h: m });
    Ok(Prepared { main, global: Some(global), rows, cols, frames })
}

fn at(sample: usize, image: usize, e: Error) -> Error {
    let wrap = |m: String| format!("sample {sample}, image {image}: {m}");
    match e {
        Error::Data(DataError::Image(m)) => Error::Data(DataError::Image(wrap(m))),
        Error::Data(DataError::Invalid(m)) => Error::Data(DataError::Invalid(wrap(m))),
        other => other,
    }
}

/// Runs the processor on a batch: `images[s]` are the images of sample `s` (possibly none).
/// Images are processed in parallel. See the module docs for the exact steps.
pub fn process(images: &[Vec<RawImage>], cfg: &ImageProcessorConfig) -> Result<BatchPixels> {
    cfg.check()?;
    let flat: Vec<(usize, usize, &RawImage)> = images
        .iter()
        .enumerate()
        .flat_map(|(s, imgs)| imgs.iter().enumerate().map(move |(i, img)| (s, i, img)))
        .collect();
    let prepared: Vec<Prepared<'_>> =
        flat.par_iter().map(|&(s, i, img)| prepare(img, cfg).map_err(|e| at(s, i, e))).collect::<Result<_>>()?;

    // (image index in `prepared`, frame) per sample, in order.
    let mut per_sample: Vec<Vec<(usize, Frame)>> = vec![Vec::new(); images.len()];
    let mut rows = vec![Vec::new(); images.len()];
    let mut cols = vec![Vec::new(); images.len()];
    for (k, (&(s, _, _), p)) in flat.iter().zip(&prepared).enumerate() {
        per_sample[s].extend(p.frames.iter().map(|&f| (k, f)));
        rows[s].push(p.rows);
        cols[s].push(p.cols);
    }
    let num_frames: Vec<usize> = per_sample.iter().map(Vec::len).collect();
    let batch = images.len();
    let max_frames = num_frames.iter().copied().max().unwrap_or(0);
    let all = per_sample.iter().flatten();
    let height = all.clone().map(|(_, f)| f.h).max().unwrap_or(0);
    let width = all.clone().map(|(_, f)| f.w).max().unwrap_or(0);
    if cfg.do_pad {
        if flat.is_empty() {
            return Err(Error::Data(DataError::Invalid("no images found in the batch".into())));
        }
    } else if num_frames.iter().any(|&n| n != max_frames) || all.clone().any(|(_, f)| f.h != height || f.w != width) {
        return Err(Error::Data(DataError::Invalid(format!(
            "do_pad=False needs the same number of frames in every sample and frames of one size \
             (frames per sample: {num_frames:?}); enable do_pad"
        ))));
    }

    let table = cfg.value_table();
    let plane = height * width;
    let mut pixel_values = vec![0f32; batch * max_frames * 3 * plane];
    let mut mask = vec![false; batch * max_frames * plane];
    hint_huge_pages(&mut pixel_values);
    hint_huge_pages(&mut mask);
    if plane > 0 {
        pixel_values.par_chunks_mut(3 * plane).zip(mask.par_chunks_mut(plane)).enumerate().for_each(
            |(slot, (out, msk))| {
                let (s, j) = (slot / max_frames, slot % max_frames);
                let Some(&(k, fr)) = per_sample[s].get(j) else { return };
                let p = &prepared[k];
                let src = match (&p.global, fr.global) {
                    (Some(g), true) => g.view(),
                    _ => p.main.view(),
                };
                fill_frame(out, msk, src, fr, width, &table);
            },
        );
    }
    for p in prepared {
        p.main.recycle();
        if let Some(g) = p.global {
            recycle_u8(g.data);
        }
    }
    Ok(BatchPixels {
        pixel_values,
        pixel_attention_mask: if cfg.do_pad { Some(mask) } else { None },
        batch,
        max_frames,
        height,
        width,
        rows,
        cols,
        num_frames,
    })
}

/// Writes one frame into `out` (`[3, H, W]`, W = `width`) and its mask (`[H, W]`).
fn fill_frame(out: &mut [f32], msk: &mut [bool], src: ImageView<'_>, fr: Frame, width: usize, table: &[[f32; 256]; 3]) {
    let plane = msk.len();
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for y in 0..fr.h {
        let start = ((fr.y0 + y) * src.width + fr.x0) * 3;
        let row = &src.data[start..start + fr.w * 3];
        let o = y * width;
        let (r, g, b) = (&mut r_plane[o..o + fr.w], &mut g_plane[o..o + fr.w], &mut b_plane[o..o + fr.w]);
        for (x, px) in row.chunks_exact(3).enumerate() {
            r[x] = table[0][px[0] as usize];
            g[x] = table[1][px[1] as usize];
            b[x] = table[2][px[2] as usize];
        }
        msk[o..o + fr.w].fill(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn sizes_follow_transformers() {
        assert_eq!(longest_edge_size(480, 640, 2048), (1536, 2048));
        assert_eq!(longest_edge_size(10, 2000, 128), (1, 128)); // int(0.64) = 0 -> max 1
        assert_eq!(longest_edge_size(53, 37, 192), (192, 134)); // int(134.03) = 134
        assert_eq!(longest_edge_size(1, 1, 5000), (4096, 4096));
        assert_eq!(vision_encoder_size(1536, 2048, 512), (1536, 2048));
        assert_eq!(vision_encoder_size(1, 128, 64), (64, 128));
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = ImageProcessorConfig::from_json(&json!({})).unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        let c = ImageProcessorConfig::from_json(&json!({"image_processor": {"size": {"longest_edge": 2048},
            "max_image_size": {"longest_edge": 512}, "resample": 3}}))
        .unwrap();
        assert_eq!(c.size, ResizeTarget::LongestEdge(2048));
        assert_eq!((c.max_image_size, c.resample), (512, Filter::Bicubic));
        assert_eq!(ImageProcessorConfig::from_json(&c.to_json()).unwrap(), c);
        for bad in [
            json!({"size": "5"}),
            json!({"size": [5]}),
            json!({"size": {"foo": 5}}),
            json!({"do_pad": "yes"}),
            json!({"resample": 9}),
            json!({"max_image_size": {}}),
            json!([]),
        ] {
            assert!(ImageProcessorConfig::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn size_forms_follow_get_size_dict() {
        let size = |v: Value| ImageProcessorConfig::from_json(&v).map(|c| c.size);
        let exact = |height, width| ResizeTarget::Exact { height, width };
        assert_eq!(size(json!({"size": [384, 320]})).unwrap(), exact(384, 320)); // (height, width)
        assert_eq!(size(json!({"size": 50})).unwrap(), exact(50, 50));
        assert_eq!(
            size(json!({"size": {"shortest_edge": 9, "longest_edge": 20}})).unwrap(),
            ResizeTarget::LongestEdge(20)
        );
        // Valid for transformers but not usable by Idefics3's resize: fine unless it resizes.
        for s in [json!({"shortest_edge": 9}), json!({"max_height": 9, "max_width": 9})] {
            assert!(size(json!({"size": s.clone()})).is_err(), "{s}");
            assert_eq!(size(json!({"size": s, "do_resize": false})).unwrap(), ImageProcessorConfig::default().size);
        }
        assert!(size(json!({"size": 50, "default_to_square": false})).is_err());
        assert!(size(json!({"size": 50, "default_to_square": false, "do_resize": false})).is_ok());
        assert!(size(json!({"size": [5], "do_resize": false})).is_err()); // transformers: IndexError
    }

    #[test]
    fn empty_batch_and_errors_name_index() {
        let cfg = ImageProcessorConfig::default();
        assert!(process(&[vec![], vec![]], &cfg).is_err());
        let bad = RawImage { mode: PilMode::Rgb, width: 0, height: 2, data: vec![], palette: None, transparency: None };
        let ok = RawImage::from_rgb8(1, 1, vec![1, 2, 3]).unwrap();
        let e = process(&[vec![ok], vec![bad]], &cfg).unwrap_err().to_string();
        assert!(e.contains("sample 1, image 0"), "{e}");
    }
}
