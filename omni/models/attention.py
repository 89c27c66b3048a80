"""Attention: the masks the GPT family needs and the XLA reference implementation.

Shapes: q, k, v are [batch, length, heads, head_dim]; masks are boolean, True where a query may attend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(length: int) -> jax.Array:
    """[length, length]: query i sees keys 0..i."""
    idx = jnp.arange(length)
    return idx[:, None] >= idx[None, :]


def banded_causal_mask(length: int, window: int) -> jax.Array:
    """GPT-3's locally banded sparse layers: query i sees keys i-window+1..i (the Sparse Transformer's
    local pattern; the paper does not publish the band width, so it is config.model.sparse_window)."""
    idx = jnp.arange(length)
    offset = idx[:, None] - idx[None, :]
    return (offset >= 0) & (offset < window)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
    """Reference softmax(q k^T / sqrt(d)) v with the softmax in float32 whatever the compute dtype."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
