//! One decoding step of the text model (one new token per row) on plain f32 slices, without the tensor
//! graph: the fast path of [`TextModel::forward`] for decoding, behind the [`TextModel::decode_usable`]
//! gate and tested against it (tests/text_decode.rs).
//!
//! A decoding step reads every weight once and does little else, so it is bound by memory bandwidth and
//! by the cost of starting parallel work: the graph path starts a dozen parallel dispatches per layer,
//! each waking and joining rayon's workers around a few tens of microseconds of work. Here the whole
//! step runs as one team (`ops::team`: every worker in lockstep, spinning barriers between phases), the
//! products through the same skinny kernels as the graph's `Linear` (`ops::matmul_bf16_skinny`, hence
//! the same numbers), each thread taking its share of the output columns.
//!
//! Per layer, x: [B, H] the residual stream, six phases:
//!   1. h = rms_norm(x) w1 (every thread, its own copy);  [q | k | v] = h [Wq | Wk | Wv]^T   (columns split)
//!   2. q, k rotated at each row's position; k, v written into the KV cache          (thread 0)
//!   3. a = softmax(q k_cache^T * scale + mask) v_cache, per (row, query head), GQA  (tasks split)
//!   4. x += a Wo^T                                                                  (columns split)
//!   5. h = rms_norm(x) w2;  act = silu(h Wg^T) * (h Wu^T)                           (columns split)
//!   6. x += act Wd^T                                                                (columns split)

use candle_core::{CpuStorage, DType, Layout, Result as CResult, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

use super::cache::KvCache;
use super::text::{TextLayer, TextModel};
use super::Interrupt;
use crate::error::{Error, Result};
use crate::ops::attention_f32::softmax_row;
use crate::ops::linear::Weight;
use crate::ops::matmul_bf16_skinny::{columns, Kernel, WeightElem};
use crate::ops::norm::rms_rstd;
use crate::ops::team::{self, part, Shared, Team};
use crate::ops::{Linear, Mask};

/// Threads' column ranges are cut at multiples of this (the kernels take 4 weight rows at a time).
const ALIGN: usize = 16;

/// The abort reason of a Ctrl-C (see [`TextModel::decode_step`]).
const INTERRUPTED: &str = "interrupted";

/// The weight tensor of a linear layer the fast path can read: f32 dense or bf16-stored, no bias, no
/// adapter, not quantized.
fn plain_weight(lin: &Linear) -> Option<&Tensor> {
    if lin.adapter.is_some() || lin.bias.is_some() {
        return None;
    }
    match &lin.weight {
        Weight::Dense(w) if w.dtype() == DType::F32 => Some(w),
        Weight::Bf16(w) | Weight::PackedBf16 { w, .. } if w.dtype() == DType::BF16 => Some(w),
        _ => None,
    }
}

/// A weight's values as `W` (f32, or bf16 bits as u16).
trait FromStorage: WeightElem {
    fn slice<'a>(s: &'a Storage, l: &Layout) -> CResult<&'a [Self]>;
}

impl FromStorage for f32 {
    fn slice<'a>(s: &'a Storage, l: &Layout) -> CResult<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
            _ => candle_core::bail!("decode: expected a contiguous f32 CPU tensor"),
        }
    }
}

impl FromStorage for u16 {
    fn slice<'a>(s: &'a Storage, l: &Layout) -> CResult<&'a [u16]> {
        match (s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => Ok(v[a..b].reinterpret_cast()),
            _ => candle_core::bail!("decode: expected a contiguous bf16 CPU tensor"),
        }
    }
}

/// One layer's parameters as slices: norms [H]; q [Hq hd, H], k, v [Hkv hd, H], o [H, Hq hd],
/// gate, up [I, H], down [H, I].
struct LayerRefs<'a, W> {
    ln1: &'a [f32],
    ln2: &'a [f32],
    q: &'a [W],
    k: &'a [W],
    v: &'a [W],
    o: &'a [W],
    gate: &'a [W],
    up: &'a [W],
    down: &'a [W],
}

/// x [B, H] -> rms_norm(x) w into y, as `ops::rms_norm`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    for (y, x) in y.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        let r = rms_rstd(x, eps);
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    }
}

/// Rotates one head `x` [hd] (rotate-half, as `ops::rope`) with cos/sin [hd / 2] of its position.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Columns `cols` of x [m, k] times the side-by-side weights `ws` (each [n_p, k]) into out_t [cols, m].
fn columns_of<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[&[W]],
    cols: std::ops::Range<usize>,
    out_t: &mut [f32],
    kernel: Kernel,
) {
    let mut first = 0; // the first column of the current weight in the side-by-side numbering
    for w in ws {
        let n = w.len() / k;
        let (lo, hi) = (cols.start.max(first), cols.end.min(first + n));
        if lo < hi {
            columns(x, m, k, w, lo - first, &mut out_t[(lo - cols.start) * m..(hi - cols.start) * m], kernel);
        }
        first += n;
    }
}

