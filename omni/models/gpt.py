"""The GPT decoder family: GPT-1 (post-LN), GPT-2 (pre-LN) and GPT-3 (GPT-2 with alternating
dense and locally banded sparse attention).

Every parameter carries logical axis names (batch, length, embed, heads, kv, mlp, vocab, layers); the one
table in omni/parallel.py maps them to mesh axes. Layers run under nn.scan so compile time does not grow
with depth; config.model.scan_layers=False unrolls them.

Generation passes a `KVCache`: the model then writes the new tokens' keys and values into it and returns
`(logits, cache)`; omni/generate.py drives prefill and decoding with it. The linear layers and products
(omni/models/linear.py) also compute with int8 weights (model.quant) and with decoding's transposed kernels.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni.models.attention import attention, cached_attention, resolve
from omni.models.linear import Dense, Embed, init_normal, init_ones, init_zeros, kernel_param, matmul


def _constrain(x: jax.Array, axes: tuple) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


class KVCache(flax.struct.PyTreeNode):
    """Keys and values of every layer for `slots` token positions of each row. Rows are left-padded: row b's
    tokens start at slot `start[b]`, so one scalar `index` (the next slot to write) serves the whole batch and
    a token's position is its slot minus its row's start. One array per layer, heads-major, so that decoding
    writes a token in place and attends without copying or transposing the cache."""
    k: tuple  # per layer: [batch, heads, slots, head_dim]
    v: tuple
    start: jax.Array  # [batch] int32: first slot holding a real token (the row's left padding before it)
    index: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, m: ml_collections.ConfigDict, start: jax.Array, slots: int) -> "KVCache":
        shape = (start.shape[0], m.num_heads, slots, m.d_model // m.num_heads)
        k = tuple(jnp.zeros(shape, m.dtype) for _ in range(m.num_layers))
        v = tuple(jnp.zeros(shape, m.dtype) for _ in range(m.num_layers))
        return cls(k=k, v=v, start=start.astype(jnp.int32), index=jnp.zeros((), jnp.int32))

    def repeat(self, times: int) -> "KVCache":
        """Each row `times` times in a row: one prefill shared by several continuations of its prompt."""
        rows = functools.partial(jnp.repeat, repeats=times, axis=0, total_repeat_length=self.start.shape[0] * times)
        return self.replace(k=tuple(map(rows, self.k)), v=tuple(map(rows, self.v)), start=rows(self.start))


def layer_norm(m: ml_collections.ConfigDict, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=m.dtype, param_dtype=m.param_dtype, scale_init=init_ones(("embed",)),
                        bias_init=init_zeros(("embed",)), name=name)


class Attention(nn.Module):
    config: ml_collections.ConfigDict
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, sparse: jax.Array, segment_ids: jax.Array | None, kv=None, slot_info=None):
        m = self.config
        head_dim = m.d_model // m.num_heads
        # Kernels keep a separate heads axis so the rules table can shard attention by heads.
        t = m.get("transposed_kernels", False)  # decoding's layout (omni/models/linear.py)
        w_qkv, s_qkv = kernel_param(self, "qkv_kernel", 0.02, (("embed",), (m.d_model,)),
                                    ((None, "heads", "kv"), (3, m.num_heads, head_dim)))
        b_qkv = self.param("qkv_bias", init_zeros((None, "heads", "kv")), (3, m.num_heads, head_dim), m.param_dtype)
        w_out, s_out = kernel_param(self, "out_kernel", _residual_std(m),
                                    (("heads", "kv"), (m.num_heads, head_dim)), (("embed",), (m.d_model,)))
        b_out = self.param("out_bias", init_zeros(("embed",)), (m.d_model,), m.param_dtype)
        batch, length, _ = x.shape
        self.sow("intermediates", "qkv_in", x)  # SparseGPT's calibration reads each product's inputs (no-op else)
        # Plain 2-D products of flattened kernels: the fastest lowering on CPU, identical math everywhere.
        w_qkv = w_qkv.reshape(-1, m.d_model) if t else w_qkv.reshape(m.d_model, -1)
        qkv = matmul(m, x, w_qkv, s_qkv).reshape(batch, length, 3, m.num_heads, head_dim)
        qkv = qkv + b_qkv.astype(m.dtype)
        q, k, v = (_constrain(qkv[:, :, i], ("batch", "length", "heads", "kv")) for i in range(3))
        if kv is None:
            dropout_rng = None if self.deterministic or m.dropout == 0.0 else self.make_rng("dropout")
            y = attention(q, k, v, impl=resolve(m.attention, m.dtype, m.dropout, length=length), sparse=sparse,
                          window=m.sparse_window, segment_ids=segment_ids, chunk=m.attention_chunk,
                          dropout_rng=dropout_rng, dropout_rate=m.dropout)
        else:
            y, kv = _cached_attention(m, q, k, v, kv, slot_info, sparse, segment_ids)
        y = _constrain(y, ("batch", "length", "heads", "kv")).reshape(batch, length, m.d_model)
        self.sow("intermediates", "out_in", y)
        y = matmul(m, y, w_out.reshape(m.d_model, m.d_model), s_out)
        y = y + b_out.astype(m.dtype)
        return y if kv is None else (y, kv)


def _cached_attention(m, q, k, v, kv, slot_info, sparse, segment_ids):
    """Attends from the new tokens to every earlier, non-padding slot of one layer's cache and to the new tokens
    of their own segment, then writes their keys and values at slots index.. (any number of new tokens, at any
    index)."""
    index, k_valid, q_valid = slot_info
    cache_k, cache_v = kv
    band = jnp.where(sparse, m.sparse_window, cache_k.shape[2] + 1)
    y = cached_attention(q, k, v, cache_k, cache_v, q_offset=index, window=band, q_segment_ids=q_valid,
                         k_segment_ids=k_valid, new_segment_ids=segment_ids, chunk=m.attention_chunk)
    # Make the writes depend on the attention output (adding an exact zero): XLA then orders every read of the
    # old cache before its in-place update; otherwise it copies each layer's cache twice per token (measured:
    # 24 copies, 0.9 ms of a 5.3 ms batch-1 token). A barrier does not do it: XLA:CPU drops barriers first.
    # Elementwise (y has k's shape and sharding), so no device waits on another.
    after = 0 * jnp.isfinite(y).astype(k.dtype)  # 0 even where y is not finite
    k, v = k + after, v + after
    cache_k, cache_v = (_constrain(jax.lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).astype(c.dtype),
                                                                (0, 0, index, 0)), ("batch", "heads", None, "kv"))
                        for c, x in zip(kv, (k, v)))
    return y, (cache_k, cache_v)


class MLP(nn.Module):
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.config
        self.sow("intermediates", "fc_in", x)
        h = Dense(m, m.d_ff, ("embed", "mlp"), 0.02, name="fc")(x)
        h = _constrain(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        self.sow("intermediates", "proj_in", h)
        return Dense(m, m.d_model, ("mlp", "embed"), _residual_std(m), name="proj")(h)


def _residual_std(m: ml_collections.ConfigDict) -> float:
    # GPT-2: projections into the residual stream scaled by 1/sqrt(N), N = 2 residual adds per layer.
    return 0.02 if m.variant == "gpt1" else 0.02 / math.sqrt(2 * m.num_layers)


class Block(nn.Module):
    """One decoder layer. `sparse` (a traced bool, scanned over layers) selects GPT-3's banded mask."""
    config: ml_collections.ConfigDict
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, sparse: jax.Array, segment_ids: jax.Array | None = None, kv=None,
                 slot_info=None):
        """`kv`: this layer's (keys, values) cache and `slot_info` (index, valid slots, valid new tokens) when
        generating;
        the updated cache is then the second output (nn.scan stacks it over layers)."""
        m = self.config
        self.sow("intermediates", "block_in", x)
        drop = functools.partial(nn.Dropout(m.dropout), deterministic=self.deterministic)
        attention_out = Attention(m, self.deterministic, name="attn")
        mlp = MLP(m, name="mlp")

        def attn(h):
            nonlocal kv
            out = attention_out(h, sparse, segment_ids, kv, slot_info)
            if kv is None:
                return out
            out, kv = out
            return out

        if m.variant == "gpt1":  # post-LN: normalise after each residual add
            x = layer_norm(m, "ln1")(x + drop(attn(x)))
            x = layer_norm(m, "ln2")(x + drop(mlp(x)))
        else:  # pre-LN: normalise the input of each sub-block
            x = x + drop(attn(layer_norm(m, "ln1")(x)))
            x = x + drop(mlp(layer_norm(m, "ln2")(x)))
        return _constrain(x, ("batch", "length", "embed")), kv


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer, recompute it in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def sparse_layers(m: ml_collections.ConfigDict) -> np.ndarray:
    """Which layers use banded attention: GPT-3 alternates dense (even) and sparse (odd) layers. NumPy, so
    unrolled layers see a static choice (accelerator kernels need static masks)."""
    layer = np.arange(m.num_layers)
    return (layer % 2 == 1) if m.variant == "gpt3" else np.zeros(m.num_layers, bool)


