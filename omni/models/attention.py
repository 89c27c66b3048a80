"""Attention for the GPT family: the XLA reference, a memory-efficient chunked XLA path, cuDNN flash attention
(GPU), Pallas splash attention (TPU), and sequence (context) parallelism.

Shapes: q, k, v are [batch, length, heads, head_dim]. Every implementation applies the same mask: causal,
optionally banded (GPT-3's locally banded sparse layers: query i sees keys i-window+1..i) and optionally
restricted to equal `segment_ids` [batch, length] (packed documents do not attend across their boundaries).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_NEG = jnp.finfo(jnp.float32).min


def allowed(q_pos: jax.Array, k_pos: jax.Array, window=None, q_seg: jax.Array | None = None,
            k_seg: jax.Array | None = None) -> jax.Array:
    """Boolean mask, True where a query may attend: [q, k], or [batch, q, k] with segment ids. Positions are
    absolute (a chunk or a sequence shard passes its own); `window` may be traced (None: dense)."""
    offset = q_pos[:, None] - k_pos[None, :]
    ok = offset >= 0
    if window is not None:
        ok &= offset < window
    if q_seg is not None:
        ok = ok[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    return ok


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, window=None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
    """Plain softmax(q k^T / sqrt(d)) v over the full [length, length] scores: the ground truth of the tests."""
    pos = jnp.arange(q.shape[1])
    mask = allowed(pos, pos, window, segment_ids, segment_ids)
    mask = mask[:, None] if mask.ndim == 3 else mask
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# ---------------------------------------------------------------------------------------------------------
# The chunked XLA path. Queries go in chunks and the backward pass recomputes each chunk's probabilities from
# the saved log-sum-exp instead of storing them. Up to UNROLL_CHUNKS chunks are unrolled and each meets only
# the keys up to its own end (the masked triangle is skipped: fastest at short lengths). Beyond that, a scan
# runs the chunks against all keys (masked): XLA reuses a scan body's buffers but not those of unrolled chunks,
# so memory is then chunk x length, linear in length.

UNROLL_CHUNKS = 4
# With this few queries (decoding against a KV cache) XLA:CPU would copy the transposed keys for q @ k^T on every
# call; k @ q^T reads the cache as it lies.
FEW_QUERIES = 8


def _chunk_probs(q, k, q_pos, window, q_seg, k_seg, lse=None):
    """Softmax probabilities of one query chunk (heads-major, q pre-scaled) against keys at 0..len(k)-1."""
    if q.shape[2] <= FEW_QUERIES:  # decoding: keys in their own layout; only the tiny result is transposed
        logits = (k @ q.swapaxes(-1, -2)).swapaxes(-1, -2).astype(jnp.float32)
    else:
        logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32)  # [batch, heads, chunk, keys]
    mask = allowed(q_pos, jnp.arange(k.shape[2]), window, q_seg, k_seg)
    mask = mask[:, None] if mask.ndim == 3 else mask
    logits = jnp.where(mask, logits, _NEG)
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
    # exp of the masked logits too, never of a raw one: against a fully masked row's lse (about _NEG) a raw logit
    # overflows to inf, and differentiating through the where (a cached prefix's attention, DPO) gives 0 * inf.
    return jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0), lse


def _dropout(probs, rng, rate, index):
    if rng is None or rate == 0.0:
        return probs
    keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0.0)


def _chunk_fwd(q, k, v, q_pos, window, q_seg, k_seg, rng, rate, index):
    probs, lse = _chunk_probs(q, k, q_pos, window, q_seg, k_seg)
    return _dropout(probs, rng, rate, index).astype(v.dtype) @ v, lse


def _chunk_bwd(q, k, v, q_pos, window, q_seg, k_seg, rng, rate, index, lse, d_out):
    """(dq of the chunk, its dk and dv contributions) for one query chunk."""
    probs, _ = _chunk_probs(q, k, q_pos, window, q_seg, k_seg, lse)
    dropped = _dropout(probs, rng, rate, index)
    dv = dropped.swapaxes(-1, -2).astype(v.dtype) @ d_out
    d_probs = (d_out @ v.swapaxes(-1, -2)).astype(jnp.float32)
    if rng is not None and rate:
        d_probs = jnp.where(dropped != 0, d_probs / (1.0 - rate), 0.0)
    # softmax backward: dS = P * (dP - rowsum(P * dP)); exact with or without dropout.
    d_logits = (probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))).astype(q.dtype)
    return d_logits @ k, d_logits.swapaxes(-1, -2) @ q, dv


def _split(x, n, axis=2):
    """[..., n * c, ...] -> [n, ..., c, ...] (scan over chunks); None stays None."""
    if x is None:
        return None
    x = x.reshape(x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis=2):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _plan(q_len: int, chunk: int, causal_skip: bool):
    """Unrolled (q_start, q_end, k_end) chunks, or None for the scan (q_len a multiple of the chunk)."""
    chunk = q_len if chunk <= 0 else min(chunk, q_len)
    if q_len // chunk > UNROLL_CHUNKS and q_len % chunk == 0:
        return None
    return [(s, min(s + chunk, q_len), min(s + chunk, q_len) if causal_skip else None)
            for s in range(0, q_len, chunk)]


def _seg(seg, start, end):
    return None if seg is None else seg[:, start:end]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _chunked(q, k, v, q_offset, window, q_seg, k_seg, rng, chunk, rate, causal_skip):
    return _chunked_fwd(q, k, v, q_offset, window, q_seg, k_seg, rng, chunk, rate, causal_skip)[0]


def _chunked_fwd(q, k, v, q_offset, window, q_seg, k_seg, rng, chunk, rate, causal_skip):
    q_len = q.shape[2]
    plan = _plan(q_len, chunk, causal_skip)
    if plan is None:
        n = q_len // chunk

        def body(_, xs):
            i, qc, pos, seg = xs
            return None, _chunk_fwd(qc, k, v, pos, window, seg, k_seg, rng, rate, i)

        xs = (jnp.arange(n), _split(q, n), _split(q_offset + jnp.arange(q_len), n, 0), _split(q_seg, n, 1))
        _, (out, lse) = jax.lax.scan(body, None, xs)
        out, lse = _merge(out), _merge(lse)
    else:
        outs, lses = [], []
        for i, (s, e, ke) in enumerate(plan):
            o, l = _chunk_fwd(q[:, :, s:e], k[:, :, :ke], v[:, :, :ke], q_offset + jnp.arange(s, e), window,
                              _seg(q_seg, s, e), _seg(k_seg, 0, ke), rng, rate, i)
            outs.append(o)
            lses.append(l)
        out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return out, (q, k, v, q_offset, window, q_seg, k_seg, rng, lse)


def _chunked_bwd(chunk, rate, causal_skip, residuals, d_out):
    q, k, v, q_offset, window, q_seg, k_seg, rng, lse = residuals
    q_len = q.shape[2]
    plan = _plan(q_len, chunk, causal_skip)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if plan is None:
        n = q_len // chunk

        def body(carry, xs):
            i, qc, pos, seg, lse_c, d_c = xs
            dq, dk, dv = _chunk_bwd(qc, k, v, pos, window, seg, k_seg, rng, rate, i, lse_c, d_c)
            return (carry[0] + dk, carry[1] + dv), dq

        xs = (jnp.arange(n), _split(q, n), _split(q_offset + jnp.arange(q_len), n, 0), _split(q_seg, n, 1),
              _split(lse, n), _split(d_out, n))
        (dk, dv), dq = jax.lax.scan(body, zeros, xs)
        dq = _merge(dq)
    else:
        dqs, (dk, dv) = [], zeros
        for i, (s, e, ke) in enumerate(plan):
            dq_c, dk_c, dv_c = _chunk_bwd(q[:, :, s:e], k[:, :, :ke], v[:, :, :ke], q_offset + jnp.arange(s, e),
                                          window, _seg(q_seg, s, e), _seg(k_seg, 0, ke), rng, rate, i,
                                          lse[:, :, s:e], d_out[:, :, s:e])
            dqs.append(dq_c)
            dk, dv = dk.at[:, :, :ke].add(dk_c), dv.at[:, :, :ke].add(dv_c)
        dq = jnp.concatenate(dqs, axis=2)
    return (dq, dk.astype(k.dtype), dv.astype(v.dtype)) + (None,) * 5


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window=None, q_segment_ids=None,
                      k_segment_ids=None, q_offset=0, chunk: int = 64, dropout_rng: jax.Array | None = None,
                      dropout_rate: float = 0.0) -> jax.Array:
    """Exact attention of q (at absolute positions q_offset + i) against k, v (at 0..k_len-1), chunked over
    queries. chunk <= 0: one block. A static q_offset of 0 lets unrolled chunks skip the keys after their end;
    a traced one (a sequence shard's) computes them masked."""
    causal_skip = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    # Heads-major layout makes both products plain batched matmuls (2-3x faster on CPU than the einsum form).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * q.shape[-1] ** -0.5, k, v))
    rng = dropout_rng if dropout_rate > 0.0 else None
    out = _chunked(q, k, v, jnp.asarray(q_offset, jnp.int32), window, q_segment_ids, k_segment_ids, rng,
                   chunk, float(dropout_rate), causal_skip)
    return out.transpose(0, 2, 1, 3)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *,
                     q_offset, window, q_segment_ids: jax.Array, k_segment_ids: jax.Array,
                     new_segment_ids: jax.Array | None = None, chunk: int = 64) -> jax.Array:
    """Generation: new tokens' q, k, v [batch, new, heads, d] at slots q_offset.. attend to the earlier slots
    of a heads-major KV cache [batch, heads, slots, d] (not yet holding the new tokens) and to each other,
    masked causally, by `window` and by segment (`k_segment_ids` per cache slot; 0: padding). Among the new
    tokens, `new_segment_ids` (default `q_segment_ids`) decide who sees whom: continuations of one cached prefix
    packed side by side each see the prefix and themselves only.

    The two parts are softmaxed separately and merged by their log-sum-exps, so the caller writes the new keys
    into the cache after attention: the update then has one consumer (the next step's cache) and XLA updates it
    in place, where attending to the updated cache made it copy every layer's cache on every token."""
    q = (q * q.shape[-1] ** -0.5).transpose(0, 2, 1, 3)
    k, v = (x.transpose(0, 2, 1, 3).astype(cache_k.dtype) for x in (k, v))
    q_offset = jnp.asarray(q_offset, jnp.int32)
    earlier = jnp.where(jnp.arange(cache_k.shape[2]) < q_offset, k_segment_ids, -1)  # -1 matches no query
    old, old_lse = _attend(q, cache_k, cache_v, q_offset, window, q_segment_ids, earlier, chunk)
    new_seg = q_segment_ids if new_segment_ids is None else new_segment_ids
    new, new_lse = _attend(q, k, v, 0, window, new_seg, new_seg, chunk)
    lse = jnp.logaddexp(old_lse, new_lse)[..., None]
    out = old * jnp.exp(old_lse[..., None] - lse) + new * jnp.exp(new_lse[..., None] - lse)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def _attend(q, k, v, q_offset, window, q_seg, k_seg, chunk):
    """(output, log-sum-exp) of heads-major, pre-scaled q at positions q_offset.. against keys at 0..len-1."""
    causal_skip = isinstance(q_offset, int) and q_offset == 0 and q.shape[2] == k.shape[2]
    out, residuals = _chunked_fwd(q, k, v, jnp.asarray(q_offset, jnp.int32), window, q_seg, k_seg, None, chunk,
                                  0.0, causal_skip)
    return out.astype(jnp.float32), residuals[-1]


