"""Reference TRL DPOTrainer trajectories (LoRA on the tiny SmolVLM, CPU, fp32 model, fp32 or bf16 autocast) for
ferrovlm's DPO trainer (dev only).

    python scripts/reference/dpo_trajectory.py  # in an environment with torch, transformers, peft, trl, datasets

Builds the `tiny_smolvlm` test checkpoint (see lora_grads.build_tiny_smolvlm) in a temp dir, makes a non-trivial
LoRA adapter (r=4, alpha=8, text q/k/v/o/gate/up/down, B != 0), saves it, reloads it with
`PeftModel.from_pretrained(base, adapter, is_trainable=True)`, and trains it with `trl.DPOTrainer` (ref_model=None)
for 3 optimizer steps on 4 conversational vision preference rows. Per case, into tests/fixtures/dpo/<case>/:

  adapter/            the initial adapter (PEFT save_pretrained)
  adapter_final/      the "default" adapter after the 3 optimizer steps (PEFT save_pretrained)
  images/*.png        the dataset images
  rows.json           the dataset rows, image file names in place of the PIL images
  args.json           every DPOConfig kwarg passed (output_dir excluded: a temp dir)
  log_history.json    trainer.state.log_history verbatim (the last entry has wall-clock timings)
  batch0.npz          the batch TRL's DataCollatorForVisionPreference built for the first micro-batch
  steps.json          per micro-batch: dataset row order, compute_loss value, token counts; trainer facts
                      (reference-adapter handling, optimizer, param groups, ...) and the first step recomputed
                      from a plain full-logits forward with the formulas of tests/fixtures/dpo/README.md; for a
                      bf16 case also `bf16` (what autocast did) and `bf16_vs_fp32` (per logged step |bf16 - fp32|
                      against its fp32 twin case, and the max)

The folder is emptied (except README.md) and rewritten on every run. See tests/fixtures/dpo/README.md.
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
from sft_trajectory import BF16_RECOMPUTE_RTOL, autocast_facts, bf16_vs_fp32, record_forward_dtypes  # noqa: E402

OUT = FIX / "dpo"

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# (image file, size, question, chosen, rejected): distinct lengths so that prompt and completion padding matter
ROWS = [
    ("row0_32x32.png", (32, 32), "What is in the image?", "A red circle.", "A big blue square on a white wall."),
    ("row1_48x40.png", (48, 40), "Describe this picture briefly.", "Shapes on a gradient, drawn small.", "Nothing."),
    ("row2_40x24.png", (40, 24), "Name one colour.", "Blue.", "Probably green, or maybe yellow."),
    ("row3_28x36.png", (28, 36), "How many shapes are there?", "There are three.", "There are seven shapes."),
]
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
    beta=0.1,
)

CASES = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "ipo": dict(loss_type=["ipo"]),
    "hinge": dict(loss_type=["hinge"]),
    "sigmoid_sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
    # `sigmoid` under bf16=True: fp32 model, LoRA params and AdamW state; the policy and reference forwards run under
    # torch.autocast("cpu", dtype=torch.bfloat16) (accelerate's wrapper / DPOTrainer's accelerator.autocast())
    "sigmoid_bf16": dict(loss_type=["sigmoid"], bf16=True),
}
# bf16 cases are compared with their fp32 twin (same rows, adapter, seed): see bf16_vs_fp32 in steps.json
FP32_TWIN = {"sigmoid_bf16": "sigmoid"}

TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def user_msg(q):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}


def assistant_msg(a):
    return {"role": "assistant", "content": [{"type": "text", "text": a}]}


def make_rows(img_dir: Path):
    """-> (rows with PIL images for the Dataset, rows with file names for rows.json)"""
    rows, described = [], []
    for i, (fname, (w, h), q, c, r) in enumerate(ROWS):
        img = save_png(shape_image(w, h, 200 + i), img_dir / fname)
        body = {"prompt": [user_msg(q)], "chosen": [assistant_msg(c)], "rejected": [assistant_msg(r)]}
        rows.append({"images": [img], **body})
        described.append({"images": [f"images/{fname}"], **body})
    return rows, described


def row_id(example) -> int:
    text = next(p["text"] for p in example["prompt"][0]["content"] if p["type"] == "text")
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


def full_logits_stats(model, b):
    """Per-sequence sums over completion tokens from a plain full-logits forward (no fused head)."""
    out = model(**{k: v for k, v in b.items() if k != "completion_mask"}, use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt_ids = b["input_ids"][:, 1:]
    mask = b["completion_mask"][:, 1:].bool()
    logp = torch.log_softmax(logits, -1)
    tok = logp.gather(-1, tgt_ids.unsqueeze(-1)).squeeze(-1) * mask
    ent = -(logp.exp() * logp).sum(-1)
    return dict(tok=tok, mask=mask, logps=tok.sum(1), ent=ent, mean_logits=logits.mean(-1),
                top1=(logits.argmax(-1) == tgt_ids))


def check_first_step(ckpt: Path, adapter: Path, batch: dict, spec: dict, beta: float, logged: dict,
                     bf16: bool = False) -> dict:
    """Recomputes the first logged step (policy = reference = the initial adapter) with plain forwards and the
    formulas of tests/fixtures/dpo/README.md, and asserts they match TRL's log (with bf16, the forwards run under
    torch.autocast("cpu", bfloat16) like TRL's, and the tolerance is BF16_RECOMPUTE_RTOL)."""
    import contextlib

    from peft import PeftModel

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    base, _ = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    model.eval()
    b = {k: torch.from_numpy(v) for k, v in batch.items()}
    with autocast():
        s = full_logits_stats(model, b)
    with torch.no_grad(), model.disable_adapter(), autocast():
        s_base = full_logits_stats(model, b)
    B = b["input_ids"].shape[0] // 2
    logps = s["logps"]
    ref = logps.detach()  # the "ref" adapter is a copy of the initial adapter -> identical at step 1
    ch, rj = logps[:B], logps[B:]
    rch, rrj = ref[:B], ref[B:]
    d = (ch - rch) - (rj - rrj)
    cm = b["completion_mask"]
    loss = 0.0
    weights = spec.get("loss_weights") or [1.0] * len(spec["loss_type"])
    for lt, w in zip(spec["loss_type"], weights):
        if lt == "sigmoid":
            per = -torch.nn.functional.logsigmoid(beta * d)
        elif lt == "hinge":
            per = torch.relu(1 - beta * d)
        elif lt == "ipo":
            nc, nr = cm[:B].sum(1).clamp(min=1), cm[B:].sum(1).clamp(min=1)
            per = ((ch - rch) / nc - (rj - rrj) / nr - 1 / (2 * beta)) ** 2
        elif lt == "sft":
            per = -(s["tok"][:B][s["mask"][:B]]).mean().expand(B)
        loss = loss + per.mean() * w
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    m = s["mask"]
    mine = {
        "loss": float(loss), "grad_norm": grad_norm,
        "logps/chosen": ch.mean().item(), "logps/rejected": rj.mean().item(),
        "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
        "entropy": ((s["ent"] * m).sum() / m.sum()).item(),
        "logits/chosen": s["mean_logits"][:B][m[:B]].mean().item(),
        "logits/rejected": s["mean_logits"][B:][m[B:]].mean().item(),
        "mean_token_accuracy": (s["top1"][:B] & m[:B]).sum().item() / m[:B].sum().item(),
        "num_tokens": float(b["attention_mask"].sum()),
    }
    rtol = BF16_RECOMPUTE_RTOL if bf16 else 2e-5
    for k, v in mine.items():
        assert abs(v - logged[k]) <= rtol * max(1.0, abs(v)), (k, v, logged[k])
    if bf16:
        mine["_abs_diff_to_log"] = {k: abs(v - logged[k]) for k, v in mine.items()}
    # had TRL used the base model (adapters disabled) as reference, the first step's rewards would be these:
    base_logps = s_base["logps"]
    mine["_if_ref_were_base_model"] = {
        "rewards/chosen": (beta * (ch - base_logps[:B])).mean().item(),
        "rewards/rejected": (beta * (rj - base_logps[B:])).mean().item(),
    }
    return mine


