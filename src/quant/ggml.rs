//! GGML block types (the tensor types of GGUF files, llama.cpp's `ggml_type`): ids, block sizes and
//! bytes per block, the reference decoding ([`dequantize_row`]), and [`GgmlWeight`], a Linear weight
//! kept in its GGUF blocks (a kind of [`super::QuantWeight`]; kernels in `ops::matmul_ggml`). The
//! block layouts are documented where they are decoded; the quantizers are in `ggml_quantize`.

use std::ops::Range;
use std::sync::Arc;

/// A GGUF tensor type. The discriminants are ggml's type ids as stored in GGUF tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Bf16 = 30,
}

/// Values per super-block of the K-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type with ggml id `id`, if we support it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == id)
    }

    /// ggml's name of the type ("F32", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a row of `n` values, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        n.is_multiple_of(bs).then(|| n / bs * self.type_size())
    }

    /// The type llama.cpp's quantizer writes for a row of `n` values when `self` cannot hold it
    /// (`tensor_type_fallback` in llama-quant.cpp): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16
    /// when even that does not fit. `self` when it fits.
    pub fn fallback_for_row(self, n: usize) -> GgmlType {
        if n.is_multiple_of(self.block_size()) {
            return self;
        }
        let t = match self {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            t => t,
        };
        if n.is_multiple_of(t.block_size()) {
            t
        } else {
            GgmlType::F16
        }
    }
}

/// Bad GGML data: a row length the type cannot hold, or data of the wrong size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgmlError {
    #[error("{} cannot hold rows of {n} values (blocks of {} values)", ty.name(), ty.block_size())]
    RowLength { ty: GgmlType, n: usize },
    #[error("{} data of {found} bytes where the shape needs {expected}", ty.name())]
    DataSize { ty: GgmlType, expected: usize, found: usize },
    #[error("data range {start}..{end} is outside its buffer of {len} bytes")]
    Range { start: usize, end: usize, len: usize },
}

/// Bytes owned by the weight or shared with their source (a memory-mapped GGUF file: no copy).
#[derive(Clone)]
pub struct GgmlData {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl GgmlData {
    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        GgmlData { owner: Arc::new(v), range }
    }

    /// `range` of `owner`'s bytes (e.g. a tensor inside an `Arc<memmap2::Mmap>`), checked.
    pub fn shared(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self, GgmlError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(GgmlError::Range { start: range.start, end: range.end, len });
        }
        Ok(GgmlData { owner, range })
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for GgmlData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgmlData({} bytes)", self.range.len())
    }
}

/// A Linear weight [out, in] in GGML blocks: row o is `row_bytes` bytes at o * row_bytes, blocks of
/// `ty.block_size()` consecutive values of the row (GGUF's layout of a 2-D tensor with ne = [in, out]).
#[derive(Debug, Clone)]
pub struct GgmlWeight {
    pub ty: GgmlType,
    /// [out, in]
    pub shape: (usize, usize),
    data: GgmlData,
}

impl GgmlWeight {
    /// Checks that `data` holds exactly `out` rows of `in` values of `ty`.
    pub fn new(ty: GgmlType, shape: (usize, usize), data: GgmlData) -> Result<Self, GgmlError> {
        let rb = ty.row_bytes(shape.1).ok_or(GgmlError::RowLength { ty, n: shape.1 })?;
        let expected = rb.checked_mul(shape.0).ok_or(GgmlError::DataSize { ty, expected: usize::MAX, found: 0 })?;
        let found = data.bytes().len();
        if found != expected {
            return Err(GgmlError::DataSize { ty, expected, found });
        }
        Ok(GgmlWeight { ty, shape, data })
    }

    pub fn from_vec(ty: GgmlType, shape: (usize, usize), data: Vec<u8>) -> Result<Self, GgmlError> {
        Self::new(ty, shape, GgmlData::from_vec(data))
    }

    /// `w` ([out, in] row-major f32) quantized to `ty` (`ggml_quantize::quantize`).
    pub fn quantize(ty: GgmlType, w: &[f32], shape: (usize, usize)) -> Result<Self, GgmlError> {
        if w.len() != shape.0 * shape.1 {
            return Err(GgmlError::RowLength { ty, n: shape.1 });
        }
        Self::from_vec(ty, shape, super::ggml_quantize::quantize(ty, w, shape.1)?)
    }

