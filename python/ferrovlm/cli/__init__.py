"""The ``ferrovlm`` command (``python -m ferrovlm`` too), TRL's CLI for ferrovlm:

    ferrovlm sft ...        supervised fine-tuning, TRL's `trl sft` flags
    ferrovlm dpo ...        preference optimization, TRL's `trl dpo` flags
    ferrovlm generate ...   answer a prompt about images, streamed
    ferrovlm export ...     merged safetensors, or GGUF + mmproj for llama.cpp
    ferrovlm demo ...       the README's main job

``ferrovlm <command> --help`` lists a command's flags. Bad flags or values exit with status 2 (argparse's
message), errors while running (a bad dataset row, a missing checkpoint) with status 1 and one line naming what is
wrong, Ctrl-C with status 130."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..errors import FerroVLMError
from .args import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config
from .parser import TrlParser

COMMANDS = {
    "sft": "Supervised fine-tuning (TRL's `trl sft` flags).",
    "dpo": "Direct preference optimization (TRL's `trl dpo` flags).",
    "generate": "Answer a prompt about images with a model and its adapter, streamed to stdout.",
    "export": "Write a model with its adapter merged: safetensors, or GGUF + mmproj for llama.cpp.",
    "demo": "The README's main job: build a small VLM from SmolLM2 and teach it about generated images.",
}


def _top_parser() -> argparse.ArgumentParser:
    from .. import __version__

    epilog = "commands:\n" + "\n".join(f"  {k:<10}{v}" for k, v in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="ferrovlm", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Fine-tune and run SmolVLM / Idefics3 models (TRL's command line).",
                                 epilog=epilog + "\n\n`ferrovlm <command> --help` lists a command's flags.")
    ap.add_argument("--version", action="version", version=f"ferrovlm {__version__}")
    ap.add_argument("command", choices=list(COMMANDS), metavar="command", help="{" + ",".join(COMMANDS) + "}")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Runs ``ferrovlm <command> <flags>``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        if not argv or argv[0] in ("-h", "--help"):
            top.print_help()
            return 0
        top.parse_args(argv[:1])  # --version, or an error for an unknown option
    command, rest = argv[0], argv[1:]
    top.parse_args([command])  # an unknown command: argparse's "invalid choice" (exit status 2)
    prog = f"ferrovlm {command}"
    try:
        return _run(command, rest, prog)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (FerroVLMError, OSError, ValueError, KeyError, NotImplementedError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


def _run(command: str, rest: list[str], prog: str) -> int:
    if command in ("sft", "dpo"):
        from .train import run

        return run(command, rest, prog)
    if command == "generate":
        from .infer import run_generate

        return run_generate(rest, prog)
    if command == "export":
        from .infer import run_export

        return run_export(rest, prog)
    from .. import demo

    argv0 = sys.argv[0]
    sys.argv[0] = prog  # the demo's own parser names itself after argv[0]
    try:
        settings = demo.parse(rest)
    finally:
        sys.argv[0] = argv0
    demo.main(settings)
    return 0


__all__ = ["main", "TrlParser", "ScriptArguments", "ModelConfig", "get_peft_config", "get_quantization_config"]