def run_case(name: str, spec: dict, ckpt: Path, adapter: Path) -> dict:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from safetensors.torch import load_file
    from trl import DPOConfig, DPOTrainer

    case = fresh_dir(OUT / name)
    shutil.copytree(adapter, case / "adapter")
    base, processor = load_tiny(ckpt)
    model = PeftModel.from_pretrained(base, case / "adapter", is_trainable=True)

    rows, described = make_rows(case / "images")
    (case / "rows.json").write_text(json.dumps(described, indent=2) + "\n")
    train_dataset = Dataset.from_list(rows)

    kwargs = {**COMMON_ARGS, **spec}
    (case / "args.json").write_text(json.dumps(kwargs, indent=2, sort_keys=True) + "\n")
    tmp_out = tempfile.mkdtemp()
    args = DPOConfig(output_dir=tmp_out, **kwargs)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                         processing_class=processor)

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    ref_names = sorted(n for n, _ in peft_model.named_parameters() if ".ref." in n)
    ref_trainable = sorted(n for n, p in peft_model.named_parameters() if ".ref." in n and p.requires_grad)
    default_trainable = sorted(n for n, p in peft_model.named_parameters() if ".default." in n and p.requires_grad)
    ref_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".ref." in n}

    micro = []
    collate = trainer.data_collator

    def capturing_collator(examples):
        ids = [row_id(e) for e in examples]
        out = collate(examples)
        micro.append({"rows": ids, "batch": {k: to_np(v) for k, v in out.items()}})
        return out

    trainer.data_collator = capturing_collator

    orig_compute_loss = trainer.compute_loss
    calls = []

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        active = list(trainer.accelerator.unwrap_model(trainer.model).active_adapters)
        loss = orig_compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        cm = inputs["completion_mask"]
        calls.append({
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "compute_loss": float((loss[0] if isinstance(loss, tuple) else loss).item()),
            "completion_tokens_per_row": cm.sum(1).tolist(),
            "completion_tokens_shifted_per_row": cm[:, 1:].sum(1).tolist(),
            "attention_mask_sum": int(inputs["attention_mask"].sum()),
            "shape_input_ids": list(inputs["input_ids"].shape),
            "shape_pixel_values": list(inputs["pixel_values"].shape),
            "active_adapters_during_policy_forward": active,
            "model_training": bool(model.training),
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

    bs = kwargs["per_device_train_batch_size"]
    expect = []
    for epoch in range(len(micro) * bs // len(ROWS)):
        perm = torch.randperm(len(ROWS), generator=torch.Generator().manual_seed(kwargs["seed"] + epoch)).tolist()
        expect += [perm[i:i + bs] for i in range(0, len(ROWS), bs)]
    assert [m["rows"] for m in micro] == expect, ([m["rows"] for m in micro], expect)

    ref_after = {n: p.detach() for n, p in peft_model.named_parameters() if ".ref." in n}
    init_sd = load_file(str(case / "adapter" / "adapter_model.safetensors"))
    ref_equals_initial = all(
        torch.equal(ref_after[n], init_sd[n.replace(".ref.", ".")]) for n in ref_after
    ) if ref_after else None
    ref_unchanged = all(torch.equal(ref_before[n], ref_after[n]) for n in ref_before) if ref_before else None

    log_history = trainer.state.log_history
    recomputed = check_first_step(ckpt, case / "adapter", micro[0]["batch"], spec, kwargs["beta"], log_history[0],
                                  bf16=bf16)
    (case / "log_history.json").write_text(json.dumps(log_history, indent=2) + "\n")
    np.savez_compressed(case / "batch0.npz", **micro[0]["batch"])

    trainer.model.save_pretrained(case / "adapter_final", selected_adapters=["default"])
    for f in (case / "adapter_final").rglob("*"):
        if f.is_file() and f.name not in ("adapter_config.json", "adapter_model.safetensors"):
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
            | {
                "n_params": len(g["params"]),
                "n_ref_params": sum(".ref." in name_of[id(p)] for p in g["params"]),
                "param_names": sorted(name_of[id(p)] for p in g["params"])[:4],
            }
        )
    beta = kwargs["beta"]
    steps = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__, "accelerate": accelerate.__version__},
        "reference": {
            "peft_adapters": sorted(peft_model.peft_config),
            "ref_adapter_added": "ref" in peft_model.peft_config,
            "n_ref_params": len(ref_names),
            "n_ref_params_requires_grad": len(ref_trainable),
            "n_default_params_requires_grad": len(default_trainable),
            "ref_adapter_equals_initial_adapter_after_training": ref_equals_initial,
            "ref_adapter_unchanged_by_training": ref_unchanged,
            "active_adapter_after_training": peft_model.active_adapter,
            "trainer_ref_model_is_none": trainer.ref_model is None,
        },
        "reference_logps_mean_from_log": [
            {"step": e["step"], "ref_chosen": e["logps/chosen"] - e["rewards/chosen"] / beta,
             "ref_rejected": e["logps/rejected"] - e["rewards/rejected"] / beta}
            for e in log_history if "logps/chosen" in e
        ],
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "disable_dropout": bool(trainer.args.disable_dropout),
        "max_length": trainer.args.max_length,
        "truncation_mode": trainer.args.truncation_mode,
        "loss_type": trainer.loss_types,
        "loss_weights": trainer.loss_weights,
        "beta": trainer.beta,
        "max_grad_norm": trainer.args.max_grad_norm,
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
    print(f"[{name}] rows per micro-batch: {[m['rows'] for m in micro]}  ref: {steps['reference']}")
    for e in log_history:
        print("   ", {k: v for k, v in e.items() if k not in TIMING_KEYS})
    return steps


def main() -> None:
    only = set(sys.argv[1:])
    only |= {FP32_TWIN[c] for c in only if c in FP32_TWIN}  # a bf16 case is compared with its fp32 twin's log
    clean_dir_keep_readme(OUT)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_tiny_smolvlm(tmp / "smolvlm-tiny")
    from peft import get_peft_model

    base, processor = load_tiny(ckpt)
    torch.manual_seed(ADAPTER_SEED)
    init = get_peft_model(base, lora_config(target_modules=TEXT_TARGETS))
    fill_adapter_(init, ADAPTER_SEED)
    save_adapter(init, tmp / "adapter")
    del init, base
    for name, spec in CASES.items():
        if only and name not in only:
            continue
        run_case(name, spec, ckpt, tmp / "adapter")
    normalize_perms(OUT)
    shutil.rmtree(tmp)
    print(f"[dpo] folder size {dir_size(OUT)} bytes")


if __name__ == "__main__":
    main()
