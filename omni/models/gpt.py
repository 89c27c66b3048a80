"""The GPT decoder family in one file: GPT-1 (post-LN), GPT-2 (pre-LN) and GPT-3 (GPT-2 with alternating
dense and locally banded sparse attention).

Every parameter carries logical axis names (batch, length, embed, heads, kv, mlp, vocab, layers); the one
table in omni/parallel.py maps them to mesh axes. Layers run under nn.scan so compile time does not grow
with depth; config.model.scan_layers=False unrolls them.

Generation passes a `KVCache`: the model then writes the new tokens' keys and values into it and returns
`(logits, cache)`; omni/generate.py drives prefill and decoding with it. With model.quant the linear kernels and
the embedding are int8 with per-channel scales (omni/compress/quant.py writes them) and every product uses them.
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

from omni.compress import quant as quant_lib
from omni.models.attention import attention, cached_attention, resolve

Dtype = jnp.dtype


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


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


def layer_norm(m: ml_collections.ConfigDict, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=m.dtype, param_dtype=m.param_dtype, scale_init=_ones(("embed",)),
                        bias_init=_zeros(("embed",)), name=name)


class Attention(nn.Module):
    config: ml_collections.ConfigDict
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, sparse: jax.Array, segment_ids: jax.Array | None, kv=None, slot_info=None):
        m = self.config
        head_dim = m.d_model // m.num_heads
        # Kernels keep a separate heads axis so the rules table can shard attention by heads.
        t = m.get("transposed_kernels", False)  # generation's layout (see Dense)
        w_qkv, s_qkv = _kernel(self, "qkv_kernel", 0.02, (("embed",), (m.d_model,)),
                               ((None, "heads", "kv"), (3, m.num_heads, head_dim)))
        b_qkv = self.param("qkv_bias", _zeros((None, "heads", "kv")), (3, m.num_heads, head_dim), m.param_dtype)
        w_out, s_out = _kernel(self, "out_kernel", _residual_std(m), (("heads", "kv"), (m.num_heads, head_dim)),
                               (("embed",), (m.d_model,)))
        b_out = self.param("out_bias", _zeros(("embed",)), (m.d_model,), m.param_dtype)
        batch, length, _ = x.shape
        self.sow("intermediates", "qkv_in", x)  # SparseGPT's calibration reads each product's inputs (no-op else)
        # Plain 2-D products of flattened kernels: the fastest lowering on CPU, identical math everywhere.
        w_qkv = w_qkv.reshape(-1, m.d_model) if t else w_qkv.reshape(m.d_model, -1)
        qkv = _matmul(m, x, w_qkv, s_qkv).reshape(batch, length, 3, m.num_heads, head_dim)
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
        y = _matmul(m, y, w_out.reshape(m.d_model, m.d_model), s_out)
        y = y + b_out.astype(m.dtype)
        return y if kv is None else (y, kv)


def _cached_attention(m, q, k, v, kv, slot_info, sparse, q_valid):
    """Attends from the new tokens to every earlier, non-padding slot of one layer's cache and to each other,
    then writes their keys and values at slots index.. (any number of new tokens, at any index)."""
    index, k_valid = slot_info
    cache_k, cache_v = kv
    band = jnp.where(sparse, m.sparse_window, cache_k.shape[2] + 1)
    y = cached_attention(q, k, v, cache_k, cache_v, q_offset=index, window=band, q_segment_ids=q_valid,
                         k_segment_ids=k_valid, chunk=m.attention_chunk)
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


class Dense(nn.Module):
    """A linear layer: kernel [in, out] and bias, as nn.Dense stores them (same names, same initial values).
    Under model.transposed_kernels (generation's layout, set by omni.generate.Generator on a transposed copy of
    the weights) the kernel is stored [out, in]: decoding multiplies a few rows by every kernel, and XLA:CPU runs
    those products as (W^T x^T)^T about 30% faster when W^T is laid out in memory (measured: +29% decode
    tokens/s at batch 8); transposing inside the decode loop would copy each token."""
    config: ml_collections.ConfigDict
    features: int
    axes: tuple  # logical axes of the [in, out] kernel
    std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.config
        w, scale = _kernel(self, "kernel", self.std, ((self.axes[0],), (x.shape[-1],)),
                           ((self.axes[1],), (self.features,)))
        b = self.param("bias", _zeros((self.axes[1],)), (self.features,), m.param_dtype)
        return _matmul(m, x, w, scale) + b.astype(m.dtype)


def _kernel(module: nn.Module, name: str, std: float, inputs: tuple, outputs: tuple):
    """A linear kernel's parameter(s): (float kernel, None), or under model.quant (int8 values, float32 scales
    per output channel). `inputs` and `outputs` are (logical axes, shape) pairs; the kernel is inputs + outputs,
    or outputs + inputs under model.transposed_kernels."""
    m = module.config
    first, second = (outputs, inputs) if m.get("transposed_kernels", False) else (inputs, outputs)
    axes, shape = first[0] + second[0], first[1] + second[1]
    if m.get("quant", "none") == "none":
        return module.param(name, _init(std, axes), shape, m.param_dtype), None
    # Quantized weights come from omni.compress.quant.quantize_model; initialising them has no use beyond shapes.
    values = module.param(name, _zeros(axes), shape, jnp.int8)
    return values, module.param(quant_lib.scale_name(name), _ones(outputs[0]), outputs[1], jnp.float32)


def _matmul(m: ml_collections.ConfigDict, x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x @ w for w [in, out], or for w stored transposed [out, in] (model.transposed_kernels); an int8 w (model.quant)
    is converted inside the product and its output channels multiplied by `scale` after it, or, under 'w8a8',
    multiplied by x quantised per token in int8 x int8 -> int32."""
    transposed = m.get("transposed_kernels", False)
    if m.get("quant", "none") == "w8a8":
        return quant_lib.w8a8_matmul(x, w, scale, transposed).astype(m.dtype)
    if not transposed:
        y = x @ w.astype(m.dtype)
    elif (rows := math.prod(x.shape[:-1])) <= DECODE_ROWS:
        y = _few_rows_matmul(x.reshape(rows, -1), w).reshape(x.shape[:-1] + (w.shape[0],))
    else:
        y = x @ w.astype(m.dtype).T
    return y if scale is None else y * scale.reshape(-1).astype(m.dtype)


