//! The bf16 matmuls of `matmul_bf16_packed.rs` and `matmul_bf16_fused.rs` on Intel AMX (Sapphire Rapids
//! and later), behind the run-time gate [`amx_usable`].
//!
//! `y[n, out] = a[n, k] . w[out, k]^T` with `a` and `w` in bf16 (`x` rounded to bf16 round-to-nearest-even
//! exactly as the AVX512-BF16 path does) and f32 accumulation by `tdpbf16ps`, which adds to each f32
//! element of a 16 x 16 tile `C[i][j] += a[i][2p] b[2p][j] + a[i][2p+1] b[2p+1][j]` over the 16 k-pairs `p`
//! of a 16 x 16-pair A tile and a 16-pair x 16 B tile. Results equal the AVX512-BF16 path's up to the
//! order of the f32 sums.
//!
//! Layouts (every tile is 16 rows of 64 bytes; palette 1, all eight tiles configured 16 x 64 bytes):
//! * B tile: 16 consecutive k-pair rows x 16 columns of a packed weight panel (`matmul_bf16_packed::pack`:
//!   for each k-pair, the panel's `NR` columns as bf16 pairs) is exactly AMX's pair-interleaved ("VNNI")
//!   B layout, loaded in place with row stride `NR * 4` bytes. The last `ceil(k/2) % 16` pairs of a panel
//!   are copied into a zeroed `16 x NR` scratch first, so no tile reads past its panel.
//! * A tile: 16 rows x 16 pairs of `x` as bf16 pair rows (`bf16::pack_x`'s layout), here with each row
//!   padded with zero pairs to a multiple of 16 pairs and the rows padded with zero rows to a multiple of
//!   32 ([`ATiles`]): every A load is in bounds and the padding adds zero products.
//! * Registers: tmm0-3 accumulate a 32 x 32 block of `y` (rows 0-15 / 16-31 x columns 0-15 / 16-31),
//!   tmm4-5 hold the two A tiles and tmm6-7 the two B tiles of a k step (2 + 2 loads, 4 `tdpbf16ps`),
//!   software pipelined (the next step's loads go between this step's products). A block of at most 16
//!   rows (columns) uses one A (B) tile. The whole k range is summed in the tiles; a full block is then
//!   stored straight into `y` (plain matmul), any other to a 32 x 32 f32 scratch handed to a sink (the
//!   copy of a partial block, or the fused gemm's epilogue).
//! * Numbers: `tdpbf16ps`, like `vdpbf16ps`, treats bf16 denormal inputs as zero and flushes f32 denormal
//!   results, ignoring MXCSR.
//!
//! Parallel tasks (rayon): [`MA`] rows x one packed panel (`NR` = 64 columns, two 32-column halves). Each
//! task loads its tile configuration (`ldtilecfg`) and releases it at the end (`tilerelease`).
//!
//! The gate: CPUID.(EAX=7,ECX=0):EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), AVX512-BF16 (the packed
//! weights exist only there), and Linux's permission for the tile data, `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`, requested once per process. The permission belongs to the process: every thread
//! may then use the tiles, the rayon workers that already run included. `FERROVLM_NO_AMX=1` turns the
//! gate off (A/B benchmarks, the AVX512-BF16 path's tests); elsewhere than Linux on x86_64 it is off.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bf16::{f32_to_bf16_bits, Bf16Rows};
use super::matmul_bf16_packed::{AlignedU32, PackedBf16, NR};

/// Rows per parallel task (a multiple of 32).
const MA: usize = 128;
/// k-pairs per tile step (the A tile's 64-byte rows).
const TK: usize = 16;

/// Whether the AMX kernels run on this CPU and process (see the module doc); checked once, cached.
pub fn amx_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(detect)
}

/// `FERROVLM_NO_AMX` set to anything but "" or "0".
fn disabled_by_env() -> bool {
    std::env::var("FERROVLM_NO_AMX").is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    if disabled_by_env() || !super::matmul_bf16_packed::available() {
        return false;
    }
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: the cpuid instruction exists on every x86_64 CPU and only reads registers.
    #[allow(unused_unsafe)]
    let (max_leaf, edx7) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0).edx) };
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    if max_leaf < 7 || edx7 & AMX_BF16 == 0 || edx7 & AMX_TILE == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, n) takes two integers and touches no user memory; it fails
    // (non-zero) where the kernel or CPU lacks the feature.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    let _ = disabled_by_env;
    false
}

