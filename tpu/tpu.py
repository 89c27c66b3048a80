#!/usr/bin/env python3
"""Create a Cloud TPU VM slice, install omni on every worker, launch a run on all workers, delete the slice.

    python tpu/tpu.py create --name N --zone Z --accelerator v4-32 [--spot] [--queued]
    python tpu/tpu.py setup  --name N --zone Z [--repo URL [--ref REF]]
    python tpu/tpu.py launch --name N --zone Z --command "python -m omni.main --config=configs/gpt3_xl.py"
    python tpu/tpu.py logs   --name N --zone Z [--run RUN]
    python tpu/tpu.py delete --name N --zone Z [--queued]

--dry-run prints each command, one shell-quoted line per command, and runs nothing; other tools (a sweep
runner) read those lines. Every command is built by a pure function below, so tests check them offline.
Standard library only: this runs on a laptop that has gcloud but not omni's dependencies.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

Cmd = list[str]

REPO_ROOT = Path(__file__).resolve().parent.parent
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
# Paths on each worker. The venv gives every worker a `python` (Ubuntu images only ship `python3`), so the
# user's `python -m omni.main ...` runs unchanged. Logs live under runs/, which setup's copy never ships.
REMOTE_DIR = "~/omni"
REMOTE_VENV = "~/omni-venv"
REMOTE_LOGS = "~/omni/runs/tpu_logs"
LOCAL_LOGS = "runs/tpu_logs"
# What setup's copy of the local checkout leaves out: history, local runs and environments, build debris.
COPY_EXCLUDES = [".git", "runs", ".venv", "build", "__pycache__", "*.egg-info", ".pytest_cache"]

# Generation as users write it -> (gcloud's accelerator-type prefix, TPU software version for JAX), from
# https://cloud.google.com/tpu/docs/runtimes ("v4 and earlier: tpu-ubuntu2204-base"). v5e is spelled
# v5litepod in gcloud, and its number counts chips where v2-v4 and v5p count TensorCores.
GENERATIONS = {
    "v2": ("v2", "tpu-ubuntu2204-base"),
    "v3": ("v3", "tpu-ubuntu2204-base"),
    "v4": ("v4", "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5litepod": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "v2-alpha-tpuv6e"),
}
SIMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def accelerator_type(accelerator: str) -> tuple[str, str]:
    """'v5e-256' -> ('v5litepod-256', 'v2-alpha-tpuv5-lite'): gcloud's accelerator type and runtime version."""
    generation, _, size = accelerator.lower().rpartition("-")
    if generation not in GENERATIONS or not size.isdigit() or int(size) == 0:
        known = ", ".join(f"{g}-N" for g in GENERATIONS)
        raise ValueError(f"unknown accelerator {accelerator!r}; expected one of {known} (e.g. v4-32, v5e-256)")
    prefix, runtime = GENERATIONS[generation]
    return f"{prefix}-{int(size)}", runtime


@dataclass(frozen=True)
class Slice:
    name: str
    zone: str
    project: Optional[str] = None

    def where(self) -> Cmd:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def ssh_all(self, script: str, *flags: str) -> Cmd:
        """Run one shell script on every worker at once (gcloud starts them concurrently)."""
        return [*TPU_VM, "ssh", self.name, *self.where(), "--worker=all", *flags, "--command", script]


def create_commands(tpu: Slice, accelerator: str, spot: bool = False, queued: bool = False,
                    runtime: Optional[str] = None) -> list[Cmd]:
    """One gcloud command: a TPU VM now (fails if capacity is short), or a queued request (waits for it)."""
    accel, default_runtime = accelerator_type(accelerator)
    runtime = runtime or default_runtime
    spot_flag = ["--spot"] if spot else []
    if queued:
        # The queued resource and its node share the slice's name, so every later command finds the node.
        return [[*QUEUED, "create", tpu.name, f"--node-id={tpu.name}", *tpu.where(),
                 f"--accelerator-type={accel}", f"--runtime-version={runtime}", *spot_flag]]
    return [[*TPU_VM, "create", tpu.name, *tpu.where(), f"--accelerator-type={accel}",
             f"--version={runtime}", *spot_flag]]


