"""Sweeps: one base config and a list of overrides, run one after another, each in its own workdir.

A sweep file (experiments/NAME.py) is plain data:

    BASE = "configs/tiny.py"
    GRID = {"model.num_layers": [2, 4], "model.d_model": [128, 256]}   # cartesian product, or
    RUNS = [{"name": "small", "model.d_model": 128}, {"model.d_model": 256}]   # an explicit list
    COMMON = {"train.steps": 300}          # optional: applied to every run (a run's own value wins)
    def report(workdir, rows): ...         # optional: called after the results table is written

    python -m omni.sweep experiments/NAME.py [--workdir=runs/NAME] [--dry-run] [--only=A,B] [--table]
                         [--tpu-name=N --tpu-zone=Z --tpu-accelerator=A]

Locally every run is `python -m omni.main --config=BASE --config.KEY=VALUE ... --workdir=WORKDIR/RUN`; a run
whose workdir holds summary.json is done and skipped, and an interrupted one resumes from its own checkpoint,
so rerunning the sweep picks up where it stopped. Afterwards every summary.json is gathered into
WORKDIR/results.md and WORKDIR/results.csv.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable

from omni.workdir import SUMMARY, Workdir, write_atomic

# summary.json keys shown in the results table, in this order (those no run has are left out).
METRICS = ("params", "eval_loss", "eval_perplexity", "tokens_per_s", "wall_s")
FORMATS = {"params": "{:,}", "eval_loss": "{:.4f}", "eval_perplexity": "{:.2f}", "tokens_per_s": "{:,.0f}",
           "wall_s": "{:.0f}"}
NAME_OK = re.compile(r"^[A-Za-z0-9._=-]+$")


class SweepError(ValueError):
    """A sweep file that cannot work; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any]  # config key -> value, COMMON included


@dataclasses.dataclass
class Sweep:
    path: str
    base: str
    runs: list[Run]
    swept: list[str]  # keys that vary between runs: the table's columns
    report: Callable[[str, list[dict]], None] | None = None

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


def _module(path: str):
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"sweep_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_name(overrides: dict[str, Any]) -> str:
    """A readable directory name from a run's own overrides: {"model.d_model": 128} -> "d_model128"."""
    parts = [f"{key.rsplit('.', 1)[-1]}{re.sub(r'[^A-Za-z0-9.]', '_', str(value))}"
             for key, value in overrides.items()]
    return "-".join(parts) or "base"


