//! Bindings of `crate::data::processor`.

use pyo3::prelude::*;

use crate::data::processor::ImageTokens;
use crate::python::errors::guard;

/// Expands the `<image>` placeholders of each prompt with its images' tile layouts (rows[s][i],
/// cols[s][i]); counts must match per sample.
#[pyfunction]
#[pyo3(signature = (texts, rows, cols, image_seq_len, image_token="<image>", fake_image_token="<fake_token_around_image>", global_image_token="<global-img>"))]
#[allow(clippy::too_many_arguments)]
fn expand_image_tokens(
    texts: Vec<String>,
    rows: Vec<Vec<usize>>,
    cols: Vec<Vec<usize>>,
    image_seq_len: usize,
    image_token: &str,
    fake_image_token: &str,
    global_image_token: &str,
) -> PyResult<Vec<String>> {
    let tokens = ImageTokens {
        image: image_token.into(),
        fake_around: fake_image_token.into(),
        global: global_image_token.into(),
    };
    let grids: Vec<Vec<(usize, usize)>> =
        rows.iter().zip(&cols).map(|(r, c)| r.iter().copied().zip(c.iter().copied()).collect()).collect();
    guard(|| tokens.expand_batch(&texts, &grids, image_seq_len))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expand_image_tokens, m)?)?;
    Ok(())
}
