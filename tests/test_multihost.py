"""Many hosts, simulated on localhost: two processes (one CPU device each, gloo collectives) train, checkpoint,
stop and resume, and end with the losses of one process running the same global batch on two devices."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, ROOT, run_cli


def _flags(data_dir, workdir, steps):
    """A seconds-long run on a 1 MB slice of the offline corpus, its batch split over mesh data=2."""
    flags = {
        "model.num_layers": 2, "model.num_heads": 2, "model.d_model": 64, "model.d_ff": 256,
        "model.vocab_size": 512, "model.max_len": 64, "model.attention_chunk": 32, "train.seq_len": 64,
        "train.batch_size": 8, "train.steps": steps, "train.log_every": 1, "train.eval_every": 2,
        "train.eval_batches": 2, "train.checkpoint_every": 2, "optim.warmup_steps": 2,
        "optim.decay_steps": 100, "mesh.data": 2, "data.data_dir": data_dir, "data.max_corpus_mb": 1.0,
        "data.tokenizer_sample_mb": 1.0}
    return ["--config=configs/tiny.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _compile_cache(path):
    """Every run compiles the same few programs: JAX's persistent cache keeps the test's time to minutes."""
    return {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run_two_processes(args, cache):
    """Runs `python -m omni.main ARGS` as processes 0 and 1 of 2; returns their (returncode, stdout, stderr)."""
    coordinator = f"localhost:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, **_compile_cache(cache))  # one CPU device each
    procs = [subprocess.Popen(
        [sys.executable, "-m", "omni.main", *args, f"--config.distributed.coordinator={coordinator}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}, [m["eval_loss"] for m in lines if "eval_loss" in m]


def test_two_processes_resume_and_match_one(tmp_path):
    data_dir = str(tmp_path / "data")
    # One process first: it also builds the corpus and the tokenizer that the others then read.
    single = str(tmp_path / "single")
    cache = tmp_path / "jax_cache"
    two_devices = f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"
    out = run_cli(_flags(data_dir, single, steps=4), env={"XLA_FLAGS": two_devices, **_compile_cache(cache)})
    assert out.returncode == 0, out.stderr[-3000:]

    multi = str(tmp_path / "multi")
    for steps in (2, 4):  # stop at step 2 with a checkpoint, then rerun to resume to step 4
        results = _run_two_processes(_flags(data_dir, multi, steps), cache)
        for code, stdout, stderr in results:
            assert code == 0, stderr[-3000:]
    (_, first, _), (_, second, _) = results
    assert "resuming from" in first and second == ""  # only process 0 prints
    for process in range(2):  # each process saved its own data position beside the shared arrays
        assert os.path.exists(os.path.join(multi, "checkpoints", "4", "data", f"process_{process}-of-2.json"))

    expected, got = _losses(single), _losses(multi)
    assert sorted(got[0]) == [1, 2, 3, 4] and len(got[1]) == 2
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert got[1] == pytest.approx(expected[1], rel=1e-5)
    with open(os.path.join(multi, "summary.json")) as f:
        assert json.load(f)["loss"] == pytest.approx(expected[0][4], rel=1e-5)


@pytest.mark.parametrize("flags,needle", [
    (["--config.distributed.coordinator=localhost"], "config.distributed.coordinator='localhost': expected HOST:PORT"),
    (["--config.distributed.num_processes=2"], "config.distributed.num_processes=2 needs"),
    (["--config.distributed.coordinator=localhost:1234", "--config.distributed.num_processes=2",
      "--config.distributed.process_id=2"], "config.distributed.process_id=2"),
])
def test_bad_distributed_values_name_the_key(flags, needle, tmp_path):
    out = run_cli(["--config=configs/tiny.py", f"--workdir={tmp_path}", *flags], timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr[-2000:]


@pytest.mark.parametrize("env,found", [
    ({}, None),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),  # any pod: not a multi-process launch by itself
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}, None),  # sbatch's shell
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
])
def test_cluster_detected_only_for_several_processes(env, found, monkeypatch):
    from omni import main
    for key in ("KUBERNETES_SERVICE_HOST", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main._cluster_launcher() == found  # this machine is no Cloud TPU VM
