"""The GPT family against published parameter counts and an independent NumPy implementation."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from omni.config import base_config
from omni.models import GPT, count_params, flops_per_token
from omni.models.params import abstract_params

PUBLISHED = {  # Brown et al. 2020 Table 2.1; Radford et al. 2018, 2019 (released weights)
    "gpt3_small": 125e6, "gpt3_medium": 350e6, "gpt3_large": 760e6, "gpt3_xl": 1.3e9, "gpt3_2_7b": 2.7e9,
    "gpt3_6_7b": 6.7e9, "gpt3_13b": 13.0e9, "gpt3_175b": 175.0e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gpt3_parameter_counts_within_3_percent(name):
    config = load_config(name)
    n = count_params(abstract_params(config.model))
    assert abs(n / PUBLISHED[name] - 1) < 0.03, (name, n)
    assert config.model.d_model // config.model.num_heads * config.model.num_heads == config.model.d_model


@pytest.mark.parametrize("name,published,tol", [
    ("gpt2_small", 124e6, 0.01), ("gpt2_medium", 355e6, 0.01), ("gpt2_large", 774e6, 0.01),
    ("gpt2_xl", 1558e6, 0.01), ("gpt1", 117e6, 0.01)])
def test_gpt1_gpt2_parameter_counts(name, published, tol):
    n = count_params(abstract_params(load_config(name).model))
    assert abs(n / published - 1) < tol, (name, n)


def test_gpt2_small_matches_released_weights_exactly():
    # The released GPT-2 small checkpoint has 124,439,808 parameters (wte 50257x768, wpe 1024x768, 12 blocks).
    assert count_params(abstract_params(load_config("gpt2_small").model)) == 124_439_808


# --- an independent NumPy forward pass --------------------------------------------------------------------

def _np_layernorm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_block(x, p, variant, sparse, window):
    t, d = x.shape
    heads = p["attn"]["qkv_kernel"].shape[2]

    def attn(h):
        qkv = np.einsum("td,dchk->tchk", h, p["attn"]["qkv_kernel"]) + p["attn"]["qkv_bias"]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        scores = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(d // heads)
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        allowed = (j <= i) & ((i - j < window) if sparse else True)
        scores = np.where(allowed, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.einsum("hqs,shk->qhk", probs, v)
        return np.einsum("qhk,hkd->qd", y, p["attn"]["out_kernel"]) + p["attn"]["out_bias"]

    def mlp(h):
        u = _np_gelu(h @ p["mlp"]["fc"]["kernel"] + p["mlp"]["fc"]["bias"])
        return u @ p["mlp"]["proj"]["kernel"] + p["mlp"]["proj"]["bias"]

    if variant == "gpt1":
        x = _np_layernorm(x + attn(x), p["ln1"])
        return _np_layernorm(x + mlp(x), p["ln2"])
    x = x + attn(_np_layernorm(x, p["ln1"]))
    return x + mlp(_np_layernorm(x, p["ln2"]))


def numpy_gpt(params, tokens, m):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = []
    for row in np.asarray(tokens):
        x = p["wte"]["embedding"][row] + p["wpe"][: len(row)]
        for layer in range(m.num_layers):
            block = jax.tree.map(lambda a: a[layer], p["blocks"])
            sparse = m.variant == "gpt3" and layer % 2 == 1
            x = _np_block(x, block, m.variant, sparse, m.sparse_window)
        if m.variant != "gpt1":
            x = _np_layernorm(x, p["ln_f"])
        out.append(x @ p["wte"]["embedding"].T)
    return np.stack(out)


def _tiny(variant, **kw):
    m = base_config().model
    m.update({**dict(variant=variant, num_layers=4, num_heads=2, d_model=16, d_ff=64, vocab_size=50, max_len=24,
                     sparse_window=3), **kw})
    return m


def _init(model, tokens):
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])


def _randomised(params, seed=1):
    # Perturb every parameter (biases and LayerNorm included, which start at 0/1) so the check is not trivial.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("variant", ["gpt1", "gpt2", "gpt3"])
def test_forward_matches_numpy_reference(variant):
    m = _tiny(variant)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, m.vocab_size)
    model = GPT(m)
    params = _randomised(_init(model, tokens))
    logits = jax.jit(model.apply)({"params": params}, tokens)
    assert logits.shape == (2, 12, m.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), numpy_gpt(params, tokens, m), rtol=1e-4, atol=1e-4)


def test_gpt3_band_changes_the_output():
    # The same parameters with the band wider than the sequence must give different logits (the mask acts).
    m = _tiny("gpt3")
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, m.vocab_size)
    params = _randomised(_init(GPT(m), tokens))
    wide = _tiny("gpt3", )
    wide.sparse_window = 100
    banded = jax.jit(GPT(m).apply)({"params": params}, tokens)
    dense = jax.jit(GPT(wide).apply)({"params": params}, tokens)
    np.testing.assert_allclose(banded[:, :3], dense[:, :3], rtol=1e-5, atol=1e-6)  # inside the band: same
    assert not np.allclose(banded[:, 3:], dense[:, 3:], atol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits():
    m = _tiny("gpt2")
    a = jnp.arange(10)[None] % m.vocab_size
    b = a.at[0, 7].set(3)
    model = GPT(m)
    params = _init(model, a)
    apply = jax.jit(model.apply)
    la, lb = apply({"params": params}, a), apply({"params": params}, b)
    np.testing.assert_allclose(la[:, :7], lb[:, :7], rtol=1e-6, atol=1e-6)
    assert not np.allclose(la[:, 7:], lb[:, 7:])


# "full" and "dots" take 25 s together on 2 cores: slow, kept out of CI; "none" covers unrolled vs scan there.
@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow),
                                   pytest.param("dots", marks=pytest.mark.slow)])
def test_unrolled_and_remat_match_scan(remat):
    m = _tiny("gpt3", remat=remat)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, m.vocab_size)
    params = _randomised(_init(GPT(m), tokens))
    unrolled_cfg = _tiny("gpt3", remat=remat, scan_layers=False)
    unrolled = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(m.num_layers):
        unrolled[f"blocks_{i}"] = jax.tree.map(lambda a: a[i], params["blocks"])

    def loss_and_grad(model, p):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(p)

    l1, g1 = loss_and_grad(GPT(m), params)
    l2, g2 = loss_and_grad(GPT(unrolled_cfg), unrolled)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1["blocks"]["mlp"]["fc"]["kernel"][2], g2["blocks_2"]["mlp"]["fc"]["kernel"],
                               rtol=1e-5, atol=1e-7)


def test_initialisation_follows_gpt2():
    m = _tiny("gpt2", num_layers=8, d_model=256, d_ff=1024, num_heads=4)
    params = _init(GPT(m), jnp.zeros((1, 4), jnp.int32))
    blocks = params["blocks"]
    assert np.std(blocks["mlp"]["fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(blocks["mlp"]["proj"]["kernel"]) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert np.std(blocks["attn"]["out_kernel"]) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert np.all(blocks["ln1"]["scale"] == 1) and np.all(blocks["attn"]["qkv_bias"] == 0)


def test_dropout_is_random_in_training_and_off_in_eval():
    m = _tiny("gpt2", dropout=0.5)
    tokens = jnp.zeros((1, 8), jnp.int32)
    model = GPT(m)
    params = _init(model, tokens)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    eval_a = apply({"params": params}, tokens)
    eval_b = apply({"params": params}, tokens)
    train = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train, eval_a)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    m = _tiny("gpt2", dtype="bfloat16")
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = GPT(m).init(jax.random.key(0), tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    assert jax.jit(GPT(m).apply)(variables, tokens).dtype == jnp.float32


def test_flops_per_token_counts_attention():
    m = load_config("gpt3_175b").model
    # 6N for N = 175B, plus attention's 12 * 96 * 2048 * 12288 ~ 2.9e10 (PaLM's accounting).
    assert flops_per_token(m, 2048) == pytest.approx(6 * 174.6e9 + 12 * 96 * 2048 * 12288, rel=0.01)


def test_unembed_gradient_matches_autodiff():
    """The hand-written backward of the tied unembedding equals autodiff of x @ E^T."""
    from omni.models.linear import unembed
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)
    ours = jax.grad(lambda x, e: jnp.sum(jnp.sin(unembed(x, e)) * probe), argnums=(0, 1))(x, emb)
    ref = jax.grad(lambda x, e: jnp.sum(jnp.sin(x @ e.T) * probe), argnums=(0, 1))(x, emb)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
