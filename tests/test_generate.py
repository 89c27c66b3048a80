"""omni.generate: KV-cache decoding gives the tokens of recomputing the whole forward pass every step (all
variants, scanned or unrolled params, left-padded batches), the model's cache path gives full-forward logits,
stop sequences end rows, bad requests are one clear error, greedy decoding matches transformers' GPT-2
`generate`, and sharded params decode like one device. Sampling and text completion: tests/test_sampling.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_8_devices
from decoding_reference import (
    GREEDY, NEW, PAD, PROMPT_LENGTHS, forward, full_logits, prompts_of, reference_decode, spread_params, tiny)
from omni.compress import quant
from omni.generate import GenerationError, Generator, Sampling
from omni.models import GPT
from omni.models.gpt import KVCache


# --- greedy decoding against recomputing the full forward pass ------------------------------------------

VARIANTS = {
    "gpt1": dict(variant="gpt1"),
    "gpt2": dict(variant="gpt2"),
    "gpt2-unrolled": dict(variant="gpt2", scan_layers=False),
    # Window 4, far below every row's prompt + new tokens; chunks of 16, so the prefill (32 slots) runs two.
    "gpt3": dict(variant="gpt3", sparse_window=4, attention_chunk=16),
    # INT8 weights (omni/compress/quant.py): decoding's transposed int8 kernels, scales and few-row products.
    "gpt2-int8": dict(variant="gpt2", quant="int8"),
    "gpt2-w8a8": dict(variant="gpt2", scan_layers=False, quant="w8a8"),
}


@functools.lru_cache(maxsize=None)
def shared_run(name):
    """(config, params, prompts, generator, Generation, reference tokens, reference logprobs) of variant `name`:
    the greedy run of the shared prompts, built once."""
    m = tiny(**VARIANTS[name])
    params = spread_params(tiny(**{**VARIANTS[name], "quant": "none"}), seed=len(name))
    if m.quant != "none":  # the float model's weights, quantized
        params = quant.quantize_model(params)
    prompts = prompts_of(PROMPT_LENGTHS, m.vocab_size, seed=1)
    generator = Generator(m, params, pad_id=PAD)
    out = generator.generate(prompts, NEW, GREEDY)
    want, want_logprobs = reference_decode(m, params, prompts, NEW)
    return m, params, prompts, generator, out, want, want_logprobs


@pytest.fixture(params=list(VARIANTS))
def greedy_run(request):
    return shared_run(request.param)


def test_greedy_matches_full_forward_every_step(greedy_run):
    m, params, prompts, generator, out, want, want_logprobs = greedy_run
    assert ("blocks" in params) == m.scan_layers and ("blocks_0" in params) != m.scan_layers
    assert out.tokens.shape == out.logprobs.shape == (3, NEW) and out.tokens.dtype.kind == "i"
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [NEW] * 3)
    assert not out.stopped.any()
    np.testing.assert_allclose(out.logprobs, want_logprobs, atol=1e-5, rtol=0)
    assert [out.row(i) for i in range(3)] == want.tolist()
    assert len(set(want.ravel().tolist())) > 5  # not one token repeated


def test_gpt3_band_changes_the_output():
    """The gpt3 case is not vacuous: the same params with a window covering everything give other logits."""
    m, params, prompts, _, _, want, _ = shared_run("gpt3")
    seqs = [p + w for p, w in zip(prompts, want.tolist())]
    banded = full_logits(m, params, seqs)
    dense = full_logits(tiny(**dict(VARIANTS["gpt3"], sparse_window=64)), params, seqs)
    assert np.allclose(banded[:, :4], dense[:, :4], atol=1e-4)  # within the window: the same
    assert np.abs(banded[2, 20:40] - dense[2, 20:40]).max() > 0.1  # beyond it: other logits


# --- the model's cache path --------------------------------------------------------------------------------

def test_cache_prefill_then_steps_gives_full_forward_logits():
    """GPT.__call__ with a KVCache (scanned layers, banded attention): a prefill (5 chunks of 4: the scanned
    chunk loop), 3 tokens at once, then single tokens give the full forward pass's logits; a left-padded row
    gives the logits of its tokens alone."""
    m = tiny("gpt3", sparse_window=4, attention_chunk=4)
    params = spread_params(m, seed=3)
    model = GPT(m)
    tokens = np.random.default_rng(2).integers(1, m.vocab_size, (2, 28)).astype(np.int32)
    tokens[1, :5] = PAD  # row 1: 5 slots of left padding, then 23 real tokens
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    cache = KVCache.zeros(m, jnp.asarray([0, 5]), 28)
    pieces = []
    for lo, hi in [(0, 20), (20, 23)] + [(t, t + 1) for t in range(23, 28)]:
        logits, cache = step(params, tokens[:, lo:hi], cache)
        assert logits.shape == (2, hi - lo, m.vocab_size) and int(cache.index) == hi
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    unpadded = np.stack([tokens[0], np.concatenate([tokens[1, 5:], np.zeros(5, np.int32)])])
    want = np.asarray(forward(m)(params, unpadded))  # row 1 right-padded: causal, its first 23 are exact
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, 5:], want[1, :23], atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 1.0  # logits of real size
    assert len(cache.k) == len(cache.v) == m.num_layers and cache.k[0].shape == (2, 4, 28, 16)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_updates_the_cache_in_place(batch):
    """The compiled generation program copies no layer's KV cache: each token's keys and values are written
    in place (a copy per layer and token cost 17% of batch-1 decoding on CPU)."""
    import re

    from omni.generate import _stop_table
    m, params, _, generator, _, _, _ = shared_run("gpt2-unrolled")
    tokens, start, _ = generator._left_pad(prompts_of([5] * batch, m.vocab_size, seed=0))
    slots = tokens.shape[1] + NEW
    program = generator._run.lower(generator.params, tokens, start, _stop_table(()), jax.random.key(0),
                                   max_new=NEW, slots=slots, sampling=GREEDY).compile().as_text()
    head_dim = m.d_model // m.num_heads
    cache = rf"f32\[{batch},{m.num_heads},{slots},{head_dim}\]\S* copy\("
    assert re.search(r"dynamic-update-slice", program)  # the writes are there...
    assert not re.findall(cache, program)  # ...and no copy of a cache


# --- stop sequences and the context's end ---------------------------------------------------------------

def _stop_length(row, stops):
    """Length of a row cut after its first complete stop sequence (None: no stop in it)."""
    for t in range(len(row)):
        if any(len(s) <= t + 1 and list(row[t + 1 - len(s): t + 1]) == list(s) for s in stops):
            return t + 1
    return None


def test_stop_sequences_end_rows():
    m, params, prompts, generator, _, want, want_logprobs = shared_run("gpt2")
    rows = want.tolist()
    # A one-token stop from row 0 and a two-token stop from row 1, neither anywhere in row 2 (which runs on).
    one = next([x] for x in rows[0][2:] if x not in rows[2])
    two = next(rows[1][t:t + 2] for t in range(3, NEW - 1) if _stop_length(rows[2], [rows[1][t:t + 2]]) is None)
    stops = [one, two]
    out = generator.generate(prompts, NEW, GREEDY, stop=stops)
    expected = [_stop_length(row, stops) for row in rows]
    assert expected[0] < NEW and expected[1] < NEW and expected[2] is None
    assert expected[1] >= 2  # a single token of the two-token sequence did not stop it
    for i, n in enumerate(expected):
        n = n or NEW
        assert out.lengths[i] == n and out.stopped[i] == (expected[i] is not None)
        np.testing.assert_array_equal(out.tokens[i, :n], want[i, :n])
        assert np.all(out.tokens[i, n:] == PAD)
        np.testing.assert_allclose(out.logprobs[i, :n], want_logprobs[i, :n], atol=1e-5)
        assert np.all(out.logprobs[i, n:] == 0.0)
        assert out.row(i) == rows[i][:n]


def test_max_new_tokens_capped_at_context_end():
    m, params, _, generator, _, _, _ = shared_run("gpt3")
    prompts = prompts_of([m.max_len - 3, 10, 1], m.vocab_size, seed=9)
    out = generator.generate(prompts, 10, GREEDY)
    assert out.tokens.shape == (3, 3)
    np.testing.assert_array_equal(out.lengths, [3, 3, 3])
    want, _ = reference_decode(m, params, prompts, 3)
    np.testing.assert_array_equal(out.tokens, want)


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=5,
                                                                               repetition_penalty=1.3)])
def test_samples_of_a_prompt_from_one_prefill_are_the_rows_of_the_prompt_repeated(sampling):
    """generate(prompts, samples=k) fills each prompt's cache once for its k rows: the tokens, lengths and
    log-probs of generate(each prompt repeated k times), the same draws (row by row), left padding included."""
    _, _, prompts, generator, _, _, _ = shared_run("gpt2")
    repeated = generator.generate([p for p in prompts for _ in range(3)], NEW, sampling, stop=[[7]], seed=5)
    once = generator.generate(prompts, NEW, sampling, stop=[[7]], seed=5, samples=3)
    np.testing.assert_array_equal(once.tokens, repeated.tokens)
    np.testing.assert_array_equal(once.lengths, repeated.lengths)
    np.testing.assert_allclose(once.logprobs, repeated.logprobs, atol=1e-5)
    if sampling.temperature > 0:  # the samples of a prompt differ: each row draws its own
        assert len({tuple(once.row(i)) for i in range(3)}) > 1


# --- errors ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untouched_generator():
    """A generator whose compiled program must never be reached: every request below fails before it."""
    m = tiny("gpt2", max_len=32, vocab_size=100)
    g = Generator(m, spread_params(m))
    g._run = None  # reaching the program would be a TypeError, not a GenerationError
    return g


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([], {}, "no prompts given"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 32], {}, "prompt 0 has 32 tokens but the model's context is 32"),
    ([[1, 2], [1] * 40], {}, "prompt 1 has 40 tokens"),
    ([[1, 2], [3, 100]], {}, "prompt 1 has token ids outside the model's vocabulary [0, 100)"),
    ([[-1, 2]], {}, "prompt 0 has token ids outside"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens=0: must be >= 1"),
    ([[1, 2]], dict(samples=0), "samples=0: must be >= 1"),
    ([[1, 2]], dict(sampling=Sampling(temperature=-0.5)), "sampling temperature=-0.5: must be >= 0"),
    ([[1, 2]], dict(sampling=Sampling(temperature=float("nan"))), "sampling temperature=nan"),
    ([[1, 2]], dict(sampling=Sampling(top_k=-1)), "sampling top_k=-1: must be an int in [0, 100]"),
    ([[1, 2]], dict(sampling=Sampling(top_k=101)), "sampling top_k=101"),
    ([[1, 2]], dict(sampling=Sampling(top_k=2.5)), "sampling top_k=2.5: must be an int"),
    ([[1, 2]], dict(sampling=Sampling(frequency_penalty=float("inf"))), "sampling frequency_penalty=inf"),
    ([[1, 2]], dict(sampling=Sampling(top_p=0.0)), "sampling top_p=0.0: must be in (0, 1]"),
    ([[1, 2]], dict(sampling=Sampling(top_p=1.5)), "sampling top_p=1.5"),
    ([[1, 2]], dict(sampling=Sampling(repetition_penalty=0.0)), "sampling repetition_penalty=0.0: must be > 0"),
    ([[1, 2]], dict(stop=[[]]), "stop sequence []: must have 1 to 16 tokens"),
    ([[1, 2]], dict(stop=[[5], list(range(17))]), "must have 1 to 16 tokens"),
    ([[1, 2]], dict(stop=[[5], [3, -1]]), "stop sequence [3, -1]: token ids must be >= 0"),
])
def test_bad_requests_are_generation_errors(untouched_generator, prompts, kwargs, message):
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(GenerationError) as e:
        untouched_generator.generate(prompts, **kwargs)
    assert message in str(e.value), str(e.value)


# --- Hugging Face transformers parity ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from omni.interop import hf

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # spread weights (as spread_params): no near ties in the greedy choices
        for name, p in model.named_parameters():
            is_ln_scale = ".ln_" in f".{name}" and name.endswith("weight")
            p.copy_((1.0 if is_ln_scale else 0.0) + torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.3))
    path = str(tmp_path_factory.mktemp("hf") / "model")
    model.save_pretrained(path, safe_serialization=True)
    m, params = hf.from_hf(path)
    return model, Generator(m, params)


def _hf_generate(model, prompts, n):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[:, width:].numpy()


@pytest.mark.parametrize("lengths", [(9,), (4, 13)])
def test_greedy_matches_transformers_generate(hf_pair, lengths):
    model, generator = hf_pair
    prompts = prompts_of(lengths, 120, seed=len(lengths))
    want = _hf_generate(model, prompts, 16)
    out = generator.generate(prompts, 16, GREEDY)
    assert want.shape == out.tokens.shape == (len(lengths), 16)
    np.testing.assert_array_equal(out.tokens, want)
    if len(lengths) == 2:  # the padded row is the one HF needs the attention mask for
        alone = _hf_generate(model, prompts[:1], 16)
        np.testing.assert_array_equal(alone[0], want[0])


# --- sharded params ---------------------------------------------------------------------------------------

SHARDED = r"""
import json
import flax.linen as nn, jax, numpy as np
from omni import parallel
from omni.config import base_config, validate
from omni.generate import Generator, Sampling
from omni.models import GPT