# ---------------------------------------------------------------------------------------------------------
# Accelerator kernels. Their masks are static, so a traced dense/banded choice (layers under nn.scan) goes
# through lax.cond between two compiled variants.

def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """cuDNN flash attention (GPU, bf16/fp16) through jax.nn.dot_product_attention."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                        implementation="cudnn")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None,
                     segment_ids: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU) on one device's shard; `interpret=True` runs the kernel on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    _, length, heads, _ = q.shape
    shape = (length, length)
    one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), 0)
    block = next((b for b in (512, 256) if length % b == 0), SPLASH_BLOCK)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * q.shape[-1] ** -0.5, k, v))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)


def _kernel(impl: str, q, k, v, sparse, window: int, segment_ids, mesh, interpret: bool = False):
    """A kernel on each device's batch and heads shard (shard_map: Pallas kernels do not partition
    themselves); attention is independent per row and head, so no communication is needed."""
    fn = cudnn_attention if impl == "cudnn" else functools.partial(splash_attention, interpret=interpret)

    def local(q, k, v, seg, sparse):
        seg = seg if segment_ids is not None else None
        if isinstance(sparse, bool):
            return fn(q, k, v, window if sparse else None, seg)
        return jax.lax.cond(sparse, lambda: fn(q, k, v, window, seg), lambda: fn(q, k, v, None, seg))

    seg = segment_ids if segment_ids is not None else jnp.zeros(q.shape[:2], jnp.int32)
    if mesh is None or mesh.empty:
        return local(q, k, v, seg, sparse)
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    static = isinstance(sparse, bool)
    body = (lambda q, k, v, s: local(q, k, v, s, sparse)) if static else local
    specs = (qkv_spec, qkv_spec, qkv_spec, seg_spec) + (() if static else (P(),))
    fn_sharded = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)
    return fn_sharded(q, k, v, seg) if static else fn_sharded(q, k, v, seg, jnp.asarray(sparse))


# ---------------------------------------------------------------------------------------------------------
# Choosing an implementation, and sequence parallelism.

SPLASH_BLOCK = 128  # the splash kernel's rows go in blocks of a multiple of the TPU's 128 lanes


def resolve(impl: str, dtype, dropout: float, platform: str | None = None, length: int | None = None) -> str:
    """'auto' -> cuDNN on GPU (half precision, no attention dropout), splash on TPU (no dropout, rows of whole
    128-blocks), else XLA."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and dropout == 0.0:
        return "cudnn"
    if platform == "tpu" and dropout == 0.0 and (length is None or length % SPLASH_BLOCK == 0):
        return "splash"
    return "xla"