def install_script() -> str:
    """Worker-side: a venv (installing python3-venv if the image lacks it), then jax[tpu] and omni."""
    make_venv = f"python3 -m venv {REMOTE_VENV}"
    pip = f"{REMOTE_VENV}/bin/pip"
    return " && ".join([
        f"({make_venv} || (sudo apt-get update -q && sudo apt-get install -y -q python3-venv && {make_venv}))",
        f"{pip} install -q -U pip",
        f'{pip} install -U "jax[tpu]"',
        f"{pip} install -e {REMOTE_DIR}",
    ])


def setup_commands(tpu: Slice, repo: Optional[str] = None, ref: Optional[str] = None,
                   source: Path = REPO_ROOT) -> list[Cmd]:
    """Put the code on every worker and install it there.

    Without --repo the local working tree is shipped as it is, uncommitted edits included (what you tested
    is what runs); with --repo every worker clones or updates its checkout and checks out ref.
    """
    if repo is None:
        archive = f"/tmp/omni-{tpu.name}.tar.gz"
        excludes = [f"--exclude={pattern}" for pattern in COPY_EXCLUDES]
        fetch = f"mkdir -p {REMOTE_DIR} && tar -xzf ~/omni.tar.gz -C {REMOTE_DIR}"
        return [["tar", "-czf", archive, *excludes, "-C", str(source), "."],
                [*TPU_VM, "scp", archive, f"{tpu.name}:omni.tar.gz", *tpu.where(), "--worker=all"],
                tpu.ssh_all(f"{fetch} && {install_script()}")]
    # Never delete an existing checkout: its runs/ holds checkpoints and logs.
    fetch = (f"(test -d {REMOTE_DIR}/.git || git clone {shlex.quote(repo)} {REMOTE_DIR}) && "
             f"git -C {REMOTE_DIR} fetch origin && "
             f"git -C {REMOTE_DIR} checkout --force {shlex.quote(ref or 'origin/HEAD')}")
    return [tpu.ssh_all(f"{fetch} && {install_script()}")]


def run_script(command: str, run: str) -> str:
    """Worker-side: run the user's command in the checkout and tee it to a log named by the worker's host."""
    log_dir = f"{REMOTE_LOGS}/{run}"
    return " && ".join([
        f"cd {REMOTE_DIR}",
        f". {REMOTE_VENV}/bin/activate",
        "export PYTHONUNBUFFERED=1",  # through a pipe Python would otherwise hold log lines back
        f"mkdir -p {log_dir}",
        "set -o pipefail",  # the exit status is the command's, not tee's
        # Append: rerunning the same command resumes from the checkpoint and continues the same log.
        f"{{ {command} ; }} 2>&1 | tee -a {log_dir}/$(hostname).log",
    ])


def launch_commands(tpu: Slice, command: str, run: str) -> list[Cmd]:
    """Start the command on all workers at once; gcloud writes worker W's stream to LOCAL_LOGS/name/run/W.log.

    jax.distributed needs no flags here: on a TPU VM slice omni detects the coordinator and its process id.
    """
    if not command.strip():
        raise ValueError("--command is empty")
    if not SIMPLE_NAME.match(run):
        raise ValueError(f"--run {run!r} must be letters, digits, '.', '_' or '-'")
    local_dir = f"{LOCAL_LOGS}/{tpu.name}/{run}"
    return [["mkdir", "-p", local_dir],
            tpu.ssh_all(run_script(command, run), f"--output-directory={local_dir}")]


def logs_commands(tpu: Slice, run: Optional[str] = None, lines: int = 50) -> list[Cmd]:
    """Print the last lines of every worker's own log, each under a '==> ...host.log <==' header."""
    if run is None:  # the newest run on each worker; launch starts them all together
        pattern = f"$(ls -td {REMOTE_LOGS}/*/ | head -n 1)*.log"
    elif SIMPLE_NAME.match(run):
        pattern = f"{REMOTE_LOGS}/{run}/*.log"
    else:
        raise ValueError(f"--run {run!r} must be letters, digits, '.', '_' or '-'")
    return [tpu.ssh_all(f"tail -v -n {lines} {pattern}")]


