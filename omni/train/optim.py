"""AdamW with GPT-3's schedule: linear warmup, cosine decay to a floor, then constant."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
    """0 -> lr over warmup_steps, cosine lr -> min_lr_ratio*lr until decay_steps, then constant. optax's
    decay_steps counts the warmup, as omni's does; with warmup_steps=0 it starts at lr, on the cosine."""
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, o.decay_steps,
                                              end_value=o.min_lr_ratio * o.lr)


def _is_kernel(path) -> bool:
    return str(getattr(path[-1], "key", "")).endswith("kernel")


def _is_block_kernel(path) -> bool:
    """A kernel inside the transformer blocks: what pruning (omni/compress) zeroes. Heads are never pruned, and
    a head may start at zero on purpose (PPO's value head)."""
    return _is_kernel(path) and any(str(getattr(k, "key", "")).startswith("blocks") for k in path)


def decay_mask(params):
    """Weight decay on matmul kernels only: not on biases, LayerNorm gains or embeddings (GPT-1, GPT-3)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_kernel(path), params)


def keep_zeros(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with no update for a block kernel weight that is exactly zero, so a pruned model (omni/compress)
    keeps its zeros through fine-tuning: the mask is the zeros themselves, nothing to store or restore, and the
    optimizer state is inner's (checkpoints written without it still restore). Trained dense kernels hold no
    exact zeros, so for them this changes nothing."""
    def update(updates, state, params):
        updates, state = inner.update(updates, state, params)
        return jax.tree_util.tree_map_with_path(
            lambda path, u, p: jnp.where(p == 0, jnp.zeros_like(u), u) if _is_block_kernel(path) else u,
            updates, params), state

    return optax.GradientTransformation(inner.init, update)


def optimizer(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(lr_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )
    return keep_zeros(tx) if o.keep_zeros else tx