impl TextModel {
    /// Whether [`Self::decode_step`] can run this model: f32 compute on the CPU with the fused kernels
    /// on, f32 norms, and every projection a plain weight (see `plain_weight`) of one storage kind
    /// (LoRA layers, biases, quantized and GGUF weights take the graph path).
    pub fn decode_usable(&self) -> bool {
        let Some(first) = self.layers.first().and_then(|l| plain_weight(&l.q_proj)) else { return false };
        let kind = first.dtype();
        self.dtype == DType::F32
            && crate::ops::fused_on(self.embed_tokens.device())
            && self.norm.dtype() == DType::F32
            && self.layers.iter().all(|l| {
                l.input_layernorm.dtype() == DType::F32
                    && l.post_attention_layernorm.dtype() == DType::F32
                    && Self::projections(l).iter().all(|lin| plain_weight(lin).is_some_and(|w| w.dtype() == kind))
            })
    }

    fn projections(l: &TextLayer) -> [&Linear; 7] {
        [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
    }

    /// One new token per row. x: [B, 1, H] f32 embeddings at `positions` [B]; `mask.key_valid` covers
    /// the B * S keys after this step (S = cached + 1). Appends to `cache`; returns the final-normed
    /// hidden [B, 1, H], equal to [`Self::forward`]'s. Needs [`Self::decode_usable`] (checked by the
    /// caller once per step; a layer it would refuse fails here with an error).
    pub fn decode_step(
        &self,
        x: &Tensor,
        positions: &[i64],
        mask: &Mask,
        cache: &mut KvCache,
        interrupt: Interrupt,
    ) -> Result<Tensor> {
        let (b, l, hidden) = x.dims3()?;
        if l != 1 || positions.len() != b {
            let msg = format!("decode_step: one token per row, got x {:?} and {} positions", x.dims(), positions.len());
            return Err(candle_core::Error::Msg(msg).into());
        }
        let c = &self.cfg;
        let (hkv, hd) = (c.num_key_value_heads, c.head_dim);
        let mut bufs = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            bufs.push(cache.layer_mut(i).room(b, hkv, 1, hd, DType::F32, x.device())?);
            // [B, Hkv, cap, hd] each
        }
        let past = cache.seq_len();
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?; // [B, H]
        let step = Step { b, past, positions, mask, bufs: &bufs, interrupt };
        let y = match plain_weight(&self.layers[0].q_proj).map(Tensor::dtype) {
            Some(DType::BF16) => self.decode_with::<u16>(&step, xs)?,
            _ => self.decode_with::<f32>(&step, xs)?,
        };
        for i in 0..self.layers.len() {
            cache.layer_mut(i).commit(1);
        }
        let norm: Vec<f32> = self.norm.to_vec1()?;
        let mut out = vec![0f32; b * hidden];
        rms_norm_rows(&y, &norm, c.rms_norm_eps as f32, &mut out);
        Ok(Tensor::from_vec(out, (b, 1, hidden), x.device())?)
    }

    /// Borrows every layer's parameters as `W` slices and runs the team over them.
    fn decode_with<W: FromStorage>(&self, step: &Step, xs: Vec<f32>) -> Result<Vec<f32>> {
        let mut guards = Vec::with_capacity(self.layers.len() * 9);
        for l in &self.layers {
            guards.push(l.input_layernorm.storage_and_layout());
            guards.push(l.post_attention_layernorm.storage_and_layout());
            for lin in Self::projections(l) {
                let w = plain_weight(lin).ok_or_else(|| candle_core::Error::Msg("decode: unusable layer".into()))?;
                guards.push(w.storage_and_layout());
            }
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for g in guards.chunks_exact(9) {
            let w = |i: usize| W::slice(&g[i].0, g[i].1);
            layers.push(LayerRefs {
                ln1: f32::slice(&g[0].0, g[0].1)?,
                ln2: f32::slice(&g[1].0, g[1].1)?,
                q: w(2)?,
                k: w(3)?,
                v: w(4)?,
                o: w(5)?,
                gate: w(6)?,
                up: w(7)?,
                down: w(8)?,
            });
        }
        self.run_team(step, &layers, xs)
    }
}

/// What one decoding step works on besides the weights.
struct Step<'a> {
    b: usize,
    /// Cached positions before this step.
    past: usize,
    positions: &'a [i64],
    mask: &'a Mask,
    /// Each layer's K and V buffers [B, Hkv, capacity, hd] with room for this step.
    bufs: &'a [(Tensor, Tensor)],
    interrupt: Interrupt<'a>,
}

