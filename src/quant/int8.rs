//! LLM.int8 (bitsandbytes' `load_in_8bit`), bit for bit where bitsandbytes is deterministic.
//!
//! Weights: cast to f16, then per output row `SCB = max |w|` (f32) and `CB = round(w * (127 / SCB))`
//! (ties to even) as int8. Dequantized: `CB * (SCB * (1 / 127))` in f32 (bitsandbytes' training
//! path on the CPU, `MatMul8bitFp`).
//!
//! Inference (`MatMul8bitLt`, what transformers runs in eval mode): columns of x holding any
//! |f16(x)| >= threshold are "outlier" columns, taken out of the int8 product and multiplied in f32
//! with the dequantized weight columns (`(CB * SCB) * (1 / 127)`); the rest of f16(x) is quantized per
//! row like the weight, multiplied in int32 and rescaled by `row_stat * SCB * 6.200124e-05`
//! (1 / 127^2), in f32.

use half::f16;
use rayon::prelude::*;

use super::Int8;

/// round-half-to-even of an f32 to i8 (as torch's `round().to(int8)` for values in range).
#[inline]
fn round_i8(v: f32) -> i8 {
    v.round_ties_even().clamp(-128.0, 127.0) as i8
}

/// bitsandbytes' `int8_vectorwise_quant` of one row (threshold 0): (codes, absmax).
fn quant_row(row: &[f32], out: &mut [i8]) -> f32 {
    let a = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    // torch evaluates `127.0 / row_stats` as `reciprocal(row_stats) * 127`
    let s = (1.0 / a) * 127.0;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = round_i8(v * s);
    }
    a
}

impl Int8 {
    /// Quantizes `w` ([out, in] f32) as `Int8Params` does (through f16).
    pub fn quantize(w: &[f32], shape: (usize, usize), threshold: f32) -> Self {
        let (o, k) = shape;
        let mut cb = vec![0i8; o * k];
        let mut scb = vec![0f32; o];
        cb.par_chunks_mut(k.max(1)).zip(scb.par_iter_mut()).enumerate().for_each(|(r, (c, s))| {
            let row: Vec<f32> = w[r * k..(r + 1) * k].iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            *s = quant_row(&row, c);
        });
        Int8 { shape, cb, scb, threshold, training: Default::default() }
    }

    /// Rows r0..r0+rows dequantized (f32) into dst.
    pub fn decode_rows(&self, r0: usize, rows: usize, dst: &mut [f32]) {
        let k = self.shape.1;
        for r in 0..rows {
            let s = self.scb[r0 + r] * (1.0 / 127.0);
            let src = &self.cb[(r0 + r) * k..(r0 + r + 1) * k];
            for (d, &c) in dst[r * k..(r + 1) * k].iter_mut().zip(src) {
                *d = c as f32 * s;
            }
        }
    }

    /// LLM.int8 inference product: y [n, out] (f16 values as f32) = x [n, k] W^T (+ bias).
    pub fn forward_lt(&self, x: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (out, k) = self.shape;
        let x16: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(); // [n, k]
        let t = self.threshold;
        let mut outlier = vec![false; k];
        if t > 0.0 {
            for r in 0..n {
                for (c, o) in outlier.iter_mut().enumerate() {
                    *o |= x16[r * k + c].abs() >= t;
                }
            }
        }
        // Rows of x quantized with the outliers zeroed; outlier columns zeroed in every row (n > 1).
        let mut ca = vec![0i8; n * k];
        let mut sca = vec![0f32; n];
        for r in 0..n {
            let row: Vec<f32> = (0..k)
                .map(|c| {
                    let v = x16[r * k + c];
                    if t > 0.0 && v.abs() >= t {
                        0.0
                    } else {
                        v
                    }
                })
                .collect();
            sca[r] = quant_row(&row, &mut ca[r * k..(r + 1) * k]);
            if n > 1 {
                for (c, &o) in outlier.iter().enumerate() {
                    if o {
                        ca[r * k + c] = 0;
                    }
                }
            }
        }
        let cols: Vec<usize> = (0..k).filter(|&c| outlier[c]).collect();
        let mut y = vec![0f32; n * out];
        y.par_chunks_mut(out.max(1)).enumerate().for_each(|(r, yr)| {
            let xa = &ca[r * k..(r + 1) * k];
            for (o, yv) in yr.iter_mut().enumerate() {
                let wr = &self.cb[o * k..(o + 1) * k];
                let acc: i32 = xa.iter().zip(wr).map(|(&a, &b)| a as i32 * b as i32).sum();
                let mut v = acc as f32 * (sca[r] * self.scb[o]) * 6.200124e-05;
                if let Some(b) = bias {
                    v += b[o];
                }
                if !cols.is_empty() {
                    // int8_vectorwise_dequant: (CB * SCB) * (1 / 127)
                    let extra: f32 =
                        cols.iter().map(|&c| x[r * k + c] * (wr[c] as f32 * self.scb[o] * 7.874_016e-3)).sum();
                    v += extra;
                }
                *yv = v;
            }
        });
        y
    }
}
