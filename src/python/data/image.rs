//! Bindings of `crate::data::image` and `crate::data::image_processor`.

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::data::image::{RawImage, Transparency};
use crate::data::image_decode::decode_image;
use crate::data::image_processor::{process, ImageProcessorConfig};
use crate::error::{input_err, DataError, Error};
use crate::python::errors::guard;

/// One image as Python hands it over: (mode, width, height, pixel bytes, palette bytes or None,
/// palette mode or None, transparency or None) — what PIL's `Image` exposes.
type PilTuple = (String, usize, usize, Vec<u8>, Option<Vec<u8>>, Option<String>, Option<Py<PyAny>>);

fn transparency(py: Python<'_>, t: &Py<PyAny>) -> Result<Option<Transparency>, Error> {
    let t = t.bind(py);
    if let Ok(v) = t.extract::<i64>() {
        return Ok(Some(Transparency::Value(v)));
    }
    if let Ok(b) = t.cast::<PyBytes>() {
        return Ok(Some(Transparency::PaletteAlpha(b.as_bytes().to_vec())));
    }
    if let Ok(tp) = t.cast::<PyTuple>() {
        if let Ok((r, g, b)) = tp.extract::<(i64, i64, i64)>() {
            return Ok(Some(Transparency::Rgb(r, g, b)));
        }
    }
    input_err(format!("unsupported image.info['transparency'] value: {t}"))
}

fn raw_image(py: Python<'_>, t: PilTuple, sample: usize, index: usize) -> Result<RawImage, Error> {
    let (mode, w, h, bytes, palette, palette_mode, tr) = t;
    let at = |e: Error| match e {
        Error::Data(DataError::Image(m)) => {
            Error::Data(DataError::Image(format!("sample {sample}, image {index}: {m}")))
        }
        other => other,
    };
    let mut img = RawImage::from_pil(&mode, w, h, bytes, palette, palette_mode.as_deref()).map_err(at)?;
    if let Some(tr) = tr {
        img.transparency = transparency(py, &tr)?;
    }
    Ok(img)
}

/// Runs the image processor. `images[s]` lists sample s's images as PIL tuples; `config_json` is
/// the processor config. Returns (pixel_values [B, F, 3, H, W] f32, pixel_attention_mask
/// [B, F, H, W] bool or None, rows, cols).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn process_images<'py>(
    py: Python<'py>,
    images: Vec<Vec<PilTuple>>,
    config_json: &str,
) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Option<Bound<'py, PyArrayDyn<bool>>>, Vec<Vec<usize>>, Vec<Vec<usize>>)> {
    let cfg = guard(|| {
        let v: serde_json::Value =
            serde_json::from_str(config_json).or_else(|e| input_err(format!("image processor config: {e}")))?;
        ImageProcessorConfig::from_json(&v)
    })?;
    let mut raws: Vec<Vec<RawImage>> = Vec::with_capacity(images.len());
    for (s, sample) in images.into_iter().enumerate() {
        let mut row = Vec::with_capacity(sample.len());
        for (i, t) in sample.into_iter().enumerate() {
            row.push(guard(|| raw_image(py, t, s, i))?);
        }
        raws.push(row);
    }
    let out = py.detach(|| guard(|| process(&raws, &cfg)))?;
    let dims = [out.batch, out.max_frames, 3, out.height, out.width];
    let pv = guard(|| ArrayD::from_shape_vec(IxDyn(&dims), out.pixel_values).or_else(|e| input_err(e.to_string())))?;
    let mask = match out.pixel_attention_mask {
        None => None,
        Some(m) => {
            let d = [out.batch, out.max_frames, out.height, out.width];
            Some(guard(|| ArrayD::from_shape_vec(IxDyn(&d), m).or_else(|e| input_err(e.to_string())))?.into_pyarray(py))
        }
    };
    Ok((pv.into_pyarray(py), mask, out.rows, out.cols))
}

/// Decodes image file bytes (PNG, JPEG, GIF, BMP, WebP, TIFF) with EXIF orientation applied; refuses
/// images over `max_pixels` (Pillow's decompression-bomb limit by default). Returns a PIL tuple.
#[pyfunction]
#[pyo3(signature = (data, max_pixels=None))]
fn decode_image_bytes(data: &[u8], max_pixels: Option<u64>) -> PyResult<(String, usize, usize, Vec<u8>)> {
    guard(|| {
        let img = decode_image(data, max_pixels)?;
        Ok((img.mode.as_str().to_string(), img.width, img.height, img.data))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(process_images, m)?)?;
    m.add_function(wrap_pyfunction!(decode_image_bytes, m)?)?;
    Ok(())
}
