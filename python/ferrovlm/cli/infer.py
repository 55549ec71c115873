"""``ferrovlm generate`` (a prompt and images, the answer streamed to stdout) and ``ferrovlm export`` (a model
with its adapter merged, as safetensors in transformers' layout or as GGUF files for llama.cpp)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .parser import HelpFormatter, string_to_bool

DTYPES = ["auto", "bfloat16", "float16", "float32"]


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _add_model_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model_name_or_path", default=None,
                    help="A checkpoint folder or hub id (default with --adapter: the base model named in its "
                         "adapter_config.json).")
    ap.add_argument("--adapter", default=None,
                    help="A LoRA adapter folder (PEFT's files, e.g. the --output_dir of `ferrovlm sft --use_peft`).")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="The dtype the model is loaded in "
                    "('auto': the checkpoint's).")
    ap.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=False,
                    metavar="{true,false}", help="Quantize the base model to 4 bit (nf4) while loading.")
    ap.add_argument("--load_in_8bit", type=string_to_bool, nargs="?", const=True, default=False,
                    metavar="{true,false}", help="Quantize the base model to 8 bit (LLM.int8) while loading.")


def _base_name(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    if args.model_name_or_path:
        return args.model_name_or_path
    if args.adapter:
        cfg = Path(args.adapter) / "adapter_config.json"
        try:
            base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError) as err:
            parser.error(f"--adapter: cannot read {cfg}: {err}")
        if base:
            return str(base)
        parser.error(f"--adapter: {cfg} names no base model; pass --model_name_or_path")
    parser.error("the following arguments are required: --model_name_or_path (or --adapter)")


def load(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, Any, bool]:
    """(model, processor or tokenizer, whether it is a vision-language model); the adapter attached."""
    from ..modeling import AutoModelForCausalLM, AutoModelForImageTextToText
    from ..peft import PeftModel
    from ..processing import AutoProcessor
    from ..quantization_config import BitsAndBytesConfig
    from ..tokenization import AutoTokenizer

    if args.load_in_4bit and args.load_in_8bit:
        parser.error("--load_in_4bit and --load_in_8bit cannot be used together")
    name = _base_name(args, parser)
    kwargs: dict[str, Any] = {"dtype": args.dtype}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    elif args.load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    from ..hub import resolve_pretrained

    folder = resolve_pretrained(name)
    is_vlm = json.loads((Path(folder) / "config.json").read_text()).get("model_type") != "llama"
    model = (AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM).from_pretrained(name, **kwargs)
    processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(name)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    return model, processor, is_vlm


# -- generate --------------------------------------------------------------------------------------------------
def generate_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Answer a prompt about images with a model (and its LoRA adapter); the answer is streamed to stdout."),
        epilog="example:\n  ferrovlm generate --adapter out --image cat.png --prompt 'What is in the picture?'")
    _add_model_flags(ap)
    ap.add_argument("--image", nargs="+", action="extend", default=[], metavar="PATH",
                    help="Image files or URLs, in the order the prompt refers to them (repeatable).")
    ap.add_argument("--prompt", required=True, help="The user's message.")
    ap.add_argument("--system", default=None, help="A system message.")
    ap.add_argument("--max_new_tokens", type=_positive_int, default=128, help="The most tokens to generate.")
    ap.add_argument("--do_sample", type=string_to_bool, nargs="?", const=True, default=False,
                    metavar="{true,false}", help="Sample instead of greedy decoding.")
    ap.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    ap.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold.")
    ap.add_argument("--top_k", type=int, default=50, help="Sample among the k likeliest tokens.")
    ap.add_argument("--repetition_penalty", type=float, default=1.0, help="Penalty on tokens already present.")
    ap.add_argument("--seed", type=int, default=None, help="Seeds sampling.")
    return ap


def run_generate(argv: list[str], prog: str) -> int:
    from ..generation import set_seed
    from ..image_processing import load_image
    from ..streamers import TextStreamer

    parser = generate_parser(prog)
    args = parser.parse_args(argv)
    for p in args.image:
        if not p.startswith(("http://", "https://")) and not Path(p).is_file():
            parser.error(f"--image: no such file: {p}")
    model, processor, is_vlm = load(args, parser)
    if args.image and not is_vlm:
        parser.error("--image: this model is a language model without a vision tower")
    images = [load_image(p) for p in args.image]
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    messages.append({"role": "user", "content": content if is_vlm else args.prompt})
    if is_vlm:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=images or None, return_tensors="np")
    elif getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(prompt, return_tensors="np", add_special_tokens=False)
    else:  # a base language model without a chat template continues the text
        inputs = processor((args.system + "\n" if args.system else "") + args.prompt, return_tensors="np")
    if args.seed is not None:
        set_seed(args.seed)
    model.eval()
    streamer = TextStreamer(processor, skip_prompt=True, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, streamer=streamer)  # ends the line itself
    return 0


# -- export ----------------------------------------------------------------------------------------------------
def export_parser(prog: str) -> argparse.ArgumentParser:
    from ..gguf import ALIASES, QUANTIZATION_METHODS

    ap = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Write a model with its LoRA adapter merged: safetensors in transformers' layout (with the processor "
        "files), or GGUF files for llama.cpp (the text model, and the vision tower as mmproj-*.gguf)."),
        epilog="examples:\n  ferrovlm export --adapter out --output_dir merged\n"
               "  ferrovlm export --adapter out --output_dir gguf --format gguf --quantization_method q8_0")
    _add_model_flags(ap)
    ap.add_argument("--output_dir", required=True, help="The folder the files are written to.")
    ap.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors", help="What to write.")
    ap.add_argument("--quantization_method", nargs="+", default=None, metavar="METHOD",
                    choices=[*QUANTIZATION_METHODS, *ALIASES],
                    help=f"GGUF only: one file per method ({', '.join(QUANTIZATION_METHODS)}; Unsloth's "
                         f"{', '.join(ALIASES)}); default f16.")
    return ap


def run_export(argv: list[str], prog: str) -> int:
    from ..peft import PeftModel

    parser = export_parser(prog)
    args = parser.parse_args(argv)
    if args.quantization_method and args.format != "gguf":
        parser.error("--quantization_method applies to --format gguf only")
    out = Path(args.output_dir)
    if out.is_file():
        parser.error(f"--output_dir {out} is a file")
    model, processor, _ = load(args, parser)
    if args.format == "gguf":
        paths = model.save_pretrained_gguf(out, tokenizer=processor, quantization_method=args.quantization_method
                                           or "f16")
    else:
        merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
        merged.save_pretrained(out)
        processor.save_pretrained(out)
        paths = sorted(str(p) for p in out.iterdir())
    for p in paths:
        print(p)
    return 0


__all__ = ["generate_parser", "export_parser", "run_generate", "run_export"]
