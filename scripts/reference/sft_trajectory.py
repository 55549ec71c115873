"""Reference TRL SFTTrainer trajectories (LoRA on the tiny SmolVLM, CPU, fp32 model, fp32 or bf16 autocast) for
ferrovlm's trainer (dev only).

    python scripts/reference/sft_trajectory.py  # in an environment with torch, transformers, peft, trl, datasets

Builds the `tiny_smolvlm` test checkpoint (see lora_grads.build_tiny_smolvlm) in a temp dir, makes a non-trivial
LoRA adapter (r=4, alpha=8, text q/k/v/o/gate/up/down, B != 0), saves it, reloads it with
`PeftModel.from_pretrained(base, adapter, is_trainable=True)`, trains it with `trl.SFTTrainer` for 3 optimizer
steps and writes, per case, into tests/fixtures/sft/<case>/:

  adapter/            the initial adapter (PEFT save_pretrained)
  adapter_final/      the adapter after the 3 optimizer steps (PEFT save_pretrained)
  images/*.png        the dataset images
  rows.json           the dataset rows, image file names in place of the PIL images
  args.json           every SFTConfig kwarg passed (output_dir excluded: a temp dir)
  log_history.json    trainer.state.log_history verbatim (the last entry has wall-clock timings)
  batch0.npz          the batch TRL's collator built for the first micro-batch (what the model got)
  steps.json          per micro-batch: dataset row order, num_items_in_batch, compute_loss value, token counts;
                      plus trainer facts (model_accepts_loss_kwargs, optimizer, param groups, ...); for a bf16 case
                      also `bf16` (what autocast did: dtypes seen in the forward, of params and AdamW state) and
                      `bf16_vs_fp32` (per logged step |bf16 - fp32| against its fp32 twin case, and the max)

The folder is emptied (except README.md) and rewritten on every run. See tests/fixtures/sft/README.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_grads import (  # noqa: E402
    FIX,
    TEXT_TARGETS,
    build_tiny_smolvlm,
    clean_dir_keep_readme,
    dir_size,
    fill_adapter_,
    fresh_dir,
    load_tiny,
    lora_config,
    normalize_perms,
    save_adapter,
    save_png,
    shape_image,
)

OUT = FIX / "sft"

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# (image file, size, question, answer): 4 rows, distinct lengths so that padding matters
ROWS = [
    ("row0_32x32.png", (32, 32), "What is in the image?", "A red circle."),
    ("row1_48x40.png", (48, 40), "Describe this picture briefly.", "Shapes on a gradient, drawn small."),
    ("row2_40x24.png", (40, 24), "Name one colour.", "Blue."),
    ("row3_28x36.png", (28, 36), "How many shapes are there?", "There are three."),
]
# Each answer gets GREEDY_TOKENS tokens appended that the initial model (base + initial adapter) itself predicts
# greedily in context (see extend_answers), so that mean_token_accuracy is not identically 0 on a random model.
GREEDY_TOKENS = 6
ADAPTER_SEED = 300  # one initial adapter, shared by all cases

COMMON_ARGS = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=3,
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

CASES = {
    "messages": dict(fmt="messages", args={}),
    "prompt_completion": dict(fmt="prompt_completion", args={}),
    "messages_accum": dict(fmt="messages", args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                      lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01)),
    # `messages` under bf16=True: the model stays fp32 (master weights, LoRA params, grads, AdamW state f32) and
    # accelerate runs the forward under torch.autocast("cpu", dtype=torch.bfloat16)
    "messages_bf16": dict(fmt="messages", args=dict(bf16=True)),
}
# bf16 cases are compared with their fp32 twin (same rows, adapter, seed): see bf16_vs_fp32 in steps.json
FP32_TWIN = {"messages_bf16": "messages"}
# check_first_step's tolerance under autocast (relative; one bf16 unit roundoff, 2^-9): its full-logits forward
# rounds the same matmuls to bf16 as TRL's, but its backward differs from the chunked head's (grad_norm: 4.6e-4
# relative), so not to 2e-5; the differences found are written to steps.json
BF16_RECOMPUTE_RTOL = 2e-3

TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def user_msg(q):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}


def assistant_msg(a):
    return {"role": "assistant", "content": [{"type": "text", "text": a}]}


def extend_answers(model, processor, img_dir: Path) -> list[str]:
    """answer_i + the greedy continuation (GREEDY_TOKENS tokens) of the model after '...Assistant: answer_i'."""
    model.eval()
    answers = []
    for i, (fname, (w, h), q, a) in enumerate(ROWS):
        img = save_png(shape_image(w, h, 200 + i), img_dir / fname)
        text = processor.apply_chat_template([user_msg(q), assistant_msg(a)], tokenize=False)
        suffix = "<end_of_utterance>\n"
        assert text.endswith(suffix), text
        enc = processor(text=[text[: -len(suffix)]], images=[[img]], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
        answers.append(a + processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:]))
    return answers


def make_rows(fmt: str, img_dir: Path, answers: list[str]):
    """-> (rows with PIL images for the Dataset, rows with file names for rows.json)"""
    rows, described = [], []
    for i, (fname, (w, h), q, _) in enumerate(ROWS):
        a = answers[i]
        img = save_png(shape_image(w, h, 200 + i), img_dir / fname)
        if fmt == "messages":
            body = {"messages": [user_msg(q), assistant_msg(a)]}
        else:
            body = {"prompt": [user_msg(q)], "completion": [assistant_msg(a)]}
        rows.append({"images": [img], **body})
        described.append({"images": [f"images/{fname}"], **body})
    return rows, described


def row_id(example) -> int:
    """Which dataset row a collator example is (by its question text)."""
    msgs = example.get("messages") or example.get("prompt")
    text = next(p["text"] for p in msgs[0]["content"] if p["type"] == "text")
    return next(i for i, r in enumerate(ROWS) if r[2] == text)


def to_np(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype == torch.bool:
            return v.numpy().astype(np.bool_)
        if v.is_floating_point():
            return v.float().numpy()
        return v.to(torch.int64).numpy()
    return np.asarray(v)


def check_first_step(ckpt: Path, adapter: Path, micro: list, ga: int, logged: dict, bf16: bool = False) -> dict:
    """Recomputes the first logged step from the captured micro-batches with the plain (full-logits) forward of the
    initial model, using the formulas written in tests/fixtures/sft/README.md, and asserts they match TRL's log
    (with bf16, the forward runs under torch.autocast("cpu", bfloat16) like TRL's, and the tolerance is
    BF16_RECOMPUTE_RTOL)."""
    import contextlib

    from peft import PeftModel

    base, _ = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    model.eval()  # no dropout anywhere (lora_dropout=0, attention dropout 0), so train/eval forwards agree
    batches = [{k: torch.from_numpy(v) for k, v in m["batch"].items()} for m in micro[:ga]]
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    nll_sum, ent_means, acc_means, ntok = 0.0, [], [], 0
    for b in batches:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, -1)
        tgt = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(tgt * mask).sum()
        (nll / n_total).backward()  # gradient of this micro-batch's share of the accumulated mean
        nll_sum += nll.item()
        ent = -(logp.exp() * logp).sum(-1)
        ent_means.append(((ent * mask).sum() / mask.sum()).item())
        acc_means.append(((logits.argmax(-1) == labels) & mask).sum().item() / mask.sum().item())
        ntok += int(b["attention_mask"].sum())
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    mine = {"loss": nll_sum / n_total, "entropy": sum(ent_means) / len(ent_means),
            "mean_token_accuracy": sum(acc_means) / len(acc_means), "num_tokens": float(ntok), "grad_norm": grad_norm}
    rtol = BF16_RECOMPUTE_RTOL if bf16 else 2e-5
    for k, v in mine.items():
        assert abs(v - logged[k]) <= rtol * max(1.0, abs(v)), (k, v, logged[k])
    if bf16:
        mine["_abs_diff_to_log"] = {k: abs(v - logged[k]) for k, v in mine.items()}
    return mine


def autocast_facts(trainer) -> dict:
    """What bf16=True did to the model/optimizer (after training): accelerate's mixed-precision mode, the dtypes of
    the frozen and trainable parameters and of the AdamW state; per-forward facts come from record_forward_dtypes."""
    opt = trainer.optimizer
    inner_opt = getattr(opt, "optimizer", opt)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    state_dtypes = sorted({f"{k}:{v.dtype}" for p in trainable for k, v in inner_opt.state.get(p, {}).items()
                           if isinstance(v, torch.Tensor)})
    return {
        "accelerator_mixed_precision": str(trainer.accelerator.mixed_precision),
        "accelerator_native_amp": bool(trainer.accelerator.native_amp),
        "model_dtype": str(trainer.accelerator.unwrap_model(trainer.model).dtype),
        "base_weight_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}),
        "trainable_param_dtypes": sorted({str(p.dtype) for p in trainable}),
        "optimizer_state_dtypes": state_dtypes,
    }


def record_forward_dtypes(model) -> tuple[dict, list]:
    """Forward hooks on the first text layer's q_proj (a LoRA Linear), its base Linear and the lm_head: autocast
    state and input/output dtypes of the first forward they see."""
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            if name not in seen:
                x = inp[0] if inp else None
                seen[name] = {
                    "autocast_cpu_enabled": torch.is_autocast_enabled("cpu"),
                    "autocast_cpu_dtype": str(torch.get_autocast_dtype("cpu")),
                    "input_dtype": str(x.dtype) if isinstance(x, torch.Tensor) else None,
                    "output_dtype": str(out.dtype) if isinstance(out, torch.Tensor) else None,
                    "weight_dtype": str(mod.weight.dtype) if hasattr(mod, "weight") else None,
                }
        return fn

    handles = []
    for n, m in model.named_modules():
        if n.endswith("text_model.layers.0.self_attn.q_proj"):
            handles.append(m.register_forward_hook(hook("text.layers.0.q_proj (LoRA)")))
            handles.append(m.base_layer.register_forward_hook(hook("text.layers.0.q_proj.base_layer")))
            handles.append(m.lora_A["default"].register_forward_hook(hook("text.layers.0.q_proj.lora_A")))
        elif n.endswith("text_model.norm"):
            handles.append(m.register_forward_hook(hook("text.norm")))
    assert len(handles) == 4, handles
    return seen, handles


def bf16_vs_fp32(log_history: list, twin_log: list) -> dict:
    """Per logged step |bf16 - fp32| of every float key both logs have, and the max over the steps."""
    keys = [k for k in log_history[0] if isinstance(log_history[0][k], float) and k not in ("epoch",)]
    per_step = [{k: abs(a[k] - b[k]) for k in keys} for a, b in zip(log_history[:-1], twin_log[:-1])]
    return {"per_step_abs_diff": per_step, "max_abs_diff": {k: max(d[k] for d in per_step) for k in keys},
            "train_loss_abs_diff": abs(log_history[-1]["train_loss"] - twin_log[-1]["train_loss"])}


def run_case(name: str, spec: dict, ckpt: Path, adapter: Path, answers: list[str]) -> None:
    import datasets
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    case = fresh_dir(OUT / name)

    # the initial adapter, reloaded from disk
    shutil.copytree(adapter, case / "adapter")
    base, processor = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, case / "adapter", is_trainable=True)

    rows, described = make_rows(spec["fmt"], case / "images", answers)
    (case / "rows.json").write_text(json.dumps(described, indent=2) + "\n")
    train_dataset = Dataset.from_list(rows)

    kwargs = {**COMMON_ARGS, **spec["args"]}
    (case / "args.json").write_text(json.dumps(kwargs, indent=2, sort_keys=True) + "\n")
    tmp_out = tempfile.mkdtemp()
    args = SFTConfig(output_dir=tmp_out, **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=processor)

    # capture every collated micro-batch (and which rows it holds)
    micro = []
    collate = trainer.data_collator

    def capturing_collator(examples):
        ids = [row_id(e) for e in examples]
        out = collate(examples)
        micro.append({"rows": ids, "batch": {k: to_np(v) for k, v in out.items()}})
        return out

    trainer.data_collator = capturing_collator

    # record what compute_loss gets and returns per micro-batch
    orig_compute_loss = trainer.compute_loss
    calls = []

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = orig_compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        lab = inputs["labels"]
        calls.append({
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "compute_loss": float((loss[0] if isinstance(loss, tuple) else loss).item()),
            "label_tokens_shifted": int((lab[:, 1:] != -100).sum()),
            "label_tokens_unshifted": int((lab != -100).sum()),
            "attention_mask_sum": int(inputs["attention_mask"].sum()),
            "shape_input_ids": list(inputs["input_ids"].shape),
            "shape_pixel_values": list(inputs["pixel_values"].shape),
        })
        return loss

    trainer.compute_loss = recording_compute_loss

    bf16 = bool(kwargs["bf16"])
    if bf16:
        forward_dtypes, hooks = record_forward_dtypes(trainer.model)
    trainer.train()
    if bf16:
        for h in hooks:
            h.remove()

    # the row order is accelerate's SeedableRandomSampler: torch.randperm(n, generator seeded with seed + epoch),
    # cut into micro-batches in order
    bs = kwargs["per_device_train_batch_size"]
    expect = []
    for epoch in range(len(micro) * bs // len(ROWS)):
        perm = torch.randperm(len(ROWS), generator=torch.Generator().manual_seed(kwargs["seed"] + epoch)).tolist()
        expect += [perm[i:i + bs] for i in range(0, len(ROWS), bs)]
    assert [m["rows"] for m in micro] == expect, ([m["rows"] for m in micro], expect)

    log_history = trainer.state.log_history
    recomputed = check_first_step(ckpt, case / "adapter", micro, kwargs["gradient_accumulation_steps"], log_history[0],
                                  bf16=bf16)
    (case / "log_history.json").write_text(json.dumps(log_history, indent=2) + "\n")
    np.savez_compressed(case / "batch0.npz", **micro[0]["batch"])

    trainer.model.save_pretrained(case / "adapter_final")
    for f in (case / "adapter_final").iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            f.unlink()
    cfg = json.loads((case / "adapter_final" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny_smolvlm"
    (case / "adapter_final" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    opt = trainer.optimizer
    inner_opt = getattr(opt, "optimizer", opt)
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = []
    for g in inner_opt.param_groups:
        groups.append(
            {
                k: v
                for k, v in g.items()
                if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))
            }
            | {"n_params": len(g["params"]), "param_names": sorted(name_of[id(p)] for p in g["params"])[:4]}
        )
    steps = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
        "model_accepts_loss_kwargs": bool(trainer.model_accepts_loss_kwargs),
        "loss_shifts_labels": bool(getattr(trainer, "_loss_shifts_labels", False)),
        "loss_is_scaled_for_ga": getattr(trainer, "loss_is_scaled_for_ga", None),
        "completion_only_loss": bool(trainer.completion_only_loss),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "max_length": trainer.args.max_length,
        "optim": str(trainer.args.optim),
        "optimizer_class": f"{type(inner_opt).__module__}.{type(inner_opt).__name__}",
        "param_groups": groups,
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
        "collator_class": type(collate).__name__,
        "first_step_recomputed_from_full_logits": recomputed,
        "micro_batches": [{"rows": m["rows"], **c} for m, c in zip(micro, calls)],
    }
    if bf16:
        twin = FP32_TWIN[name]
        twin_log = json.loads((OUT / twin / "log_history.json").read_text())
        steps["bf16"] = {**autocast_facts(trainer), "first_forward": forward_dtypes}
        steps["bf16_vs_fp32"] = {"fp32_case": twin, **bf16_vs_fp32(log_history, twin_log)}
    (case / "steps.json").write_text(json.dumps(steps, indent=2, default=str) + "\n")
    shutil.rmtree(tmp_out, ignore_errors=True)
    normalize_perms(case)
    print(f"[{name}] rows per micro-batch: {[m['rows'] for m in micro]}")
    for e in log_history:
        print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})


def main() -> None:
    clean_dir_keep_readme(OUT)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_tiny_smolvlm(tmp / "smolvlm-tiny")
    from peft import get_peft_model

    # the initial adapter (shared by all cases) and the answers it continues greedily
    base, processor = load_tiny(ckpt)
    torch.manual_seed(ADAPTER_SEED)
    init = get_peft_model(base, lora_config(target_modules=TEXT_TARGETS))
    fill_adapter_(init, ADAPTER_SEED)
    save_adapter(init, tmp / "adapter")
    answers = extend_answers(init, processor, tmp / "images")
    print("[sft] answers:", answers)
    del init, base
    for name, spec in CASES.items():
        run_case(name, spec, ckpt, tmp / "adapter", answers)
    normalize_perms(OUT)
    shutil.rmtree(tmp)
    print(f"[sft] folder size {dir_size(OUT)} bytes")


if __name__ == "__main__":
    main()
