"""INT8 quantization (omni/compress/quant.py) against NumPy: the int8 values and scales of the definition, the
rounding error bound, an exact int32 product, and W8A8 / weight-only products close to float32."""
import jax.numpy as jnp
import numpy as np
import pytest

from omni.compress import quant


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


def test_w8a8_is_the_exact_int32_product_rescaled():
    w, x = _kernel((64, 32), 1), np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    q = quant.quantize_kernel(w)
    xq, xs = (np.asarray(a) for a in quant.quantize_rows(x))
    exact = xq.astype(np.int64) @ np.asarray(q.values).astype(np.int64)  # int32 cannot overflow: 64 x 127^2
    expected = exact * xs[:, None] * np.asarray(q.scales)[None]
    np.testing.assert_allclose(np.asarray(quant.w8a8_matmul(x, q)), expected, rtol=1e-6)
    dense = x @ w
    assert np.linalg.norm(np.asarray(quant.w8a8_matmul(x, q)) - dense) / np.linalg.norm(dense) < 0.02


def test_weight_only_product_is_the_dequantized_kernels():
    w, x = _kernel((4, 8, 32), 3), np.random.default_rng(4).standard_normal((2, 3, 32)).astype(np.float32)
    q = quant.quantize_kernel(w, in_axes=2)
    out = np.asarray(quant.weight_only_matmul(x, q, in_axes=2))
    np.testing.assert_allclose(out, x @ np.asarray(quant.dequantize(q)).reshape(32, 32), rtol=1e-5, atol=1e-6)
    dense = x @ w.reshape(32, 32)
    assert np.linalg.norm(out - dense) / np.linalg.norm(dense) < 0.01