impl TextModel {
    fn run_team<W: WeightElem>(&self, st: &Step, layers: &[LayerRefs<W>], xs: Vec<f32>) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (b, h, hd, hq, hkv) = (st.b, c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let (nq, nkv, inter) = (hq * hd, hkv * hd, c.intermediate_size);
        let nqkv = nq + 2 * nkv;
        let eps = c.rms_norm_eps as f32;
        let s = st.past + 1; // keys after this step
        let scale = (hd as f64).powf(-0.5) as f32;
        let kernel = Kernel::best();
        // cos/sin [B, hd/2] of each row's position (the two halves of transformers' table are equal).
        let inv_freq: Vec<f32> = self.rope.inv_freq().to_vec1()?;
        let angle = |r: usize, i: usize| st.positions[r] as f32 * inv_freq[i];
        let cos: Vec<f32> = (0..b * hd / 2).map(|t| angle(t / (hd / 2), t % (hd / 2)).cos()).collect();
        let sin: Vec<f32> = (0..b * hd / 2).map(|t| angle(t / (hd / 2), t % (hd / 2)).sin()).collect();
        let x = Shared::from_vec(xs); // [B, H] residual stream
        let qkv = Shared::new(nqkv * b); // [Nqkv, B] (column-major, as the kernels write)
        let att = Shared::new(b * nq); // [B, nq]
        let act = Shared::new(b * inter); // [B, I]
        let body = |team: &Team, t: usize| {
            let nt = team.threads();
            let mut hn = vec![0f32; b * h]; // this thread's normed copy of x
                                            // x += input W^T over this thread's columns of x (input [B, k] only read in the phase).
            let add_into_x = |input: &[f32], k: usize, w: &[W]| {
                let r = part(h, t, nt, ALIGN);
                let mut y = vec![0f32; r.len() * b]; // [cols, B]
                columns_of(input, b, k, &[w], r.clone(), &mut y, kernel);
                for row in 0..b {
                    // SAFETY: this thread's columns of x; no thread reads x in this phase.
                    let xr = unsafe { x.part(row * h + r.start..row * h + r.end) };
                    xr.iter_mut().enumerate().for_each(|(j, v)| *v += y[j * b + row]);
                }
            };
            for (li, lw) in layers.iter().enumerate() {
                if t == 0 && (st.interrupt)() {
                    team.abort(INTERRUPTED.into());
                }
                // 1. rms_norm and q|k|v (columns split)
                // SAFETY: x is only read in this phase.
                rms_norm_rows(unsafe { x.get() }, lw.ln1, eps, &mut hn);
                let r = part(nqkv, t, nt, ALIGN);
                // SAFETY: this thread's columns of qkv; no thread reads qkv in this phase.
                let out = unsafe { qkv.part(r.start * b..r.end * b) };
                columns_of(&hn, b, h, &[lw.q, lw.k, lw.v], r, out, kernel);
                if !team.barrier() {
                    return;
                }
                // 2. RoPE and the KV cache write (thread 0)
                if t == 0 {
                    // SAFETY: only thread 0 touches qkv in this phase.
                    let all = unsafe { qkv.part(0..nqkv * b) };
                    if let Err(e) = rope_and_store(all, b, (nq, nkv, hd), &cos, &sin, &st.bufs[li], st.past) {
                        team.abort(e.to_string());
                    }
                }
                if !team.barrier() {
                    return;
                }
                // 3. attention, (row, query head) tasks t, t + nt, ...
                // SAFETY: qkv is only read in this phase (for att, see `attend`).
                let q = unsafe { qkv.get() };
                if let Err(e) = attend(q, &att, b, (hq, hkv, hd), s, &st.bufs[li], st.mask, scale, t, nt) {
                    team.abort(e.to_string());
                }
                if !team.barrier() {
                    return;
                }
                // 4. x += a Wo^T (columns split)
                // SAFETY: att is only read in this phase.
                add_into_x(unsafe { att.get() }, nq, lw.o);
                if !team.barrier() {
                    return;
                }
                // 5. act = silu(h Wg^T) * (h Wu^T) (columns split)
                // SAFETY: x is only read in this phase.
                rms_norm_rows(unsafe { x.get() }, lw.ln2, eps, &mut hn);
                let r = part(inter, t, nt, ALIGN);
                let (mut g, mut u) = (vec![0f32; r.len() * b], vec![0f32; r.len() * b]);
                columns_of(&hn, b, h, &[lw.gate], r.clone(), &mut g, kernel);
                columns_of(&hn, b, h, &[lw.up], r.clone(), &mut u, kernel);
                for row in 0..b {
                    // SAFETY: this thread's columns of act; no thread reads act in this phase.
                    let ar = unsafe { act.part(row * inter + r.start..row * inter + r.end) };
                    for (j, a) in ar.iter_mut().enumerate() {
                        let (g, u) = (g[j * b + row], u[j * b + row]);
                        *a = g / (1.0 + (-g).exp()) * u;
                    }
                }
                if !team.barrier() {
                    return;
                }
                // 6. x += act Wd^T (columns split)
                // SAFETY: act is only read in this phase.
                add_into_x(unsafe { act.get() }, inter, lw.down);
                if !team.barrier() {
                    return;
                }
            }
        };
        match team::run(body) {
            Ok(()) => Ok(x.into_vec()),
            Err(why) if why == INTERRUPTED => Err(Error::Interrupted),
            Err(why) => Err(candle_core::Error::Msg(format!("decode: {why}")).into()),
        }
    }
}

