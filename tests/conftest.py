import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

# Tests compile hundreds of small programs and run each a few times: at LLVM's cheapest level XLA:CPU compiles them
# about a third faster (tests/test_dpo.py: 100 s -> 66 s) and computes the same numbers. Set before jax is imported;
# every process a test starts inherits it (those that set XLA_FLAGS themselves add it).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def _compilation_cache() -> dict[str, str]:
    """One persistent JAX compilation cache for the omni processes this test session starts (the CLI tests compile
    the same tiny models many times over). It starts empty and is removed at exit, so no compiled program
    outlives the code that made it. Not for the pytest process itself: a TPU topology's compile-only client
    (tests/test_aot.py) cannot load a cached executable, and JAX would warn."""
    path = tempfile.mkdtemp(prefix="omni-tests-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


COMPILATION_CACHE = _compilation_cache()
pytest_plugins = ("serve_harness",)  # the served tiny model's fixtures (workdir, truth, server, client)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")


def load_config(name: str):
    """configs/NAME.py's get_config(), as the CLI loads it."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_cli(args, cwd=ROOT, env=None, timeout=600, **kw):
    """Runs `python -m omni.main ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **COMPILATION_CACHE, **(env or {})}
    return subprocess.run([sys.executable, "-m", "omni.main", *args], cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True, **kw)


def small_overrides(data_dir, workdir, steps=12, **extra):
    """`python -m omni.main` flags for a seconds-long run on a 1 MB slice of the offline corpus."""
    flags = {
        "model.num_layers": 2, "model.num_heads": 2, "model.d_model": 64, "model.d_ff": 256,
        "model.vocab_size": 512, "model.max_len": 64, "model.attention_chunk": 32, "train.seq_len": 64,
        "train.batch_size": 8, "train.steps": steps, "train.log_every": 1, "train.eval_every": 6,
        "train.eval_batches": 2, "train.checkpoint_every": 4, "optim.warmup_steps": 2,
        "optim.decay_steps": 100, "data.data_dir": data_dir, "data.max_corpus_mb": 1.0,
        "data.tokenizer_sample_mb": 1.0, **extra}
    return ["--config=configs/tiny.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def finished_run(data_dir: str, parent, steps: int) -> str:
    """The workdir of a finished small run under `parent` (tests read it; they copy it to write)."""
    workdir = os.path.join(str(parent), "w")
    out = run_cli(small_overrides(data_dir, workdir, steps=steps))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The data_dir of the small CLI runs: their corpus and tokenizer are prepared there once per session."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted 12-step small run, the truth resumed runs are compared with (tests copy it to write)."""
    return finished_run(data_dir, tmp_path_factory.mktemp("straight"), steps=12)


def run_on_8_devices(script: str, timeout: int) -> dict:
    """Runs a Python script on 8 simulated CPU devices (XLA_FLAGS must be set before jax is imported, hence a
    subprocess); the script prints one line "RESULT <json>", which is returned."""
    import json
    import subprocess

    env = dict(os.environ, **COMPILATION_CACHE, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; not run in CI (pytest -m slow)")
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped elsewhere")
