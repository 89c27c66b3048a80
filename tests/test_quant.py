"""INT8 quantization (omni/compress/quant.py) against NumPy: the int8 values and scales of the definition, the
rounding error bound, an exact int32 product; and the GPT computing with INT8 weights (model.quant): the
float model's outputs on the dequantised weights, 4x smaller parameters, and the same HF export."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni.compress import quant
from omni.config import base_config
from omni.models import GPT, linear


def _kernel(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)  # heavy tails, as trained weights have


@pytest.mark.parametrize("shape,in_axes", [((48, 64), 1), ((32, 3, 4, 8), 1), ((4, 8, 32), 2)])
def test_per_channel_int8_matches_numpy(shape, in_axes):
    w = _kernel(shape)
    q = quant.quantize_kernel(w, in_axes)
    scales = np.abs(w).max(axis=tuple(range(in_axes))) / 127
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.values), np.clip(np.round(w / scales), -127, 127).astype(np.int8))
    assert q.values.dtype == jnp.int8 and q.values.nbytes * 4 == w.nbytes
    error = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert np.all(error <= scales / 2 * (1 + 1e-5))
    # each channel's largest weight is exactly +-127 steps
    assert np.all(np.abs(np.asarray(q.values)).max(axis=tuple(range(in_axes))) == 127)


def test_an_all_zero_channel_quantizes_to_zero_without_nan():
    w = _kernel((16, 8))
    w[:, 3] = 0
    q = quant.quantize_kernel(w)
    assert np.all(np.asarray(q.values)[:, 3] == 0) and np.all(np.isfinite(np.asarray(q.scales)))
    assert np.all(np.asarray(quant.dequantize(q))[:, 3] == 0)


@pytest.mark.parametrize("transposed", [False, True])
def test_w8a8_is_the_exact_int32_product_rescaled(transposed):
    w, x = _kernel((64, 32), 1), np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    q = quant.quantize_kernel(w)
    xq, xs = (np.asarray(a) for a in linear.quantize_rows(x))
    exact = xq.astype(np.int64) @ np.asarray(q.values).astype(np.int64)  # int32 cannot overflow: 64 x 127^2
    expected = exact * xs[:, None] * np.asarray(q.scales)[None]
    values = q.values.T if transposed else q.values
    out = np.asarray(linear.w8a8_matmul(x, values, q.scales, transposed))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # one row (batch-1 decoding, its own CPU path), with the leading axes of a decoding step
    one = np.asarray(linear.w8a8_matmul(x[:1].reshape(1, 1, -1), values, q.scales, transposed))
    np.testing.assert_allclose(one, expected[:1].reshape(1, 1, -1), rtol=1e-6)
    dense = x @ w
    assert np.linalg.norm(out - dense) / np.linalg.norm(dense) < 0.02


def _model(**kw):
    m = base_config().model
    m.update(dict(num_layers=2, num_heads=4, d_model=64, d_ff=256, vocab_size=96, max_len=32), **kw)
    return m


def test_the_int8_model_computes_the_dequantized_weights():
    m = _model()
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 16))
    params = nn.unbox(jax.jit(GPT(m).init)(jax.random.key(0), tokens)["params"])
    q = quant.quantize_model(params)
    int8 = GPT(_model(quant="int8"))
    # the layout the model declares is the layout quantize_model writes: what a checkpoint restores onto
    declared = jax.eval_shape(lambda: nn.unbox(int8.init(jax.random.key(0), tokens)["params"]))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), declared) == jax.tree.map(lambda a: (a.shape, a.dtype), q)
    kernels = [a for path, a in jax.tree_util.tree_leaves_with_path(q) if "kernel" in str(path) or "wte" in str(path)]
    assert {a.dtype for a in kernels} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}  # values and scales
    size = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))  # noqa: E731
    assert size(q) < 0.3 * size(params)  # 4x on the weights; positions, LayerNorms and biases stay float

    back = quant.dequantize_model(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    embedding = np.asarray(params["wte"]["embedding"])
    step = np.abs(embedding).max(axis=1, keepdims=True) / 127  # one scale per vocabulary row
    assert np.all(np.abs(np.asarray(back["wte"]["embedding"]) - embedding) <= step / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(back["wpe"], params["wpe"])

    float_apply = jax.jit(GPT(m).apply)
    dense = float_apply({"params": params}, tokens)
    np.testing.assert_allclose(jax.jit(int8.apply)({"params": q}, tokens), float_apply({"params": back}, tokens),
                               atol=2e-5, rtol=0)
    for mode, bound in (("int8", 0.02), ("w8a8", 0.03)):
        out = jax.jit(GPT(_model(quant=mode)).apply)({"params": q}, tokens)
        assert float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense)) < bound, mode


def test_an_int8_model_exports_to_hf_as_its_dequantized_weights(tmp_path):
    from safetensors.numpy import load_file

    from omni.interop.hf import to_hf

    m = _model()
    params = nn.unbox(jax.jit(GPT(m).init)(jax.random.key(2), np.zeros((1, 4), np.int32))["params"])
    q = quant.quantize_model(params)
    to_hf(_model(quant="int8"), q, str(tmp_path / "int8"))
    to_hf(m, quant.dequantize_model(q), str(tmp_path / "float"))
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("int8", "float"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
