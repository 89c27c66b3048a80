"""INT8 quantization of a GPT's weights: symmetric, one scale per output channel, stored as int8 values plus
float32 scales (4x smaller than fp32 on disk and in memory).

The model itself computes with them when config.model.quant is set ('int8': weight-only; 'w8a8': activations
quantised per token too); omni/models/linear.py holds those products.

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
from omni.models.linear import QMAX, scale_name


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
