//! The bf16 gemm of `matmul_bf16_packed.rs` with fused epilogues, for inference in the bf16 compute mode.
//!
//! The input is already bf16 ([`Bf16Rows`]: converted once, e.g. by a layer norm, and multiplied by
//! several weights), and the final store of each tile (after the last k block) applies, in this order,
//! `* scale`, `* row_scale[row]`, `+ bias[col]`, GELU-tanh, `dst + ...` (residual, f32 output), then
//! writes f32 or rounds to bf16 (rows for the next gemm). Several weights sharing the input write side
//! by side into one output ([`Job::col0`]), e.g. q | k | v.
//!
//! [`tile`] is the microkernel of `matmul_bf16_packed.rs` with that epilogue; attention (`attention_bf16.rs`)
//! uses it too. Partial sums of the k blocks before the last go to a per-thread f32 scratch tile.
//! On a CPU with AMX the products run on `matmul_bf16_amx.rs` and only the epilogue here ([`tile`] with
//! no k-pairs). [`gemm_fused_portable`] computes the same on any CPU (f32 gemm on the bf16 values, scalar epilogue).

use std::cell::RefCell;

use rayon::prelude::*;

use super::activation::gelu_tanh_scalar;
use super::bf16::{f32_to_bf16_bits, Bf16Rows};
use super::matmul_bf16_packed::{self, PackedBf16, KC, MC, MR, NCP, NR};

/// One weight of a [`gemm_fused`] call: `out[:, col0..col0 + w.out] = epilogue(a @ w^T + bias)`.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub w: &'a PackedBf16,
    /// [w.out]
    pub bias: Option<&'a [f32]>,
    pub col0: usize,
}

