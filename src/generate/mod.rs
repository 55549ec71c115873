//! Text generation with a KV cache: one prefill (images encoded and merged once), then one token per
//! step. Greedy and sampling here, beam search in `beam.rs`; both follow transformers' `generate`.

pub mod beam;
pub mod logits;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
use crate::lora::FrozenScope;
use crate::model::cache::KvCache;
use crate::model::{check, ForwardInput, Interrupt, VlmModel};
use crate::ops::Mask;

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EarlyStopping {
    /// Stop a batch item once `num_beams` hypotheses are finished.
    True,
    /// Stop when the best running beam cannot beat the finished ones (heuristic on the current length).
    False,
    /// Canonical beam search: stop only when no improvement is possible.
    Never,
}

/// Generation settings (a `GenerationConfig` after merging the checkpoint's file and the call).
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Total length cap (prompt + new tokens).
    pub max_length: usize,
    pub min_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    pub seed: u64,
}

/// Called after each step with the new token of every row (greedy / sampling only).
pub type OnToken<'a> = &'a mut dyn FnMut(&[u32]) -> bool;

/// Cached decoding state of a batch of rows.
/// New positions the KV cache allocates up front at most (a huge `max_length` does not allocate
/// memory that a generation stopping at EOS never uses).
pub const MAX_RESERVED_NEW: usize = 1024;

pub struct Session<'m> {
    model: &'m VlmModel,
    /// The weights do not change during a generation (DoRA's norms are computed once).
    _frozen: FrozenScope<'m>,
    cache: KvCache,
    /// [rows][S] which cached keys are real tokens.
    key_valid: Vec<Vec<bool>>,
    /// Next position id of each row.
    next_pos: Vec<i64>,
}

impl<'m> Session<'m> {
    /// Runs the prompt through the model; returns the session and the last-position logits [rows][V].
    /// Positions follow the attention mask (cumsum - 1, padding at 1) as in transformers' generate.
    /// `max_length`: the longest sequence the session will hold (prompt + new tokens), allocated once
    /// in the KV cache (at most [`MAX_RESERVED_NEW`] new positions up front; the cache doubles beyond).
    pub fn prefill(
        model: &'m VlmModel,
        input: &ForwardInput,
        max_length: usize,
        interrupt: Interrupt,
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        let (b, l) = (input.batch, input.seq_len);
        model.check_input(input)?;
        let mask01: Vec<i64> = match input.attention_mask {
            Some(m) => m.to_vec(),
            None => vec![1; b * l],
        };
        let mut positions = Vec::with_capacity(b * l);
        let mut next_pos = Vec::with_capacity(b);
        let mut key_valid = Vec::with_capacity(b);
        for r in 0..b {
            let row = &mask01[r * l..(r + 1) * l];
            let mut c = 0i64;
            for &m in row {
                c += (m != 0) as i64;
                positions.push(if m != 0 { c - 1 } else { 1 });
            }
            next_pos.push(c);
            key_valid.push(row.iter().map(|&m| m != 0).collect::<Vec<bool>>());
        }
        let mut session = Session {
            model,
            _frozen: model.switch.frozen_scope(),
            cache: KvCache::with_capacity(model.text.layers.len(), max_length.clamp(l, l + MAX_RESERVED_NEW)),
            key_valid,
            next_pos,
        };
        let x = model.merged_embeddings(input, interrupt)?; // [B, L, H]
        let logits = session.run(&x, &positions, interrupt)?;
        Ok((session, logits))
    }