    /// All rows' blocks (out * row_bytes bytes).
    pub fn data(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The shared bytes (to write them out, or build another weight on them).
    pub fn shared_data(&self) -> &GgmlData {
        &self.data
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.shape.1 / self.ty.block_size() * self.ty.type_size()
    }

    /// Rows r0..r0 + rows dequantized into dst ([rows, in]) by the reference [`dequantize_row`].
    pub fn decode_rows(&self, r0: usize, rows: usize, dst: &mut [f32]) {
        let (k, rb) = (self.shape.1, self.row_bytes());
        let src = &self.data()[r0 * rb..(r0 + rows) * rb];
        for (s, d) in src.chunks_exact(rb.max(1)).zip(dst[..rows * k].chunks_exact_mut(k.max(1))) {
            dequantize_row(self.ty, s, d);
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_K / Q5_K: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes.
/// Bytes 0..4 hold scales 0..4 (low 6 bits) and the top 2 bits of scales 4..8; bytes 4..8 the same
/// for the mins; bytes 8..12 the low 4 bits of scales 4..8 (low nibble) and mins 4..8 (high nibble).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Decodes one row of `dst.len()` values stored as `ty` in `src` (exactly `ty.row_bytes(dst.len())`
/// bytes). This is the reference decoding: the float operations are ggml's (`dequantize_row_*`) and
/// gguf-py's in the same order (`d * q + m`, `(d * sc) * q - dmin * m`), without fused multiply-adds,
/// so the values equal what llama.cpp and transformers' GGUF loader produce, bit for bit.
///
/// Block layouts (little-endian, f16 scales):
/// - Q8_0 (34 B / 32): d, 32 x i8; x = d q.
/// - Q4_0 (18 B / 32): d, 16 B; value j < 16 is the low nibble of byte j, j + 16 its high nibble;
///   x = d (q - 8). Q4_1 (20 B): d, m, nibbles; x = d q + m.
/// - Q5_0 (22 B / 32): d, qh (u32: bit j is the 5th bit of value j), nibbles; x = d (q - 16).
///   Q5_1 (24 B): d, m, qh, nibbles; x = d q + m.
/// - Q4_K (144 B / 256): d, dmin, 12 B of 6-bit scales/mins ([`scale_min_k4`]), 128 B of nibbles; per
///   64 values, 32 bytes: low nibbles are sub-block 2i, high nibbles 2i + 1; x = (d sc) q - dmin m.
/// - Q5_K (176 B / 256): as Q4_K plus qh[32] before the nibbles; bit i of qh[l] is the 5th bit of
///   value l of sub-block i.
/// - Q6_K (210 B / 256): ql[128], qh[64], i8 scales[16], d; per 128 values (ql 64 B, qh 32 B):
///   q = (low 4 bits from ql) | (2 bits from qh) << 4, minus 32; 16 sub-blocks of 16; x = (d sc) q.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(ty.row_bytes(dst.len()), Some(src.len()), "{} row of {} values", ty.name(), dst.len());
    let bs = ty.block_size();
    let ts = ty.type_size();
    for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => y[0] = f16_at(b, 0),
            GgmlType::Bf16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                    *v = (q as i8) as f32 * d;
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16_at(b, 0);
                let (m, qs) = if ty == GgmlType::Q4_1 { (f16_at(b, 2), &b[4..20]) } else { (0.0, &b[2..18]) };
                for (j, &q) in qs.iter().enumerate() {
                    let (lo, hi) = ((q & 0xF) as i32, (q >> 4) as i32);
                    if ty == GgmlType::Q4_1 {
                        y[j] = d * lo as f32 + m;
                        y[j + 16] = d * hi as f32 + m;
                    } else {
                        y[j] = d * (lo - 8) as f32;
                        y[j + 16] = d * (hi - 8) as f32;
                    }
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16_at(b, 0);
                let one = ty == GgmlType::Q5_1;
                let (m, o) = if one { (f16_at(b, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                for (j, &q) in b[o + 4..o + 20].iter().enumerate() {
                    let lo = (q & 0xF) as i32 | ((((qh >> j) & 1) as i32) << 4);
                    let hi = (q >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
                    if one {
                        y[j] = d * lo as f32 + m;
                        y[j + 16] = d * hi as f32 + m;
                    } else {
                        y[j] = d * (lo - 16) as f32;
                        y[j + 16] = d * (hi - 16) as f32;
                    }
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let five = ty == GgmlType::Q5K;
                let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for i in 0..8 {
                    let (sc, mn) = scale_min_k4(i, scales);
                    let (dl, ml) = (d * sc as f32, dmin * mn as f32);
                    let bytes = &qs[(i / 2) * 32..(i / 2) * 32 + 32];
                    for l in 0..32 {
                        let mut q = if i % 2 == 0 { bytes[l] & 0xF } else { bytes[l] >> 4 } as u32;
                        if five {
                            q |= (((qh[l] >> i) & 1) as u32) << 4;
                        }
                        y[i * 32 + l] = dl * q as f32 - ml;
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for h in 0..2 {
                    let (ql, qh, sc, y) = (&ql[h * 64..], &qh[h * 32..], &sc[h * 8..], &mut y[h * 128..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t as u32), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None); // Q4_2, removed from ggml
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(GgmlType::Q4K.row_bytes(576), None);
        assert_eq!(GgmlType::Q6K.row_bytes(512), Some(420));
    }
}