/// Where a [`gemm_fused`] call writes.
pub enum Out<'a> {
    /// f32 rows `[n, ld]`; with `accumulate` the results are added to the values there (residual).
    F32 { y: &'a mut [f32], ld: usize, accumulate: bool },
    /// bf16 rows, the input of a following gemm.
    Bf16(&'a mut Bf16Rows),
}

/// How a tile's final values are stored (see the module doc for the order of the steps).
#[derive(Clone, Copy)]
pub(crate) struct Epi {
    /// f32 or bf16 element of the tile's first row and column.
    pub dst: *mut u8,
    /// Row stride of `dst` in elements.
    pub ld: usize,
    pub bf16: bool,
    pub accumulate: bool,
    pub scale: f32,
    /// One per tile row, or null.
    pub row_scale: *const f32,
    /// One per tile column, or null.
    pub bias: *const f32,
    pub gelu: bool,
}

/// Whether [`gemm_fused`] and the bf16 attention run their AVX512-BF16 kernels on this CPU.
pub fn available() -> bool {
    matmul_bf16_packed::available()
}

fn check(a: &Bf16Rows, jobs: &[Job], out: &Out) -> usize {
    let width = match out {
        Out::F32 { y, ld, .. } => {
            assert!(y.len() >= a.n * ld, "gemm_fused: output of {} values for {} rows of {ld}", y.len(), a.n);
            *ld
        }
        Out::Bf16(y) => {
            assert_eq!(y.n, a.n, "gemm_fused: output rows {} vs input rows {}", y.n, a.n);
            y.k
        }
    };
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for j in jobs {
        assert_eq!(
            j.w.in_features(),
            a.k,
            "gemm_fused: weight in_features {} vs input width {}",
            j.w.in_features(),
            a.k
        );
        assert!(j.bias.is_none_or(|b| b.len() == j.w.out_features()), "gemm_fused: bias length");
        assert!(
            j.col0 + j.w.out_features() <= width,
            "gemm_fused: columns {}..{} past the output width {width}",
            j.col0,
            j.col0 + j.w.out_features()
        );
        spans.push((j.col0, j.col0 + j.w.out_features()));
    }
    spans.sort_unstable();
    assert!(spans.windows(2).all(|s| s[0].1 <= s[1].0), "gemm_fused: jobs write overlapping columns");
    width
}

/// `out[:, col0 + j] = epilogue((a @ w^T)[:, j] + bias[j])` for each job; `gelu` applies GELU-tanh.
/// The AVX512-BF16 kernel where [`available`], else [`gemm_fused_portable`].
pub fn gemm_fused(a: &Bf16Rows, jobs: &[Job], gelu: bool, out: Out) {
    if !available() || a.n == 0 || a.k == 0 {
        return gemm_fused_portable(a, jobs, gelu, out);
    }
    let _ = check(a, jobs, &out);
    #[cfg(target_arch = "x86_64")]
    {
        let (dst, ld, bf16, accumulate) = match out {
            Out::F32 { y, ld, accumulate } => (y.as_mut_ptr() as *mut u8, ld, false, accumulate),
            Out::Bf16(y) => {
                let ld = 2 * y.kp2();
                (y.data.as_mut_ptr() as *mut u8, ld, true, false)
            }
        };
        if super::matmul_bf16_amx::amx_usable() {
            // SAFETY: amx_usable() checked the CPU and the tile permission; check() bounded every job's
            // columns and rows by the output; blocks are disjoint.
            return unsafe { run_amx(a, jobs, gelu, dst, ld, bf16, accumulate) };
        }
        // SAFETY: available() checked the CPU; check() bounded every job's columns and rows by the
        // output; tasks write disjoint tiles.
        unsafe { run_fast(a, jobs, gelu, dst, ld, bf16, accumulate) }
    }
}

thread_local! {
    /// Partial sums of one task's `MC x NCP*NR` tile between k blocks.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_fast(a: &Bf16Rows, jobs: &[Job], gelu: bool, dst: *mut u8, ld: usize, bf16: bool, accumulate: bool) {
    let (n, kp2) = (a.n, a.kp2());
    let esize = if bf16 { 2 } else { 4 };
    let tiles_r = n.div_ceil(MC);
    let mut tasks = Vec::new(); // (job, row tile, column tile)
    for (ji, j) in jobs.iter().enumerate() {
        for tr in 0..tiles_r {
            for tc in 0..j.w.out_features().div_ceil(NR).div_ceil(NCP) {
                tasks.push((ji, tr, tc));
            }
        }
    }
    let (ap, dp) = (a.data.as_ptr() as usize, dst as usize);
    tasks.into_par_iter().for_each(|(ji, tr, tc)| {
        let job = &jobs[ji];
        let out = job.w.out_features();
        let panels = out.div_ceil(NR);
        let (r0, r1) = (tr * MC, (tr * MC + MC).min(n));
        let (p0, p1) = (tc * NCP, (tc * NCP + NCP).min(panels));
        let wp = job.w.panels().as_ptr();
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if kp2 > KC && s.len() < MC * NCP * NR {
                s.resize(MC * NCP * NR, 0.0);
            }
            let sp = s.as_mut_ptr();
            let mut kb = 0;
            while kb < kp2 {
                let kc = KC.min(kp2 - kb);
                let last = kb + kc == kp2;
                for ir in (r0..r1).step_by(MR) {
                    let rows = MR.min(r1 - ir);
                    for jp in p0..p1 {
                        let part =
                            if kp2 > KC { sp.add((ir - r0) * NCP * NR + (jp - p0) * NR) } else { std::ptr::null_mut() };
                        let col = job.col0 + jp * NR;
                        let epi = Epi {
                            dst: (dp as *mut u8).add((ir * ld + col) * esize),
                            ld,
                            bf16,
                            accumulate,
                            scale: 1.0,
                            row_scale: std::ptr::null(),
                            bias: job.bias.map_or(std::ptr::null(), |b| b.as_ptr().add(jp * NR)),
                            gelu,
                        };
                        let part_in = if kb > 0 { part as *const f32 } else { std::ptr::null() };
                        let part_out = if last { std::ptr::null_mut() } else { part };
                        let b = wp.add(jp * kp2 * NR + kb * NR);
                        tile(
                            kc,
                            (ap as *const u32).add(ir * kp2 + kb),
                            kp2,
                            rows,
                            b,
                            NR.min(out - jp * NR),
                            part_in,
                            part_out,
                            NCP * NR,
                            &epi,
                        );
                    }
                }
                kb += kc;
            }
        });
    });
}

/// [`run_fast`] on AMX: each job's product by `matmul_bf16_amx::run`, whose finished 32 x 32 blocks go
/// through [`tile`] with no k-pairs (`kc = 0`: the block comes in as `part_in`), i.e. the same epilogue.
///
/// # Safety
/// `matmul_bf16_amx::amx_usable()`; as [`run_fast`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_amx(a: &Bf16Rows, jobs: &[Job], gelu: bool, dst: *mut u8, ld: usize, bf16: bool, accumulate: bool) {
    use super::matmul_bf16_amx::{run, ATiles};
    let esize = if bf16 { 2 } else { 4 };
    let at = ATiles::from_rows(a);
    let dp = dst as usize;
    for job in jobs {
        let (col0, bias) = (job.col0, job.bias.map_or(0, |b| b.as_ptr() as usize));
        let sink = move |r0: usize, rows: usize, c0: usize, cols: usize, src: *const f32, lds: usize| {
            for i in (0..rows).step_by(MR) {
                let epi = Epi {
                    // rows r0 + i.. and columns col0 + c0.. of the output, inside it by check()
                    dst: (dp as *mut u8).wrapping_add(((r0 + i) * ld + col0 + c0) * esize),
                    ld,
                    bf16,
                    accumulate,
                    scale: 1.0,
                    row_scale: std::ptr::null(),
                    bias: if bias == 0 { std::ptr::null() } else { (bias as *const f32).wrapping_add(c0) },
                    gelu,
                };
                // SAFETY: the CPU has AVX512-BF16 (amx_usable() implies it); `src` holds `rows` x `cols`
                // values (stride lds); with kc = 0 the a and b pointers are never read; epi's dst and bias
                // point inside the output (check()) and the job's bias (out_features values).
                unsafe {
                    let part = src.add(i * lds);
                    let rows = MR.min(rows - i);
                    tile(
                        0,
                        part as *const u32,
                        0,
                        rows,
                        part as *const u32,
                        cols,
                        part,
                        std::ptr::null_mut(),
                        lds,
                        &epi,
                    )
                };
            }
        };
        run(&at, job.w, &sink, None);
    }
}

