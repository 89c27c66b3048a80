"""omni.sweep: sweep files, the exact commands, resuming, failures and the results table. No real training
except one two-step run of a very small model, kept for `pytest -m slow`."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from omni import sweep as sw

TINY = os.path.join(ROOT, "configs", "tiny.py")


def write_sweep(tmp_path, body: str, name: str = "exp.py") -> str:
    path = tmp_path / name
    path.write_text(f"BASE = {TINY!r}\n" + body)
    return str(path)


def fake_summary(rundir, **summary) -> None:
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_grid_expands_in_order_with_readable_names(tmp_path):
    path = write_sweep(tmp_path, 'GRID = {"model.num_layers": [2, 4], "optim.lr": [1e-3, 3e-4]}\n'
                                 'COMMON = {"train.steps": 7, "optim.lr": 9.0}\n')
    s = sw.load(path)
    assert [r.name for r in s.runs] == ["num_layers2-lr0.001", "num_layers2-lr0.0003", "num_layers4-lr0.001",
                                        "num_layers4-lr0.0003"]
    assert s.runs[1].overrides == {"train.steps": 7, "optim.lr": 3e-4, "model.num_layers": 2}  # the run's lr wins
    assert s.swept == ["model.num_layers", "optim.lr"]


def test_runs_list_keeps_given_names(tmp_path):
    path = write_sweep(tmp_path, 'RUNS = [{"name": "small", "model.d_model": 64}, {"model.d_model": 96, '
                                 '"model.num_heads": 2}]\n')
    s = sw.load(path)
    assert [r.name for r in s.runs] == ["small", "d_model96-num_heads2"]
    assert s.swept == ["model.d_model", "model.num_heads"]


def test_dry_run_prints_the_exact_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sw.subprocess, "call", lambda cmd: pytest.fail(f"dry run ran {cmd}"))
    path = write_sweep(tmp_path, 'GRID = {"model.d_model": [64, 128]}\nCOMMON = {"train.steps": 5}\n')
    assert sw.main([path, "--workdir=w", "--dry-run", "--only=d_model128"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{sys.executable} -m omni.main --config={TINY} --config.train.steps=5 --config.model.d_model=128 "
        "--workdir=w/d_model128"]
    assert sw.main([path, "--workdir=w", "--dry-run", "--tpu-name=s", "--tpu-zone=z", "--tpu-accelerator=v4-8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{sys.executable} tpu/tpu.py launch --name s --zone z --accelerator v4-8 --run exp-d_model64 "
                        f"--command 'python -m omni.main --config={TINY} --config.train.steps=5 "
                        "--config.model.d_model=64 --workdir=w/d_model64'")
    assert len(lines) == 2 and not os.path.exists("w")


def test_finished_runs_are_skipped_and_a_failure_does_not_stop_the_rest(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path, 'RUNS = [{"name": "a"}, {"name": "b"}, {"name": "c"}]\n')
    workdir = str(tmp_path / "runs")
    fake_summary(os.path.join(workdir, "a"), eval_loss=1.0)  # finished before: the rerun resumes after it
    called = []

    def call(cmd):
        name = os.path.basename(cmd[-1].split("=", 1)[1])
        called.append(name)
        if name == "b":
            return 3
        fake_summary(os.path.join(workdir, name), eval_loss=2.0)
        return 0

    monkeypatch.setattr(sw.subprocess, "call", call)
    assert sw.main([path, f"--workdir={workdir}"]) == 1
    assert called == ["b", "c"]
    captured = capsys.readouterr()
    assert "a: done" in captured.out and "b (exit code 3)" in captured.err and "not finished yet: b" in captured.out


def test_table_gathers_summaries_into_markdown_and_csv(tmp_path, capsys):
    path = write_sweep(tmp_path, 'GRID = {"model.d_model": [64, 128, 256]}\n'
                                 'def report(workdir, rows):\n    print("REPORT", [r["name"] for r in rows])\n')
    workdir = str(tmp_path / "runs")
    fake_summary(os.path.join(workdir, "d_model64"), params=1234567, eval_loss=3.14159, eval_perplexity=23.1407,
                 tokens_per_s=2779.4, wall_s=381.6, mfu=0.4)
    fake_summary(os.path.join(workdir, "d_model256"), params=10, eval_loss=2.5, eval_perplexity=12.18)
    assert sw.main([path, f"--workdir={workdir}", "--table"]) == 0
    expected = ("| name | model.d_model | params | eval_loss | eval_perplexity | tokens_per_s | wall_s |\n"
                "|---|---|---|---|---|---|---|\n"
                "| d_model64 | 64 | 1,234,567 | 3.1416 | 23.14 | 2,779 | 382 |\n"
                "| d_model256 | 256 | 10 | 2.5000 | 12.18 |  |  |\n")
    with open(os.path.join(workdir, "results.md")) as f:
        assert f.read() == expected
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {"name": "d_model64", "model.d_model": "64", "params": "1234567", "eval_loss": "3.14159",
                       "eval_perplexity": "23.1407", "tokens_per_s": "2779.4", "wall_s": "381.6"}
    assert rows[1]["wall_s"] == "" and len(rows) == 2
    out = capsys.readouterr().out
    assert expected in out and "not finished yet: d_model128" in out
    assert "REPORT ['d_model64', 'd_model256']" in out


@pytest.mark.parametrize("body,message", [
    ('GRID = {"model.d_model": [64]}\nRUNS = [{}]\n', "exactly one of GRID"),
    ('COMMON = {"train.steps": 1}\n', "exactly one of GRID"),
    ("GRID = {}\n", "GRID must be a non-empty dict"),
    ('GRID = {"model.d_model": 64}\n', "GRID must be a non-empty dict"),
    ("RUNS = []\n", "RUNS must be a non-empty list"),
    ('RUNS = [{"model.d_modle": 64}]\n', "no key 'model.d_modle'"),
    ("GRID = {1: [2]}\n", "config keys are strings"),
    ('RUNS = [{"name": "x"}, {"name": "x"}]\n', "not unique"),
    ('RUNS = [{"name": "a/b"}]\n', "plain directory names"),
    ('BASE = "configs/nope.py"\nRUNS = [{}]\n', "BASE must name an existing config"),
])
def test_bad_sweep_file_is_one_clear_error(tmp_path, capsys, body, message):
    path = write_sweep(tmp_path, body)
    assert sw.main([path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sweep {path}") and message in err


def test_scaling_sweep_is_compute_honest_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    s = sw.load("experiments/scaling.py")
    assert len(s.runs) >= 3
    tokens = {r.overrides["train.steps"] * r.overrides["train.batch_size"] * r.overrides["train.seq_len"]
              for r in s.runs}
    assert len(tokens) == 1  # every size sees the same tokens
    widths = [r.overrides["model.d_model"] for r in s.runs]
    lrs = [r.overrides["optim.lr"] for r in s.runs]
    assert all(w1 < w2 and lr1 > lr2 or w1 == w2 for w1, w2, lr1, lr2 in zip(widths, widths[1:], lrs, lrs[1:]))
    rows = []
    for i, run in enumerate(s.runs):
        rundir = tmp_path / run.name
        rundir.mkdir()
        (rundir / "config.json").write_text(json.dumps({"model": {
            "vocab_size": 2048, "max_len": 128, "d_model": run.overrides["model.d_model"]}}))
        rows.append({"name": run.name, **run.overrides, "params": 10 ** 6 * (i + 1), "eval_loss": 5.0 - i,
                     "eval_perplexity": 100.0, "tokens_per_s": 1000.0, "wall_s": 60.0})
    s.report(str(tmp_path), rows)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "scaling.md").read_text()
    assert f"| {s.runs[0].name} | {10 ** 6 - (2048 + 128) * widths[0]:,} |" in table


@pytest.mark.slow  # ~40 s of start-up (corpus, unigram baseline, peak FLOP/s, compile) even for two steps
def test_real_two_step_run_then_rerun_skips_it(tmp_path):
    """The command the sweep builds really runs (flags parse), writes summary.json, and a rerun skips it."""
    path = write_sweep(tmp_path, 'RUNS = [{"name": "mini", "model.d_model": 32, "model.num_heads": 2}]\n'
                                 'COMMON = {"model.num_layers": 1, "model.d_ff": 64, "train.steps": 2, '
                                 '"train.batch_size": 2, "train.seq_len": 16, "train.eval_batches": 1, '
                                 '"optim.warmup_steps": 1, "optim.lr": 0.001}\n')
    workdir = str(tmp_path / "runs")
    run = lambda: subprocess.run([sys.executable, "-m", "omni.sweep", path, f"--workdir={workdir}"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| mini | 32 | 2 |" in first.stdout
    second = run()
    assert second.returncode == 0 and "mini: done" in second.stdout and "omni.main" not in second.stdout
