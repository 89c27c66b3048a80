#!/usr/bin/env python3
"""Write and submit a SLURM batch script that runs omni on a GPU cluster, one process per node (or per GPU).

    python tpu/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --command "python -m omni.main --config=configs/gpt3_xl.py" [--dry-run]

Inside the job, srun starts the processes and each one joins jax.distributed through the first node of the
allocation: --config.distributed.coordinator=FIRST_HOST:PORT, num_processes=$SLURM_NTASKS,
process_id=$SLURM_PROCID. --dry-run prints the script and then the sbatch command, and writes nothing.
Standard library only, like tpu.py.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SCRIPT_DIR = "runs/slurm"  # ignored by git; also where each job's output file goes


@dataclass(frozen=True)
class Job:
    nodes: int
    gpus_per_node: int
    partition: str
    time: str
    command: str
    port: int = 12355
    per_gpu: bool = False
    name: Optional[str] = None
    account: Optional[str] = None
    setup: Optional[str] = None  # shell line run before srun, e.g. "source .venv/bin/activate"

    def job_name(self) -> str:
        """omni-CONFIG from the command's --config=configs/CONFIG.py, unless given."""
        found = re.search(r"--config[= ](\S*?)([^/\s]+)\.py\b", self.command)
        return self.name or (f"omni-{found.group(2)}" if found else "omni")


def check(job: Job) -> None:
    """Reject what sbatch would only reject after queueing, or what would start a broken run."""
    if not job.command.strip():
        raise ValueError("--command is empty")
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ValueError(f"--nodes ({job.nodes}) and --gpus-per-node ({job.gpus_per_node}) must be >= 1")
    if not 1024 <= job.port <= 65535:
        raise ValueError(f"--port {job.port} must be in [1024, 65535]")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", job.time):
        raise ValueError(f"--time {job.time!r} must look like MINUTES, HH:MM:SS or D-HH:MM:SS")


def task_command(job: Job) -> str:
    """What each task runs. Single-quoted for srun, so $SLURM_PROCID is the task's own, not the batch shell's."""
    distributed = ("--config.distributed.coordinator=$OMNI_COORDINATOR "
                   "--config.distributed.num_processes=$SLURM_NTASKS "
                   "--config.distributed.process_id=$SLURM_PROCID")
    # One process per GPU: each task sees only the GPU of its local rank, so JAX claims just that one.
    pin = "export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID && " if job.per_gpu else ""
    return f"bash -c {shlex.quote(f'{pin}exec {job.command} {distributed}')}"


def sbatch_script(job: Job) -> str:
    """The whole batch script, as text."""
    check(job)
    tasks = job.gpus_per_node if job.per_gpu else 1
    header = [f"--job-name={job.job_name()}", f"--nodes={job.nodes}", f"--ntasks-per-node={tasks}",
              f"--gpus-per-node={job.gpus_per_node}", f"--partition={job.partition}", f"--time={job.time}",
              f"--output={SCRIPT_DIR}/%x-%j.out"] + ([f"--account={job.account}"] if job.account else [])
    per = "GPU" if job.per_gpu else f"node, each driving its {job.gpus_per_node} GPUs"
    lines = ["#!/bin/bash", *(f"#SBATCH {h}" for h in header),
             f"# {job.nodes * tasks} omni processes, one per {per}; all join jax.distributed through the",
             "# allocation's first host.",
             "set -eo pipefail",  # no -u: venv and conda activate scripts read unset variables
             'cd "$SLURM_SUBMIT_DIR"',
             *([job.setup] if job.setup else []),
             'export OMNI_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
             f':{job.port}"',
             f"srun --kill-on-bad-exit=1 {task_command(job)}"]
    return "\n".join(lines) + "\n"


def script_path(job: Job) -> str:
    return f"{SCRIPT_DIR}/{job.job_name()}.sbatch"


def sbatch_command(path: str) -> list[str]:
    return ["sbatch", path]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slurm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--time", required=True, help="wall-clock limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--command", required=True, help='e.g. "python -m omni.main --config=configs/gpt3_xl.py"')
    p.add_argument("--port", type=int, default=12355, help="coordinator port on the first node")
    p.add_argument("--per-gpu", action="store_true", help="one process per GPU instead of one per node")
    p.add_argument("--job-name", help="default: omni-CONFIG")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--setup", help='shell line run first, e.g. "source .venv/bin/activate"')
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; write nothing")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    job = Job(args.nodes, args.gpus_per_node, args.partition, args.time, args.command, args.port,
              args.per_gpu, args.job_name, args.account, args.setup)
    try:
        script = sbatch_script(job)
    except ValueError as e:
        print(f"slurm.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    path = script_path(job)
    submit = shlex.join(sbatch_command(path))
    if args.dry_run:
        print(script)
        print(submit)
        return
    Path(SCRIPT_DIR).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    Path(path).write_text(script)
    print(f"+ {submit}", file=sys.stderr, flush=True)
    try:
        returncode = subprocess.run(sbatch_command(path)).returncode
    except FileNotFoundError:
        sys.exit(f"slurm.py: error: sbatch not found on PATH; run this on the cluster's login node ({path} is written)")
    if returncode != 0:
        sys.exit(f"slurm.py: error: exit status {returncode} from: {submit}")


if __name__ == "__main__":
    main()