/// One `MR x NR` tile over `kc` k-pairs: `acc[rows, cols] = a[rows, kc pairs] . b[kc pairs, NR]`
/// (`b`: a packed panel, `NR` pairs per k-pair), plus `part_in` when not null; stored to `part_out`
/// (row stride `ldp`) when not null, else finished and stored by `epi`.
///
/// # Safety
/// Needs avx512f + avx512bf16; `1 <= rows <= MR`, `1 <= cols <= NR`; every pointer valid for the
/// rows and columns it is read or written at.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile(
    kc: usize,
    a: *const u32,
    lda: usize,
    rows: usize,
    b: *const u32,
    cols: usize,
    part_in: *const f32,
    part_out: *mut f32,
    ldp: usize,
    epi: &Epi,
) {
    use super::simd::x86::{gelu_tanh, lanes, store_bf16};
    use core::arch::x86_64::*;
    let acc = super::matmul_bf16_packed::fast::dot_tile(kc, a, lda, rows, b);
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (v, &r) in row.iter().enumerate() {
            let c0 = v * 16;
            if c0 >= cols {
                break;
            }
            let m = lanes(cols - c0);
            let mut r = r;
            if !part_in.is_null() {
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, part_in.add(i * ldp + c0)));
            }
            if !part_out.is_null() {
                _mm512_mask_storeu_ps(part_out.add(i * ldp + c0), m, r);
                continue;
            }
            if epi.scale != 1.0 {
                r = _mm512_mul_ps(r, _mm512_set1_ps(epi.scale));
            }
            if !epi.row_scale.is_null() {
                r = _mm512_mul_ps(r, _mm512_set1_ps(*epi.row_scale.add(i)));
            }
            if !epi.bias.is_null() {
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, epi.bias.add(c0)));
            }
            if epi.gelu {
                r = gelu_tanh(r);
            }
            if epi.bf16 {
                store_bf16((epi.dst as *mut u16).add(i * epi.ld + c0), m, r);
            } else {
                let p = (epi.dst as *mut f32).add(i * epi.ld + c0);
                if epi.accumulate {
                    r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), r);
                }
                _mm512_mask_storeu_ps(p, m, r);
            }
        }
    }
}

