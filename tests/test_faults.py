"""Nothing lost, whatever happens: a refused run leaves the workdir byte for byte as it was, a damaged checkpoint
is found and the newest intact one used, a second run in the same workdir is refused, signals before training
end cleanly, and every fault gets one clear line. The slow campaign (`pytest -m slow tests/test_faults.py -s`)
kills runs at random moments, damages every kind of checkpoint file and prints the table of RESULTS.md."""
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import COMPILATION_CACHE, ROOT, run_cli, small_overrides
from omni.config import ConfigError, base_config
from omni.train import checkpoint
from omni.train.checkpoint import CheckpointError
from omni.workdir import Workdir, WorkdirError

STEPS = 12  # conftest's `straight` run: checkpoints at 4, 8, 12


def fingerprint(path: str) -> dict[str, str]:
    """Every file under `path` (relative name -> SHA-256): equal before and after means nothing was touched."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def params_of(workdir: str, step=None):
    _, params, _ = Workdir(workdir).load(step)
    return jax.tree.map(np.asarray, params)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # bit for bit


def one_error_line(out) -> str:
    text = (out.stdout + out.stderr).strip()
    assert out.returncode != 0 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(out.stderr.strip().splitlines()) <= 5, out.stderr[-3000:]
    return errors[0]


def damage_file(step_dir: str, kind: str) -> str:
    """Damages the largest params file of a step: truncated, overwritten in place (same size) or deleted."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
    victim = max(files, key=os.path.getsize)
    if kind == "truncated":
        os.truncate(victim, os.path.getsize(victim) // 2)
    elif kind == "overwritten":
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 3)
            f.write(os.urandom(min(4096, os.path.getsize(victim) // 3)))
    elif kind == "deleted":
        os.unlink(victim)
    return victim


# --- refused runs leave the workdir as it was --------------------------------------------------------------

def test_a_rerun_with_another_identity_is_refused_untouched(straight, data_dir, tmp_path):
    before = fingerprint(straight)
    cases = {  # the rest of each key class is checked in process below
        "data.name=text": small_overrides(data_dir, straight, steps=STEPS, **{"data.name": "text",
                                                                              "data.path": ROOT + "/omni"}),
        "stage": ["--config=configs/sft_tiny.py", f"--workdir={straight}", f"--config.init_from={straight}",
                  "--config.train.seq_len=64"],
    }
    for key, args in cases.items():
        line = one_error_line(run_cli(args))
        assert straight in line and key.split("=")[0] in line, line
    assert fingerprint(straight) == before


def test_a_fresh_run_that_fails_leaves_no_workdir(data_dir, tmp_path):
    workdir = str(tmp_path / "never")
    line = one_error_line(run_cli(small_overrides(data_dir, workdir, **{"data.name": "text",
                                                                        "data.path": str(tmp_path / "none")})))
    assert "data" in line and not os.path.exists(workdir)


@pytest.mark.parametrize("args,named", [
    (["--config=configs/tiny.py", "--config.train.stepz=3"], "--config.train.stepz"),
    (["--config=configs/nope.py"], "configs/nope.py"),
])
def test_bad_flags_get_one_line(args, named):
    line = one_error_line(run_cli(args))
    assert named in line


def test_a_workdir_that_is_a_file_gets_one_line(data_dir, tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    line = one_error_line(run_cli(small_overrides(data_dir, str(path))))
    assert str(path) in line and path.read_text() == "mine"


def test_unwritable_checkpoints_are_found_before_anything_runs(tmp_path):
    run = Workdir(str(tmp_path / "w")).create()
    with open(run.file("checkpoints"), "w") as f:  # root writes anywhere: a file stands in for no access
        f.write("x")
    with pytest.raises(WorkdirError, match="checkpoints is not a directory"):
        run.check_writable()
    os.unlink(run.file("checkpoints"))
    os.makedirs(run.file("checkpoints"))
    os.chmod(run.file("checkpoints"), 0o555)
    try:
        if os.geteuid() != 0:  # root ignores the mode bits
            with pytest.raises(WorkdirError, match="cannot write in"):
                run.check_writable()
    finally:
        os.chmod(run.file("checkpoints"), 0o755)
    run.check_writable()


def test_a_model_too_large_for_the_host_stops_before_loading_anything(tmp_path):
    workdir = str(tmp_path / "w")  # GPT-3 13B on one device: ~190 GiB of parameters and Adam state
    line = one_error_line(run_cli(["--config=configs/gpt3_13b.py", "--config.topology=", f"--workdir={workdir}",
                                   "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"]))
    assert "GiB per device" in line and "--config.force=True" in line and not os.path.exists(workdir)


def test_identity_names_each_differing_key_and_the_workdirs_value(tmp_path):
    run = Workdir(str(tmp_path / "w"))
    run.write_config(base_config())
    other = base_config()
    other.model.d_model, other.data.name, other.train.steps, other.optim.lr = 64, "text", 7, 0.5
    with pytest.raises(ConfigError) as e:
        run.check_identity(other)
    assert "config.data.name='stdlib' (this run: 'text')" in str(e.value)
    assert "config.model.d_model=128 (this run: 64)" in str(e.value)
    assert "train.steps" not in str(e.value) and "optim.lr" not in str(e.value)  # resumable
    for key, value in [("model.scan_layers", False), ("train.batch_size", 16), ("data.tokenizer_sample_mb", 1.0),
                       ("optim.b2", 0.999), ("init_from", "runs/other")]:  # layout, shapes, tokenizer, optimizer
        other = base_config()
        section, _, name = key.rpartition(".")
        (other[section] if section else other)[name] = value
        with pytest.raises(ConfigError, match=f"config.{key}="):
            run.check_identity(other)
    run.check_identity(base_config())


# --- the lock ------------------------------------------------------------------------------------------------

def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    run = Workdir(str(tmp_path / "w"))
    with run.hold(base_config()):
        lock = json.load(open(run.file("lock")))
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(WorkdirError, match=f"in use by another run \\(pid {os.getpid()}"):
            with Workdir(run.path).hold(base_config()):
                pass
    assert not os.path.exists(run.file("lock"))  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(run.file("lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "1", "since": "then"}, f)
    with run.hold(base_config()):
        assert json.load(open(run.file("lock")))["pid"] == os.getpid()
    assert "taking over the lock of a run that is gone" in capsys.readouterr().out
    with open(run.file("lock"), "w") as f:
        json.dump({"host": "another-host", "pid": 1, "since": "then"}, f)
    with pytest.raises(WorkdirError, match="on host another-host"):
        with run.hold(base_config()):
            pass


def test_a_second_run_of_the_cli_is_refused_by_name(straight, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight, workdir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(os.path.join(workdir, "lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid,
                       "started": open(f"/proc/{holder.pid}/stat").read().rpartition(")")[2].split()[19],
                       "since": "now", "command": "python -m omni.main (the other run)"}, f)
        before = fingerprint(workdir)
        line = one_error_line(run_cli(small_overrides(data_dir, workdir, steps=16)))
        assert f"pid {holder.pid}" in line and "the other run" in line
        assert fingerprint(workdir) == before
    finally:
        holder.kill()


# --- damaged checkpoints -------------------------------------------------------------------------------------

def test_checksums_find_each_kind_of_damage(straight, tmp_path):
    for kind in ("truncated", "overwritten", "deleted"):
        workdir = str(tmp_path / kind)
        shutil.copytree(straight, workdir)
        step_dir = checkpoint.step_dirs(workdir)[STEPS]
        assert checkpoint.damage(step_dir) is None
        victim = damage_file(step_dir, kind)
        reason = checkpoint.damage(step_dir)
        assert reason is not None and os.path.relpath(victim, step_dir) in reason, (kind, reason)
        # A reader warns and uses the newest intact step; it moves nothing.
        assert Workdir(workdir).meta()[2] == STEPS - 4
        assert os.path.isdir(step_dir)
        with pytest.raises(CheckpointError, match="is damaged"):
            Workdir(workdir).meta(STEPS)


def test_a_damaged_latest_step_is_set_aside_and_the_run_continues_bit_exactly(straight, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight, workdir)
    os.unlink(os.path.join(workdir, "summary.json"))
    damage_file(checkpoint.step_dirs(workdir)[STEPS], "overwritten")
    out = run_cli(small_overrides(data_dir, workdir, steps=STEPS))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/{STEPS} is damaged" in out.stdout
    assert f"resuming from {workdir}/checkpoints/{STEPS - 4}" in out.stdout
    assert os.path.isdir(os.path.join(workdir, "damaged", str(STEPS)))  # set aside, not deleted
    assert_same_params(params_of(workdir), params_of(straight))
    steps = [r["step"] for r in Workdir(workdir).metrics() if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_metrics_keep_each_step_once_and_drop_a_torn_line(tmp_path):
    run = Workdir(str(tmp_path / "w")).create()
    with open(run.file("metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    run.keep_metrics_until(2)
    assert [r["step"] for r in run.metrics()] == [1, 2]


# --- signals -------------------------------------------------------------------------------------------------

def test_sigterm_during_start_up_exits_0_and_leaves_nothing(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen([sys.executable, "-m", "omni.main", *small_overrides(data_dir, workdir)], cwd=ROOT,
                            env={**os.environ, **COMPILATION_CACHE}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:  # the data is ready; compilation is next
        if line.startswith("unigram baseline"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest[-3000:]
    assert "stopped by SIGTERM (not while training" in rest and not os.path.exists(workdir)


@pytest.mark.slow
def test_ctrl_c_saves_and_the_rerun_ends_bit_exactly(straight, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    args = small_overrides(data_dir, workdir, steps=STEPS)
    proc = subprocess.Popen([sys.executable, "-m", "omni.main", *args], cwd=ROOT,
                            env={**os.environ, **COMPILATION_CACHE}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0 and "stopped by SIGINT: saved step" in rest, rest[-3000:]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_params(params_of(workdir), params_of(straight))


# --- the slow campaign ---------------------------------------------------------------------------------------

def _kill_at(args: list[str], after_step: int, delay: float) -> None:
    """Starts a run and kills it (-9) `delay` seconds after it printed step `after_step`'s line: with a
    checkpoint at that step and a short delay, inside its save."""
    proc = subprocess.Popen([sys.executable, "-m", "omni.main", *args], cwd=ROOT,
                            env={**os.environ, **COMPILATION_CACHE}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(f"step {after_step}/"):
            break
    time.sleep(delay)
    proc.kill()
    proc.wait()


def _saves_in_progress(workdir: str) -> int:
    root = os.path.join(workdir, "checkpoints")
    return sum("tmp" in name for name in os.listdir(root)) if os.path.isdir(root) else 0


@pytest.mark.slow
def test_fault_campaign(straight, data_dir, tmp_path):
    """Each fault, then the same command rerun until it finishes: the final parameters must equal the
    uninterrupted run's bit for bit. Prints the table recorded in benchmarks/RESULTS.md."""
    rng = random.Random(0)
    expected = params_of(straight)
    rows = []

    def finish(workdir: str, fault: str, extra: str = "") -> None:
        out = run_cli(small_overrides(data_dir, workdir, steps=STEPS, **{"train.checkpoint_every": 2}))
        notices = [ln.replace(workdir, "W").split(", since")[0]
                   for ln in out.stdout.splitlines() if ln.startswith(("warning:", "resuming"))]
        assert out.returncode == 0, out.stderr[-3000:]
        assert_same_params(params_of(workdir), expected)
        steps = [r["step"] for r in Workdir(workdir).metrics() if "loss" in r]
        assert steps == list(range(1, STEPS + 1)), steps
        rows.append((fault, extra, "; ".join(notices)[:200], "bit-exact"))

    for i in range(10):  # kill -9 at random moments: odd ones just after a checkpoint step's line (in its save)
        workdir = str(tmp_path / f"kill{i}")
        after, delay = (rng.choice([2, 4, 6, 8, 10]), rng.uniform(0.0, 0.05)) if i % 2 else (1, rng.uniform(0, 2))
        _kill_at(small_overrides(data_dir, workdir, steps=STEPS, **{"train.checkpoint_every": 2}), after, delay)
        in_save = f", {_saves_in_progress(workdir)} save(s) cut short" if _saves_in_progress(workdir) else ""
        finish(workdir, f"kill -9 {delay:.2f} s after step {after}",
               f"steps saved: {sorted(checkpoint.step_dirs(workdir))}{in_save}")
    for kind in ("truncated", "overwritten", "deleted"):
        workdir = str(tmp_path / f"damage-{kind}")
        shutil.copytree(straight, workdir)
        os.unlink(os.path.join(workdir, "summary.json"))
        damage_file(checkpoint.step_dirs(workdir)[STEPS], kind)
        finish(workdir, f"latest step's largest params file {kind}")
    for item in ("opt_state", "data"):
        workdir = str(tmp_path / f"missing-{item}")
        shutil.copytree(straight, workdir)
        os.unlink(os.path.join(workdir, "summary.json"))
        shutil.rmtree(os.path.join(checkpoint.step_dirs(workdir)[STEPS], item))
        finish(workdir, f"latest step's {item} deleted")
    print("\n| fault | detail | what the rerun printed | final params |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