/// The A operand: bf16 pair rows `[np, kpp]`, `np` = n rounded up to 32, `kpp` = ceil(k/2) rounded up to
/// 16, zero past the data.
pub(crate) struct ATiles {
    data: AlignedU32,
    n: usize,
    kpp: usize,
}

impl ATiles {
    fn zeros(n: usize, k: usize) -> Self {
        let kpp = k.div_ceil(2).next_multiple_of(TK);
        ATiles { data: AlignedU32::zeros(n.next_multiple_of(32) * kpp), n, kpp }
    }

    /// `x [n, k]` rounded to bf16 (round to nearest even, as `bf16::pack_x`).
    pub(crate) fn from_f32(x: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(x.len(), n * k, "matmul_bf16_amx: x has {} values, expected {n} x {k}", x.len());
        let mut a = Self::zeros(n, k);
        let (kpp, kp2) = (a.kpp, k.div_ceil(2));
        if n > 0 && k > 0 {
            a.data[..n * kpp].par_chunks_mut(kpp * 16).zip(x.par_chunks(k * 16)).for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(kpp).zip(src.chunks(k)) {
                    for (dp, sp) in d.iter_mut().zip(s.chunks_exact(2)) {
                        *dp = f32_to_bf16_bits(sp[0]) as u32 | (f32_to_bf16_bits(sp[1]) as u32) << 16;
                    }
                    if k % 2 == 1 {
                        d[kp2 - 1] = f32_to_bf16_bits(s[k - 1]) as u32;
                    }
                }
            });
        }
        a
    }

    /// The rows of `a`, padded.
    pub(crate) fn from_rows(a: &Bf16Rows) -> Self {
        let mut t = Self::zeros(a.n, a.k);
        let (kpp, kp2) = (t.kpp, a.kp2());
        if a.n > 0 && kp2 > 0 {
            t.data[..a.n * kpp].par_chunks_mut(kpp * 16).zip(a.pairs().par_chunks(kp2 * 16)).for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(kpp).zip(src.chunks(kp2)) {
                    d[..kp2].copy_from_slice(s);
                }
            });
        }
        t
    }
}

