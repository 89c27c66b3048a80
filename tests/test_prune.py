"""Magnitude pruning (omni/compress/prune.py) against counts and orderings computed here: exact sparsity per
linear layer, exact N:M patterns, the smallest weights (or heads, channels) go, the same masks for scanned and
unrolled parameters, and a pruned model still runs."""
import jax
import numpy as np
import pytest
import flax.linen as nn

from omni.compress import prune
from omni.config import base_config
from omni.models import GPT
from omni.models.params import unrolled


def _model(scan: bool = True):
    m = base_config().model
    m.update(num_layers=2, num_heads=4, d_model=32, d_ff=64, vocab_size=64, max_len=16, scan_layers=scan)
    shapes = nn.unbox(jax.eval_shape(GPT(m).init, jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    # every weight nonzero and distinct in magnitude, so counts and orderings are exact
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    leaves = [np.asarray(rng.standard_normal(np.shape(x)) * 0.05 + 1e-3, np.float32) for x in leaves]
    return m, jax.tree.unflatten(tree, leaves)


def _matrices(params):
    return [w for _, _, w in prune.linear_layers(params)]


def test_per_layer_magnitude_prunes_exactly_the_smallest():
    _, params = _model()
    pruned = prune.apply(params, prune.magnitude(params, 0.5))
    before, after = _matrices(params), _matrices(pruned)
    assert len(after) == 2 * 4  # two layers x (qkv, out, fc, proj)
    for w, p in zip(before, after):
        gone = p == 0
        assert gone.sum() == w.size // 2
        assert np.abs(w[gone]).max() <= np.abs(w[~gone]).min()
        np.testing.assert_array_equal(p[~gone], w[~gone])
    np.testing.assert_array_equal(pruned["wte"]["embedding"], params["wte"]["embedding"])  # dense
    np.testing.assert_array_equal(pruned["blocks"]["mlp"]["fc"]["bias"], params["blocks"]["mlp"]["fc"]["bias"])
    assert prune.sparsity(pruned) == pytest.approx(0.5)


def test_global_magnitude_spares_the_layer_of_large_weights():
    _, params = _model(scan=False)
    params["blocks_1"]["mlp"]["fc"]["kernel"] = params["blocks_1"]["mlp"]["fc"]["kernel"] * 10
    pruned = jax.tree.map(np.asarray, prune.apply(params, prune.magnitude(params, 0.5, scope="global")))
    assert prune.sparsity(pruned) == pytest.approx(0.5, abs=1e-6)
    big = pruned["blocks_1"]["mlp"]["fc"]["kernel"]
    assert (big == 0).mean() < 0.1 and (pruned["blocks_0"]["mlp"]["fc"]["kernel"] == 0).mean() > 0.5
    threshold = max(np.abs(w[p == 0]).max() for w, p in zip(_matrices(params), _matrices(pruned)))
    assert all(np.abs(p[p != 0]).min() >= threshold for p in _matrices(pruned))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_keeps_the_n_largest_of_every_m_inputs(n, m):
    _, params = _model()
    pruned = prune.apply(params, prune.n_m(params, n, m))
    for w, p in zip(_matrices(params), _matrices(pruned)):
        groups_w, groups_p = w.reshape(-1, m, w.shape[1]), p.reshape(-1, m, w.shape[1])
        assert np.all((groups_p != 0).sum(axis=1) == n)
        kept_min = np.where(groups_p != 0, np.abs(groups_w), np.inf).min(axis=1)
        gone_max = np.where(groups_p == 0, np.abs(groups_w), -np.inf).max(axis=1)
        assert np.all(gone_max <= kept_min)


def test_n_m_needs_inputs_divisible_by_m():
    with pytest.raises(ValueError, match="divisible"):
        prune.n_m_mask(np.ones((6, 3)), 2, 4)


def test_scanned_and_unrolled_parameters_get_the_same_masks():
    m, params = _model(scan=True)
    _, flat = unrolled(m, params)
    for method in (lambda p: prune.magnitude(p, 0.3), lambda p: prune.n_m(p, 2, 4), lambda p: prune.heads(p, 0.5),
                   lambda p: prune.mlp_channels(p, 0.25)):
        stacked, separate = method(params), method(flat)
        for i in range(m.num_layers):
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), stacked["blocks"],
                         separate[f"blocks_{i}"])


def test_heads_removes_whole_heads_of_smallest_norm():
    m, params = _model(scan=False)
    scale = np.array([3.0, 0.1, 2.0, 0.2], np.float32)  # heads 1 and 3 are the weakest
    attn = params["blocks_0"]["attn"]
    attn["qkv_kernel"] = attn["qkv_kernel"] * scale[None, None, :, None]
    attn["out_kernel"] = attn["out_kernel"] * scale[:, None, None]
    pruned = prune.apply(params, prune.heads(params, 0.5))
    pruned = jax.tree.map(np.asarray, pruned)
    qkv, out = pruned["blocks_0"]["attn"]["qkv_kernel"], pruned["blocks_0"]["attn"]["out_kernel"]
    assert np.all(qkv[:, :, [1, 3]] == 0) and np.all(out[[1, 3]] == 0)
    assert np.all(qkv[:, :, [0, 2]] != 0) and np.all(out[[0, 2]] != 0)
    assert np.all(pruned["blocks_0"]["attn"]["qkv_bias"][:, [1, 3]] == 0)
    assert [int((np.abs(pruned[f"blocks_{i}"]["attn"]["out_kernel"]).sum((1, 2)) == 0).sum()) for i in range(2)] == [2, 2]
    logits = GPT(m).apply({"params": pruned}, np.arange(8)[None] % m.vocab_size)
    assert np.all(np.isfinite(logits))


def test_mlp_channels_removes_columns_and_rows_together():
    _, params = _model(scan=False)
    pruned = jax.tree.map(np.asarray, prune.apply(params, prune.mlp_channels(params, 0.25)))
    for i in range(2):
        mlp = pruned[f"blocks_{i}"]["mlp"]
        gone = np.all(mlp["fc"]["kernel"] == 0, axis=0)
        assert gone.sum() == 16
        assert np.all(mlp["proj"]["kernel"][gone] == 0) and np.all(mlp["fc"]["bias"][gone] == 0)
        assert np.all(mlp["proj"]["kernel"][~gone] != 0)
        src = params[f"blocks_{i}"]["mlp"]
        norms = (np.square(src["fc"]["kernel"]).sum(0) + np.square(src["fc"]["bias"])
                 + np.square(src["proj"]["kernel"]).sum(1))
        assert norms[gone].max() <= norms[~gone].min()


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_fractions_are_named(bad):
    _, params = _model()
    with pytest.raises(ValueError, match="sparsity"):
        prune.magnitude(params, bad)
    with pytest.raises(ValueError, match="fraction"):
        prune.heads(params, bad)
