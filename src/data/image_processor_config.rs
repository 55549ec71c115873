//! `preprocessor_config.json` of the Idefics3 / SmolVLM image processor: its fields, transformers'
//! defaults, and how `size` is read (transformers' `get_size_dict`). The processing itself is in
//! `image_processor`.

use serde_json::{json, Map, Value};

use super::resample::Filter;
use crate::error::{DataError, Error, Result};

/// The `size` of the processor: how `do_resize` sizes an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"longest_edge": n}`: longest edge becomes n, aspect ratio kept (see the module docs).
    LongestEdge(usize),
    /// `{"height": h, "width": w}`: exactly that size.
    Exact { height: usize, width: usize },
}

/// `preprocessor_config.json` of an Idefics3 / SmolVLM checkpoint. Fields are public and may be
/// changed between calls; missing keys take `Idefics3ImageProcessor`'s defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: ResizeTarget,
    /// `resample` (PIL code; default LANCZOS).
    pub resample: Filter,
    pub do_image_splitting: bool,
    /// `max_image_size["longest_edge"]`: the tile size M.
    pub max_image_size: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// One value per channel (3), or a single value for all channels.
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    pub do_pad: bool,
}

impl Default for ImageProcessorConfig {
    /// The class defaults of transformers' `Idefics3ImageProcessor`.
    fn default() -> Self {
        ImageProcessorConfig {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTarget::LongestEdge(4 * 364),
            resample: Filter::Lanczos,
            do_image_splitting: true,
            max_image_size: 364,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.5; 3],
            image_std: vec![0.5; 3],
            do_pad: true,
        }
    }
}

fn cfg_err(msg: String) -> Error {
    Error::Data(DataError::Invalid(format!("image processor config: {msg}")))
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn as_bool(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match get(obj, key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(cfg_err(format!("'{key}' must be true or false, got {v}"))),
    }
}

fn as_count(v: &Value, key: &str) -> Result<usize> {
    match v.as_f64() {
        Some(f) if f >= 1.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => Ok(f as usize),
        _ => Err(cfg_err(format!("'{key}' must be a positive integer, got {v}"))),
    }
}

fn as_floats(obj: &Map<String, Value>, key: &str, default: &[f64]) -> Result<Vec<f64>> {
    let bad = |v: &Value| cfg_err(format!("'{key}' must be a number or a list of 3 numbers, got {v}"));
    match get(obj, key) {
        None => Ok(default.to_vec()),
        Some(Value::Array(a)) => {
            let v: Option<Vec<f64>> = a.iter().map(Value::as_f64).collect();
            match v {
                Some(v) if v.len() == 1 || v.len() == 3 => Ok(v),
                _ => Err(bad(&Value::Array(a.clone()))),
            }
        }
        Some(v) => v.as_f64().map(|f| vec![f]).ok_or_else(|| bad(v)),
    }
}

/// transformers' `VALID_SIZE_DICT_KEYS`.
const VALID_SIZE_KEYS: [&[&str]; 6] = [
    &["height", "width"],
    &["shortest_edge"],
    &["longest_edge", "shortest_edge"],
    &["longest_edge"],
    &["max_height", "max_width"],
    &["max_pixels", "min_pixels"],
];

/// `size` as transformers' `get_size_dict` reads it (then `Idefics3ImageProcessor.resize` uses it):
/// a dict with one of the valid key sets; a list / tuple `(height, width)` (`size = (384, 384)` as
/// tutorials set it on the processor); an int n, `{height: n, width: n}` (with `default_to_square`,
/// the default; else `{shortest_edge: n}`). `Ok(None)`: not set. `Ok(Some(Err(msg)))`: a valid size
/// that Idefics3's resize rejects (no `longest_edge`, no `height` + `width`): an error only when
/// `do_resize` is on, as in transformers. `Err`: an invalid size (transformers raises in any case).
fn parse_size(v: Option<&Value>, default_to_square: bool) -> Result<Option<std::result::Result<ResizeTarget, String>>> {
    let unusable = |s: &Value| {
        Ok(Some(Err(format!("'size' must have 'longest_edge' or 'height' and 'width' to resize, got {s}"))))
    };
    let Some(v) = v else { return Ok(None) };
    match v {
        Value::Object(s) => {
            let mut keys: Vec<&str> = s.iter().filter(|(_, x)| !x.is_null()).map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            if !VALID_SIZE_KEYS.contains(&keys.as_slice()) {
                return Err(cfg_err(format!("'size' must have one of the key sets {VALID_SIZE_KEYS:?}, got {v}")));
            }
            // transformers tests `size.longest_edge` first (truthy), then `size.height and size.width`.
            let truthy = |k: &str| get(s, k).filter(|x| x.as_f64() != Some(0.0));
            if let Some(l) = truthy("longest_edge") {
                Ok(Some(Ok(ResizeTarget::LongestEdge(as_count(l, "size.longest_edge")?))))
            } else if let (Some(h), Some(w)) = (truthy("height"), truthy("width")) {
                Ok(Some(Ok(ResizeTarget::Exact {
                    height: as_count(h, "size.height")?,
                    width: as_count(w, "size.width")?,
                })))
            } else {
                unusable(v)
            }
        }
        Value::Array(a) if a.len() >= 2 => Ok(Some(Ok(ResizeTarget::Exact {
            height: as_count(&a[0], "size[0]")?,
            width: as_count(&a[1], "size[1]")?,
        }))),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            let n = as_count(v, "size")?;
            if default_to_square {
                Ok(Some(Ok(ResizeTarget::Exact { height: n, width: n })))
            } else {
                unusable(&json!({ "shortest_edge": n }))
            }
        }
        _ => Err(cfg_err(format!(
            "'size' must be a dict like {{\"longest_edge\": 2048}}, a (height, width) pair or an int, got {v}"
        ))),
    }
}

