"""A tiny random LlamaForCausalLM (the language model alone) and transformers' outputs (dev only).

    python scripts/reference/llama_tiny.py  # in an environment with torch, transformers

Writes tests/fixtures/llama_tiny/: checkpoint/ (config.json, model.safetensors, generation_config.json
as save_pretrained writes them; fp32, untied lm_head, GQA 6 q / 2 kv heads), inputs.npz (input_ids,
attention_mask right padded, labels with -100 at padding and on the first two tokens) and
expected.npz (logits [B, L, V], loss, greedy ids of `generate` on the left-padded rows).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llama_tiny"


def main() -> None:
    torch.manual_seed(11)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=299,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so that logits are not all alike
            p.normal_(0.0, 0.2)
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT / "checkpoint")
    model = LlamaForCausalLM.from_pretrained(
        OUT / "checkpoint", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rng = np.random.default_rng(5)
    lens = [9, 6]
    width = max(lens)
    ids = np.full((2, width), 2, np.int64)
    am = np.zeros((2, width), np.int64)
    for r, n in enumerate(lens):
        ids[r, :n] = np.concatenate([[1], rng.integers(3, 299, n - 1)])
        am[r, :n] = 1
    labels = np.where(am == 1, ids, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), labels=torch.tensor(labels))
    # generate on the same rows, left padded
    lids = np.full_like(ids, 2)
    lam = np.zeros_like(am)
    for r, n in enumerate(lens):
        lids[r, width - n :] = ids[r, :n]
        lam[r, width - n :] = 1
    gen = model.generate(
        input_ids=torch.tensor(lids), attention_mask=torch.tensor(lam), max_new_tokens=8, do_sample=False
    )
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT / "inputs.npz", input_ids=ids, attention_mask=am, labels=labels, left_ids=lids, left_mask=lam
    )
    np.savez_compressed(
        OUT / "expected.npz",
        logits=out.logits.numpy().astype(np.float32),
        loss=np.float32(out.loss.item()),
        generated=gen[:, width:].numpy(),
    )
    print("wrote", OUT, "loss", out.loss.item(), "generated", gen[:, width:].tolist())


if __name__ == "__main__":
    main()