/// `y[n, out] = bf16(x)[n, k] @ W^T` for a packed weight on AMX (the same rounding of `x` as
/// `matmul_bf16_packed::matmul_packed`). Runs the AVX512-BF16 or portable path where [`amx_usable`] is
/// false, so it is safe to call anywhere (tests, benchmarks).
pub fn matmul_packed_amx(x: &[f32], n: usize, k: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(
        k,
        w.in_features(),
        "matmul_bf16_amx: x has k = {k} but the weight has {} input features",
        w.in_features()
    );
    assert_eq!(x.len(), n * k, "matmul_bf16_amx: x has {} values, expected n*k = {}", x.len(), n * k);
    let out = w.out_features();
    if !amx_usable() {
        return super::matmul_bf16_packed::matmul_packed_avx512bf16(x, n, k, w);
    }
    if n == 0 || out == 0 || k == 0 {
        return vec![0.0; n * out];
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Every element is written below (full blocks by the tiles, partial ones by the sink): no zeroing.
        let mut y: Vec<f32> = Vec::with_capacity(n * out);
        let a = ATiles::from_f32(x, n, k);
        let yp = super::cpu::SendPtr(y.as_mut_ptr());
        let sink = move |r0: usize, rows: usize, c0: usize, cols: usize, src: *const f32, lds: usize| {
            for i in 0..rows {
                // SAFETY: `src` holds `rows` rows of `cols` values (stride lds); y is [n, out] and the block
                // y[r0..r0+rows, c0..c0+cols] lies inside it and is written by this call only.
                unsafe { std::ptr::copy_nonoverlapping(src.add(i * lds), yp.get().add((r0 + i) * out + c0), cols) };
            }
        };
        // SAFETY: amx_usable() checked; `a` was built for n rows of w.in_features(); y has capacity for
        // n rows of `out`; run() writes every block y[r0.., c0..] of the n x out result exactly once
        // (tiles or sink), so all n * out values are initialised before set_len.
        unsafe {
            run(&a, w, &sink, Some((yp, out)));
            y.set_len(n * out);
        }
        y
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("amx_usable() is false off x86_64")
}

/// GFLOP/s of a register-only `tdpbf16ps` loop (no loads: the tiles' own ceiling) on every rayon thread
/// right now, other load on the machine included; `None` where [`amx_usable`] is false. For benchmarks.
pub fn amx_peak_gflops(iters: usize) -> Option<f64> {
    if !amx_usable() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let threads = rayon::current_num_threads();
        let t = std::time::Instant::now();
        (0..threads).into_par_iter().for_each(|_| {
            // SAFETY: amx_usable() checked; the tiles are configured before use and released after.
            unsafe {
                tiles::config();
                for _ in 0..iters {
                    core::arch::asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        options(nostack, nomem)
                    );
                }
                tiles::release();
            }
        });
        // 4 instructions x 16 x 16 outputs x 32 products x 2 flops.
        Some((threads * iters * 4 * 16 * 16 * 32 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Where [`run`] hands each finished block: `sink(r0, rows, c0, cols, src, lds)` gets
/// `y[r0..r0 + rows, c0..c0 + cols]` (`c0`: a column of the weight) at `src`, row stride `lds`. Called from
/// several threads, for disjoint blocks.
pub(crate) type Sink<'a> = dyn Fn(usize, usize, usize, usize, *const f32, usize) + Sync + 'a;

/// One cache-line-aligned scratch of `L` values.
#[repr(C, align(64))]
struct Aligned<T, const L: usize>([T; L]);

/// `a . w^T` on AMX, block by block into `sink`; with `direct` = (y, ld), full 32 x 32 blocks are stored
/// straight to `y[r, c]` at `y + r * ld + c` instead (f32), only partial blocks go through `sink`.
///
/// # Safety
/// [`amx_usable`] must be true; `a` holds `a.n` rows of `w.in_features()` values; `direct`, if given, is
/// valid for writes of `a.n` rows of `ld >= w.out_features()` values.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn run(a: &ATiles, w: &PackedBf16, sink: &Sink, direct: Option<(super::cpu::SendPtr<f32>, usize)>) {
    let (n, out, kp2, kpp) = (a.n, w.out_features(), w.in_features().div_ceil(2), a.kpp);
    debug_assert_eq!(kpp, kp2.next_multiple_of(TK));
    if n == 0 || out == 0 || kp2 == 0 {
        return;
    }
    let panels = out.div_ceil(NR);
    let (full, rem) = (kp2 / TK, kp2 % TK);
    let (ap, wp) = (a.data.as_ptr() as usize, w.panels().as_ptr() as usize);
    (0..n.div_ceil(MA) * panels).into_par_iter().for_each(|t| {
        let (ri, pi) = (t / panels, t % panels);
        let panel = (wp as *const u32).add(pi * kp2 * NR);
        let pcols = NR.min(out - pi * NR);
        let mut tail = Aligned([0u32; TK * NR]);
        if rem > 0 {
            std::ptr::copy_nonoverlapping(panel.add(full * TK * NR), tail.0.as_mut_ptr(), rem * NR);
        }
        let tail_p = if rem > 0 { tail.0.as_ptr() } else { std::ptr::null() };
        let mut c = Aligned([0f32; 32 * 32]);
        tiles::config();
        for r0 in (ri * MA..n.min(ri * MA + MA)).step_by(32) {
            let rows = 32.min(n - r0);
            for h in 0..pcols.div_ceil(32) {
                let cols = 32.min(pcols - 32 * h);
                let tb = if tail_p.is_null() { tail_p } else { tail_p.add(32 * h) };
                let col = pi * NR + 32 * h;
                let (cp, ldc) = match direct {
                    Some((y, ld)) if rows == 32 && cols == 32 => (y.get().add(r0 * ld + col), ld),
                    _ => (c.0.as_mut_ptr(), 32),
                };
                let a0 = (ap as *const u32).add(r0 * kpp);
                tiles::block(a0, kpp, full, panel.add(32 * h), tb, rows > 16, cols > 16, cp, ldc);
                if cp == c.0.as_mut_ptr() {
                    sink(r0, rows, col, cols, c.0.as_ptr(), 32);
                }
            }
        }
        tiles::release();
    });
}

/// The tile instructions, by mnemonic in inline assembly (Rust's AMX intrinsics are unstable). The
/// compiler never allocates tmm registers, so tile contents survive between `asm!` blocks of one thread.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{Aligned, NR, TK};
    use core::arch::asm;

    /// Palette 1; tiles 0-7 each 16 rows x 64 bytes (byte 0: palette, 16..32: bytes per row as u16,
    /// 48..56: rows).
    const CONFIG: Aligned<u8, 64> = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Aligned(c)
    };

    /// Loads the tile configuration on this thread (zeroes the tiles).
    ///
    /// # Safety
    /// AMX permission granted ([`super::amx_usable`]).
    #[inline]
    pub(super) unsafe fn config() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
    }

    /// Returns the tiles to their initial state (no tile state to save on context switches).
    ///
    /// # Safety
    /// AMX permission granted.
    #[inline]
    pub(super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `c[32 x 32] (row stride ldc) = a[32 rows, 16 * steps pairs] . b[16 * steps pairs, 32 columns]`, `steps`
    /// = `full` (+ 1 with `tail`): `a` the first of 32 pair rows (stride `lda` u32), `b` the first column in
    /// a packed panel (stride `NR` u32), `tail` null or the same column of the panel's last partial 16
    /// pairs, zero padded (stride `NR`). Only the first 16 rows (columns) without `two_a` (`two_b`).
    ///
    /// # Safety
    /// Tiles configured ([`config`]); every pointer valid for what it says.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        a: *const u32,
        lda: usize,
        full: usize,
        b: *const u32,
        tail: *const u32,
        two_a: bool,
        two_b: bool,
        c: *mut f32,
        ldc: usize,
    ) {
        let (ldab, ldb) = (lda * 4, NR * 4);
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let steps = full + usize::from(!tail.is_null());
        let bstep = |s: usize| if s < full { b.add(s * TK * NR) } else { tail };
        if two_a && two_b {
            // Software pipelined: each step's products run while the next step's tiles load, each load
            // placed right after the last product that reads the register it overwrites.
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                a0 = in(reg) a, a1 = in(reg) a.add(16 * lda), b0 = in(reg) bstep(0), b1 = in(reg) bstep(0).add(16),
                lda = in(reg) ldab, ldb = in(reg) ldb, options(nostack)
            );
            for s in 1..steps {
                let a0 = a.add(s * TK);
                let b0 = bstep(s);
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(16 * lda), b0 = in(reg) b0, b1 = in(reg) b0.add(16),
                    lda = in(reg) ldab, ldb = in(reg) ldb, options(nostack)
                );
            }
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem)
            );
        }
        for s in 0..steps {
            let a0 = a.add(s * TK);
            let a1 = a0.add(16 * lda);
            let b0 = bstep(s);
            let b1 = b0.add(16);
            match (two_a, two_b) {
                (true, true) => break, // done above
                (true, false) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                    lda = in(reg) ldab, ldb = in(reg) ldb, options(nostack)
                ),
                (false, true) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                    lda = in(reg) ldab, ldb = in(reg) ldb, options(nostack)
                ),
                (false, false) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    a0 = in(reg) a0, b0 = in(reg) b0,
                    lda = in(reg) ldab, ldb = in(reg) ldb, options(nostack)
                ),
            }
        }
        let ldc = ldc * 4;
        let (c1, c2) = (c.add(16), c.add(16 * (ldc / 4)));
        let c3 = c2.add(16);
        asm!("tilestored [{c} + {ldc}*1], tmm0", c = in(reg) c, ldc = in(reg) ldc, options(nostack));
        if two_b {
            asm!("tilestored [{c} + {ldc}*1], tmm1", c = in(reg) c1, ldc = in(reg) ldc, options(nostack));
        }
        if two_a {
            asm!("tilestored [{c} + {ldc}*1], tmm2", c = in(reg) c2, ldc = in(reg) ldc, options(nostack));
        }
        if two_a && two_b {
            asm!("tilestored [{c} + {ldc}*1], tmm3", c = in(reg) c3, ldc = in(reg) ldc, options(nostack));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul_bf16_packed::{matmul_packed_avx512bf16, matmul_portable, pack, tests::rng_vec};
    use half::bf16;

    fn weights(out: usize, k: usize, seed: u64) -> Vec<bf16> {
        rng_vec(out * k, seed).into_iter().map(bf16::from_f32).collect()
    }

    /// |amx - reference| <= 1e-4 (1 + |reference|), as the AVX512-BF16 kernel's test against the portable path.
    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (u, v)) in got.iter().zip(want).enumerate() {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{what}: [{i}] {u} vs {v}");
        }
    }

    fn case(n: usize, k: usize, out: usize, seed: u64) {
        let x = rng_vec(n * k, seed);
        let w = weights(out, k, seed + 1000);
        let p = pack(&w, out, k);
        let got = matmul_packed_amx(&x, n, k, &p);
        let what = format!("n={n} k={k} out={out}");
        close(&got, &matmul_portable(&x, n, k, &w, out), &what);
        close(&got, &matmul_packed_avx512bf16(&x, n, k, &p), &format!("{what} vs avx512bf16"));
    }

    #[test]
    fn amx_matches_portable_many_shapes() {
        if !amx_usable() {
            eprintln!("note: skipped: no usable AMX on this CPU / OS (or FERROVLM_NO_AMX is set)");
            return;
        }
        // every n in 1..70 (one or two A tiles, partial 32-row blocks), k odd / even / under one tile step
        // / with and without a k tail, out under 16, between 16 and 32, past one panel, not a multiple of 16.
        let ks = [1usize, 2, 3, 31, 32, 33, 64, 65, 577];
        let outs = [1usize, 5, 15, 16, 17, 33, 64, 65, 130];
        for n in 1..70 {
            for (ki, &k) in ks.iter().enumerate() {
                let out = outs[(n + ki) % outs.len()];
                case(n, k, out, (n * 100 + ki) as u64);
            }
        }
        // several row tasks and panels; k over many tile steps; the SmolLM2 shapes.
        for (i, &(n, k, out)) in
            [(200, 1100, 300), (129, 576, 1536), (300, 1536, 576), (40, 576, 192), (257, 2, 70)].iter().enumerate()
        {
            case(n, k, out, 7 + i as u64);
        }
    }

    #[test]
    fn amx_reads_nothing_past_a_panel_or_a_row() {
        if !amx_usable() {
            eprintln!("note: skipped: no usable AMX on this CPU / OS (or FERROVLM_NO_AMX is set)");
            return;
        }
        // A NaN in the second panel's weights (column 64) and an infinity in x's row 2 must stay in
        // their own column / row: the k tail of panel 0 and the padding of row 1 read no neighbour.
        let (n, k, out) = (5, 37, 70);
        let mut x = rng_vec(n * k, 1);
        x[2 * k + 3] = f32::INFINITY;
        let mut w = weights(out, k, 2);
        w[64 * k] = bf16::NAN;
        w[64 * k + k - 1] = bf16::NAN;
        let p = pack(&w, out, k);
        let got = matmul_packed_amx(&x, n, k, &p);
        let want = matmul_portable(&x, n, k, &w, out);
        for r in 0..n {
            for j in 0..out {
                let (u, v) = (got[r * out + j], want[r * out + j]);
                if r == 2 || j == 64 {
                    assert!(!u.is_finite(), "[{r},{j}] {u} should not be finite");
                } else {
                    assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "[{r},{j}] {u} vs {v}");
                }
            }
        }
    }

    #[test]
    fn amx_from_rows_matches_from_f32() {
        for &(n, k) in &[(1usize, 1usize), (3, 33), (40, 64), (33, 577)] {
            let x = rng_vec(n * k, 9);
            let a = ATiles::from_f32(&x, n, k);
            let b = ATiles::from_rows(&Bf16Rows::from_f32(&x, n, k));
            assert_eq!((a.n, a.kpp), (b.n, b.kpp));
            assert_eq!(&a.data[..], &b.data[..], "{n} x {k}");
            assert_eq!(a.data.len(), n.next_multiple_of(32) * k.div_ceil(2).next_multiple_of(TK));
        }
    }

    #[test]
    fn amx_empty_shapes() {
        let p = pack(&weights(3, 4, 1), 3, 4);
        assert!(matmul_packed_amx(&[], 0, 4, &p).is_empty());
        let p0 = pack(&[], 3, 0);
        assert_eq!(matmul_packed_amx(&[], 2, 0, &p0), vec![0.0; 6]);
    }
}
