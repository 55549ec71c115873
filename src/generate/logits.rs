//! Logits processors and warpers, applied per row in transformers' order:
//! repetition penalty, min-new-tokens EOS suppression, then (sampling only) temperature, top-k, top-p.

/// Divides positive / multiplies negative scores of every token already in `seq` by `penalty`.
pub fn repetition_penalty(scores: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in seq {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// Forbids the EOS ids (score -inf).
pub fn suppress(scores: &mut [f32], ids: &[u32]) {
    for &t in ids {
        if let Some(s) = scores.get_mut(t as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

pub fn temperature(scores: &mut [f32], t: f32) {
    if t != 1.0 {
        scores.iter_mut().for_each(|s| *s /= t);
    }
}

/// Keeps the `k` highest scores (and ties with the k-th), at least `min_keep`.
pub fn top_k(scores: &mut [f32], k: usize, min_keep: usize) {
    let k = k.max(min_keep).min(scores.len());
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores.iter_mut().for_each(|s| {
        if *s < kth {
            *s = f32::NEG_INFINITY
        }
    });
}

/// Nucleus filtering as transformers does it: sort ascending, drop tokens whose cumulative
/// probability is <= 1 - top_p, always keeping the `min_keep` most likely.
pub fn top_p(scores: &mut [f32], p: f32, min_keep: usize) {
    if p >= 1.0 {
        return;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b])); // ascending, stable
    let probs = softmax(&idx.iter().map(|&i| scores[i]).collect::<Vec<f32>>());
    let n = idx.len();
    let mut cum = 0f32;
    let mut remove = vec![false; n];
    for (r, pr) in probs.iter().enumerate() {
        cum += pr;
        remove[r] = cum <= 1.0 - p;
    }
    remove[n.saturating_sub(min_keep)..].iter_mut().for_each(|r| *r = false);
    for (r, &i) in idx.iter().enumerate() {
        if remove[r] {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f32 (max-subtracted).
pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// log_softmax in f32.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = xs.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
    xs.iter().map(|x| x - lse).collect()
}

/// Index of the first maximum (torch.argmax's tie rule).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_scales_by_sign_once() {
        let mut s = vec![2.0, -2.0, 1.0];
        repetition_penalty(&mut s, &[0, 1, 0], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_and_top_p() {
        let mut s = vec![1.0, 3.0, 2.0, 3.0];
        top_k(&mut s, 2, 1);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY, 3.0]);
        // probs ~ [0.0871, 0.6439, 0.2369, 0.0321]; top_p 0.7 keeps the two largest
        let mut s = vec![1.0f32, 3.0, 2.0, 0.0];
        top_p(&mut s, 0.7, 1);
        assert!(s[0].is_infinite() && s[3].is_infinite() && s[1] == 3.0 && s[2] == 2.0);
    }
}