    /// Feeds one token per row; returns the logits [rows][V].
    pub fn step(&mut self, tokens: &[u32], interrupt: Interrupt) -> Result<Vec<Vec<f32>>> {
        let b = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &self.model.device)?;
        let x = self.model.text.embed(&ids)?; // [B, 1, H]
        let positions: Vec<i64> = self.next_pos.clone();
        for (r, kv) in self.key_valid.iter_mut().enumerate() {
            kv.push(true);
            self.next_pos[r] += 1;
        }
        self.run(&x, &positions, interrupt)
    }

    /// x: [B, L, H] new embeddings at `positions` [B*L]; key_valid already covers them.
    fn run(&mut self, x: &Tensor, positions: &[i64], interrupt: Interrupt) -> Result<Vec<Vec<f32>>> {
        let (b, l, _) = x.dims3()?;
        let max_pos = self.model.config.text.max_position_embeddings as i64;
        if positions.iter().any(|&p| p >= max_pos) {
            return input_err(format!("generation reached position {max_pos}, the model's max_position_embeddings"));
        }
        let s = self.key_valid.first().map_or(0, Vec::len);
        let all_valid = self.key_valid.iter().all(|r| r.iter().all(|&v| v));
        let key_valid = (!all_valid).then(|| Arc::new(self.key_valid.iter().flatten().copied().collect::<Vec<bool>>()));
        debug_assert_eq!(s, self.cache.seq_len() + l);
        let mask = Mask { causal: true, key_valid };
        let pos = Tensor::from_vec(positions.to_vec(), (b, l), &self.model.device)?;
        let text = &self.model.text;
        let hidden = if l == 1 && x.dtype() == DType::F32 && text.decode_usable() {
            text.decode_step(x, positions, &mask, &mut self.cache, interrupt)? // [B, 1, H]
        } else {
            text.forward(x, &pos, &mask, Some(&mut self.cache), interrupt)? // [B, L, H]
        };
        let last = hidden.narrow(1, l - 1, 1)?; // [B, 1, H]
        let logits = self.model.lm_head.forward(&last)?.to_dtype(DType::F32)?.squeeze(1)?; // [B, V]
        Ok(logits.to_vec2::<f32>()?)
    }

    /// Keeps rows `rows` in that order (beam reordering, beam expansion).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let idx =
            Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(), rows.len(), &self.model.device)?;
        self.cache.select_rows(&idx)?;
        self.key_valid = rows.iter().map(|&r| self.key_valid[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }
}

/// SplitMix64: a small seeded generator for sampling (reproducible run to run, not torch's stream).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Draws an index with probability proportional to `probs`.
    pub fn categorical(&mut self, probs: &[f32]) -> usize {
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        let mut u = self.next_f64() * total;
        for (i, &p) in probs.iter().enumerate() {
            u -= p as f64;
            if u < 0.0 && p > 0.0 {
                return i;
            }
        }
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
    }
}

/// Applies the processors of `cfg` to one row's scores (`seq` = the row's tokens so far,
/// `new_tokens` = how many were generated).
pub fn process_scores(cfg: &GenerationConfig, scores: &mut [f32], seq: &[u32], new_tokens: usize, min_keep: usize) {
    logits::repetition_penalty(scores, seq, cfg.repetition_penalty);
    if new_tokens < cfg.min_new_tokens {
        logits::suppress(scores, &cfg.eos_token_ids);
    }
    if cfg.do_sample {
        logits::temperature(scores, cfg.temperature);
        if cfg.top_k > 0 {
            logits::top_k(scores, cfg.top_k, min_keep);
        }
        logits::top_p(scores, cfg.top_p, min_keep);
    }
}

/// Greedy or sampled generation. Returns every row as prompt + new tokens, finished rows padded with
/// `pad_token_id`, all of the same length. `on_token` sees each step's tokens; returning false stops.
pub fn generate(
    model: &VlmModel,
    input: &ForwardInput,
    cfg: &GenerationConfig,
    on_token: Option<OnToken>,
    interrupt: Interrupt,
) -> Result<Vec<Vec<u32>>> {
    if cfg.num_beams > 1 {
        return beam::beam_search(model, input, cfg, interrupt);
    }
    let (b, l) = (input.batch, input.seq_len);
    let mut seqs: Vec<Vec<u32>> =
        (0..b).map(|r| input.input_ids[r * l..(r + 1) * l].iter().map(|&t| t as u32).collect()).collect();
    if l >= cfg.max_length {
        return Ok(seqs);
    }
    let (mut session, mut logits) = Session::prefill(model, input, cfg.max_length, interrupt)?;
    let mut rng = Rng::new(cfg.seed);
    let mut unfinished = vec![true; b];
    let mut on_token = on_token;
    for step in 0.. {
        check(interrupt)?;
        let mut next = Vec::with_capacity(b);
        for (r, scores) in logits.iter_mut().enumerate() {
            process_scores(cfg, scores, &seqs[r], step, 1);
            let t =
                if cfg.do_sample { rng.categorical(&logits::softmax(scores)) } else { logits::argmax(scores) } as u32;
            next.push(if unfinished[r] { t } else { cfg.pad_token_id });
        }
        for (r, &t) in next.iter().enumerate() {
            seqs[r].push(t);
            if unfinished[r] && cfg.eos_token_ids.contains(&t) {
                unfinished[r] = false;
            }
        }
        let keep_going = on_token.as_mut().is_none_or(|f| f(&next));
        if !keep_going || !unfinished.iter().any(|&u| u) || seqs[0].len() >= cfg.max_length {
            break;
        }
        logits = session.step(&next, interrupt)?;
    }
    Ok(seqs)
}
