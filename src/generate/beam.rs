//! Beam search as transformers 5 implements it (vectorised form, written per batch item): keep the
//! top `max(2, 1 + n_eos) * num_beams` continuations of the summed log-probs, continue the best
//! `num_beams` that did not stop, and merge the ones that stopped into the finished hypotheses with a
//! length-penalised score.

use super::{check, process_scores, GenerationConfig, Interrupt, Session};
use crate::error::Result;
use crate::generate::{logits, EarlyStopping};
use crate::model::{ForwardInput, VlmModel};

const NEG: f32 = -1.0e9;

struct Item {
    running: Vec<Vec<u32>>,   // [beams][cur_len]
    running_scores: Vec<f32>, // [beams]
    finished: Vec<Vec<u32>>,  // [beams] hypotheses (prompt + tokens)
    finished_scores: Vec<f32>,
    is_finished: Vec<bool>,
    heuristic_unsatisfied: bool,
}

/// Indices of the k largest values, largest first (ties: lower index first).
fn top_indices(xs: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let k = k.min(xs.len());
    if k < xs.len() {
        idx.select_nth_unstable_by(k, |&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
    idx
}

pub fn beam_search(
    model: &VlmModel,
    input: &ForwardInput,
    cfg: &GenerationConfig,
    interrupt: Interrupt,
) -> Result<Vec<Vec<u32>>> {
    let (b, l, nb) = (input.batch, input.seq_len, cfg.num_beams);
    let prompts: Vec<Vec<u32>> =
        (0..b).map(|r| input.input_ids[r * l..(r + 1) * l].iter().map(|&t| t as u32).collect()).collect();
    if l >= cfg.max_length {
        return Ok(prompts);
    }
    let (mut session, first) = Session::prefill(model, input, cfg.max_length, interrupt)?;
    let expand: Vec<usize> = (0..b).flat_map(|r| std::iter::repeat_n(r, nb)).collect();
    session.select_rows(&expand)?;
    let mut logits_rows: Vec<Vec<f32>> = expand.iter().map(|&r| first[r].clone()).collect();
    let n_eos = cfg.eos_token_ids.len();
    let keep = 2usize.max(1 + n_eos) * nb;
    let mut items: Vec<Item> = prompts
        .iter()
        .map(|p| Item {
            running: vec![p.clone(); nb],
            running_scores: (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect(),
            finished: vec![p.clone(); nb],
            finished_scores: vec![NEG; nb],
            is_finished: vec![false; nb],
            heuristic_unsatisfied: true,
        })
        .collect();
    let mut cur_len = l;
    let lp = cfg.length_penalty;
    loop {
        check(interrupt)?;
        let vocab = logits_rows[0].len();
        let mut reorder = Vec::with_capacity(b * nb);
        let mut next_tokens = Vec::with_capacity(b * nb);
        let mut all_hit = true;
        for (bi, it) in items.iter_mut().enumerate() {
            // [beams * V] accumulated log-probs
            let mut acc = Vec::with_capacity(nb * vocab);
            for beam in 0..nb {
                let mut lp_row = logits::log_softmax(&logits_rows[bi * nb + beam]);
                process_scores(cfg, &mut lp_row, &it.running[beam], cur_len - l, n_eos + 1);
                let s = it.running_scores[beam];
                acc.extend(lp_row.iter().map(|x| x + s));
            }
            let top = top_indices(&acc, keep);
            let cand_scores: Vec<f32> = top.iter().map(|&i| acc[i]).collect();
            let cand_origin: Vec<usize> = top.iter().map(|&i| i / vocab).collect();
            let cand_seqs: Vec<Vec<u32>> = top
                .iter()
                .map(|&i| {
                    let mut s = it.running[i / vocab].clone();
                    s.push((i % vocab) as u32);
                    s
                })
                .collect();
            let hits: Vec<bool> = cand_seqs
                .iter()
                .map(|s| s.last().is_some_and(|t| cfg.eos_token_ids.contains(t)) || s.len() >= cfg.max_length)
                .collect();
            all_hit &= hits.iter().all(|&h| h);
            // running beams for the next step: best candidates that did not stop
            let run_scores: Vec<f32> =
                cand_scores.iter().zip(&hits).map(|(s, &h)| if h { s + NEG } else { *s }).collect();
            let next_run = top_indices(&run_scores, nb);
            // finished hypotheses: merge those of the top num_beams candidates that just stopped
            let denom = ((cur_len + 1 - l) as f32).powf(lp);
            let batch_full = it.is_finished.iter().all(|&f| f) && cfg.early_stopping == EarlyStopping::True;
            let mut merged_scores = it.finished_scores.clone();
            let mut just: Vec<bool> = Vec::with_capacity(keep);
            for (c, &s) in cand_scores.iter().enumerate() {
                let j = hits[c] && c < nb;
                let mut sc = s / denom;
                if batch_full {
                    sc += NEG;
                }
                if !it.heuristic_unsatisfied {
                    sc += NEG;
                }
                if !j {
                    sc += NEG;
                }
                merged_scores.push(sc);
                just.push(j);
            }
            let best = top_indices(&merged_scores, nb);
            let (mut f_seqs, mut f_scores, mut f_done) =
                (Vec::with_capacity(nb), Vec::with_capacity(nb), Vec::with_capacity(nb));
            for &m in &best {
                if m < nb {
                    f_seqs.push(it.finished[m].clone());
                    f_done.push(it.is_finished[m]);
                } else {
                    f_seqs.push(cand_seqs[m - nb].clone());
                    f_done.push(just[m - nb]);
                }
                f_scores.push(merged_scores[m]);
            }
            it.finished = f_seqs;
            it.finished_scores = f_scores;
            it.is_finished = f_done;
            it.running = next_run.iter().map(|&c| cand_seqs[c].clone()).collect();
            it.running_scores = next_run.iter().map(|&c| run_scores[c]).collect();
            for &c in &next_run {
                reorder.push(bi * nb + cand_origin[c]);
                next_tokens.push(*cand_seqs[c].last().unwrap_or(&cfg.pad_token_id));
            }
        }
        cur_len += 1;
        // early-stop heuristic and the loop condition
        let mut any_unsatisfied = false;
        let mut exists_open = false;
        for it in items.iter_mut() {
            let best_len =
                if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 { cfg.max_length - l } else { cur_len - l };
            let best_possible = it.running_scores[0] / (best_len as f32).powf(lp);
            let min_finished = it.finished_scores.iter().copied().fold(f32::INFINITY, f32::min);
            let improvable = it.is_finished.iter().any(|&f| best_possible > if f { min_finished } else { NEG });
            it.heuristic_unsatisfied &= improvable;
            any_unsatisfied |= it.heuristic_unsatisfied;
            exists_open |= !(it.is_finished.iter().all(|&f| f) && cfg.early_stopping == EarlyStopping::True);
        }
        if !(any_unsatisfied && exists_open && !all_hit) {
            break;
        }
        session.select_rows(&reorder)?;
        logits_rows = session.step(&next_tokens, interrupt)?;
    }
    // best hypothesis per item, padded to the longest
    let fill =
        if !cfg.eos_token_ids.is_empty() && cfg.pad_token_id == 0 { cfg.eos_token_ids[0] } else { cfg.pad_token_id };
    let mut out: Vec<Vec<u32>> =
        items.into_iter().map(|it| it.finished.into_iter().next().unwrap_or_default()).collect();
    let longest = out.iter().map(Vec::len).max().unwrap_or(l);
    for s in &mut out {
        s.resize(longest, fill);
    }
    Ok(out)
}