/// Rotates q and k of `qkv` [Nqkv, B] in place and writes k, v at position `pos` of the layer's K/V
/// buffers [B, Hkv, capacity, hd].
fn rope_and_store(
    qkv: &mut [f32],
    b: usize,
    (nq, nkv, hd): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    (kb, vb): &(Tensor, Tensor),
    pos: usize,
) -> CResult<()> {
    let half = hd / 2;
    let (mut k, mut v) = (vec![0f32; b * nkv], vec![0f32; b * nkv]); // [B, Hkv, 1, hd]
    let mut head = vec![0f32; hd];
    for r in 0..b {
        let (cr, sr) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
        for h0 in (0..nq + nkv).step_by(hd) {
            head.iter_mut().enumerate().for_each(|(i, v)| *v = qkv[(h0 + i) * b + r]);
            rotate(&mut head, cr, sr);
            head.iter().enumerate().for_each(|(i, &v)| qkv[(h0 + i) * b + r] = v);
            if h0 >= nq {
                k[r * nkv + h0 - nq..r * nkv + h0 - nq + hd].copy_from_slice(&head);
            }
        }
        for j in 0..nkv {
            v[r * nkv + j] = qkv[(nq + nkv + j) * b + r];
        }
    }
    let hkv = nkv / hd;
    kb.slice_set(&Tensor::from_vec(k, (b, hkv, 1, hd), kb.device())?, 2, pos)?;
    vb.slice_set(&Tensor::from_vec(v, (b, hkv, 1, hd), vb.device())?, 2, pos)
}

/// Thread t's attention tasks: query head (row, head) = task for task in t, t + nt, ... < B Hq, over
/// the first `s` cached keys and values; q read from `qkv` [Nqkv, B], the output written to its [hd]
/// part of `att` [B, Hq hd].
#[allow(clippy::too_many_arguments)]
fn attend(
    qkv: &[f32],
    att: &Shared,
    b: usize,
    (hq, hkv, hd): (usize, usize, usize),
    s: usize,
    (kb, vb): &(Tensor, Tensor),
    mask: &Mask,
    scale: f32,
    t: usize,
    nt: usize,
) -> CResult<()> {
    let cap = kb.dim(2)?;
    let (ks, kl) = kb.storage_and_layout();
    let (vs, vl) = vb.storage_and_layout();
    let (kd, vd) = (f32::slice(&ks, kl)?, f32::slice(&vs, vl)?);
    let groups = hq / hkv;
    let kernel = Kernel::best();
    let mut q = vec![0f32; hd];
    let mut p = vec![0f32; s];
    for task in (t..b * hq).step_by(nt) {
        let (r, head) = (task / hq, task % hq);
        q.iter_mut().enumerate().for_each(|(i, v)| *v = qkv[(head * hd + i) * b + r]);
        let base = (r * hkv + head / groups) * cap * hd; // [S, hd] block of this kv head
        columns(&q, 1, hd, &kd[base..base + s * hd], 0, &mut p, kernel); // [S] = K q
        p.iter_mut().for_each(|v| *v *= scale);
        softmax_row(&mut p, mask, r, 0, 1); // the one new query sees every cached key the mask allows
                                            // SAFETY: the [hd] output of this (row, head) task, written by this thread only; att is not
                                            // read in this phase.
        let o = unsafe { att.part(task * hd..(task + 1) * hd) };
        o.iter_mut().for_each(|v| *v = 0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                o.iter_mut().zip(&vd[base + j * hd..base + (j + 1) * hd]).for_each(|(o, v)| *o += pj * v);
            }
        }
    }
    Ok(())
}