def expand(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of a grid, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _check_keys(config, overrides: dict, where: str) -> None:
    """An unknown key fails here, before the first run, rather than in the middle of the sweep."""
    for key in overrides:
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise SweepError(f"{where}: the base config has no key {key!r}")
            node = node[part]


def _own_runs(grid, runs, where: str) -> tuple[list[str], list[dict], list[str]]:
    """(run names, each run's own overrides, the swept keys) from GRID or RUNS."""
    if (grid is None) == (runs is None):
        raise SweepError(f"{where}: define exactly one of GRID (dict of key -> list) or RUNS (list of dicts)")
    if grid is not None:
        if not (isinstance(grid, dict) and grid and all(isinstance(v, (list, tuple)) and v for v in grid.values())):
            raise SweepError(f"{where}: GRID must be a non-empty dict of config key -> non-empty list")
        own = expand(grid)
        given = [None] * len(own)
    else:
        if not (isinstance(runs, (list, tuple)) and runs and all(isinstance(r, dict) for r in runs)):
            raise SweepError(f"{where}: RUNS must be a non-empty list of dicts")
        own, given = [{k: v for k, v in r.items() if k != "name"} for r in runs], [r.get("name") for r in runs]
    swept = list(dict.fromkeys(k for o in own for k in o))
    bad = [k for k in swept if not isinstance(k, str)]
    if bad:
        raise SweepError(f"{where}: config keys are strings like 'model.d_model', got {bad}")
    return [name or run_name(o) for name, o in zip(given, own)], own, swept


def load(path: str) -> Sweep:
    """Reads and validates a sweep file."""
    m = _module(path)
    where = f"sweep {path}"
    base, common = getattr(m, "BASE", None), getattr(m, "COMMON", {})
    if not isinstance(base, str) or not os.path.isfile(base):
        raise SweepError(f"{where}: BASE must name an existing config file, got {base!r}")
    if not (isinstance(common, dict) and all(isinstance(k, str) for k in common)):
        raise SweepError(f"{where}: COMMON must be a dict of config key -> value")
    names, own, swept = _own_runs(getattr(m, "GRID", None), getattr(m, "RUNS", None), where)
    bad = [n for n in names if not isinstance(n, str) or not NAME_OK.match(n)]
    if bad:
        raise SweepError(f"{where}: run names must be plain directory names, got {bad}")
    if len(set(names)) != len(names):
        raise SweepError(f"{where}: run names are not unique: {names}")
    config = _module(base).get_config()
    for name, o in zip(names, own):
        _check_keys(config, {**common, **o}, f"{where}, run {name}")
    return Sweep(path, base, [Run(n, {**common, **o}) for n, o in zip(names, own)], swept, getattr(m, "report", None))


def omni_command(sweep: Sweep, run: Run, workdir: str, python: str = "python") -> list[str]:
    """The omni.main command line of one run."""
    flags = [f"--config.{key}={value}" for key, value in run.overrides.items()]
    return [python, "-m", "omni.main", f"--config={sweep.base}", *flags, f"--workdir={os.path.join(workdir, run.name)}"]


def tpu_command(omni: list[str], log_name: str, name: str, zone: str, accelerator: str) -> list[str]:
    """tpu/tpu.py's launch of one run's command on every worker of a slice (it returns when the run ends);
    --run names the workers' log directory, so a resumed run appends to its own log."""
    return [sys.executable, "tpu/tpu.py", "launch", "--name", name, "--zone", zone, "--accelerator", accelerator,
            "--run", log_name, "--command", shlex.join(omni)]


def execute(commands: list[tuple[Run, list[str]]], workdir: str, local: bool) -> int:
    """Runs the commands one after another. A failed run does not stop the others (they are independent, and
    an unattended sweep should not lose the night to one diverging size); the exit code says it failed."""
    failed = []
    for i, (run, cmd) in enumerate(commands, 1):
        rundir = Workdir(os.path.join(workdir, run.name))
        if local and rundir.finished:
            print(f"[sweep] {i}/{len(commands)} {run.name}: done ({rundir.file(SUMMARY)}), skipped", flush=True)
            continue
        print(f"[sweep] {i}/{len(commands)} {run.name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            failed.append(f"{run.name} (exit code {rc})")
            print(f"[sweep] {run.name} failed with exit code {rc}; going on with the rest", flush=True)
        elif local and not rundir.finished:  # omni.main exits 0 on SIGTERM after checkpointing
            print(f"[sweep] {run.name} stopped before finishing (preempted); rerun the sweep to resume", flush=True)
            return 0
    if failed:
        print(f"[sweep] failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def gather(sweep: Sweep, workdir: str) -> list[dict]:
    """One row per finished run: its name, its swept values and its whole summary.json."""
    rows = []
    for run in sweep.runs:
        summary = Workdir(os.path.join(workdir, run.name)).summary()
        if summary is not None:
            rows.append({"name": run.name, **{k: run.overrides.get(k, "") for k in sweep.swept}, **summary})
    return rows


def _cell(key: str, value) -> str:
    if isinstance(value, (int, float)) and key in FORMATS:
        return FORMATS[key].format(value)
    return str(value)


def write_table(sweep: Sweep, rows: list[dict], workdir: str) -> str:
    """Writes results.md and results.csv under workdir; returns the markdown."""
    columns = ["name", *sweep.swept, *(k for k in METRICS if any(k in r for r in rows))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, r.get(c, "")) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    os.makedirs(workdir, exist_ok=True)
    write_atomic(os.path.join(workdir, "results.md"), markdown.encode())
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(os.path.join(workdir, "results.csv"), table.getvalue().encode())
    return markdown


def _select(sweep: Sweep, only: str) -> list[Run]:
    if not only:
        return sweep.runs
    wanted = only.split(",")
    unknown = set(wanted) - {r.name for r in sweep.runs}
    if unknown:
        raise SweepError(f"sweep {sweep.path}: no run named {sorted(unknown)}; runs: {[r.name for r in sweep.runs]}")
    return [r for r in sweep.runs if r.name in wanted]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m omni.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep file, e.g. experiments/scaling.py")
    p.add_argument("--workdir", help="parent of the runs' workdirs; default runs/<sweep name>")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--only", default="", help="comma-separated run names")
    p.add_argument("--table", action="store_true", help="only gather the finished runs into the results table")
    p.add_argument("--tpu-name", help="launch each run on this TPU slice through tpu/tpu.py")
    p.add_argument("--tpu-zone")
    p.add_argument("--tpu-accelerator")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = load(args.sweep)
        runs = _select(sweep, args.only)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    workdir = args.workdir or os.path.join("runs", sweep.name)
    tpu = (args.tpu_name, args.tpu_zone, args.tpu_accelerator)
    if any(tpu) and not all(tpu):
        print("error: --tpu-name, --tpu-zone and --tpu-accelerator go together", file=sys.stderr, flush=True)
        return 2
    rc = 0
    if not args.table:
        if all(tpu):  # the slice's own python runs omni; its workdir lives on the slice
            commands = [(r, tpu_command(omni_command(sweep, r, workdir), f"{sweep.name}-{r.name}", *tpu))
                        for r in runs]
        else:
            commands = [(r, omni_command(sweep, r, workdir, sys.executable)) for r in runs]
        if args.dry_run:
            print("\n".join(shlex.join(cmd) for _, cmd in commands), flush=True)
            return 0
        rc = execute(commands, workdir, local=not all(tpu))
    rows = gather(sweep, workdir)
    print(write_table(sweep, rows, workdir), flush=True)
    missing = [r.name for r in sweep.runs if r.name not in {row["name"] for row in rows}]
    if missing:
        print(f"[sweep] not finished yet: {', '.join(missing)}", flush=True)
    if sweep.report and rows:
        sweep.report(workdir, rows)
    return rc


if __name__ == "__main__":
    sys.exit(main())
