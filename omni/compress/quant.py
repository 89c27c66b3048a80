"""INT8 quantization of linear kernels: symmetric, one scale per output channel (weight-only, 4x smaller than
fp32), and the products that use them: weights dequantised inside the matmul, or W8A8, where each row of the
activations is quantised on the fly (one scale per token) and the product runs int8 x int8 -> int32.

A Flax kernel's leading `in_axes` axes are its input (qkv [embed | 3, heads, kv] has one, the attention output
[heads, kv | embed] two); every other axis indexes output channels, each with its own scale.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

QMAX = 127  # symmetric: -127..127, so that negating a weight never overflows


class QuantizedKernel(NamedTuple):
    """int8 values [kernel's shape] and float32 scales [output axes]: kernel ~= values * scales."""
    values: jax.Array
    scales: jax.Array


def quantize_kernel(kernel: jax.Array, in_axes: int = 1) -> QuantizedKernel:
    """Per-output-channel symmetric INT8: scale = max |w| over the channel's inputs / 127 (1 for an all-zero
    channel, whose values are then all 0), values = round(w / scale)."""
    w = jnp.asarray(kernel, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(in_axes)))
    scales = jnp.where(amax > 0, amax / QMAX, 1.0)
    values = jnp.clip(jnp.round(w / scales), -QMAX, QMAX).astype(jnp.int8)
    return QuantizedKernel(values, scales)


def dequantize(q: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    return (q.values.astype(jnp.float32) * q.scales).astype(dtype)


def weight_only_matmul(x: jax.Array, q: QuantizedKernel, in_axes: int = 1) -> jax.Array:
    """x [..., in] @ the kernel as a 2-D (in, out) matrix, dequantised inside the jit'd product (XLA fuses the
    int8 -> float conversion into the dot's operand, so no float copy of the kernel stays in memory)."""
    values = _matrix(q.values, in_axes)
    w = values.astype(x.dtype) * q.scales.reshape(-1).astype(x.dtype)
    return x @ w


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token INT8 of activations [..., in]: (int8 values, float32 scales [...])."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax / QMAX, 1.0)
    return jnp.clip(jnp.round(x / scales[..., None]), -QMAX, QMAX).astype(jnp.int8), scales


def w8a8_matmul(x: jax.Array, q: QuantizedKernel, in_axes: int = 1) -> jax.Array:
    """x [..., in] @ kernel with both sides in INT8: an int8 x int8 dot accumulated in int32, rescaled by the
    token's and the output channel's scales. Returns float32."""
    xq, x_scales = quantize_rows(x)
    values = _matrix(q.values, in_axes)
    acc = jax.lax.dot_general(xq, values, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scales[..., None] * q.scales.reshape(-1)


def _matrix(values: jax.Array, in_axes: int) -> jax.Array:
    """A kernel as the 2-D (in, out) matrix of its product."""
    return values.reshape(math.prod(values.shape[:in_axes]), -1)
