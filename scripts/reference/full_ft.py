"""Reference values for FULL-PARAMETER training (no PEFT) of the tiny SmolVLM: gradients from transformers, and
TRL SFTTrainer / DPOTrainer trajectories (CPU, fp32, eager attention) for ferrovlm's trainer (dev only).

    python scripts/reference/full_ft.py [grads|sft|dpo ...]  # with torch, transformers, trl, datasets (no peft use)

Builds the `tiny_smolvlm` test checkpoint (lora_grads.build_tiny_smolvlm) in a temp dir, and for the `untied`
case the same checkpoint written again with `tie_word_embeddings=False` (UNTIED_OVERRIDES, same seed: every tensor
is identical, `lm_head.weight` is drawn last). Writes into tests/fixtures/full_ft/:

  grads/images/*.png        the pixels behind inputs.npz (lora_grads.make_inputs: the same batch as ../lora)
  grads/<case>/inputs.npz   the processor batch (right padding) + labels (= input_ids, -100 at padding)
  grads/<case>/expected.npz `loss` and, per trainable parameter (transformers names), `grad/<name>` (whole
                            gradient) or, for the [49280, 32] embedding / LM head, `grad_rows/<name>` at the rows
                            `grad_row_ids/<name>` and `grad_colsum/<name>`; `grad_norm/<name>` for every one
  grads/cases.json          versions, the inputs, and per case the recipe, trainable names, loss, label tokens
  sft/<case>/               TRL SFTTrainer on the loaded model (no peft_config): args.json, rows.json, images/,
                            log_history.json, batch0.npz, steps.json, final_norms.json, update_norms.json,
                            final_sample.npz
  dpo/<case>/               TRL DPOTrainer (no peft_config, ref_model=None): the same files

The folder is emptied (except README.md) and rewritten on every run (only the named parts when some are given).
See tests/fixtures/full_ft/README.md.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_trajectory as dpo_ref  # noqa: E402
import sft_trajectory as sft_ref  # noqa: E402
from lora_grads import (  # noqa: E402
    FIX,
    build_tiny_smolvlm,
    clean_dir_keep_readme,
    dir_size,
    fresh_dir,
    load_tiny,
    make_inputs,
    normalize_perms,
)

OUT = FIX / "full_ft"

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

CKPT_SEED = 3  # tests/conftest.py's tiny_smolvlm
UNTIED_OVERRIDES = {"tie_word_embeddings": False}  # top-level Idefics3 config key; text_config untouched

# parameters at least this large (the [49280, 32] embedding and LM head) are stored as row samples
PARTIAL_MIN_NUMEL = 100_000
ROW_SAMPLE = 256  # random vocabulary rows stored besides every token id of the batch
ROW_SAMPLE_SEED = 0

GRAD_CASES = {
    "all": dict(ckpt="tied", freeze_vision=False),
    "frozen_vision": dict(ckpt="tied", freeze_vision=True),
    "untied": dict(ckpt="untied", freeze_vision=False),
}

SFT_CASES = {
    "full": dict(freeze_vision=False, args={}),
    "full_freeze_vision": dict(freeze_vision=True, args={}),
    "full_accum": dict(freeze_vision=False, args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                       lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01)),
}

DPO_CASES = {
    "full": dict(loss_type=["sigmoid"]),
}

FREEZE_VISION_CODE = "for p in model.model.vision_model.parameters(): p.requires_grad = False"

# exact final tensors kept in final_sample.npz (plus the embedding rows of batch0's first tokens)
SAMPLE_PARAMS = [
    "model.connector.modality_projection.proj.weight",
    "model.text_model.layers.0.self_attn.q_proj.weight",
    "model.text_model.layers.1.mlp.down_proj.weight",
    "model.text_model.norm.weight",
    "model.vision_model.post_layernorm.weight",
    "model.vision_model.embeddings.patch_embedding.bias",
    "model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
]
SAMPLE_EMBED_TOKENS = 5


def freeze_vision_(model) -> None:
    for p in model.model.vision_model.parameters():
        p.requires_grad = False


def build_untied(dst: Path) -> Path:
    """tiny_smolvlm with UNTIED_OVERRIDES: the same folder, model.safetensors/config.json rewritten."""
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    build_tiny_smolvlm(dst)
    write_checkpoint(dst, {**TINY_SMOLVLM, **UNTIED_OVERRIDES}, seed=CKPT_SEED)
    return dst


def versions() -> dict:
    import accelerate
    import datasets
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__, "numpy": np.__version__}


def tie_facts(model) -> dict:
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return {"config_tie_word_embeddings": bool(model.config.tie_word_embeddings),
            "lm_head_is_embed_tokens": head is emb,
            "named_parameters_has_lm_head": any(n == "lm_head.weight" for n, _ in model.named_parameters())}


def warning_lines(caught) -> list[str]:
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def sample_rows(vocab: int, inputs: dict) -> np.ndarray:
    ids = set(inputs["input_ids"].unique().tolist())
    rng = np.random.default_rng(ROW_SAMPLE_SEED)
    others = [int(i) for i in rng.permutation(vocab) if int(i) not in ids][:ROW_SAMPLE]
    return np.asarray(sorted(ids | set(others)), dtype=np.int64)


def run_grad_case(name: str, spec: dict, ckpts: dict, inputs: dict) -> dict:
    case = fresh_dir(OUT / "grads" / name)
    model, _ = load_tiny(ckpts[spec["ckpt"]])
    if spec["freeze_vision"]:
        freeze_vision_(model)
    model.eval()  # no dropout anywhere: train() gives the same numbers
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    loss = out.loss
    loss.backward()

    lg = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lb = inputs["labels"][:, 1:].reshape(-1)
    check = torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100)
    assert torch.allclose(check, loss, atol=1e-6), (check, loss)

    expected = {"loss": np.asarray(loss.item(), dtype=np.float32)}
    trainable, frozen, partial = [], [], []
    vocab = model.config.text_config.vocab_size
    rows = sample_rows(vocab, inputs)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
            frozen.append(n)
            continue
        assert p.grad is not None, n
        g = p.grad.detach()
        norm = torch.linalg.vector_norm(g.double()).item()
        assert norm > 0, f"zero gradient for {n}"
        trainable.append(n)
        expected[f"grad_norm/{n}"] = np.asarray(norm, dtype=np.float64)
        if p.numel() >= PARTIAL_MIN_NUMEL:
            assert g.shape[0] == vocab, (n, g.shape)
            partial.append(n)
            expected[f"grad_rows/{n}"] = g[torch.from_numpy(rows)].numpy().copy()
            expected[f"grad_row_ids/{n}"] = rows
            expected[f"grad_colsum/{n}"] = g.double().sum(0).numpy()
        else:
            expected[f"grad/{n}"] = g.numpy().copy()
    np.savez_compressed(case / "expected.npz", **expected)
    np.savez_compressed(case / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})

    # facts about the big gradients: which rows are non-zero, how much of the norm the stored rows hold
    big = {}
    image_id = model.config.image_token_id
    for n in partial:
        g = dict(model.named_parameters())[n].grad
        nz = (g != 0).any(1)
        big[n] = {
            "nonzero_rows": int(nz.sum()),
            "stored_rows": len(rows),
            "stored_rows_norm_fraction": (torch.linalg.vector_norm(g[torch.from_numpy(rows)].double())
                                          / torch.linalg.vector_norm(g.double())).item(),
            "image_token_row_is_zero": bool(not nz[image_id]),
        }
    facts = tie_facts(model)
    n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[grads/{name}] loss={loss.item():.6f} trainable={len(trainable)} tensors / {n_tr} "
          f"frozen={len(frozen)} {facts} {big}")
    normalize_perms(case)
    return {
        "checkpoint": "tiny_smolvlm" if spec["ckpt"] == "tied" else
        {"base": "tiny_smolvlm", "config_overrides": UNTIED_OVERRIDES, "seed": CKPT_SEED},
        "freeze": FREEZE_VISION_CODE if spec["freeze_vision"] else None,
        "loss": float(loss.item()),
        "num_label_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
        "trainable_params": n_tr,
        "trainable": trainable,
        "frozen": frozen,
        "partial": partial,
        "partial_facts": big,
        "tied": facts,
    }


def run_grads(ckpts: dict) -> None:
    root = clean_dir_keep_readme(OUT / "grads")
    _, processor = load_tiny(ckpts["tied"])
    inputs, described = make_inputs(processor, root / "images")
    cases = {name: run_grad_case(name, spec, ckpts, inputs) for name, spec in GRAD_CASES.items()}
    meta = {
        "versions": versions(),
        "untied_recipe": {"config": "tiny_checkpoint.TINY_SMOLVLM", "config_overrides": UNTIED_OVERRIDES,
                          "seed": CKPT_SEED},
        "row_sample": {"min_numel": PARTIAL_MIN_NUMEL, "random_rows": ROW_SAMPLE, "seed": ROW_SAMPLE_SEED},
        "inputs": {**described, "shapes": {k: list(v.shape) for k, v in inputs.items()}},
        "cases": cases,
    }
    (root / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")
    normalize_perms(root)


# --------------------------------------------------------------------------------------------
# trainer runs (shared by SFT and DPO)
# --------------------------------------------------------------------------------------------


def capture_micro_batches(trainer, row_id) -> list:
    micro = []
    collate = trainer.data_collator

    def capturing_collator(examples):
        ids = [row_id(e) for e in examples]
        out = collate(examples)
        micro.append({"rows": ids, "batch": {k: sft_ref.to_np(v) for k, v in out.items()}})
        return out

    trainer.data_collator = capturing_collator
    return micro


def expected_row_order(n_micro: int, bs: int, n_rows: int, seed: int) -> list:
    """accelerate's SeedableRandomSampler: torch.randperm(n, generator seeded with seed + epoch), cut in order."""
    expect = []
    for epoch in range(n_micro * bs // n_rows):
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        expect += [perm[i:i + bs] for i in range(0, n_rows, bs)]
    return expect


def optimizer_facts(trainer) -> dict:
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = []
    for g in inner.param_groups:
        groups.append({k: v for k, v in g.items()
                       if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
                      | {"n_params": len(g["params"]), "n_elements": sum(p.numel() for p in g["params"]),
                         "param_names": sorted(name_of[id(p)] for p in g["params"])})
    return {
        "optim": str(trainer.args.optim),
        "optimizer_class": f"{type(inner).__module__}.{type(inner).__name__}",
        "decay_parameter_names": sorted(trainer.get_decay_parameter_names(trainer.model)),
        "param_groups": groups,
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
    }


def write_final(case: Path, model, initial: dict, first_ids: np.ndarray) -> dict:
    """final_norms.json, update_norms.json ({name: ||final - initial||}), final_sample.npz."""
    params = dict(model.named_parameters())
    final_norms = {n: torch.linalg.vector_norm(p.detach().double()).item() for n, p in params.items()}
    update_norms = {n: torch.linalg.vector_norm((p.detach() - initial[n]).double()).item() for n, p in params.items()}
    (case / "final_norms.json").write_text(json.dumps(final_norms, indent=2) + "\n")
    (case / "update_norms.json").write_text(json.dumps(update_norms, indent=2) + "\n")
    ids = torch.from_numpy(np.asarray(first_ids[:SAMPLE_EMBED_TOKENS], dtype=np.int64))
    emb = "model.text_model.embed_tokens.weight"
    sample = {n: params[n].detach().numpy().copy() for n in SAMPLE_PARAMS}
    sample["embed_rows_ids"] = ids.numpy()
    sample[f"embed_rows/{emb}"] = params[emb].detach()[ids].numpy().copy()
    np.savez_compressed(case / "final_sample.npz", **sample)
    return update_norms


def train_and_record(case: Path, trainer, row_id, n_rows: int, kwargs: dict):
    """Runs trainer.train() with collator capture; asserts the data order; writes log_history.json, batch0.npz.
    Returns (micro-batches, warnings, initial parameters, collator class name)."""
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    collator_class = type(trainer.data_collator).__name__
    micro = capture_micro_batches(trainer, row_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    got = [m["rows"] for m in micro]
    expect = expected_row_order(len(micro), kwargs["per_device_train_batch_size"], n_rows, kwargs["seed"])
    assert got == expect, (got, expect)
    (case / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
    np.savez_compressed(case / "batch0.npz", **micro[0]["batch"])
    return micro, warning_lines(caught), initial, collator_class


def print_log(name: str, micro: list, log_history: list) -> None:
    print(f"[{name}] rows per micro-batch: {[m['rows'] for m in micro]}")
    for e in log_history:
        print("   ", {k: v for k, v in e.items() if k not in sft_ref.TIMING_KEYS})


def close(mine: dict, logged: dict, rtol: float = 2e-5) -> None:
    for k, v in mine.items():
        assert abs(v - logged[k]) <= rtol * max(1.0, abs(v)), (k, v, logged[k])


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def sft_check_first_step(ckpt: Path, freeze: bool, micro: list, ga: int, logged: dict) -> dict:
    """The first logged step from the captured micro-batches with the plain full-logits forward of the initial model
    (formulas of tests/fixtures/sft/README.md), asserted equal to TRL's log."""
    model, _ = load_tiny(ckpt)
    if freeze:
        freeze_vision_(model)
    model.eval()
    batches = [{k: torch.from_numpy(v) for k, v in m["batch"].items()} for m in micro[:ga]]
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    nll_sum, ent_means, acc_means, ntok = 0.0, [], [], 0
    for b in batches:
        out = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False)
        logits, labels = out.logits[:, :-1], b["labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, -1)
        nll = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum()
        (nll / n_total).backward()
        nll_sum += nll.item()
        ent = -(logp.exp() * logp).sum(-1)
        ent_means.append(((ent * mask).sum() / mask.sum()).item())
        acc_means.append(((logits.argmax(-1) == labels) & mask).sum().item() / mask.sum().item())
        ntok += int(b["attention_mask"].sum())
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    mine = {"loss": nll_sum / n_total, "entropy": sum(ent_means) / len(ent_means),
            "mean_token_accuracy": sum(acc_means) / len(acc_means), "num_tokens": float(ntok),
            "grad_norm": torch.sqrt(sum((g ** 2).sum() for g in grads)).item()}
    close(mine, logged)
    return mine


def run_sft_case(name: str, spec: dict, ckpt: Path, answers: list[str]) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    case = fresh_dir(OUT / "sft" / name)
    model, processor = load_tiny(ckpt)
    if spec["freeze_vision"]:
        freeze_vision_(model)
    rows, described = sft_ref.make_rows("messages", case / "images", answers)
    (case / "rows.json").write_text(json.dumps(described, indent=2) + "\n")
    kwargs = {**sft_ref.COMMON_ARGS, **spec["args"]}
    (case / "args.json").write_text(json.dumps(kwargs, indent=2, sort_keys=True) + "\n")
    tmp_out = tempfile.mkdtemp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=tmp_out, **kwargs),
                             train_dataset=Dataset.from_list(rows), processing_class=processor)
    init_warnings = warning_lines(caught)
    assert trainer.model is model
    micro, train_warnings, initial, collator_class = train_and_record(case, trainer, sft_ref.row_id,
                                                                      len(sft_ref.ROWS), kwargs)
    log_history = trainer.state.log_history
    recomputed = sft_check_first_step(ckpt, spec["freeze_vision"], micro, kwargs["gradient_accumulation_steps"],
                                      log_history[0])
    update_norms = write_final(case, model, initial, micro[0]["batch"]["input_ids"][0])
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert all(update_norms[n] == 0.0 for n in frozen), "a frozen parameter moved"
    assert all(update_norms[n] > 0.0 for n in update_norms if n not in frozen), "a trainable parameter did not move"
    steps = {
        "versions": versions(),
        "freeze": FREEZE_VISION_CODE if spec["freeze_vision"] else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_names": frozen,
        "tied_after_training": tie_facts(model),
        "model_training_after": bool(model.training),
        "model_accepts_loss_kwargs": bool(trainer.model_accepts_loss_kwargs),
        "loss_is_scaled_for_ga": getattr(trainer, "loss_is_scaled_for_ga", None),
        "completion_only_loss": bool(trainer.completion_only_loss),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
        "max_length": trainer.args.max_length,
        **optimizer_facts(trainer),
        "collator_class": collator_class,
        "first_step_recomputed_from_full_logits": recomputed,
        "micro_batches": [{"rows": m["rows"], "label_tokens_shifted": int((m["batch"]["labels"][:, 1:] != -100).sum()),
                           "attention_mask_sum": int(m["batch"]["attention_mask"].sum())} for m in micro],
        "warnings_init": init_warnings,
        "warnings_train": train_warnings,
    }
    (case / "steps.json").write_text(json.dumps(steps, indent=2, default=str) + "\n")
    shutil.rmtree(tmp_out, ignore_errors=True)
    normalize_perms(case)
    print_log(f"sft/{name}", micro, log_history)


def run_sft(ckpt: Path) -> None:
    clean_dir_keep_readme(OUT / "sft")
    model, processor = load_tiny(ckpt)
    tmp = Path(tempfile.mkdtemp())
    answers = sft_ref.extend_answers(model, processor, tmp)  # the base model's own greedy continuation
    shutil.rmtree(tmp)
    print("[sft] answers:", answers)
    del model
    for name, spec in SFT_CASES.items():
        run_sft_case(name, spec, ckpt, answers)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_check_first_step(ckpt: Path, batch: dict, beta: float, logged: dict) -> dict:
    """Step 1 (policy == reference == the initial model) with a plain forward, sigmoid loss; asserted equal to
    TRL's log (formulas of tests/fixtures/dpo/README.md)."""
    model, _ = load_tiny(ckpt)
    model.eval()
    b = {k: torch.from_numpy(v) for k, v in batch.items()}
    s = dpo_ref.full_logits_stats(model, b)
    B = b["input_ids"].shape[0] // 2
    logps = s["logps"]
    ref = logps.detach()
    d = (logps[:B] - ref[:B]) - (logps[B:] - ref[B:])
    loss = -torch.nn.functional.logsigmoid(beta * d).mean()
    loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    m = s["mask"]
    mine = {
        "loss": loss.item(), "grad_norm": torch.sqrt(sum((g ** 2).sum() for g in grads)).item(),
        "logps/chosen": logps[:B].mean().item(), "logps/rejected": logps[B:].mean().item(),
        "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
        "entropy": ((s["ent"] * m).sum() / m.sum()).item(),
        "logits/chosen": s["mean_logits"][:B][m[:B]].mean().item(),
        "logits/rejected": s["mean_logits"][B:][m[B:]].mean().item(),
        "mean_token_accuracy": (s["top1"][:B] & m[:B]).sum().item() / m[:B].sum().item(),
        "num_tokens": float(b["attention_mask"].sum()),
    }
    close(mine, logged)
    assert mine["loss"] == math.log(2) or abs(mine["loss"] - math.log(2)) < 1e-7
    return mine


def run_dpo_case(name: str, spec: dict, ckpt: Path) -> None:
    from datasets import Dataset
    from safetensors.torch import load_file
    from trl import DPOConfig, DPOTrainer

    case = fresh_dir(OUT / "dpo" / name)
    model, processor = load_tiny(ckpt)
    rows, described = dpo_ref.make_rows(case / "images")
    (case / "rows.json").write_text(json.dumps(described, indent=2) + "\n")
    kwargs = {**dpo_ref.COMMON_ARGS, **spec}
    (case / "args.json").write_text(json.dumps(kwargs, indent=2, sort_keys=True) + "\n")
    tmp_out = tempfile.mkdtemp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(output_dir=tmp_out, **kwargs),
                             train_dataset=Dataset.from_list(rows), processing_class=processor)
    init_warnings = warning_lines(caught)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else None
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()} if ref is not None else {}
    micro, train_warnings, initial, collator_class = train_and_record(case, trainer, dpo_ref.row_id,
                                                                      len(dpo_ref.ROWS), kwargs)
    log_history = trainer.state.log_history
    recomputed = dpo_check_first_step(ckpt, micro[0]["batch"], kwargs["beta"], log_history[0])
    update_norms = write_final(case, model, initial, micro[0]["batch"]["input_ids"][0])
    assert all(v > 0.0 for v in update_norms.values()), "a parameter did not move"
    ckpt_sd = load_file(str(ckpt / "model.safetensors"))
    beta = kwargs["beta"]
    steps = {
        "versions": versions(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tied_after_training": tie_facts(model),
        "reference": {
            "trainer_ref_model_is_none": trainer.ref_model is None,
            "ref_model_class": type(ref).__name__ if ref is not None else None,
            "ref_model_is_policy": ref is model,
            "ref_name_or_path_is_checkpoint_dir": ref is not None and Path(ref.config._name_or_path) == ckpt,
            "ref_dtype": str(ref.dtype) if ref is not None else None,
            "ref_attn_implementation": ref.config._attn_implementation if ref is not None else None,
            "ref_training_mode": bool(ref.training) if ref is not None else None,
            "ref_params_requires_grad": sorted({p.requires_grad for p in ref.parameters()}) if ref else None,
            "ref_tied": tie_facts(ref) if ref is not None else None,
            "ref_equals_checkpoint": all(torch.equal(p.detach(), ckpt_sd[n]) for n, p in ref.named_parameters())
            if ref is not None else None,
            "ref_unchanged_by_training": all(torch.equal(ref_before[n], p.detach()) for n, p in ref.named_parameters())
            if ref is not None else None,
        },
        "reference_logps_mean_from_log": [
            {"step": e["step"], "ref_chosen": e["logps/chosen"] - e["rewards/chosen"] / beta,
             "ref_rejected": e["logps/rejected"] - e["rewards/rejected"] / beta}
            for e in log_history if "logps/chosen" in e
        ],
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
        "disable_dropout": bool(trainer.args.disable_dropout),
        "max_length": trainer.args.max_length,
        "loss_type": trainer.loss_types,
        "loss_weights": trainer.loss_weights,
        "beta": trainer.beta,
        "max_grad_norm": trainer.args.max_grad_norm,
        **optimizer_facts(trainer),
        "collator_class": collator_class,
        "first_step_recomputed_from_full_logits": recomputed,
        "micro_batches": [{"rows": m["rows"],
                           "completion_tokens_per_row": m["batch"]["completion_mask"].sum(1).tolist(),
                           "attention_mask_sum": int(m["batch"]["attention_mask"].sum())} for m in micro],
        "warnings_init": init_warnings,
        "warnings_train": train_warnings,
    }
    (case / "steps.json").write_text(json.dumps(steps, indent=2, default=str) + "\n")
    shutil.rmtree(tmp_out, ignore_errors=True)
    normalize_perms(case)
    print_log(f"dpo/{name}", micro, log_history)
    print("    reference:", steps["reference"])


def run_dpo(ckpt: Path) -> None:
    clean_dir_keep_readme(OUT / "dpo")
    for name, spec in DPO_CASES.items():
        run_dpo_case(name, spec, ckpt)


def main() -> None:
    parts = sys.argv[1:] or ["grads", "sft", "dpo"]
    assert set(parts) <= {"grads", "sft", "dpo"}, parts
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    ckpts = {"tied": build_tiny_smolvlm(tmp / "smolvlm-tiny"), "untied": build_untied(tmp / "smolvlm-tiny-untied")}
    if "grads" in parts:
        run_grads(ckpts)
    if "sft" in parts:
        run_sft(ckpts["tied"])
    if "dpo" in parts:
        run_dpo(ckpts["tied"])
    normalize_perms(OUT)
    shutil.rmtree(tmp)
    print(f"[full_ft] folder size {dir_size(OUT)} bytes")


if __name__ == "__main__":
    main()