def _few_rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, in] times w stored [out, in], for the few rows of a decoding step: (w x^T)^T, which contracts w's
    rows in place. On CPU, 2-64 rows go faster as one fused multiply-and-sum that streams w once than as a GEMM,
    whose kernels pack w for so few rows (measured through the 55 MB of the generation benchmark's weights:
    7.3 vs 10.7 ms at 8 rows, 11.7 vs 13.9 at 32, even at 64); one row of float weights stays a matrix-vector
    product. An int8 w is converted inside the fused loop, streaming a quarter of the bytes."""
    if jax.default_backend() == "cpu":
        if 1 < x.shape[0]:
            return (w[None].astype(x.dtype) * x[:, None, :]).sum(-1, dtype=jnp.float32).astype(x.dtype)
        if w.dtype == jnp.int8:
            return (w.astype(x.dtype) * x).sum(-1, dtype=jnp.float32).astype(x.dtype)[None]
    return (w.astype(x.dtype) @ x.T).T


class Embed(nn.Module):
    """The token embedding [vocab, embed], also the output layer (tied, as in GPT-1/2/3). Under model.quant its
    rows are int8 with one scale each: a row's scale serves both the lookup and that token's logit."""
    config: ml_collections.ConfigDict

    def setup(self):
        m = self.config
        shape, axes = (m.vocab_size, m.d_model), ("vocab", "embed")
        self.scale = None
        if m.get("quant", "none") == "none":
            self.embedding = self.param("embedding", _init(0.02, axes), shape, m.param_dtype)
        else:
            self.embedding = self.param("embedding", _zeros(axes), shape, jnp.int8)
            self.scale = self.param("scale", _ones(axes[:1]), shape[:1], jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)
        return x if self.scale is None else x * jnp.take(self.scale, tokens)[..., None].astype(x.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits x @ embedding^T."""
        if self.scale is None:
            return unembed(x, self.embedding.astype(self.config.dtype))
        return _logits(x, self.embedding) * self.scale.astype(x.dtype)


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
        """`kv`: this layer's (keys, values) cache and `slot_info` (index, valid slots) when generating;
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
    `cache` (generation) the tokens fill its slots from cache.index on and the call returns (logits, cache)."""
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        m = self.config
        wte = Embed(m, name="wte")
        wpe = self.param("wpe", _init(0.01 if m.variant != "gpt1" else 0.02, (None, "embed")),
                         (m.max_len, m.d_model), m.param_dtype)
        tokens = _constrain(tokens, ("batch", "length"))
        slot_info = None
        if cache is not None:  # left-padded rows: position = slot - start; padding only attends to padding
            slots = cache.index + jnp.arange(tokens.shape[1])
            positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
            segment_ids = (slots[None, :] >= cache.start[:, None]).astype(jnp.int32)
            k_valid = (jnp.arange(cache.k[0].shape[2])[None, :] >= cache.start[:, None]).astype(jnp.int32)
            slot_info = (cache.index, k_valid)
        pos = wpe[: tokens.shape[1]] if positions is None else jnp.take(wpe, positions, axis=0)
        x = wte(tokens) + pos.astype(m.dtype)
        x = nn.Dropout(m.dropout)(x, deterministic=deterministic)
        x = _constrain(x, ("batch", "length", "embed"))
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = self._blocks(x, deterministic, segment_ids, kv, slot_info)
        if m.variant != "gpt1":
            x = layer_norm(m, "ln_f")(x)
        if m.get("head", "lm") == "scalar":  # reward model / value function: one number per position
            score = nn.Dense(1, dtype=m.dtype, param_dtype=m.param_dtype, kernel_init=_init(0.02, ("embed", None)),
                             bias_init=_zeros((None,)), name="score_head")(x)
            return _constrain(score[..., 0].astype(jnp.float32), ("batch", "length"))
        logits = wte.attend(x).astype(jnp.float32)  # tied input/output embeddings
        logits = _constrain(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, cache.replace(k=kv[0], v=kv[1], index=cache.index + tokens.shape[1])

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


# Below this many tokens per call (generation), XLA:CPU would copy the transposed [vocab, d_model] embedding on
# every call for `x @ embedding.T`, which costs more than the product itself.
DECODE_ROWS = 64


@jax.custom_vjp
def unembed(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x @ embedding^T, with a hand-written backward pass. Autodiff's embedding gradient contracts the
    [tokens, vocab] logit gradient over its leading axis, which XLA:CPU does by first transposing that whole
    array; contracting a (small) transposed x against it instead is a plain matmul (+5-10% step speed)."""
    return _logits(x, embedding)


def _logits(x, embedding):
    rows = math.prod(x.shape[:-1])
    if rows <= DECODE_ROWS:  # decoding: contract the embedding's rows in place
        return _few_rows_matmul(x.reshape(rows, -1), embedding).reshape(x.shape[:-1] + (-1,))
    return x @ embedding.astype(x.dtype).T


def _unembed_fwd(x, embedding):
    return _logits(x, embedding), (x, embedding)


def _unembed_bwd(residuals, d_logits):
    x, embedding = residuals
    x_t = x.reshape(-1, x.shape[-1]).T
    # The barrier stops XLA from folding the transpose back into the dot (which restores the slow form).
    d_embedding = jax.lax.optimization_barrier(x_t) @ d_logits.reshape(-1, d_logits.shape[-1])
    return d_logits @ embedding, d_embedding.T


unembed.defvjp(_unembed_fwd, _unembed_bwd)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token, counted honestly (PaLM appendix B): 6 x every matmul weight, the tied
    unembedding included, plus 12 x layers x seq_len x d_model for attention scores and weighted sums
    (the full square, as the XLA kernel computes it; remat's recomputation is not counted)."""
    head = m.vocab_size if m.get("head", "lm") == "lm" else 1
    matmul_params = m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.d_ff) + head * m.d_model
    return 6.0 * matmul_params + 12.0 * m.num_layers * seq_len * m.d_model
