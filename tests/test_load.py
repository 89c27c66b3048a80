"""omni.load gives back the saved params, placed so that a user's own jit'd train step compiles once."""
import glob
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omni
from omni import data
from omni.config import base_config
from omni.models import GPT
from omni.workdir import Workdir


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(workdir, params) of a random 1-layer GPT written as a model-only workdir."""
    root = tmp_path_factory.mktemp("load")
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    tokenizer = data.train_tokenizer(texts, 512, str(root / "t.model"))
    config = base_config()
    config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64, vocab_size=tokenizer.vocab_size, max_len=16)
    params = nn.unbox(jax.jit(GPT(config.model).init)(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    workdir = str(root / "model")
    Workdir(workdir).write_model(config, params, tokenizer.model_path)
    return workdir, jax.device_get(params)


def test_load_returns_the_saved_params_and_tokenizer(saved):
    workdir, expected = saved
    config, params, tokenizer = omni.load(workdir)
    assert config.model.d_model == 32 and tokenizer.vocab_size == config.model.vocab_size
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.devices() == {jax.devices()[0]}


def test_own_jit_step_on_loaded_params_compiles_once(saved, caplog):
    """The README's pattern: optax's fresh state (its step count uncommitted) beside the loaded params. Committed
    params made the first call's outputs committed, so the second call compiled again."""
    workdir, _ = saved
    config, params, tokenizer = omni.load(workdir)
    model = GPT(config.model)
    opt = optax.adamw(1e-4)
    opt_state = opt.init(params)
    tokens = jnp.asarray([tokenizer.encode("def f(x):\n    return x\n")[:8]] * 2, jnp.int32)
    traces = []

    @jax.jit
    def step(params, opt_state, tokens):
        traces.append(1)

        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for _ in range(3):
            params, opt_state, loss = step(params, opt_state, tokens)
            losses.append(float(loss))
    compiles = [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert step._cache_size() == 1, f"step compiled {step._cache_size()} times"
    assert len(compiles) == 1 and len(traces) == 1
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