/// [`gemm_fused`] on any CPU: the f32 gemm of `matmul_bf16_packed::matmul_portable` on the bf16 values, then
/// the same epilogue, scalar.
pub fn gemm_fused_portable(a: &Bf16Rows, jobs: &[Job], gelu: bool, mut out: Out) {
    let _ = check(a, jobs, &out);
    let x = a.to_f32(); // [n, k]
    for job in jobs {
        let o = job.w.out_features();
        let y = matmul_bf16_packed::matmul_portable(&x, a.n, a.k, &job.w.unpack(), o); // [n, o]
        for r in 0..a.n {
            for c in 0..o {
                let mut v = y[r * o + c];
                if let Some(b) = job.bias {
                    v += b[c];
                }
                if gelu {
                    v = gelu_tanh_scalar(v);
                }
                match &mut out {
                    Out::F32 { y, ld, accumulate } => {
                        let d = &mut y[r * *ld + job.col0 + c];
                        *d = if *accumulate { *d + v } else { v };
                    }
                    Out::Bf16(y) => y.set_bits(r, job.col0 + c, f32_to_bf16_bits(v)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    use crate::ops::matmul_bf16_packed::tests::rng_vec;

    /// f64 reference: epilogue(x_bf16 @ w^T + b) per job, with the residual `init` (or 0).
    fn reference(
        x: &[f32],
        n: usize,
        k: usize,
        ws: &[(Vec<bf16>, usize, Vec<f32>, usize)],
        gelu: bool,
        ld: usize,
        init: &[f32],
    ) -> Vec<f64> {
        let mut y: Vec<f64> = init.iter().map(|&v| v as f64).collect();
        for (w, o, b, col0) in ws {
            for r in 0..n {
                for j in 0..*o {
                    let mut s = b[j] as f64;
                    for i in 0..k {
                        s += bf16::from_f32(x[r * k + i]).to_f64() * w[j * k + i].to_f64();
                    }
                    if gelu {
                        s = 0.5 * s * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (s + 0.044715 * s * s * s)).tanh());
                    }
                    y[r * ld + col0 + j] += s;
                }
            }
        }
        y
    }

    fn run_case(n: usize, k: usize, outs: &[usize], gelu: bool, portable: bool, seed: u64) {
        let x = rng_vec(n * k, seed);
        let mut ws = Vec::new();
        let mut col0 = 1; // leave column 0 alone: jobs need not start at 0
        for (i, &o) in outs.iter().enumerate() {
            let w: Vec<bf16> = rng_vec(o * k, seed + 10 + i as u64).into_iter().map(bf16::from_f32).collect();
            ws.push((w, o, rng_vec(o, seed + 20 + i as u64), col0));
            col0 += o;
        }
        let ld = col0 + 3;
        let packed: Vec<PackedBf16> = ws.iter().map(|(w, o, _, _)| matmul_bf16_packed::pack(w, *o, k)).collect();
        let jobs: Vec<Job> =
            ws.iter().zip(&packed).map(|((_, _, b, c), p)| Job { w: p, bias: Some(b), col0: *c }).collect();
        let a = Bf16Rows::from_f32(&x, n, k);
        let go = |out: Out| {
            if portable {
                gemm_fused_portable(&a, &jobs, gelu, out)
            } else {
                gemm_fused(&a, &jobs, gelu, out)
            }
        };
        // f32 with residual
        let init = rng_vec(n * ld, seed + 99);
        let mut y = init.clone();
        go(Out::F32 { y: &mut y, ld, accumulate: true });
        let want = reference(&x, n, k, &ws, gelu, ld, &init);
        let tol = 2e-5 * (k as f64).sqrt() + 1e-6;
        for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "n={n} k={k} outs={outs:?} gelu={gelu} portable={portable}: y[{i}] {g} vs {w}"
            );
        }
        // bf16 rows, no residual: equal to the f32 result rounded (up to one bf16 step)
        let mut yb = Bf16Rows::zeros(n, ld);
        go(Out::Bf16(&mut yb));
        let mut y0 = vec![0f32; n * ld];
        go(Out::F32 { y: &mut y0, ld, accumulate: false });
        let yb = yb.to_f32();
        for (i, (&g, &w)) in yb.iter().zip(&y0).enumerate() {
            assert!((g - w).abs() <= w.abs() / 128.0 + 1e-30, "bf16 output [{i}] {g} vs {w}");
        }
    }

    #[test]
    fn gemm_fused_matches_f64_reference() {
        // n across MR / MC boundaries, out not a multiple of NR, odd k, k over several KC blocks.
        for (si, &(n, k, ref outs)) in
            [(1usize, 7usize, vec![5usize]), (7, 33, vec![31, 65]), (100, 577, vec![129, 64, 3]), (197, 130, vec![200])]
                .iter()
                .enumerate()
        {
            for gelu in [false, true] {
                run_case(n, k, outs, gelu, false, 7 + si as u64);
                run_case(n, k, outs, gelu, true, 7 + si as u64);
            }
        }
    }

    #[test]
    fn gemm_fused_fast_agrees_with_portable() {
        let (n, k) = (61, 1100);
        let x = rng_vec(n * k, 3);
        let w: Vec<bf16> = rng_vec(150 * k, 4).into_iter().map(bf16::from_f32).collect();
        let p = matmul_bf16_packed::pack(&w, 150, k);
        let b = rng_vec(150, 5);
        let jobs = [Job { w: &p, bias: Some(&b), col0: 0 }];
        let a = Bf16Rows::from_f32(&x, n, k);
        let (mut y1, mut y2) = (Bf16Rows::zeros(n, 150), Bf16Rows::zeros(n, 150));
        gemm_fused(&a, &jobs, true, Out::Bf16(&mut y1));
        gemm_fused_portable(&a, &jobs, true, Out::Bf16(&mut y2));
        for (u, v) in y1.to_f32().iter().zip(y2.to_f32()) {
            assert!((u - v).abs() <= v.abs() / 64.0 + 1e-6, "{u} vs {v}");
        }
    }

    #[test]
    fn bf16_rows_roundtrip() {
        let x = rng_vec(3 * 5, 1);
        let a = Bf16Rows::from_f32(&x, 3, 5);
        let back = a.to_f32();
        for (u, v) in back.iter().zip(&x) {
            assert_eq!(*u, bf16::from_f32(*v).to_f32());
        }
        assert_eq!(a.pairs()[2] >> 16, 0, "odd tail's high half is zero");
    }
}