def delete_commands(tpu: Slice, queued: bool = False) -> list[Cmd]:
    """Delete without a prompt; a queued resource is deleted with its node (--force)."""
    if queued:
        return [[*QUEUED, "delete", tpu.name, *tpu.where(), "--force", "--quiet"]]
    return [[*TPU_VM, "delete", tpu.name, *tpu.where(), "--quiet"]]


def run_commands(commands: list[Cmd], dry_run: bool) -> None:
    """Print (dry run) or run each command in order, stopping at the first that fails."""
    for command in commands:
        line = shlex.join(command)
        if dry_run:
            print(line)
            continue
        print(f"+ {line}", file=sys.stderr, flush=True)
        try:
            returncode = subprocess.run(command).returncode
        except FileNotFoundError:
            sys.exit(f"tpu.py: error: {command[0]} not found on PATH (gcloud comes with the Google Cloud CLI)")
        if returncode != 0:
            sys.exit(f"tpu.py: error: exit status {returncode} from: {line}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    common.add_argument("--project", help="Google Cloud project; default: gcloud's configured project")
    common.add_argument("--accelerator", help="v4-32, v5e-256 (= v5litepod-256), v5p-128, v6e-64, ...")
    common.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")
    create = sub.add_parser("create", parents=[common], help="create the slice")
    create.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, may be reclaimed at any time")
    create.add_argument("--queued", action="store_true", help="queue the request until capacity frees up")
    create.add_argument("--runtime-version", help="override the TPU software version picked for --accelerator")
    setup = sub.add_parser("setup", parents=[common], help="copy or clone omni to every worker and install it")
    setup.add_argument("--repo", help="git URL every worker clones; default: copy the local working tree")
    setup.add_argument("--ref", help="with --repo: commit, tag or origin/BRANCH (default origin/HEAD)")
    launch = sub.add_parser("launch", parents=[common], help="run a command on all workers, gather the logs")
    launch.add_argument("--command", required=True, help='e.g. "python -m omni.main --config=configs/gpt3_xl.py"')
    launch.add_argument("--run", help="run id naming the log directories; default: UTC time now")
    logs = sub.add_parser("logs", parents=[common], help="print the tail of every worker's log")
    logs.add_argument("--run", help="run id printed by launch; default: the newest")
    logs.add_argument("--lines", type=int, default=50)
    delete = sub.add_parser("delete", parents=[common], help="delete the slice")
    delete.add_argument("--queued", action="store_true", help="the slice was created with --queued")
    return p


def commands_for(args: argparse.Namespace) -> list[Cmd]:
    tpu = Slice(args.name, args.zone, args.project)
    if args.accelerator:
        accelerator_type(args.accelerator)  # reject a misspelt accelerator whatever the action
    if args.action == "create":
        if not args.accelerator:
            raise ValueError("create needs --accelerator (e.g. v4-32)")
        return create_commands(tpu, args.accelerator, args.spot, args.queued, args.runtime_version)
    if args.action == "setup":
        return setup_commands(tpu, args.repo, args.ref)
    if args.action == "launch":
        return launch_commands(tpu, args.command, args.run or time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    if args.action == "logs":
        return logs_commands(tpu, args.run, args.lines)
    return delete_commands(tpu, args.queued)


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    try:
        commands = commands_for(args)
    except ValueError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.action == "launch" and not args.dry_run:  # gcloud sends the workers' output to files, not here
        print(f"worker W's output goes to {commands[0][-1]}/W.log as it runs (tail -f it)", file=sys.stderr)
    run_commands(commands, args.dry_run)
    if args.action == "create" and args.queued and not args.dry_run:
        describe = shlex.join([*QUEUED, "describe", args.name, f"--zone={args.zone}"])
        print(f"queued: run setup once `{describe}` shows state ACTIVE", file=sys.stderr)


if __name__ == "__main__":
    main()
