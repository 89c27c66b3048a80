"""SparseGPT: one-shot pruning of one linear layer (Frantar & Alistarh 2023, arXiv 2301.00774).

    pruned = prune_kernel(kernel, hessian, sparsity=0.5)           # or n_m=(2, 4): keep 2 of every 4 inputs
    pruned, info = prune_kernel_with_info(kernel, hessian)         # info["damp"]: the damping actually used

Layout: the paper writes a layer as W (outputs x inputs) and walks its *columns* (inputs) left to right. A Flax
kernel is (in, out), so the paper's column j is row j (axis 0) of the kernel; this module works on the kernel
as given. `hessian` is H = 2 X X^T (in, in) over calibration inputs; its overall scale does not matter.

Algorithm, in fp32:
  1. dead inputs (H_ii == 0) get H_ii = 1 and zero weights; damp * mean(diag H) is added to the diagonal;
  2. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U);
  3. inputs are taken in blocks of `block_size`. The mask comes from the score w^2 / U_jj^2: unstructured, the
     lowest `sparsity` fraction of the whole block (inputs x outputs) when the block starts; N:M, for each
     output the M-N lowest of each group of M consecutive inputs when the group starts (from the weights as
     updated so far). Input j is then set to its masked value q and its error err = (w_j - q) / U_jj is
     compensated on the block's later inputs (w_k -= err * U_jk): the optimal-brain-surgeon update;
  4. after a block, its errors reach every later input in one matmul (W_later -= U[block, later]^T Err).

H that is not positive definite after damping (too little calibration data, a broken Hessian) gets 10x more
damping at a time, with a warning, up to `MAX_DAMP`; beyond that a ValueError.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from omni.compress.prune import LINEAR  # the linear kernels and their input axes, shared with magnitude pruning
from omni.models import GPT
from omni.models.gpt import Block, sparse_layers
from omni.models.params import scanned, unrolled

MAX_DAMP = 1e3  # relative to mean(diag H): far beyond this, SparseGPT degenerates to magnitude pruning anyway
_HIGHEST = lax.Precision.HIGHEST  # fp32 matmuls stay fp32 on GPU (TF32) and TPU (bf16 passes)


def _cholesky(a: jax.Array, block: int = 128) -> jax.Array:
    """Lower Cholesky factor, blocked (left-looking) so that LAPACK only sees block x block diagonal pieces and
    the rest is XLA matmuls and triangular solves: a large CPU potrf runs in OpenBLAS's thread pool, which stalls
    for seconds when another process holds one of the cores. NaN where `a` is not positive definite."""
    n = a.shape[0]
    lower = jnp.zeros_like(a)
    for k in range(0, n, block):
        e = min(k + block, n)
        column = a[k:, k:e] - jnp.matmul(lower[k:, :k], lower[k:e, :k].T, precision=_HIGHEST)
        diag = jnp.linalg.cholesky(column[:e - k])
        panel = lax.linalg.triangular_solve(diag, column[e - k:], left_side=False, lower=True, transpose_a=True)
        lower = lower.at[k:e, k:e].set(diag).at[e:, k:e].set(panel)
    return lower


@jax.jit
def _inverse_factor(hessian: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(U, dead, ok): U the upper Cholesky factor of the damped H^-1; ok is False when the factorization failed."""
    n = hessian.shape[0]
    h = hessian.astype(jnp.float32)  # only one triangle is read: rounding asymmetry does not matter
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=jnp.float32)
    # With J the reversal permutation and J H J = L L^T: H = R R^T with R = J L J upper triangular, so
    # H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J. One factorization, and H^-1 is never formed.
    # The barrier materializes the reversal: fused into the matmuls' operands it makes them several times slower.
    lower = _cholesky(lax.optimization_barrier(h[::-1, ::-1]))
    lower_inv = lax.linalg.triangular_solve(lower, jnp.eye(n, dtype=jnp.float32), left_side=True, lower=True)
    ok = jnp.all(jnp.isfinite(lower_inv)) & jnp.all(jnp.diagonal(lower_inv) > 0)
    return lower_inv[::-1, ::-1], dead, ok


def _lowest(score: jax.Array, count: jax.Array) -> jax.Array:
    """Mask of exactly `count` lowest entries of the non-negative `score` (ties broken by position)."""
    # The count-th smallest value by bisection on the float bits (monotone for non-negative floats): 31 counting
    # passes, several times faster than sorting a block on CPU.
    bits = lax.bitcast_convert_type(score.ravel(), jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid) >= count
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    threshold, _ = lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(np.iinfo(np.int32).max)))
    below = bits < threshold
    tie = bits == threshold
    need = count - jnp.sum(below)
    # Usually every tie is taken (one of them); a prefix sum, slow on CPU, only when there are more ties.
    take = lax.cond(jnp.sum(tie) <= need, lambda: tie, lambda: tie & (jnp.cumsum(tie) <= need))
    return (below | take).reshape(score.shape)


