//! bitsandbytes' 8-bit blockwise quantization with the signed dynamic map, used for the double
//! quantization of 4-bit block scales, and torch's f32 mean (the offset of that double quantization
//! must be the same f32 number bitsandbytes computes).

/// bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted values in [-1, 1] (f32 bit patterns as
/// torch builds them).
pub fn signed_map() -> Vec<f32> {
    SIGNED_MAP_BITS.iter().map(|&b| f32::from_bits(b)).collect()
}

/// Blockwise 8-bit quantization of `x` with `map` (sorted), as bitsandbytes' CPU kernel: per block
/// of `blocksize` values `absmax = max |x|`, `v = x / absmax`, and the code is the entry nearest to v
/// among the one at or below it and the next (the lower one on ties). Returns (codes, absmax).
///
/// bitsandbytes' native CPU build rounds a few values lying within ~5% of an interval's midpoint to
/// the neighbour of larger magnitude (about 1 code in 600); this function takes the exact nearest.
pub fn quantize_blockwise(x: &[f32], map: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    let last = map.len() - 1;
    for block in x.chunks(blocksize) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        for &v in block {
            let v = v / a;
            // the entry at or below v (the first when v is below them all)
            let mut i = map.partition_point(|&c| c <= v).saturating_sub(1);
            if i < last && (v - map[i + 1]).abs() < (v - map[i]).abs() {
                i += 1;
            }
            codes.push(i as u8);
        }
    }
    (codes, absmax)
}

/// torch's `x.mean()` for a contiguous f32 CPU tensor: its sum ([`torch_sum_f32`]) divided by the
/// count in f32.
pub fn mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// f32 lanes of the `Vectorized<float>` torch's CPU sum kernel runs with (8 on x86, AVX512 CPUs
/// included, as measured against torch 2.15).
pub const TORCH_VEC_LANES: usize = 8;

/// torch's CPU sum of a contiguous f32 row (ATen's SumKernel): fewer values than a vector: the scalar
/// `row_sum` (4 interleaved accumulators, the tail into the first); otherwise `vectorized_inner_sum`
/// (the same over vectors of [`TORCH_VEC_LANES`], then the scalar tail in order, then the lanes).
/// Matching its order makes the double-quantization offset the same f32 number. (torch splits sums of
/// more than 32768 values over its threads, so bitsandbytes' own offset for weights of more than 2M
/// values depends on its thread count; this is its single-thread order.)
// Index loops over lanes and rows mirror ATen's vectorised code, whose order of additions is the point.
#[allow(clippy::needless_range_loop)]
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const ILP: usize = 4;
    let lanes = if x.len() < TORCH_VEC_LANES { 1 } else { TORCH_VEC_LANES };
    let vec_size = x.len() / lanes;
    let size_ilp = vec_size / ILP;
    let mut partial = multi_row_sum(x, lanes, size_ilp);
    if lanes == 1 {
        for &v in &x[size_ilp * ILP..] {
            partial[0][0] += v;
        }
        let mut acc = partial[0][0];
        for p in &partial[1..] {
            acc += p[0];
        }
        return acc;
    }
    for i in size_ilp * ILP..vec_size {
        for l in 0..lanes {
            partial[0][l] += x[i * lanes + l];
        }
    }
    for k in 1..ILP {
        for l in 0..lanes {
            partial[0][l] += partial[k][l];
        }
    }
    let mut acc = 0f32;
    for &v in &x[vec_size * lanes..] {
        acc += v;
    }
    for l in 0..lanes {
        acc += partial[0][l];
    }
    acc
}

/// ATen's `multi_row_sum` with 4 rows of vectors: sums vector rows `i * 4 + k` (k < 4) for i < size
/// in 4 cascade levels.
#[allow(clippy::needless_range_loop)] // as torch_sum_f32
fn multi_row_sum(x: &[f32], lanes: usize, size: usize) -> [Vec<f32>; 4] {
    const LEVELS: usize = 4;
    const ROWS: usize = 4;
    let ceil_log2 = if size <= 1 { 0 } else { usize::BITS as usize - (size - 1).leading_zeros() as usize };
    let level_power = 4usize.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc: Vec<[Vec<f32>; ROWS]> = (0..LEVELS).map(|_| std::array::from_fn(|_| vec![0f32; lanes])).collect();
    let load = |i: usize, k: usize, l: usize| x[(i * ROWS + k) * lanes + l];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ROWS {
                for l in 0..lanes {
                    acc[0][k][l] += load(i, k, l);
                }
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ROWS {
                for l in 0..lanes {
                    let v = acc[j - 1][k][l];
                    acc[j][k][l] += v;
                    acc[j - 1][k][l] = 0.0;
                }
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ROWS {
            for l in 0..lanes {
                acc[0][k][l] += load(i, k, l);
            }
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ROWS {
            for l in 0..lanes {
                let v = acc[j][k][l];
                acc[0][k][l] += v;
            }
        }
    }
    std::mem::take(&mut acc[0])
}

/// f32 bit patterns of bitsandbytes' `create_dynamic_map(signed=True)` as torch computes it (sorted;
/// entry 127 is 0, entry 255 is 1).
const SIGNED_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];