def _sequence_axis(mesh) -> str | None:
    """The mesh axis the rules table puts `length` on, when it splits activations (context parallelism)."""
    axes = nn.logical_to_mesh_axes(("length",))[0]
    if mesh is None or mesh.empty or axes is None:
        return None
    axis = axes if isinstance(axes, str) else axes[0]
    return axis if mesh.shape.get(axis, 1) > 1 else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, sparse, window: int,
              segment_ids: jax.Array | None = None, chunk: int = 64, dropout_rng: jax.Array | None = None,
              dropout_rate: float = 0.0) -> jax.Array:
    """The model's entry point. `sparse` (bool, possibly traced) selects the band of `window` keys; `impl` is
    a resolved implementation name. Under a mesh that splits `length`, queries stay sharded and keys/values
    are all-gathered along the sequence axis inside shard_map (context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    seq_axis = _sequence_axis(mesh)
    if seq_axis is not None:
        return _sequence_parallel(q, k, v, mesh, seq_axis, sparse, window, segment_ids, chunk, dropout_rng,
                                  dropout_rate)
    if impl in ("cudnn", "splash"):
        return _kernel(impl, q, k, v, sparse, window, segment_ids, mesh)
    band = jnp.where(sparse, window, q.shape[1] + 1)
    return chunked_attention(q, k, v, window=band, q_segment_ids=segment_ids, k_segment_ids=segment_ids,
                             chunk=chunk, dropout_rng=dropout_rng, dropout_rate=dropout_rate)


def _sequence_parallel(q, k, v, mesh, seq_axis, sparse, window, segment_ids, chunk, dropout_rng, dropout_rate):
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    has_seg = segment_ids is not None
    has_rng = dropout_rng is not None and dropout_rate > 0.0

    def local(q, k, v, q_seg, rng, sparse):
        k, v = (jax.lax.all_gather(x, seq_axis, axis=1, tiled=True) for x in (k, v))
        k_seg = jax.lax.all_gather(q_seg, seq_axis, axis=1, tiled=True) if has_seg else None
        if has_rng:  # a different dropout pattern on every shard
            for axis in mesh.axis_names:
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
        band = jnp.where(sparse, window, k.shape[1] + 1)
        return chunked_attention(q, k, v, window=band, q_segment_ids=q_seg if has_seg else None,
                                 k_segment_ids=k_seg, q_offset=jax.lax.axis_index(seq_axis) * q.shape[1],
                                 chunk=chunk, dropout_rng=rng if has_rng else None, dropout_rate=dropout_rate)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, P(), P()),
                       out_specs=qkv_spec, check_vma=False)
    seg = segment_ids if has_seg else jnp.zeros(q.shape[:2], jnp.int32)
    rng = dropout_rng if has_rng else jax.random.key(0)
    return fn(q, k, v, seg, rng, jnp.asarray(sparse))
