"""tpu/tpu.py and tpu/slurm.py, checked offline: the exact commands their --dry-run prints for a v4-32 and a
v5e-256 slice and a 2 x 8 GPU SLURM job, and the worker-side shell they send, run here under bash with
stand-ins for python, srun and scontrol. No cloud and no cluster is touched."""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

TPU = os.path.join(ROOT, "tpu", "tpu.py")
SLURM = os.path.join(ROOT, "tpu", "slurm.py")
XL = "python -m omni.main --config=configs/gpt3_xl.py --config.data.name='c4/en' --workdir=runs/xl"
V4 = ["--name", "omni-v4", "--zone", "us-central2-b", "--accelerator", "v4-32"]
V5E = ["--name", "omni-v5e", "--zone", "us-west4-a", "--project", "my-proj", "--accelerator", "v5e-256"]


def cli(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def dry(*args):
    """tpu.py ARGS --dry-run -> the printed commands, each split back into its argv."""
    out = cli(TPU, *args, "--dry-run")
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_create_v4_32():
    assert dry("create", *V4) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "omni-v4", "--zone=us-central2-b",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


def test_create_v5e_256_maps_the_name_and_runtime():
    assert dry("create", *V5E, "--spot") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "omni-v5e", "--zone=us-west4-a", "--project=my-proj",
        "--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite", "--spot"]]


@pytest.mark.parametrize("slice_args,accel,runtime", [(V4, "v4-32", "tpu-ubuntu2204-base"),
                                                      (V5E, "v5litepod-256", "v2-alpha-tpuv5-lite")])
def test_create_queued(slice_args, accel, runtime):
    [cmd] = dry("create", *slice_args, "--queued", "--spot")
    name = slice_args[1]
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", name]
    assert f"--node-id={name}" in cmd and f"--accelerator-type={accel}" in cmd
    assert f"--runtime-version={runtime}" in cmd and "--spot" in cmd and "--version=" not in " ".join(cmd)


def test_setup_copies_the_checkout_and_installs_on_every_worker():
    tar, scp, ssh = dry("setup", *V4)
    assert tar[:3] == ["tar", "-czf", "/tmp/omni-omni-v4.tar.gz"] and tar[-3:] == ["-C", ROOT, "."]
    assert "--exclude=.git" in tar and "--exclude=runs" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/omni-omni-v4.tar.gz", "omni-v4:omni.tar.gz",
                   "--zone=us-central2-b", "--worker=all"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "omni-v4", "--zone=us-central2-b",
                       "--worker=all"]
    assert ssh[8] == "--command"
    script = ssh[9]
    assert script.startswith("mkdir -p ~/omni && tar -xzf ~/omni.tar.gz -C ~/omni && ")
    assert '~/omni-venv/bin/pip install -U "jax[tpu]"' in script
    assert script.endswith("~/omni-venv/bin/pip install -e ~/omni")


def test_setup_from_a_git_repo():
    [ssh] = dry("setup", *V5E, "--repo", "https://example.com/omni.git", "--ref", "origin/scale")
    assert "--worker=all" in ssh and "--project=my-proj" in ssh
    script = ssh[ssh.index("--command") + 1]
    assert "git clone https://example.com/omni.git ~/omni" in script
    assert "git -C ~/omni checkout --force origin/scale" in script and "rm -rf" not in script


@pytest.mark.parametrize("slice_args", [V4, V5E])
def test_launch_runs_the_command_intact_on_all_workers(slice_args):
    name = slice_args[1]
    mkdir, ssh = dry("launch", *slice_args, "--run", "xl1", "--command", XL)
    assert mkdir == ["mkdir", "-p", f"runs/tpu_logs/{name}/xl1"]
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and ssh[5] == name
    assert "--worker=all" in ssh and f"--output-directory=runs/tpu_logs/{name}/xl1" in ssh
    script = ssh[ssh.index("--command") + 1]
    assert f"{{ {XL} ; }} 2>&1 | tee -a ~/omni/runs/tpu_logs/xl1/$(hostname).log" in script
    assert script.startswith("cd ~/omni && . ~/omni-venv/bin/activate && ")
    assert "--config.distributed" not in script  # a TPU slice finds its coordinator itself


def test_launch_default_run_id_is_a_timestamp():
    mkdir, _ = dry("launch", *V4, "--command", XL)
    run = mkdir[-1].rsplit("/", 1)[1]
    assert len(run) == 15 and run[8] == "-" and run.replace("-", "").isdigit()


def fake_worker(tmp_path):
    """A HOME laid out like a worker after setup, whose `python` prints its argv and fails on --fail."""
    (tmp_path / "omni").mkdir()
    bin_dir = tmp_path / "omni-venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    python = bin_dir / "python"
    python.write_text('#!/bin/bash\nprintf "arg:%s\\n" "$@"\n[[ " $* " == *" --fail "* ]] && exit 3\nexit 0\n')
    python.chmod(0o755)
    return dict(os.environ, HOME=str(tmp_path))


