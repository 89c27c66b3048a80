"""The `omni` console script (omni/cli.py, setup.py's entry point): each command is its `python -m` form."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli
from omni import cli

# The script pip installs beside this interpreter; `python -m omni.cli` where it is not installed.
SCRIPT = os.path.join(os.path.dirname(sys.executable), "omni")
OMNI = [SCRIPT] if os.path.isfile(SCRIPT) else [sys.executable, "-m", "omni.cli"]


def omni(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*OMNI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command():
    out = omni("--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["train", "sample", "chat", "serve", "hf", "sweep", "tpu"]


def test_unknown_command_is_one_line_and_exit_2():
    out = omni("trian")
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1 and "'trian'" in out.stderr


def test_train_is_python_m_omni_main():
    # gpt3_xl's analytic dry run: a few seconds, and the whole report is compared.
    args = ["--config=configs/gpt3_xl.py", "--config.dry_run=True", "--config.topology="]
    ours, theirs = omni("train", *args), run_cli(args, timeout=300)
    assert ours.returncode == theirs.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout == theirs.stdout and '"params": ' in ours.stdout


@pytest.mark.parametrize("command,module_args", [
    (["sample", "--config.init_from=runs/none"],
     ["omni.main", "--config=configs/sample.py", "--config.init_from=runs/none"]),
    (["hf", "import", "/no/such/dir", "runs/none"], ["omni.interop.hf", "import", "/no/such/dir", "runs/none"]),
    (["tpu", "create", "--name", "x"], ["tpu/tpu.py", "create", "--name", "x"]),  # a script, not a module
])
def test_other_commands_answer_as_their_modules(command, module_args):
    """Arguments that each program refuses at its first check: the same message and exit code either way
    (a module command with arguments before the user's, one without, and a script)."""
    ours = omni(*command)
    python = [sys.executable] if module_args[0].endswith(".py") else [sys.executable, "-m"]
    theirs = subprocess.run([*python, *module_args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ours.returncode == theirs.returncode != 0
    assert ours.stdout == theirs.stdout
    assert ours.stderr.splitlines()[-1] == theirs.stderr.splitlines()[-1]


def test_every_command_runs_a_program_that_exists():
    """The commands not run above (chat, sweep) run the same way; their modules and scripts must exist."""
    for name, command in cli.COMMANDS.items():
        found = os.path.isfile(command.module) if command.module.endswith(".py") else importlib.util.find_spec(
            command.module) is not None
        assert found, f"omni {name}: {command.module} not found"
