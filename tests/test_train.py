"""The trainer: gradient accumulation, schedule, checkpoint/resume equal to an uninterrupted run, preemption,
non-finite losses, and one clear error per kind of bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, finished_run, run_cli, small_overrides
from omni import parallel
from omni.config import ConfigError, base_config, cpu_devices, validate
from omni.losses import lm_loss
from omni.models import GPT
from omni.train import optim
from omni.train.trainer import abstract_state, make_train_step


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 4-step run that tests read (never write: copy it first)."""
    return finished_run(data_dir, tmp_path_factory.mktemp("trained"), steps=4)


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- the step -------------------------------------------------------------------------------------------

def _step_config(**train):
    c = base_config()
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=64, max_len=16, dropout=0.1)
    c.train.update(batch_size=8, seq_len=16, **train)
    return validate(c, 1)


def _run_step(c, batch):
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
    model = GPT(c.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        _, shardings, init_fn = abstract_state(c, model, (8, 16), mesh)
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
        state, metrics = jax.jit(make_train_step(c, lm_loss(model)))(state, batch)
    return state, metrics


def _batch(seed=0, b=8, length=16, vocab=64):
    t = np.random.default_rng(seed).integers(0, vocab, (b, length + 1)).astype(np.int32)
    w = np.ones((b, length), np.float32)
    w[-1, 10:] = 0.0  # some padding: the loss is a mean over weighted tokens, not rows
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": w}


@pytest.mark.slow  # CI: tests/test_sharding.py compares accum=2 on 8 devices with one device's full batch
def test_grad_accumulation_equals_full_batch():
    # Dropout off: micro-batches draw their own dropout masks, so only the deterministic math can agree.
    batch = _batch()
    full, m_full = _run_step(_deterministic(_step_config(grad_accum=1)), batch)
    accum, m_accum = _run_step(_deterministic(_step_config(grad_accum=4)), batch)
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _deterministic(c):
    c.model.dropout = 0.0
    return c


def test_step_loss_is_mean_token_cross_entropy():
    c = _deterministic(_step_config())
    batch = _batch()
    state, metrics = _run_step(c, batch)
    # Recompute the loss of the initial params independently.
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        _, _, init_fn = abstract_state(c, GPT(c.model), (8, 16), mesh)
        params = jax.jit(init_fn)(jax.random.key(0)).params
    logits = np.asarray(GPT(c.model).apply({"params": params}, batch["inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["weights"]).sum() / batch["weights"].sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert int(state.step) == 1


def test_schedule_warmup_cosine_floor():
    o = base_config().optim
    o.update(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    s = optim.lr_schedule(o)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-4)  # halfway down the cosine: (1 + 0.1) / 2
    assert float(s(110)) == pytest.approx(0.1)
    assert float(s(10_000)) == pytest.approx(0.1)


def test_weight_decay_only_on_kernels():
    params = {"wte": {"embedding": 0}, "wpe": 0, "blocks": {"attn": {"qkv_kernel": 0, "qkv_bias": 0},
              "mlp": {"fc": {"kernel": 0, "bias": 0}}, "ln1": {"scale": 0, "bias": 0}}}
    mask = optim.decay_mask(params)
    assert mask["blocks"]["attn"] == {"qkv_kernel": True, "qkv_bias": False}
    assert mask["blocks"]["mlp"]["fc"] == {"kernel": True, "bias": False}
    assert not mask["wte"]["embedding"] and not mask["wpe"] and not any(mask["blocks"]["ln1"].values())


@pytest.mark.parametrize("keep", [True, False])
def test_a_pruned_kernel_keeps_its_zeros_through_updates(keep):
    """optim.keep_zeros: the zeros of a pruned block kernel get no update (Adam, weight decay and all); other
    weights, biases, zero-initialised biases and a head that starts at zero (PPO's value head) train as before.
    Off, the zeros fill in."""
    o = base_config().optim
    o.update(warmup_steps=0, decay_steps=10, keep_zeros=keep)
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((16, 8)).astype(np.float32) * (rng.random((16, 8)) < 0.5)
    params = {"blocks_0": {"mlp": {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(8)}}},
              "score_head": {"kernel": jnp.zeros((8, 1))}}
    tx = optim.optimizer(o)
    state = tx.init(params)
    plain = base_config().optim
    plain.update({**o.to_dict(), "keep_zeros": False})
    plain_state = optim.optimizer(plain).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(plain_state)  # same checkpointed optimizer state
    for step in range(3):
        grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    fc = params["blocks_0"]["mlp"]["fc"]
    new = np.asarray(fc["kernel"])
    assert np.all(new[kernel != 0] != kernel[kernel != 0]) and np.all(fc["bias"] != 0)
    assert np.all(new[kernel == 0] == 0) == keep
    assert np.all(params["score_head"]["kernel"] != 0)


# --- whole runs through the CLI -------------------------------------------------------------------------

def test_preempted_and_resumed_run_equals_uninterrupted(data_dir, straight, tmp_path):
    expected = _summary(straight)

    interrupted = str(tmp_path / "interrupted")
    proc = subprocess.Popen([sys.executable, "-m", "omni.main", *small_overrides(data_dir, interrupted)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # SIGTERM once training is under way, as a TPU maintenance event would
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest[-3000:]
    assert "stopped by SIGTERM: saved step" in rest
    assert not os.path.exists(os.path.join(interrupted, "summary.json"))
    saved = int(rest.split("saved step ")[1].split(";")[0])
    assert 2 <= saved < 12

    # Resumed on this host split into two data-parallel devices (config.cpu_devices): the same run.
    out = run_cli(small_overrides(data_dir, interrupted, cpu_devices=2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout
    with open(os.path.join(interrupted, "config.json")) as f:
        assert json.load(f)["mesh"]["data"] == 2
    resumed = _summary(interrupted)
    assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert resumed["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    steps = [m["step"] for m in _metrics(interrupted) if "loss" in m]
    assert steps == list(range(1, 13))  # each step once
    # The workdir holds what DESIGN.md promises.
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer.model", "checkpoints", "tb"):
        assert os.path.exists(os.path.join(interrupted, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(interrupted, "tb")))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "nan")
    out = run_cli(small_overrides(data_dir, workdir, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                                        "train.checkpoint_every": 1}))
    assert out.returncode == 1
    assert "non-finite loss" in out.stderr and "at step" in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, out.stderr[-2000:]
    bad_step = int(error[0].split("at step ")[1].split(";")[0])
    kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert kept and max(kept) == bad_step - 1
    import omni
    _, params, _ = omni.load(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_load_returns_config_params_tokenizer(trained):
    import omni
    config, params, tokenizer = omni.load(trained)
    assert config.model.d_model == 64 and tokenizer.vocab_size == 512
    text = "def f(x):\n    return x\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    logits = GPT(config.model).apply({"params": params}, jnp.asarray([tokenizer.encode(text)]))
    assert logits.shape[-1] == 512


# --- bad input: one clear message, non-zero exit --------------------------------------------------------

@pytest.mark.parametrize("flag,needle", [
    ("--config.model.no_such_key=1", "no_such_key"),
    ("--config.train.seq_len=128", "config.train.seq_len=128"),
    ("--config.train.grad_accum=3", "config.train.batch_size=8"),
    ("--config.mesh.data=3", "config.mesh"),
    ("--config.model.variant=gpt5", "config.model.variant='gpt5'"),
])
def test_bad_config_names_the_key(flag, needle, data_dir, tmp_path):
    out = run_cli(small_overrides(data_dir, str(tmp_path / "w")) + [flag])
    assert out.returncode != 0
    assert needle in out.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_missing_data_path_and_vocab_mismatch(data_dir, trained, tmp_path):
    out = run_cli(small_overrides(data_dir, str(tmp_path / "w"), **{"data.name": "text",
                                                                    "data.path": "/no/such/corpus"}))
    assert out.returncode == 2 and "/no/such/corpus" in out.stderr
    out = run_cli(small_overrides(data_dir, str(tmp_path / "next"), **{"init_from": trained,
                                                                      "model.vocab_size": 640}))
    assert out.returncode == 2 and "config.model.vocab_size=640" in out.stderr and trained in out.stderr


@pytest.mark.slow  # CI: tests/test_faults.py sets a damaged latest step aside and resumes from the one before
def test_an_unreadable_only_checkpoint_is_set_aside_and_the_run_starts_over(data_dir, trained, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    out = run_cli(small_overrides(data_dir, workdir, steps=8))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint {step_dir} is damaged" in out.stdout and "starting again from step 0" in out.stdout
    assert os.path.isdir(os.path.join(workdir, "damaged", "4"))  # set aside, not deleted


def test_resuming_with_another_model_is_refused(data_dir, trained):
    out = run_cli(small_overrides(data_dir, trained, steps=8, **{"model.d_model": 32}))
    assert out.returncode == 2 and "config.model.d_model=64 (this run: 32)" in out.stderr


def test_validate_errors_in_process():
    c = base_config()
    c.mesh.update(data=2, fsdp=2, tensor=2)
    with pytest.raises(ConfigError, match="config.mesh"):
        validate(c, 4)
    c = base_config()
    c.train.grad_accum = 3
    with pytest.raises(ConfigError, match="config.train.batch_size=8"):
        validate(c, 1)
    c = base_config()
    c.cpu_devices = -1  # checked by omni.main before JAX starts its backends
    with pytest.raises(ConfigError, match="config.cpu_devices=-1"):
        cpu_devices(c)
