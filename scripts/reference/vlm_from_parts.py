"""transformers on the VLMs ferrovlm builds from parts (``from_text_model``) and saves (dev only).

    FERROVLM_PYTHON=.venv/bin/python [SMOLLM2_GGUF=.../SmolLM2-135M-Instruct.Q4_1.gguf] \\
        python scripts/reference/vlm_from_parts.py   # in an environment with torch, transformers, tokenizers

FERROVLM_PYTHON (default: the repository's .venv/bin/python) is a Python with ferrovlm installed: it builds
and saves each case of tests/vlm_parts_cases.py (which the tests build again the same way, seeded); this
script then loads the saved folder with transformers' AutoProcessor and AutoModelForImageTextToText and
records what transformers computes. Without SMOLLM2_GGUF the smollm2 files are kept as they are (with it,
transformers' GGUF reader needs the `gguf` package).

Writes tests/fixtures/vlm_parts/:
  tokenizer_tiny/       a 300-token byte-level BPE tokenizer (tokenizers' BpeTrainer on a fixed text;
                        <|endoftext|>, <|im_start|>, <|im_end|> = ids 0, 1, 2; bos <|im_start|>, eos and pad
                        <|im_end|>, unk <|endoftext|>) for tests/fixtures/llama_tiny, saved by transformers
                        (written only when missing: the llama_tiny case is built on it)
  <case>.inputs.npz     transformers' processor on the case's two prompts (chat template with
                        add_generation_prompt, the two images, padding=True): input_ids, attention_mask,
                        pixel_values, pixel_attention_mask
  <case>.expected.npz   the model's float32 eager forward: llama_tiny `logits` [B, L, V]; smollm2 `last`
                        (logits of each row's last position, all V) and `cols` (logits at every position for
                        the ids in `col_ids`); `generated` (8 greedy tokens after row 0 alone)
  <case>.json           what transformers reads: classes, config values, tokenizer length, ids of SmolVLM's
                        tokens, special tokens, image_seq_len, image processor settings, the rendered prompts;
                        `resize_vs_transformers`: the largest difference between the new embedding rows ferrovlm
                        wrote and transformers' own resize_token_embeddings(mean_resizing=True) of the language
                        model (both are the old rows' mean plus 1e-9-covariance noise)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vlm_parts"
sys.path.insert(0, str(ROOT / "tests"))
import vlm_parts_cases as cases  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words. "
    "User: What is in this image? Assistant: A cat sitting on a red chair, 3 apples and 12 pears.\n"
) * 20


def make_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([TEXT], trainer)
    assert tk.get_vocab_size() == 300, tk.get_vocab_size()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    hf.save_pretrained(OUT / "tokenizer_tiny")


def build_with_ferrovlm(case: str, out: Path) -> None:
    py = os.environ.get("FERROVLM_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    subprocess.run([py, str(ROOT / "tests" / "vlm_parts_cases.py"), "--case", case, "--out", str(out)], check=True)


def resize_difference(case: str, saved: Path, model) -> float:
    """transformers' own mean resizing of the language model vs the rows ferrovlm wrote."""
    from transformers import AutoModelForCausalLM

    if case == "llama_tiny":
        lm = AutoModelForCausalLM.from_pretrained(cases.LLAMA_TINY, dtype=torch.float32)
    else:
        folder, name = cases.smollm2_gguf()
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    old = lm.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    lm.resize_token_embeddings(model.config.text_config.vocab_size, mean_resizing=True)
    ours = model.get_input_embeddings().weight[old:]
    theirs = lm.get_input_embeddings().weight[old:]
    diff = (ours - theirs).abs().max().item()
    if lm.get_output_embeddings() is not None and not model.config.tie_word_embeddings:
        diff = max(diff, (model.lm_head.weight[old:] - lm.lm_head.weight[old:]).abs().max().item())
    return diff


def run_case(case: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / case
        build_with_ferrovlm(case, saved)
        processor = AutoProcessor.from_pretrained(saved)
        model = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        convs = cases.conversations()
        prompts = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
        imgs = [[im] for im in cases.images()]
        inputs = processor(text=prompts, images=imgs, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits.float().numpy()
            one = processor(text=prompts[:1], images=imgs[:1], return_tensors="pt")
            gen = model.generate(**one, max_new_tokens=8, do_sample=False)
        tok = processor.tokenizer
        names = cases.CASES[case]
        meta = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "case": names,
            "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "config": {
                "model_type": model.config.model_type,
                "image_token_id": model.config.image_token_id,
                "scale_factor": model.config.scale_factor,
                "tie_word_embeddings": model.config.tie_word_embeddings,
                "vocab_size": model.config.text_config.vocab_size,
                "vision_config": {
                    k: getattr(model.config.vision_config, k)
                    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "image_size", "patch_size", "initializer_range")
                },
            },
            "len_tokenizer": len(tok),
            "token_ids": {t: tok.convert_tokens_to_ids(t) for t in cases_tokens()},
            "bos_eos_pad_unk": [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token],
            "eos_token_id": tok.eos_token_id,
            "extra_special_tokens": list(tok.extra_special_tokens),
            "generation_eos_token_id": model.generation_config.eos_token_id,
            "image_seq_len": processor.image_seq_len,
            "image_processor": {
                "class": type(processor.image_processor).__name__,
                "size_longest_edge": processor.image_processor.size["longest_edge"],
                "max_image_size": dict(processor.image_processor.max_image_size),
                "do_image_splitting": processor.image_processor.do_image_splitting,
            },
            "prompts": prompts,
            "decoded_row0": tok.decode(inputs["input_ids"][0]),
            "resize_vs_transformers": resize_difference(case, saved, model),
        }
    np.savez_compressed(OUT / f"{case}.inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    prompt_len = one["input_ids"].shape[1]
    expected = {"generated": gen[:, prompt_len:].numpy()}
    if case == "llama_tiny":
        expected["logits"] = logits
    else:
        last = inputs["attention_mask"].numpy().sum(1) - 1  # right padding: each row's last real position
        expected["last"] = logits[np.arange(len(last)), last]
        col_ids = np.array(sorted(set(meta["token_ids"].values()) | set(range(0, 49152, 1024))), np.int64)
        expected["col_ids"] = col_ids
        expected["cols"] = logits[:, :, col_ids]
    np.savez_compressed(OUT / f"{case}.expected.npz", **expected)
    (OUT / f"{case}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(case, "logits", logits.shape, "generated", expected["generated"].tolist(), "resize diff",
          meta["resize_vs_transformers"])


def cases_tokens() -> list[str]:
    tokens = ["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    return tokens + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "tokenizer_tiny" / "tokenizer.json").is_file():
        make_tokenizer()
    run_case("llama_tiny")
    if os.environ.get("SMOLLM2_GGUF"):
        run_case("smollm2")
    else:
        print("SMOLLM2_GGUF is not set: the smollm2 files are kept as they are")


if __name__ == "__main__":
    main()