def _lowest_per_output(score: jax.Array, count: int) -> jax.Array:
    """score (M, out): for each output, a mask of exactly `count` lowest of the M inputs (ties by position)."""
    m = score.shape[0]
    less = score[None, :, :] < score[:, None, :]  # [i, l, o]: input l scores below input i
    earlier = jnp.arange(m)[None, :, None] < jnp.arange(m)[:, None, None]
    rank = jnp.sum(less | ((score[None, :, :] == score[:, None, :]) & earlier), axis=1)
    return rank < count


def _sub_block(block_size: int, group: int, target: int) -> int:
    """Rows per inner step: a divisor of block_size, a multiple of the N:M group, at most `target` if possible."""
    units = block_size // group
    return group * max(d for d in range(1, max(1, target // group) + 1) if units % d == 0)


def _compensate_ahead(w: jax.Array, coef: jax.Array, err: jax.Array, first: jax.Array, chunk: int) -> jax.Array:
    """w[r] -= sum_k coef[k, r] err[k] for the rows r from chunk `first` on, `chunk` rows at a time: only the
    rows ahead are touched (the triangle's flops), with static shapes."""
    def one(c, w):
        at = c * chunk
        update = jnp.matmul(lax.dynamic_slice_in_dim(coef, at, chunk, 1).T, err, precision=_HIGHEST)
        return lax.dynamic_update_slice_in_dim(w, lax.dynamic_slice_in_dim(w, at, chunk, 0) - update, at, 0)

    return lax.fori_loop(first, w.shape[0] // chunk, one, w)


def _sweep(blk: jax.Array, ub: jax.Array, prune: jax.Array, n_m: tuple[int, int] | None,
           sub: int) -> tuple[jax.Array, jax.Array]:
    """The column loop over one block (bs, out), with ub = U's (bs, bs) block. Column j is pruned by `prune`
    (N:M: chosen here as its group starts) and its error compensated on the later rows. Compensation is lazy at
    a second level too: inside a sub-block of `sub` rows each column updates the sub-block only (cache-sized),
    and the sub-block's errors reach the block's later rows in matmuls. Each row keeps its value as it was when
    reached (the errors are read back from it); the caller zeroes the pruned ones."""
    local = jnp.arange(sub)

    def column(j, carry):
        rows, mask, us = carry
        err = jnp.where(mask[j], rows[j], 0.0) / us[j, j]
        return rows - jnp.where(local > j, us[j], 0.0)[:, None] * err[None, :], mask, us

    def group(g, carry):  # N:M: the group's mask from the weights as updated so far, then its columns
        rows, mask, us = carry
        n, m = n_m
        at = g * m
        d = lax.dynamic_slice_in_dim(jnp.diagonal(us), at, m)
        score = jnp.square(lax.dynamic_slice_in_dim(rows, at, m, 0) / d[:, None])
        mask = lax.dynamic_update_slice_in_dim(mask, _lowest_per_output(score, m - n), at, 0)
        # A nested loop, not an unrolled one: XLA fuses unrolled chained updates into recomputation (10x slower).
        return lax.fori_loop(at, at + m, column, (rows, mask, us))

    def sub_block(s, carry):
        blk, prune = carry
        start = s * sub
        us = lax.dynamic_slice(ub, (start, start), (sub, sub))
        carry = (lax.dynamic_slice_in_dim(blk, start, sub, 0), lax.dynamic_slice_in_dim(prune, start, sub, 0), us)
        if n_m is None:
            rows, mask, _ = lax.fori_loop(0, sub, column, carry)
        else:
            rows, mask, _ = lax.fori_loop(0, sub // n_m[1], group, carry)
        err = jnp.where(mask, rows / jnp.diagonal(us)[:, None], 0.0)
        blk = _compensate_ahead(lax.dynamic_update_slice_in_dim(blk, rows, start, 0),
                                lax.dynamic_slice_in_dim(ub, start, sub, 0), err, s + 1, sub)
        return blk, lax.dynamic_update_slice_in_dim(prune, mask, start, 0)

    return lax.fori_loop(0, blk.shape[0] // sub, sub_block, (blk, prune))


@functools.partial(jax.jit, static_argnames=("n_m", "block_size"))
def _prune(kernel: jax.Array, u: jax.Array, dead: jax.Array, counts: jax.Array, *, n_m: tuple[int, int] | None,
           block_size: int) -> jax.Array:
    """The pruned fp32 kernel; counts[b]: how many weights block b prunes (unstructured)."""
    n_in = kernel.shape[0]
    n_blocks = -(-n_in // block_size)
    padded = n_blocks * block_size  # static shapes: a short last block is padded with zero weights, identity U
    w = jnp.where(dead[:, None], 0.0, kernel)
    w = jnp.pad(w, ((0, padded - n_in), (0, 0)))
    u = jnp.pad(u, ((0, padded - n_in), (0, padded - n_in)))
    u = u + jnp.diag((jnp.arange(padded) >= n_in).astype(jnp.float32))
    valid = jnp.arange(padded) < n_in
    sub = _sub_block(block_size, 1 if n_m is None else n_m[1], 16)

    def block(b, w):
        start = b * block_size
        blk = lax.dynamic_slice_in_dim(w, start, block_size, 0)
        ub = lax.dynamic_slice(u, (start, start), (block_size, block_size))
        if n_m is None:  # the whole block's mask, chosen as the block starts; padding rows are never chosen
            score = jnp.square(blk / jnp.diagonal(ub)[:, None])
            score = jnp.where(lax.dynamic_slice_in_dim(valid, start, block_size)[:, None], score, jnp.inf)
            prune = _lowest(score, counts[b])
        else:
            prune = jnp.zeros(blk.shape, bool)
        blk, prune = _sweep(blk, ub, prune, n_m, sub)
        err = jnp.where(prune, blk / jnp.diagonal(ub)[:, None], 0.0)
        w = lax.dynamic_update_slice_in_dim(w, jnp.where(prune, 0.0, blk), start, 0)
        # Lazy batch update: the block's errors reach all later inputs at once.
        return _compensate_ahead(w, lax.dynamic_slice_in_dim(u, start, block_size, 0), err, b + 1, block_size)

    return lax.fori_loop(0, n_blocks, block, w)[:n_in]


def _check_args(kernel: Any, hessian: Any, sparsity: float, n_m: tuple[int, int] | None, block_size: int) -> None:
    if kernel.ndim != 2 or hessian.shape != (kernel.shape[0], kernel.shape[0]):
        raise ValueError(f"kernel must be (in, out) and hessian (in, in); got {kernel.shape} and {hessian.shape}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if n_m is None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return
    n, m = n_m
    if not 0 < n <= m:
        raise ValueError(f"n_m=(N, M) keeps N of every M inputs and needs 0 < N <= M; got {n_m}")
    if kernel.shape[0] % m or min(block_size, kernel.shape[0]) % m:
        raise ValueError(f"n_m={n_m}: the input size {kernel.shape[0]} and block_size {block_size} must be "
                         f"multiples of M={m}")


def _factor(hessian: jax.Array, damp: float) -> tuple[jax.Array, jax.Array, float]:
    """U and dead inputs, raising the damping 10x at a time until H + damping factors."""
    if not bool(jnp.all(jnp.isfinite(hessian))):
        raise ValueError("SparseGPT: the Hessian has NaN or infinite entries; no damping can fix that")
    tried = damp
    while True:
        u, dead, ok = _inverse_factor(hessian, jnp.float32(tried))
        if bool(ok):
            if tried != damp:
                warnings.warn(f"SparseGPT: the Hessian is not positive definite with damp={damp}; used "
                              f"damp={tried:g} (more calibration data gives a better Hessian)", RuntimeWarning)
            return u, dead, tried
        if tried * 10 > MAX_DAMP:
            raise ValueError(f"SparseGPT: the Hessian is not positive definite even with damp={tried:g} x "
                             f"mean(diag H) (is it 2 X X^T of real inputs?)")
        tried = max(tried, 1e-6) * 10  # damp=0 starts the ladder at 1e-5


def prune_kernel_with_info(kernel: Any, hessian: Any, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
                           block_size: int = 128, damp: float = 0.01) -> tuple[jax.Array, dict]:
    """`prune_kernel`, plus a dict: `damp` (the relative damping used), `dead_inputs` (count of H_ii == 0)."""
    kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
    _check_args(kernel, hessian, sparsity, n_m, block_size)
    u, dead, used = _factor(hessian, damp)
    (n_in, n_out), block_size = kernel.shape, min(int(block_size), kernel.shape[0])
    # Weights to prune per block, from each block's real size: exactly round(sparsity * size).
    counts = [round(sparsity * min(block_size, n_in - start) * n_out) for start in range(0, n_in, block_size)]
    pruned = _prune(kernel.astype(jnp.float32), u, dead, jnp.asarray(counts, jnp.int32),
                    n_m=None if n_m is None else tuple(map(int, n_m)), block_size=block_size)
    if not bool(jnp.all(jnp.isfinite(pruned))):
        raise ValueError("SparseGPT: pruning gave non-finite weights (does the kernel hold NaN or inf?)")
    return pruned.astype(kernel.dtype), {"damp": used, "dead_inputs": int(jnp.sum(dead))}


def prune_kernel(kernel: Any, hessian: Any, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
                 block_size: int = 128, damp: float = 0.01) -> jax.Array:
    """Prunes one Flax kernel (in, out) given the (in, in) Hessian of its inputs (H = 2 X X^T over calibration
    inputs X (in, samples)). Unstructured: `sparsity` of each block of `block_size` inputs is zeroed. n_m=(N, M)
    keeps N of every M consecutive inputs for each output (`sparsity` is then ignored). `damp` is relative to
    mean(diag H). Returns the pruned kernel, same shape and dtype."""
    return prune_kernel_with_info(kernel, hessian, sparsity, n_m, block_size, damp)[0]


# ---------------------------------------------------------------------------------------------------------
# A whole model: blocks in order, each pruned on the inputs that the already-pruned blocks before it produce.

SOWN = {("attn", "qkv_kernel"): ("attn", "qkv_in"), ("attn", "out_kernel"): ("attn", "out_in"),
        ("mlp", "fc", "kernel"): ("mlp", "fc_in"), ("mlp", "proj", "kernel"): ("mlp", "proj_in")}


def prune_model(model_config: Any, params: dict, calibration: np.ndarray, sparsity: float = 0.5,
                n_m: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                batch_size: int = 8) -> tuple[dict, list[dict]]:
    """SparseGPT through a GPT (Frantar & Alistarh 2023, section 3): for each block in order, the Hessians of
    its four linear layers' inputs are accumulated over the calibration token rows [n, length] as the pruned
    model so far computes them, every kernel is pruned with `prune_kernel`, and the pruned block is re-run to give
    the next block its inputs. Embeddings, LayerNorms, biases and the head stay dense. Returns the parameters
    (same layout as given) and per kernel {"layer", "kernel", "damp", "dead_inputs"}."""
    config, flat = unrolled(model_config, params)
    flat = dict(flat)
    rows = [jnp.asarray(calibration[i:i + batch_size]) for i in range(0, len(calibration), batch_size)]
    first = jax.jit(lambda p, t: GPT(config).apply({"params": p}, t, mutable=["intermediates"])[1])
    inputs = [first(flat, t)["intermediates"]["blocks_0"]["block_in"][0] for t in rows]
    # One compiled block per attention pattern (GPT-3 alternates two), its linear layers' inputs sown.
    run_block = jax.jit(lambda p, x, s: Block(config, True).apply({"params": p}, x, s, mutable=["intermediates"]),
                        static_argnames="s")
    report = []
    for i, sparse in enumerate(sparse_layers(config)):
        block = functools.partial(run_block, s=bool(sparse))
        hessians = {path: 0.0 for path in LINEAR}
        for x in inputs:
            sown = block(flat[f"blocks_{i}"], x)[1]["intermediates"]
            for path, name in SOWN.items():
                seen = sown[name[0]][name[1]][0]
                hessians[path] = hessians[path] + _hessian(seen.reshape(-1, seen.shape[-1])) / len(inputs)
        layer = jax.tree.map(lambda a: a, flat[f"blocks_{i}"])
        for path, n_in in LINEAR.items():
            parent = functools.reduce(lambda d, k: d[k], path[:-1], layer)
            kernel = parent[path[-1]]
            pruned, info = prune_kernel_with_info(kernel.reshape(math.prod(kernel.shape[:n_in]), -1),
                                                  hessians[path], sparsity, n_m, block_size, damp)
            parent[path[-1]] = pruned.reshape(kernel.shape)
            report.append({"layer": i, "kernel": "/".join(path), **info})
        flat[f"blocks_{i}"] = layer
        inputs = [block(layer, x)[0][0] for x in inputs]
    if model_config.scan_layers:  # back to the stacked layout the caller gave
        flat = scanned(flat, config.num_layers)
    return flat, report


@jax.jit
def _hessian(x: jax.Array) -> jax.Array:
    """2 X X^T over the rows of x [samples, in] (the paper's X is [in, samples]), averaged over samples."""
    x = x.astype(jnp.float32)
    return 2.0 * jnp.matmul(x.T, x, precision=_HIGHEST) / x.shape[0]