assert jax.device_count() == 8, jax.devices()
c = base_config()
c.model.update(variant="gpt3", num_layers=2, num_heads=4, d_model=64, d_ff=128, vocab_size=128, max_len=64,
               sparse_window=4, attention="xla")
c.train.update(seq_len=64, batch_size=8)
c.mesh.update(data=2, fsdp=2, tensor=2, sequence=1)
c = validate(c, 8)
mesh = parallel.make_mesh(c.mesh)
model = GPT(c.model)
boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))["params"]  # shapes, axes
rng = np.random.default_rng(0)  # spread values (as spread_params): no near ties between logits
params = jax.tree_util.tree_map_with_path(lambda path, x: (
    1.0 + 0.2 * rng.standard_normal(x.shape) if path[-1].key == "scale"
    else rng.standard_normal(x.shape) * (0.2 if path[-1].key == "bias" else 0.3)).astype(np.float32), nn.unbox(boxed))
placed = jax.device_put(params, parallel.logical_shardings(boxed, mesh))
qkv = placed["blocks"]["attn"]["qkv_kernel"]
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 128, n).tolist() for n in (3, 9, 14, 6)]
s = Sampling(temperature=0.0)
one = Generator(c.model, params).generate(prompts, 12, s)
many = Generator(c.model, placed, mesh=mesh).generate(prompts, 12, s)
print("RESULT " + json.dumps({"one": one.tokens.tolist(), "many": many.tokens.tolist(),
      "lp": float(np.abs(one.logprobs - many.logprobs).max()), "spec": str(qkv.sharding.spec),
      "shard": qkv.addressable_shards[0].data.size, "full": qkv.size}))
"""


def test_sharded_params_decode_like_one_device():
    r = run_on_8_devices(SHARDED, timeout=300)
    assert r["spec"] == "P(None, 'fsdp', None, 'tensor', None)" and r["shard"] == r["full"] // 4
    assert r["one"] == r["many"]
    assert r["lp"] < 1e-5  # sharded sums add in another order: not bit for bit
