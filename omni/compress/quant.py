"""INT8 quantization of a GPT's weights: symmetric, one scale per output channel, stored as int8 values plus
float32 scales (4x smaller than fp32 on disk and in memory).

The model itself computes with them when config.model.quant is set (omni/models/gpt.py):
- 'int8': weight-only. Each product runs on the int8 values converted inside the jit'd matmul and multiplies
  the output channels by their scales afterwards (x @ (V s) = (x @ V) s), so no float copy of a kernel is kept.
- 'w8a8': activations quantised too, one scale per token, and the product runs int8 x int8 -> int32.

`quantize_model` turns a trained model's params into that layout: every linear kernel of the blocks (named in
omni.compress.prune.LINEAR) and the tied embedding (one scale per vocabulary row, which is both the lookup's
row and the unembedding's output channel). LayerNorms, biases, positions and a scalar head stay float.

A Flax kernel's leading `in_axes` axes are its input (qkv [embed | 3, heads, kv] has one, the attention output
[heads, kv | embed] two); every other axis indexes output channels, each with its own scale.
"""
from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni.compress.prune import LINEAR, blocks

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


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token INT8 of activations [..., in]: (int8 values, float32 scales [...])."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax / QMAX, 1.0)
    return jnp.clip(jnp.round(x / scales[..., None]), -QMAX, QMAX).astype(jnp.int8), scales


def w8a8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, transposed: bool = False) -> jax.Array:
    """x [..., in] times the int8 matrix `values` [in, out] ([out, in] if transposed) with both sides in INT8:
    an int8 x int8 dot accumulated in int32, rescaled by the token's and the output channel's scales. float32."""
    xq, x_scales = quantize_rows(x)
    if transposed and xq.size == xq.shape[-1] and jax.default_backend() == "cpu":
        # One row (batch-1 decoding): XLA:CPU's int8 dot is a slow generic loop; a fused int32 multiply-sum over
        # the kernel's rows streams it 4-5x faster (measured through the generation benchmark's weights).
        acc = (values.astype(jnp.int32) * xq.reshape(1, -1).astype(jnp.int32)).sum(-1).reshape(xq.shape[:-1] + (-1,))
    else:
        acc = jax.lax.dot_general(xq, values, (((xq.ndim - 1,), (1 if transposed else 0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scales[..., None] * scales.reshape(-1)


def scale_name(kernel_name: str) -> str:
    """The parameter holding a quantized weight's scales: qkv_kernel -> qkv_scale; kernel, embedding -> scale."""
    return kernel_name.replace("kernel", "scale") if "kernel" in kernel_name else "scale"


def _quantized_weights(params: dict):
    """(parent dict, kernel name, input axes, whether stacked over layers) of every weight quantize_model
    stores as INT8; the embedding is seen transposed, [embed | vocab]."""
    for block, stacked in blocks(params):
        for path, n_in in LINEAR.items():
            yield functools.reduce(operator.getitem, path[:-1], params[block]), path[-1], n_in, stacked
    yield params["wte"], "embedding", None, False


def quantize_model(params: dict) -> dict:
    """A float model's params (scanned or unrolled) in config.model.quant's layout: each linear kernel and the
    embedding become int8 values, each beside its float32 scales (`scale_name`). Other leaves are kept."""
    params = jax.tree.map(lambda a: a, params)  # a copy of the dict structure; leaves are shared

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def quantize(kernel, n_in, stacked):
        if n_in is None:  # the embedding [vocab, embed]: one scale per row
            values, scales = quantize_kernel(kernel.T, 1)
            return values.T, scales
        if stacked:  # a scanned stack: each layer its own scales
            return jax.vmap(lambda k: tuple(quantize_kernel(k, n_in)))(kernel)
        return tuple(quantize_kernel(kernel, n_in))

    for parent, name, n_in, stacked in list(_quantized_weights(params)):
        parent[name], parent[scale_name(name)] = quantize(parent[name], n_in, stacked)
    return params


def dequantize_model(params: dict) -> dict:
    """The float params of a quantize_model'd tree (e.g. to export it): values x scales, scales removed."""
    params = jax.tree.map(lambda a: a, params)
    for parent, name, n_in, stacked in list(_quantized_weights(params)):
        values, scales = parent[name], parent.pop(scale_name(name))
        if n_in is None:
            scales = scales[:, None]
        elif stacked:  # scales [layers, out...] against values [layers, in..., out...]
            scales = scales.reshape(scales.shape[:1] + (1,) * n_in + scales.shape[1:])
        parent[name] = values.astype(jnp.float32) * scales
    return params
