"""Every attention implementation against a NumPy reference: causal, GPT-3 banded, packed segments, chunked
(unrolled and scanned), sequence-shard offsets, dropout gradients, memory growth, and the kernels."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni.models import GPT
from omni.models.attention import (chunked_attention, cudnn_attention, reference_attention, resolve,
                                   splash_attention)
from omni.config import base_config

B, T, H, K = 2, 128, 2, 16


def numpy_attention(q, k, v, window=None, segments=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    mask = np.broadcast_to(j <= i, (q.shape[0], q.shape[1], k.shape[1])).copy()
    if window is not None:
        mask &= (i - j) < window
    if segments is not None:
        mask &= segments[:, :, None] == segments[:, None, :]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(4))
    segments = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
    return q, k, v, g, segments


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [0, 32, 48, 16])  # one block, 4 unrolled, uneven unrolled, 8 scanned
def test_chunked_matches_numpy_and_autodiff(qkv, window, packed, chunk):
    q, k, v, g, segments = qkv
    seg = jnp.asarray(segments) if packed else None
    out, vjp = jax.vjp(lambda q, k, v: chunked_attention(q, k, v, window=window, q_segment_ids=seg,
                                                         k_segment_ids=seg, chunk=chunk), q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, window, segments if packed else None), atol=2e-6)
    # The hand-written backward against autodiff of the plain formulation.
    _, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, window, seg), q, k, v)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_query_shard_at_an_offset_sees_the_right_keys(qkv):
    """What one sequence shard computes: its queries (positions 64..95) against all keys."""
    q, k, v, _, segments = qkv
    seg = jnp.asarray(segments)
    out = chunked_attention(q[:, 64:96], k, v, window=40, q_segment_ids=seg[:, 64:96], k_segment_ids=seg,
                            q_offset=jnp.int32(64), chunk=16)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, 40, segments)[:, 64:96], atol=2e-6)


def test_dropout_backward_matches_autodiff_of_the_same_mask(qkv):
    q, k, v, g, _ = qkv
    rng, rate = jax.random.key(3), 0.25

    def explicit(q, k, v):  # chunk 0: one block whose keep mask comes from fold_in(rng, 0)
        qs = q.transpose(0, 2, 1, 3) * K ** -0.5
        logits = qs @ k.transpose(0, 2, 3, 1)
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
        probs = jax.nn.softmax(logits, -1)
        keep = jax.random.bernoulli(jax.random.fold_in(rng, 0), 1 - rate, probs.shape)
        return (jnp.where(keep, probs / (1 - rate), 0) @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

    out, vjp = jax.vjp(lambda q, k, v: chunked_attention(q, k, v, chunk=0, dropout_rng=rng, dropout_rate=rate),
                       q, k, v)
    ref, ref_vjp = jax.vjp(explicit, q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for ours, theirs in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _train_memory(fn, length):
    x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_with_length():
    chunked = lambda q, k, v: chunked_attention(q, k, v, chunk=128)
    small, large = _train_memory(chunked, 1024), _train_memory(chunked, 2048)
    full = _train_memory(lambda q, k, v: reference_attention(q, k, v), 2048)
    assert large / small < 2.2, (small, large)  # quadratic would be ~4x
    assert large * 5 < full, (large, full)


@pytest.mark.parametrize("window", [None, 128])
def test_splash_kernel_in_interpret_mode_matches_numpy(window):
    """The TPU kernel's own code path, interpreted on CPU (T = 256: the kernel's 128-lane blocks)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 32)), jnp.float32) for _ in range(3))
    segments = np.repeat([1, 2], [100, 156])[None].astype(np.int32)
    out = splash_attention(q, k, v, window, jnp.asarray(segments), interpret=True)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, window, segments), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_xla_values_and_gradients(window, packed):
    """cuDNN flash attention against omni's XLA path, in bf16, dense and banded, with and without packed
    documents: outputs, and the gradients of a random projection of them with respect to q, k and v."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 4, 64)), jnp.bfloat16) for _ in range(3))
    segments = jnp.asarray(np.repeat([1, 2], [100, 156])[None].repeat(2, 0), jnp.int32) if packed else None
    probe = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(impl, q, k, v):
        if impl == "cudnn":
            out = cudnn_attention(q, k, v, window=window, segment_ids=segments)
        else:
            out = chunked_attention(q, k, v, window=window, q_segment_ids=segments, k_segment_ids=segments)
        return (out.astype(jnp.float32) * probe).sum(), out

    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda *a: loss("cudnn", *a), (0, 1, 2), has_aux=True))(q, k, v)
    (_, want), want_grads = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=3e-2)
    for g, w in zip(got_grads, want_grads):
        scale = float(jnp.abs(w.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.float32(g) / scale, np.float32(w) / scale, atol=3e-2)


def test_auto_choice_by_platform():
    assert resolve("auto", "bfloat16", 0.0, "gpu") == "cudnn"
    assert resolve("auto", "float32", 0.0, "gpu") == "xla"  # cuDNN flash needs half precision
    assert resolve("auto", "bfloat16", 0.0, "tpu") == "splash"
    assert resolve("auto", "bfloat16", 0.1, "tpu") == "xla"  # the kernels have no attention dropout
    assert resolve("auto", "float32", 0.0, "cpu") == "xla"
    assert resolve("splash", "float32", 0.0, "cpu") == "splash"


# gpt3 (banded layers) takes 11 s on 2 cores: slow; the band itself is tested against NumPy in CI.
@pytest.mark.parametrize("variant", ["gpt2", pytest.param("gpt3", marks=pytest.mark.slow)])
def test_packed_documents_equal_separate_runs(variant):
    """With segment ids and restarting positions, a row packing two documents gives each document the
    logits it gets alone: nothing leaks across the boundary."""
    c = base_config().model
    c.update(variant=variant, num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=50, max_len=32,
             sparse_window=4, attention_chunk=8)
    model = GPT(c)
    tokens = np.random.default_rng(2).integers(0, 50, (1, 32)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    cut = 13
    segments = np.where(np.arange(32) < cut, 1, 2)[None].astype(np.int32)
    positions = np.concatenate([np.arange(cut), np.arange(32 - cut)])[None].astype(np.int32)
    apply = jax.jit(model.apply)
    packed = apply(params, tokens, segment_ids=segments, positions=positions)
    first = apply(params, tokens[:, :cut])
    second = apply(params, tokens[:, cut:])
    np.testing.assert_allclose(packed[:, :cut], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, cut:], second, atol=1e-5)
    # ...and without them the second document does see the first.
    assert not np.allclose(apply(params, tokens)[:, cut:], second, atol=1e-3)


SHARDED_KERNEL = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from omni import parallel
from omni.config import base_config, validate
from omni.models import attention as A
c = base_config()
c.mesh.update(data=2, tensor=2)
mesh = parallel.make_mesh(validate(c, 4).mesh)
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 2, 32)), jnp.float32) for _ in range(3))
seg = jnp.asarray(np.repeat([1, 2], [100, 156])[None].repeat(2, 0), jnp.int32)
ref = A.reference_attention(q, k, v, 128, seg)
with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    for traced in (False, True):  # unrolled layers pass a bool, scanned ones a traced flag
        f = lambda q, k, v, s: A._kernel("splash", q, k, v, s if traced else True, 128, seg,
                                         jax.sharding.get_abstract_mesh(), interpret=True)
        print(float(jnp.abs(jax.jit(f)(q, k, v, jnp.asarray(True)) - ref).max()))
"""


def test_splash_kernel_runs_per_shard_on_a_data_by_tensor_mesh():
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-c", SHARDED_KERNEL], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    errors = [float(x) for x in out.stdout.split()]
    assert len(errors) == 2 and max(errors) < 1e-5, errors
