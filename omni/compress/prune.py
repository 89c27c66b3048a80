"""Magnitude pruning of a GPT's linear layers: unstructured (each layer to the target sparsity, or one global
threshold), N:M along each output's inputs (2:4 keeps 2 of every 4 consecutive inputs), and structured (whole
attention heads, or MLP channels, of smallest norm). Embeddings, LayerNorms, biases and heads stay dense, as in
SparseGPT's experiments.

Every method returns a mask tree shaped like the parameters (True: keep; non-prunable leaves all True) for
`apply(params, masks)`. Fine-tuning a pruned model keeps its zeros at zero by itself (the optimizer's
optim.keep_zeros: a zero weight gets no update), so the masks need not be kept. Linear layers are seen as 2-D
(in, out) matrices, per layer, whether the parameters are scanned (a leading layers axis) or unrolled:

    masks = prune.magnitude(params, 0.5)             # or n_m(params, 2, 4), heads(params, 0.25), ...
    params = prune.apply(params, masks)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

# The linear kernels of a block and how many of their leading axes are the input: qkv [embed | 3, heads, kv],
# out [heads, kv | embed], fc [embed | mlp], proj [mlp | embed].
LINEAR = {("attn", "qkv_kernel"): 1, ("attn", "out_kernel"): 2, ("mlp", "fc", "kernel"): 1,
          ("mlp", "proj", "kernel"): 1}

Path = tuple[str, ...]


def _get(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def blocks(params: dict) -> Iterator[tuple[str, bool]]:
    """(block key, scanned) for each block subtree: 'blocks' (layers stacked on axis 0) or 'blocks_0', ..."""
    for key in params:
        if key == "blocks" or key.startswith("blocks_"):
            yield key, key == "blocks"


def linear_layers(params: dict) -> Iterator[tuple[Path, int | None, np.ndarray]]:
    """(path of the kernel, layer index within a scanned stack or None, the kernel as an (in, out) matrix)."""
    for block, scanned in blocks(params):
        for sub, n_in in LINEAR.items():
            kernel = np.asarray(_get(params[block], sub))
            for layer in range(kernel.shape[0]) if scanned else [None]:
                w = kernel[layer] if scanned else kernel
                yield (block,) + sub, layer, w.reshape(int(np.prod(w.shape[:n_in])), -1)


def _masks_from(params: dict, keep: Callable[[Path, int | None, np.ndarray], np.ndarray]) -> dict:
    """The mask tree whose linear kernels are keep(path, layer, matrix) reshaped back; every other leaf all True."""
    masks = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
    for path, layer, w in linear_layers(params):
        target = _get(masks, path)
        if layer is None:
            target[...] = keep(path, layer, w).reshape(target.shape)
        else:
            target[layer] = keep(path, layer, w).reshape(target.shape[1:])
    return masks


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Mask keeping all but the `count` lowest of `scores` (exactly count, ties broken by position)."""
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def magnitude(params: dict, sparsity: float, scope: str = "layer") -> dict:
    """Unstructured: zero the `sparsity` fraction of smallest |w| in each linear layer (scope='layer'), or
    below one threshold over all of them (scope='global', so layers end up unevenly sparse)."""
    _check_fraction(sparsity, "sparsity")
    if scope == "layer":
        return _masks_from(params, lambda _p, _l, w: _lowest(np.abs(w), round(sparsity * w.size)))
    if scope != "global":
        raise ValueError(f"scope={scope!r}: expected 'layer' or 'global'")
    layers = list(linear_layers(params))
    every = np.concatenate([np.abs(w).ravel() for _, _, w in layers])
    keep = _lowest(every, round(sparsity * every.size))
    pieces = iter(np.split(keep, np.cumsum([w.size for _, _, w in layers])[:-1]))
    return _masks_from(params, lambda _p, _l, w: next(pieces).reshape(w.shape))


def n_m_mask(w: np.ndarray, n: int, m: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Mask of an (in, out) matrix keeping, for every output, the n highest-scoring (default |w|) of each group
    of m consecutive inputs."""
    if not 0 < n < m or w.shape[0] % m:
        raise ValueError(f"{n}:{m} sparsity needs 0 < n < m and inputs ({w.shape[0]}) divisible by m")
    s = np.abs(w) if scores is None else scores
    groups = s.reshape(-1, m, w.shape[1])  # [groups, m, out]
    order = np.argsort(groups, axis=1, kind="stable")  # ascending: the first m - n are pruned
    keep = np.ones_like(groups, bool)
    np.put_along_axis(keep, order[:, :m - n], False, axis=1)
    return keep.reshape(w.shape)


def n_m(params: dict, n: int = 2, m: int = 4) -> dict:
    """N:M along the input dimension of every linear layer (GPUs' sparse tensor cores run 2:4)."""
    return _masks_from(params, lambda _p, _l, w: n_m_mask(w, n, m))


def heads(params: dict, fraction: float) -> dict:
    """Structured: in each layer, remove the `fraction` of attention heads whose query, key, value and output
    weights have the smallest joint L2 norm (at least one head stays)."""
    _check_fraction(fraction, "fraction")
    masks = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
    for block, scanned in blocks(params):
        attn, mask = params[block]["attn"], masks[block]["attn"]
        qkv, out = np.asarray(attn["qkv_kernel"]), np.asarray(attn["out_kernel"])
        # head axis: qkv [..., embed, 3, heads, kv], out [..., heads, kv, embed]
        norms = (np.square(qkv).sum(axis=(-4, -3, -1)) + np.square(out).sum(axis=(-2, -1)))  # [(layers,) heads]
        for layer, row in enumerate(np.atleast_2d(norms)):
            count = min(round(fraction * row.size), row.size - 1)
            gone = ~_lowest(row, count)
            index = (layer,) if scanned else ()
            mask["qkv_kernel"][index + (..., gone, slice(None))] = False
            mask["qkv_bias"][index + (slice(None), gone)] = False
            mask["out_kernel"][index + (gone,)] = False
    return masks


def mlp_channels(params: dict, fraction: float) -> dict:
    """Structured: in each layer, remove the `fraction` of MLP hidden channels whose input column, bias and
    output row have the smallest joint L2 norm."""
    _check_fraction(fraction, "fraction")
    masks = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
    for block, scanned in blocks(params):
        mlp, mask = params[block]["mlp"], masks[block]["mlp"]
        fc, bias, proj = (np.asarray(x) for x in (mlp["fc"]["kernel"], mlp["fc"]["bias"], mlp["proj"]["kernel"]))
        norms = np.square(fc).sum(-2) + np.square(bias) + np.square(proj).sum(-1)  # [(layers,) mlp]
        for layer, row in enumerate(np.atleast_2d(norms)):
            gone = ~_lowest(row, min(round(fraction * row.size), row.size - 1))
            index = (layer,) if scanned else ()
            mask["fc"]["kernel"][index + (slice(None), gone)] = False
            mask["fc"]["bias"][index + (gone,)] = False
            mask["proj"]["kernel"][index + (gone,)] = False
    return masks


def apply(params: dict, masks: dict) -> dict:
    """params with the masked-out entries set to zero (dtypes and shardings kept)."""
    return jax.tree.map(lambda x, keep: jnp.where(keep, x, jnp.zeros_like(x)), params, masks)


def sparsity(params: dict) -> float:
    """Fraction of zeros over the linear layers' weights."""
    sizes = [(w.size, int((w == 0).sum())) for _, _, w in linear_layers(params)]
    return sum(z for _, z in sizes) / sum(s for s, _ in sizes)


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value}: must be in [0, 1)")
