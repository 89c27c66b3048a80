"""The `omni` command: one name for omni's programs, each run exactly as `python -m MODULE` runs it.

    omni train --config=configs/tiny.py [--config.KEY=VALUE ...] [--workdir=DIR]    python -m omni.main ...
    omni sample --config.init_from=runs/tiny --config.prompt="def main("            ... --config=configs/sample.py
    omni chat --workdir=runs/sft_tiny                                                python -m omni.chat ...
    omni serve --workdir=runs/sft_tiny [--workdir=DIR ...]                           python -m omni.serve ...
    omni hf import HF_DIR WORKDIR | omni hf export WORKDIR HF_DIR                   python -m omni.interop.hf ...
    omni sweep experiments/scaling.py [--dry-run]                                    python -m omni.sweep ...
    omni tpu create|setup|launch|logs|delete --name N --zone Z ...                   python tpu/tpu.py ...

Everything after the command goes to the program unchanged, so `omni train --help` is omni.main's own help.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import NamedTuple

# configs/ and tpu/ sit beside the omni package in the source tree (an editable install), as `omni train` expects.
SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(SOURCE_TREE, "configs", "sample.py")
TPU_SCRIPT = os.path.join(SOURCE_TREE, "tpu", "tpu.py")  # a script: it runs on a laptop without omni's dependencies


class Command(NamedTuple):
    module: str  # a module run as `python -m`, or a script's path
    preset: tuple[str, ...]  # arguments that come before the user's
    summary: str


COMMANDS = {
    "train": Command("omni.main", (), "run a config's stage (pretrain, sft, rm, ppo, eval, ...): --config=FILE"),
    "sample": Command("omni.main", (f"--config={SAMPLE_CONFIG}",),
                      "completions from a workdir: train's flags with configs/sample.py preloaded"),
    "chat": Command("omni.chat", (), "chat with a trained model: --workdir=DIR"),
    "serve": Command("omni.serve", (), "an OpenAI-compatible HTTP API over workdirs: --workdir=DIR [--port=8000]"),
    "hf": Command("omni.interop.hf", (), "import|export Hugging Face GPT-2 checkpoints"),
    "sweep": Command("omni.sweep", (), "run a sweep file's runs and gather their results table"),
    "tpu": Command(TPU_SCRIPT, (), "create a Cloud TPU VM slice, set it up, launch on it, read logs, delete it"),
}


def _python(command: Command) -> str:
    if command.module.endswith(".py"):
        return f"python {os.path.relpath(command.module, SOURCE_TREE)}"
    return f"python -m {command.module}"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {c.summary} ({_python(c)})" for name, c in COMMANDS.items()]
    return "\n".join(["usage: omni COMMAND [ARGS ...]", "", "commands:", *lines,
                      "", "`omni COMMAND --help` shows that command's own flags."])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"omni: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    command = COMMANDS[name]
    # As `python -m`: the module runs as __main__ and reads its flags from sys.argv (argv[0] becomes its path).
    sys.argv = [sys.argv[0], *command.preset, *args]
    if command.module.endswith(".py"):
        runpy.run_path(command.module, run_name="__main__")
    else:
        runpy.run_module(command.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
