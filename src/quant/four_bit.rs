//! bitsandbytes' 4-bit blockwise quantization (NF4 / FP4), bit for bit.
//!
//! A weight is flattened row-major (`[out, in]` -> `n = out * in` values) and cut into blocks of
//! `blocksize` (64) values; the last block may be short. Per block `absmax_b = max |x|` (f32) and
//! each value becomes the 4-bit index of the table entry nearest to `clamp(x * (1 / absmax_b), -1, 1)`
//! (ties: the lower index, as `argmin`). Two indices share a byte, the even position in the HIGH
//! nibble: `byte = q[2i] << 4 | q[2i + 1]` (an odd count pads a zero low nibble).
//! Dequantize: `x' = table[q] * absmax_b` in f32.
//!
//! Double quantization ("nested", `bnb_4bit_use_double_quant`): `offset = mean(absmax)`, and
//! `absmax - offset` is quantized blockwise in blocks of 256 with the signed 8-bit dynamic map
//! ([`super::dynamic::signed_map`]): `absmax_b' = map[qa_b] * nested_absmax[b / 256] + offset`.

use super::dynamic;

/// NF4 (normal float 4): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 as bitsandbytes' CPU kernel decodes it: [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6,
/// -2, -3] / 12 (f32 bit patterns). Bit 3 is the sign; the table is not sorted. (Its Python table, the
/// `quant_map` it saves and its fallback for odd row lengths, has +0 at entry 8: the same values.)
pub const FP4_BITS: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x8000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

/// FP4's table indices in ascending order of value (torch's stable argsort of the table).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

static FP4: std::sync::LazyLock<[f32; 16]> = std::sync::LazyLock::new(|| FP4_BITS.map(f32::from_bits));

/// Which 4-bit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBitType {
    Nf4,
    Fp4,
}

impl FourBitType {
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4,
            FourBitType::Fp4 => &FP4,
        }
    }

    /// The `quant_map` bitsandbytes saves (FP4's zero entries both +0).
    pub fn quant_map(self) -> [f32; 16] {
        let mut t = *self.table();
        t.iter_mut().for_each(|v| *v += 0.0);
        t
    }

    /// Table indices in ascending order of value.
    fn order(self) -> [u8; 16] {
        match self {
            FourBitType::Nf4 => std::array::from_fn(|i| i as u8),
            FourBitType::Fp4 => FP4_ORDER,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(FourBitType::Nf4),
            "fp4" => Some(FourBitType::Fp4),
            _ => None,
        }
    }
}

/// The per-block scales of a 4-bit weight, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: u8 codes of `absmax - offset` in the signed dynamic map, one f32
    /// `nested_absmax` per `nested_blocksize` codes.
    Nested { codes: Vec<u8>, nested_absmax: Vec<f32>, nested_map: Vec<f32>, nested_blocksize: usize, offset: f32 },
}

impl Absmax {
    /// The f32 scale of each block.
    pub fn decode(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested { codes, nested_absmax, nested_map, nested_blocksize, offset } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| nested_map[c as usize] * nested_absmax[i / nested_blocksize] + offset)
                .collect(),
        }
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested { codes, nested_absmax, nested_map, .. } => {
                codes.len() + 4 * nested_absmax.len() + 4 * nested_map.len() + 4
            }
        }
    }
}

/// Quantizes `x` (flattened) as bitsandbytes' `quantize_4bit` on the CPU: per block `absmax = max |x|`
/// and `v = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)` (a short last block: `x / absmax'` with its
/// absmax clamped to 1e-38 and stored so); the code is the bucket of v among the midpoints of the
/// sorted table (a value on a midpoint goes to the lower bucket); an odd count pads with v = 0.
/// Returns (packed codes, f32 absmax per block).
pub fn quantize(x: &[f32], ty: FourBitType, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let table = ty.table();
    let order = ty.order();
    let mids: [f32; 15] = std::array::from_fn(|i| (table[order[i] as usize] + table[order[i + 1] as usize]) / 2.0);
    let code_of = |v: f32| order[mids.iter().filter(|&&m| m < v).count()];
    let n = x.len();
    let full = n - n % blocksize;
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    let mut scaled = Vec::with_capacity(n + 1);
    for block in x[..full].chunks(blocksize) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        let inv = 1.0 / a.max(1e-38);
        scaled.extend(block.iter().map(|v| (v * inv).clamp(-1.0, 1.0)));
    }
    if full < n {
        let a = x[full..].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        absmax.push(a);
        scaled.extend(x[full..].iter().map(|v| (v / a).clamp(-1.0, 1.0)));
    }
    if n % 2 == 1 {
        scaled.push(0.0);
    }
    let packed = scaled.chunks_exact(2).map(|p| code_of(p[0]) << 4 | code_of(p[1])).collect();
    (packed, absmax)
}

/// Double quantization of f32 block scales (see the module doc).
pub fn nest(absmax: &[f32], nested_blocksize: usize) -> Absmax {
    let offset = dynamic::mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let map = dynamic::signed_map();
    let (codes, nested_absmax) = dynamic::quantize_blockwise(&centred, &map, nested_blocksize);
    Absmax::Nested { codes, nested_absmax, nested_map: map, nested_blocksize, offset }
}

/// Dequantizes flattened elements `start..start + dst.len()` with decoded block `scales`.
#[inline]
pub fn decode_range(packed: &[u8], scales: &[f32], table: &[f32; 16], blocksize: usize, start: usize, dst: &mut [f32]) {
    let mut i = start;
    let end = start + dst.len();
    let mut d = 0;
    while i < end {
        let b = i / blocksize;
        let s = scales[b];
        let stop = ((b + 1) * blocksize).min(end);
        // Odd start: the low nibble of its byte first.
        if i % 2 == 1 && i < stop {
            dst[d] = table[(packed[i / 2] & 0x0f) as usize] * s;
            i += 1;
            d += 1;
        }
        while i + 1 < stop {
            let byte = packed[i / 2];
            dst[d] = table[(byte >> 4) as usize] * s;
            dst[d + 1] = table[(byte & 0x0f) as usize] * s;
            i += 2;
            d += 2;
        }
        if i < stop {
            dst[d] = table[(packed[i / 2] >> 4) as usize] * s;
            i += 1;
            d += 1;
        }
    }
}

/// For each byte, the two table values it codes (high nibble first): decodes 2 values per lookup.
pub fn pair_table(ty: FourBitType) -> &'static [[f32; 2]; 256] {
    static NF4_PAIRS: std::sync::LazyLock<[[f32; 2]; 256]> = std::sync::LazyLock::new(|| pairs(&NF4));
    static FP4_PAIRS: std::sync::LazyLock<[[f32; 2]; 256]> = std::sync::LazyLock::new(|| pairs(&FP4));
    match ty {
        FourBitType::Nf4 => &NF4_PAIRS,
        FourBitType::Fp4 => &FP4_PAIRS,
    }
}

fn pairs(t: &[f32; 16]) -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [t[b >> 4], t[b & 15]])
}