impl ImageProcessorConfig {
    /// Parses `preprocessor_config.json` (or the `"image_processor"` object that newer saves nest in
    /// `processor_config.json`; a whole processor config holding that key is accepted too).
    /// Unknown keys are ignored; `null` means the default.
    pub fn from_json(v: &Value) -> Result<Self> {
        let Some(mut obj) = v.as_object() else {
            return Err(cfg_err(format!("expected a JSON object, got {v}")));
        };
        if let Some(inner) = obj.get("image_processor").and_then(Value::as_object) {
            obj = inner;
        }
        let d = ImageProcessorConfig::default();
        let do_resize = as_bool(obj, "do_resize", d.do_resize)?;
        let default_to_square = as_bool(obj, "default_to_square", true)?;
        let size = match parse_size(get(obj, "size"), default_to_square)? {
            None => d.size,
            Some(Ok(t)) => t,
            // A size transformers accepts but Idefics3's resize cannot use: an error only when it resizes.
            Some(Err(_)) if !do_resize => d.size,
            Some(Err(msg)) => return Err(cfg_err(msg)),
        };
        let max_image_size = match get(obj, "max_image_size") {
            None => d.max_image_size,
            Some(Value::Object(m)) => match get(m, "longest_edge") {
                Some(l) => as_count(l, "max_image_size.longest_edge")?,
                None => return Err(cfg_err("'max_image_size' needs 'longest_edge'".into())),
            },
            Some(v) => {
                return Err(cfg_err(format!(
                    "'max_image_size' must be an object like {{\"longest_edge\": 512}}, got {v}"
                )))
            }
        };
        let resample = match get(obj, "resample") {
            None => d.resample,
            Some(v) => match v.as_i64() {
                Some(code) => Filter::from_pil(code).map_err(|e| cfg_err(format!("'resample': {e}")))?,
                None => return Err(cfg_err(format!("'resample' must be a PIL filter code (int), got {v}"))),
            },
        };
        let rescale_factor = match get(obj, "rescale_factor") {
            None => d.rescale_factor,
            Some(v) => v.as_f64().ok_or_else(|| cfg_err(format!("'rescale_factor' must be a number, got {v}")))?,
        };
        Ok(ImageProcessorConfig {
            do_convert_rgb: as_bool(obj, "do_convert_rgb", d.do_convert_rgb)?,
            do_resize,
            size,
            resample,
            do_image_splitting: as_bool(obj, "do_image_splitting", d.do_image_splitting)?,
            max_image_size,
            do_rescale: as_bool(obj, "do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: as_bool(obj, "do_normalize", d.do_normalize)?,
            image_mean: as_floats(obj, "image_mean", &d.image_mean)?,
            image_std: as_floats(obj, "image_std", &d.image_std)?,
            do_pad: as_bool(obj, "do_pad", d.do_pad)?,
        })
    }

    /// The config as `preprocessor_config.json` keys (what `to_dict()` shows).
    pub fn to_json(&self) -> Value {
        let size = match self.size {
            ResizeTarget::LongestEdge(l) => json!({ "longest_edge": l }),
            ResizeTarget::Exact { height, width } => json!({ "height": height, "width": width }),
        };
        json!({
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample.pil_code(),
            "do_image_splitting": self.do_image_splitting,
            "max_image_size": { "longest_edge": self.max_image_size },
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "do_pad": self.do_pad,
            "image_processor_type": "Idefics3ImageProcessor",
        })
    }

    pub(crate) fn check(&self) -> Result<()> {
        let zero = match self.size {
            ResizeTarget::LongestEdge(l) => l == 0,
            ResizeTarget::Exact { height, width } => height == 0 || width == 0,
        };
        if zero || self.max_image_size == 0 {
            return Err(cfg_err(format!(
                "sizes must be positive (size {:?}, max_image_size {})",
                self.size, self.max_image_size
            )));
        }
        if self.do_normalize {
            for (name, v) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
                if v.len() != 1 && v.len() != 3 {
                    return Err(cfg_err(format!("'{name}' must have 1 or 3 values for RGB images, got {}", v.len())));
                }
            }
        }
        Ok(())
    }

    /// Per channel, the f32 output for each u8 value (rescale, then normalize, as transformers).
    pub(crate) fn value_table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        let pick = |v: &Vec<f64>, c: usize| v[if v.len() == 1 { 0 } else { c }] as f32;
        for (c, row) in t.iter_mut().enumerate() {
            for (u, out) in row.iter_mut().enumerate() {
                let mut x = if self.do_rescale { (u as f64 * self.rescale_factor) as f32 } else { u as f32 };
                if self.do_normalize {
                    x = (x - pick(&self.image_mean, c)) / pick(&self.image_std, c);
                }
                *out = x;
            }
        }
        t
    }
}
