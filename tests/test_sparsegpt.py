"""SparseGPT (omni.compress.sparsegpt) against independent truth: exact mask counts, magnitude pruning where the
Hessian carries no information, a plain float64 NumPy loop written from the paper's description, lower output
error than magnitude pruning on heavy-tailed inputs, and broken Hessians."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from omni.compress import sparsegpt

IN, OUT, BLOCK = 64, 16, 16  # several blocks, one shape for most tests (one compilation per mode)


def numpy_sparsegpt(kernel, hessian, sparsity=0.5, n_m=None, block_size=128, damp=0.01):
    """The algorithm as the paper states it, float64, column by column, in the paper's (out, in) layout."""
    w = np.asarray(kernel, np.float64).T.copy()
    h = np.asarray(hessian, np.float64).copy()
    n = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        prune = np.zeros((w.shape[0], end - start), bool)
        if n_m is None:
            score = w[:, start:end] ** 2 / np.diag(u)[start:end] ** 2
            order = np.argsort(score.T.ravel(), kind="stable")  # the kernel's (in, out) order breaks ties
            chosen = np.zeros(score.size, bool)
            chosen[order[:round(sparsity * score.size)]] = True
            prune = chosen.reshape(score.T.shape).T
        errors = np.zeros_like(prune, np.float64)
        for j in range(start, end):
            if n_m is not None and (j - start) % n_m[1] == 0:
                n_keep, m = n_m
                score = w[:, j:j + m] ** 2 / np.diag(u)[j:j + m] ** 2
                lowest = np.argsort(score, axis=1, kind="stable")[:, :m - n_keep]
                np.put_along_axis(prune[:, j - start:j - start + m], lowest, True, axis=1)
            q = np.where(prune[:, j - start], 0.0, w[:, j])
            err = (w[:, j] - q) / u[j, j]
            w[:, j:end] -= np.outer(err, u[j, j:end])
            w[:, j] = q
            errors[:, j - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return w.T


def magnitude_prune(kernel, sparsity=0.5, n_m=None):
    """Baseline: the smallest |w| of the whole kernel, or of each group of M inputs per output."""
    w = np.array(kernel, np.float64)
    if n_m is None:
        w.ravel()[np.argsort(np.abs(w).ravel(), kind="stable")[:round(sparsity * w.size)]] = 0.0
        return w
    n_keep, m = n_m
    groups = w.reshape(-1, m, w.shape[1])
    np.put_along_axis(groups, np.argsort(np.abs(groups), axis=1)[:, :m - n_keep], 0.0, axis=1)
    return groups.reshape(w.shape)


def heavy_tailed_inputs(rng, samples, n_in):
    """Rows are samples. Correlated, heavy-tailed features (half of each one's variance from n_in / 4 latent
    Student-t factors, half its own Student-t noise), a few of them 10-100x larger than the rest, as in
    transformer activations."""
    factors = n_in // 4
    shared = rng.standard_t(3, size=(samples, factors)) @ rng.normal(size=(factors, n_in)) / np.sqrt(3 * factors)
    x = shared + rng.standard_t(3, size=(samples, n_in)) / np.sqrt(3)
    outliers = rng.choice(n_in, max(2, n_in // 32), replace=False)
    x[:, outliers] *= rng.uniform(10, 100, len(outliers))
    return x.astype(np.float32)


def hessian_of(x):
    return (2 * x.T.astype(np.float64) @ x / len(x)).astype(np.float32)


def dense_kernel(rng, n_in=IN, n_out=OUT):
    """Random weights with no zero entry, so every zero after pruning is the mask's."""
    w = rng.normal(size=(n_in, n_out))
    return (np.sign(w) * (np.abs(w) + 0.05)).astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    return dense_kernel(rng), hessian_of(heavy_tailed_inputs(rng, 1024, IN))


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact_in_every_block(sparsity):
    rng = np.random.default_rng(1)
    n_in = 40  # blocks of 16, 16 and a short last one of 8
    kernel = dense_kernel(rng, n_in)
    pruned = np.asarray(sparsegpt.prune_kernel(kernel, hessian_of(heavy_tailed_inputs(rng, 512, n_in)),
                                               sparsity=sparsity, block_size=BLOCK))
    for start in range(0, n_in, BLOCK):
        block = pruned[start:start + BLOCK]
        assert np.sum(block == 0) == round(sparsity * block.size), start
    assert pruned.shape == kernel.shape and np.all(np.isfinite(pruned))


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_n_m_keeps_exactly_n_of_every_m_inputs(layer, n_m):
    kernel, hessian = layer
    pruned = np.asarray(sparsegpt.prune_kernel(kernel, hessian, n_m=n_m, block_size=BLOCK))
    kept = np.sum(pruned.reshape(IN // n_m[1], n_m[1], OUT) != 0, axis=1)
    assert np.all(kept == n_m[0])


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_identity_hessian_is_magnitude_pruning_per_block(n_m):
    """U is then a scaled identity: scores order like |w| and no weight is compensated."""
    kernel = dense_kernel(np.random.default_rng(2))
    pruned = np.asarray(sparsegpt.prune_kernel(kernel, np.eye(IN, dtype=np.float32), n_m=n_m, block_size=BLOCK))
    expected = np.concatenate([magnitude_prune(kernel[s:s + BLOCK], 0.5, n_m) for s in range(0, IN, BLOCK)])
    np.testing.assert_array_equal(pruned, expected.astype(np.float32))


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_matches_numpy_float64_reference(layer, n_m):
    kernel, hessian = layer
    got = np.asarray(sparsegpt.prune_kernel(kernel, hessian, n_m=n_m, block_size=BLOCK))
    want = numpy_sparsegpt(kernel, hessian, n_m=n_m, block_size=BLOCK)
    np.testing.assert_array_equal(got == 0, want == 0)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))
    assert np.linalg.norm(want - kernel) > 0.1 * np.linalg.norm(kernel)  # kept weights really were updated


@pytest.mark.parametrize("n_m", [None, (2, 4), (4, 8)])
def test_output_error_below_magnitude_pruning_on_heavy_tailed_inputs(n_m):
    rng = np.random.default_rng(3)
    x = heavy_tailed_inputs(rng, 1024, IN)
    kernel = dense_kernel(rng)
    dense_out = np.linalg.norm(x @ kernel)

    def error(pruned):
        return np.linalg.norm(x @ (kernel - np.asarray(pruned, np.float64))) / dense_out

    ours, magnitude = error(sparsegpt.prune_kernel(kernel, hessian_of(x), n_m=n_m, block_size=BLOCK)), \
        error(magnitude_prune(kernel, 0.5, n_m))
    assert ours < 0.5 * magnitude, (ours, magnitude)


def test_dead_inputs_get_zero_weights(layer):
    kernel, hessian = layer
    hessian = hessian.copy()
    dead = [3, 17, 40]
    hessian[dead, :] = 0.0
    hessian[:, dead] = 0.0  # PSD but singular: inputs that were always zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # damping is enough here: no retry, no warning
        pruned, info = sparsegpt.prune_kernel_with_info(kernel, hessian, block_size=BLOCK)
    pruned = np.asarray(pruned)
    assert np.all(pruned[dead] == 0) and np.all(np.isfinite(pruned))
    assert info["dead_inputs"] == len(dead) and info["damp"] == 0.01
    assert np.sum(pruned == 0) == IN * OUT // 2

    all_dead = np.asarray(sparsegpt.prune_kernel(kernel, np.zeros((IN, IN), np.float32), block_size=BLOCK))
    assert np.all(all_dead == 0)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_indefinite_hessian_gets_more_damping_and_a_warning(layer, n_m):
    kernel, _ = layer
    rng = np.random.default_rng(4)
    x = rng.normal(size=(IN // 2, IN))  # fewer samples than inputs: rank-deficient
    v = np.linalg.svd(x)[2][-1]  # a null direction of x, where H gets a negative eigenvalue
    hessian = x.T @ x - 0.5 * np.mean(np.diag(x.T @ x)) * np.outer(v, v)
    assert np.linalg.eigvalsh(hessian)[0] < -0.1 * np.mean(np.diag(hessian))
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        pruned, info = sparsegpt.prune_kernel_with_info(kernel, hessian.astype(np.float32), n_m=n_m,
                                                        block_size=BLOCK)
    pruned = np.asarray(pruned)
    assert info["damp"] > 0.1 and np.all(np.isfinite(pruned))
    assert np.sum(pruned == 0) == IN * OUT // 2


def test_hopeless_hessians_raise_clear_errors(layer):
    kernel, _ = layer
    with pytest.raises(ValueError, match="not positive definite"):  # negative curvature everywhere
        sparsegpt.prune_kernel(kernel, -np.eye(IN, dtype=np.float32), block_size=BLOCK)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt.prune_kernel(kernel, np.full((IN, IN), np.nan, np.float32), block_size=BLOCK)
    with pytest.raises(ValueError, match="multiples of M"):
        sparsegpt.prune_kernel(kernel[:62], np.eye(62, dtype=np.float32), n_m=(2, 4))


def test_keeps_dtype_and_shape(layer):
    kernel, hessian = layer
    pruned = sparsegpt.prune_kernel(jnp.asarray(kernel, jnp.bfloat16), hessian, block_size=BLOCK)
    assert pruned.dtype == jnp.bfloat16 and pruned.shape == (IN, OUT)
    assert int(jnp.sum(pruned == 0)) == IN * OUT // 2