def test_launch_worker_script_tees_a_log_per_worker_and_keeps_the_exit_status(tmp_path):
    env = fake_worker(tmp_path)
    for command, status in [(XL, 0), (XL + " --fail", 3)]:
        _, ssh = dry("launch", *V4, "--run", "r1", "--command", command)
        out = subprocess.run(["bash", "-c", ssh[ssh.index("--command") + 1]], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == status, out.stderr
        assert "arg:--config.data.name=c4/en\narg:--workdir=runs/xl\n" in out.stdout
    [log] = (tmp_path / "omni" / "runs" / "tpu_logs" / "r1").iterdir()
    assert log.name == f"{os.uname().nodename}.log"
    assert log.read_text().count("arg:--config=configs/gpt3_xl.py") == 2  # appended, not overwritten


def test_logs_and_delete():
    [logs] = dry("logs", *V4, "--run", "xl1", "--lines", "20")
    assert "--worker=all" in logs and logs[-1] == "tail -v -n 20 ~/omni/runs/tpu_logs/xl1/*.log"
    assert dry("delete", *V4) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "omni-v4",
                                   "--zone=us-central2-b", "--quiet"]]
    assert dry("delete", *V5E, "--queued") == [["gcloud", "compute", "tpus", "queued-resources", "delete",
                                                "omni-v5e", "--zone=us-west4-a", "--project=my-proj",
                                                "--force", "--quiet"]]


@pytest.mark.parametrize("args,message", [
    (["create", "--name", "n", "--zone", "z", "--accelerator", "v9-8"], "unknown accelerator 'v9-8'"),
    (["create", "--name", "n", "--zone", "z", "--accelerator", "v5e"], "unknown accelerator 'v5e'"),
    (["launch", "--name", "n", "--zone", "z", "--accelerator", "v4-3x", "--command", XL], "unknown accelerator"),
    (["create", "--name", "n", "--zone", "z"], "create needs --accelerator"),
    (["launch", "--name", "n", "--zone", "z", "--accelerator", "v4-32"], "required: --command"),
    (["launch", "--name", "n", "--zone", "z", "--command", " "], "--command is empty"),
    (["launch", "--name", "n", "--zone", "z", "--command", XL, "--run", "a b"], "--run 'a b'"),
])
def test_bad_input_is_one_clear_error(args, message):
    out = cli(TPU, *args, "--dry-run")
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and "Traceback" not in out.stderr
    assert sum("error:" in line for line in out.stderr.splitlines()) == 1


def test_a_failing_command_is_named(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no gcloud here
    out = subprocess.run([sys.executable, TPU, "delete", *V4], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "gcloud not found on PATH" in out.stderr
    (tmp_path / "gcloud").write_text("#!/bin/sh\nexit 7\n")
    (tmp_path / "gcloud").chmod(0o755)
    out = subprocess.run([sys.executable, TPU, "delete", *V4], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "exit status 7 from: gcloud compute tpus tpu-vm delete omni-v4 --zone=us-central2-b --quiet" in out.stderr


SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00", "--command", XL]


def slurm_dry(*extra):
    out = cli(SLURM, *SLURM_ARGS, *extra, "--dry-run")
    assert out.returncode == 0, out.stderr
    script, submit = out.stdout.rstrip("\n").rsplit("\n\n", 1)
    return script + "\n", submit


def test_slurm_script_2_nodes_x_8_gpus():
    script, submit = slurm_dry()
    assert submit == "sbatch runs/slurm/omni-gpt3_xl.sbatch"
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                      "--time=24:00:00", "--job-name=omni-gpt3_xl"]:
        assert f"#SBATCH {directive}" in lines
    assert ('export OMNI_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355"'
            in lines)
    srun = shlex.split(lines[-1])
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[4] == (f"exec {XL} --config.distributed.coordinator=$OMNI_COORDINATOR "
                       "--config.distributed.num_processes=$SLURM_NTASKS "
                       "--config.distributed.process_id=$SLURM_PROCID")


@pytest.mark.parametrize("per_gpu,tasks", [(False, 2), (True, 16)])
def test_slurm_script_runs_each_task_with_its_own_process_id(tmp_path, per_gpu, tasks):
    """Runs the batch script under bash with stand-ins: srun starts the tasks, python prints its flags."""
    script, _ = slurm_dry(*(["--per-gpu"] if per_gpu else []))
    stand_ins = {
        "scontrol": 'echo gpu-node-07; echo gpu-node-08',
        "srun": ('shift; for ((i = 0; i < $NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % $PER_NODE)) '
                 'SLURM_NTASKS=$NTASKS "$@" || exit $?; done'),
        "python": 'echo "pid=${*: -1} n=${*: -2:1} coord=${*: -3:1} gpus=${CUDA_VISIBLE_DEVICES-all}"',
    }
    for name, body in stand_ins.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="gpu-node-[07-08]", NTASKS=str(tasks), PER_NODE=str(tasks // 2))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == tasks
    coord = "coord=--config.distributed.coordinator=gpu-node-07:12355"
    for i, line in enumerate(lines):
        gpus = str(i % 8) if per_gpu else "all"
        assert line == (f"pid=--config.distributed.process_id={i} n=--config.distributed.num_processes={tasks} "
                        f"{coord} gpus={gpus}")


@pytest.mark.parametrize("extra,message", [(["--nodes", "0"], "--nodes (0)"), (["--time", "1 day"], "--time"),
                                           (["--command", ""], "--command is empty")])
def test_slurm_bad_input(extra, message):
    out = cli(SLURM, *SLURM_ARGS, *extra, "--dry-run")
    assert out.returncode == 2 and out.stdout == "" and message in out.stderr
