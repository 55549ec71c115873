"""Matmul FLOPs of the training benchmarks (bench_sft.py, bench_dpo.py; LoRA, or full fine-tuning), counted
from the checkpoint's config.json and the collated batches, so that each side's wall time becomes an achieved
GFLOP/s.

Only matrix products are counted (2 FLOPs per multiply-add); norms, activations, softmax, RoPE, the loss and
the optimizer are left out, and so is the forward that gradient checkpointing recomputes (model FLOPs, the
usual convention for utilisation). Per image frame (one tile through the vision tower, P = (image_size /
patch_size)^2 patches of width d, I the MLP width, per layer):

    vision     2 * P * (d*3*patch^2  [patch embedding, once]  +  4*d^2 + 2*d*I  [q,k,v,out, fc1,fc2])
               + 4 * P^2 * d                                      [scores Q K^T and weights @ V]
    connector  2 * (P / s^2) * (d*s^2) * h                        [pixel shuffle by s, then the projection]

and per text sequence of L real tokens (attention mask sum; padding is not counted), h the hidden size,
q = heads*head_dim, k = kv_heads*head_dim, Im the MLP width, r the LoRA rank, per layer:

    linears    2 * L * (h*q + 2*h*k + q*h + 3*h*Im)
    LoRA       2 * L * r * sum(d_in + d_out) over q,k,v,o,gate,up,down
    attention  4 * L * L_keys * q                                 [the full L x L score matrix, as dense
                                                                   attention computes it; L_keys = L]
    head       2 * V * h per position whose next-token label counts (TRL's fused LM head and ferrovlm both
               project only those positions, so the head costs a few completion tokens, not the whole row)

The backward: the base weights are frozen and the adapters sit on the text linears only, so there is no
backward through the vision tower or the connector, and through the text tower only input gradients:
1x the forward of each frozen linear and of the head (dX = dY W; no dW), 2x the forward of attention (dQ, dK,
dV and the score gradient are all products of activations), 2x the forward of LoRA (input gradients and the
A and B weight gradients).

Full fine-tuning (``full=True``: every parameter trains, no adapters) back-propagates through everything:
2x the forward of every linear and of the head (dX and dW), of attention and of the vision tower and the
connector, except the patch embedding (1x: its input is the pixels, only dW). Nothing is redundant then (the
vision features change every step), so ``distinct`` is ``nominal``.

A DPO step runs the policy (forward + backward) and the reference (the base model, adapter disabled: forward
only, no LoRA) over the batch's 2B sequences (chosen rows, then the rejected rows of the same prompts), each
sequence with its own copy of the images.

Two counts per run:

* ``nominal``: the computation as transformers + PEFT + TRL do it (every frame of every batch through the
  vision tower in each forward, every sequence whole). The work the benchmark asks for; the same count is used
  for both sides, so a side that skips work gets a higher rate (a work rate; the ratio of the two is the
  speedup).
* ``distinct``: the same with the work a frozen vision tower makes redundant removed, which is what ferrovlm's
  trainers run (src/train/features.rs, src/train/rows.rs): each distinct image frame goes through the vision
  tower and the connector once per run (features cached by content), and a DPO pair's shared prefix (image
  tokens and prompt: the first columns where rows i and P + i agree, the minimum over the batch's pairs, used
  when at least 8 columns) runs once through the text layers, in the policy and the reference passes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

LORA_TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_SHARED_PREFIX = 8  # src/train/rows.rs: a shorter shared prefix is not worth its own pass


def _np(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def batch_counts(batch: Any) -> dict[str, Any]:
    """What the FLOPs depend on, from a collated batch (ferrovlm's numpy or TRL's torch tensors): the real
    length of each sequence, the positions the LM head projects (next-token label set: ``labels[:, 1:] !=
    -100``, or ``completion_mask[:, 1:]`` for DPO), the real image frames (``pixel_attention_mask`` not all
    false) with a digest of each frame's pixels, and the pairs' shared prefix for DPO batches."""
    ids, mask = _np(batch["input_ids"]), _np(batch["attention_mask"]).astype(bool)
    if "labels" in batch:
        head = int((_np(batch["labels"])[:, 1:] != -100).sum())
    else:
        head = int(_np(batch["completion_mask"])[:, 1:].astype(bool).sum())
    digests: list[str] = []
    if batch.get("pixel_values") is not None:
        px = _np(batch["pixel_values"])
        pm = batch.get("pixel_attention_mask")
        real = (_np(pm).reshape(px.shape[0], px.shape[1], -1).any(axis=2) if pm is not None
                else (px.reshape(px.shape[0], px.shape[1], -1) != 0).any(axis=2))
        digests = [hashlib.sha1(np.ascontiguousarray(px[n, f]).tobytes()).hexdigest()[:16]
                   for n, f in zip(*np.nonzero(real))]
    out: dict[str, Any] = {"seq_lens": [int(x) for x in mask.sum(axis=1)], "head_tokens": head, "frames": digests}
    if "completion_mask" in batch and ids.shape[0] % 2 == 0:  # DPO: rows i and P + i hold the same prompt
        p, width = ids.shape[0] // 2, ids.shape[1]
        same = (ids[:p] == ids[p:]) & (mask[:p] == mask[p:])
        lp = min(int(np.argmin(np.append(row, False))) for row in same)  # first column where a pair differs
        lp = min(lp, width - 1)
        out["shared_prefix"] = [int(mask[i, :lp].sum()) for i in range(p)] if lp >= MIN_SHARED_PREFIX else None
    return out


def run_flops(config: dict[str, Any], batches: Sequence[dict[str, Any]], dpo: bool = False, lora_r: int = 8,
              lora_modules: Sequence[str] = LORA_TEXT_MODULES, full: bool = False) -> dict[str, Any]:
    """Matmul FLOPs of a LoRA training run (adapters on the text model's ``lora_modules``, everything else
    frozen; with ``full``, full fine-tuning: no adapters, everything trains) whose optimizer steps see
    ``batches`` (``batch_counts`` of each), ``dpo`` for DPO steps (policy and reference passes). Returns
    ``{"nominal": parts, "distinct": parts, "steps": n}``, parts being FLOPs by kind (``vision``, ``connector``,
    ``text``, ``lora``, ``head``, ``backward``) and their ``total``, over the whole run; see the module
    docstring."""
    v, t = config["vision_config"], config["text_config"]
    d, i_v, n_v = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, chans = v["patch_size"], v.get("num_channels", 3)
    p = (v["image_size"] // patch) ** 2
    s = config.get("scale_factor", 1)
    h, i_t, n_t, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    hd = t.get("head_dim") or h // t["num_attention_heads"]
    q, k = t["num_attention_heads"] * hd, t.get("num_key_value_heads", t["num_attention_heads"]) * hd

    frame_vision = 2 * p * (d * chans * patch * patch + n_v * (4 * d * d + 2 * d * i_v)) + 4 * n_v * p * p * d
    frame_connector = 2 * (p // (s * s)) * (d * s * s) * h
    dims = {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
            "gate_proj": (h, i_t), "up_proj": (h, i_t), "down_proj": (i_t, h)}
    w_text = n_t * sum(a * b for a, b in dims.values())
    w_lora = 0 if full else n_t * lora_r * sum(sum(dims[m]) for m in lora_modules)
    patch_embed = 2 * p * d * chans * patch * patch  # per frame

    def text(rows: Sequence[tuple[int, int]], lora: bool) -> dict[str, float]:
        """Forward of the text layers over (tokens, keys each attends to) blocks."""
        return {"text": sum(2 * n * w_text + 4 * n_t * n * keys * q for n, keys in rows),
                "lora": sum(2 * n * w_lora for n, _ in rows) if lora else 0.0}

    def blocks(c: dict[str, Any], share: bool) -> list[tuple[int, int]]:
        lens, pre = c["seq_lens"], c.get("shared_prefix")
        if not share or not pre:
            return [(n, n) for n in lens]
        pairs = len(pre)  # each pair's prefix once, then every row's suffix over prefix + suffix keys
        return [(lp, lp) for lp in pre] + [(n - pre[j % pairs], n) for j, n in enumerate(lens)]

    out: dict[str, Any] = {"steps": len(batches)}
    for mode in ("nominal", "distinct"):
        share = mode == "distinct" and not full
        parts = dict.fromkeys(("vision", "connector", "text", "lora", "head", "backward"), 0.0)
        seen: set[str] = set()
        for c in batches:
            frames = len(c["frames"]) * (2 if dpo else 1)  # DPO: the policy and the reference forwards
            if share:
                frames = len(set(c["frames"]) - seen)
                seen.update(c["frames"])
            parts["vision"] += frames * frame_vision
            parts["connector"] += frames * frame_connector
            rows = blocks(c, share)
            fwd = text(rows, lora=True)
            head = 2 * vocab * h * c["head_tokens"]
            parts["text"] += fwd["text"]
            parts["lora"] += fwd["lora"]
            parts["head"] += head
            attn = sum(4 * n_t * n * keys * q for n, keys in rows)
            if full:  # dX and dW of everything, but no dX of the patch embedding
                vis = frames * (2 * (frame_vision + frame_connector) - patch_embed)
                parts["backward"] += vis + 2 * fwd["text"] + 2 * head
            else:  # input gradients of the frozen linears and head (1x), attention and LoRA (2x)
                parts["backward"] += (fwd["text"] - attn) + 2 * attn + 2 * fwd["lora"] + head
            if dpo:  # the reference: base model, forward only
                parts["text"] += text(rows, lora=False)["text"]
                parts["head"] += head
        parts["total"] = sum(parts.values())
        out[mode] = parts
    return out


def run_batches(rows: Sequence[Any], batch_size: int, steps: int) -> list[list[Any]]:
    """The rows of each optimizer step, taken in dataset order and cycled over epochs (the trainers shuffle
    each epoch; the FLOPs of a run only depend on which rows it sees, so this is exact whenever the steps
    cover whole epochs, and for rows of equal shape as the benchmarks' are)."""
    n = len(rows)
    return [[rows[(step * batch_size + j) % n] for j in range(batch_size)] for step in range(steps)]
