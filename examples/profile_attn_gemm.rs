//! Single-thread timing of the gemm shapes of the f32 attention backward's query block (dev aid):
//! cargo run --release --example profile_attn_gemm
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn g(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dcs: isize,
    drs: isize,
    lhs: &[f32],
    lcs: isize,
    lrs: isize,
    rhs: &[f32],
    rcs: isize,
    rrs: isize,
    acc: bool,
) {
    // SAFETY: the callers pass buffers of the sizes the strides describe.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs,
            drs,
            acc,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn time(name: &str, flop: f64, mut f: impl FnMut()) {
    f();
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!("{name:40} {:8.3} ms {:7.1} GFLOP/s", s * 1e3, flop / s / 1e9);
}

fn main() {
    let (qb, s, hd) = (128usize, 1024usize, 64usize);
    let r = |n: usize| (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect::<Vec<f32>>();
    let (q, k, kt, dout) = (r(qb * hd), r(s * hd), r(hd * s), r(qb * hd));
    let mut p = r(qb * s);
    let mut dv = r(s * hd);
    let mut dq = r(qb * hd);
    let fl = 2.0 * (qb * s * hd) as f64;
    time("S = Q Kt  (qb x S, k=hd), Kt [hd,S]", fl, || {
        g(qb, s, hd, &mut p, 1, s as isize, &q, 1, hd as isize, &kt, 1, s as isize, false)
    });
    time("S = Q K^T (K [S,hd] read transposed)", fl, || {
        g(qb, s, hd, &mut p, 1, s as isize, &q, 1, hd as isize, &k, hd as isize, 1, false)
    });
    time("dV += P^T dO (S x hd, k=qb)", fl, || {
        g(s, hd, qb, &mut dv, 1, hd as isize, &p, s as isize, 1, &dout, 1, hd as isize, true)
    });
    time("dQ = dS K (qb x hd, k=S)", fl, || {
        g(qb, hd, s, &mut dq, 1, hd as isize, &p, 1, s as isize, &k, 1, hd as isize, false)
    });
    // column-major output variants: dV^T [hd, S] = dO^T P
    let mut dvt = r(hd * s);
    time("dV^T += dO^T P (hd x S, k=qb)", fl, || {
        g(hd, s, qb, &mut dvt, 1, s as isize, &dout, 1, hd as isize, &p, 1, s as isize, true)
    });
    let mut dqt = r(hd * qb);
    time("dQ^T = K^T dS^T (hd x qb, k=S)", fl, || {
        g(hd, qb, s, &mut dqt, 1, qb as isize, &k, hd as isize, 1, &p, s as isize, 1, false)
    });
}