class GPT(nn.Module):
    """`GPT(config.model).apply({'params': p}, tokens)` -> logits [batch, length, vocab] (float32); with
    model.head='scalar' (reward model, value function) a score per position [batch, length] instead, from a
    linear head on the final hidden state in place of the unembedding.

    For packed rows, `segment_ids` [batch, length] keeps documents from attending to each other and
    `positions` [batch, length] restarts the learned positions at each document (both optional). With a
    `cache` (generation) the tokens fill its slots from cache.index on and the call returns (logits, cache);
    there `segment_ids` and `positions` (optional) pack several continuations of each row's cached prefix side
    by side: every new token sees the whole prefix, and only the new tokens of its own segment (DPO's responses
    to one prompt, omni/stages/dpo.py)."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        m = self.config
        wte = Embed(m, name="wte")
        wpe = self.param("wpe", init_normal(0.01 if m.variant != "gpt1" else 0.02, (None, "embed")),
                         (m.max_len, m.d_model), m.param_dtype)
        tokens = _constrain(tokens, ("batch", "length"))
        slot_info = None
        if cache is not None:  # left-padded rows: position = slot - start; padding only attends to padding
            slots = cache.index + jnp.arange(tokens.shape[1])
            q_valid = (slots[None, :] >= cache.start[:, None]).astype(jnp.int32)
            if positions is None:
                positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
            if segment_ids is None:
                segment_ids = q_valid
            k_valid = (jnp.arange(cache.k[0].shape[2])[None, :] >= cache.start[:, None]).astype(jnp.int32)
            slot_info = (cache.index, k_valid, q_valid)
        pos = wpe[: tokens.shape[1]] if positions is None else jnp.take(wpe, positions, axis=0)
        x = wte(tokens) + pos.astype(m.dtype)
        x = nn.Dropout(m.dropout)(x, deterministic=deterministic)
        x = _constrain(x, ("batch", "length", "embed"))
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = self._blocks(x, deterministic, segment_ids, kv, slot_info)
        if m.variant != "gpt1":
            x = layer_norm(m, "ln_f")(x)
        if m.get("head", "lm") == "scalar":  # reward model / value function: one number per position
            score = nn.Dense(1, dtype=m.dtype, param_dtype=m.param_dtype,
                             kernel_init=init_normal(0.02, ("embed", None)), bias_init=init_zeros((None,)),
                             name="score_head")(x)
            out = _constrain(score[..., 0].astype(jnp.float32), ("batch", "length"))
        else:
            out = _constrain(wte.attend(x).astype(jnp.float32), ("batch", "length", "vocab"))  # tied embeddings
        if cache is None:
            return out
        return out, cache.replace(k=kv[0], v=kv[1], index=cache.index + tokens.shape[1])

    def _blocks(self, x, deterministic, segment_ids, kv, slot_info):
        m = self.config
        block = Block
        if m.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
        sparse = sparse_layers(m)
        if m.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, 0, nn.broadcast), length=m.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            # A scanned cache is stacked over layers (a copy per call: Generator runs layers unrolled).
            stacked = None if kv is None else tuple(jnp.stack(c) for c in kv)
            x, stacked = stack(m, deterministic, name="blocks")(x, jnp.asarray(sparse), segment_ids, stacked,
                                                                slot_info)
            return x, None if kv is None else tuple(tuple(c) for c in stacked)
        new_kv = []
        for i in range(m.num_layers):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x, layer_kv = block(m, deterministic, name=f"blocks_{i}")(x, bool(sparse[i]), segment_ids, layer_kv,
                                                                     slot_info)
            new_kv.append(layer_kv)
        return x, None if kv is None else tuple(zip(*new_kv))


def continue_prefixes(apply, m: ml_collections.ConfigDict, prefix: jax.Array, prefix_start: jax.Array,
                      inputs: jax.Array) -> jax.Array:
    """The output of `apply(tokens, cache) -> (out, cache)` (a GPT's call) on `inputs` [n * group, length], row r
    continuing prefix r // group of `prefix` [n, width] (left-padded: its tokens start at slot `prefix_start`,
    [n] or [n, 1]). Each prefix runs once, filling a KV cache that its group's rows share, as if every row held
    its prefix: a prompt's samples are read so, the prompt once (omni/stages/rollout.py)."""
    group = inputs.shape[0] // prefix.shape[0]
    cache = KVCache.zeros(m, prefix_start.reshape(-1), prefix.shape[1] + inputs.shape[1])
    _, cache = apply(prefix, cache)
    out, _ = apply(inputs, cache.repeat(group))
    return out


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token, counted honestly (PaLM appendix B): 6 x every matmul weight, the tied
    unembedding included, plus 12 x layers x seq_len x d_model for attention scores and weighted sums
    (the full square, as the XLA kernel computes it; remat's recomputation is not counted)."""
    head = m.vocab_size if m.get("head", "lm") == "lm" else 1
    matmul_params = m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.d_ff) + head * m.d_model
    return 6.0 * matmul_params + 12.0 * m.num_layers * seq_len * m.d_model
