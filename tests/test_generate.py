"""omni.generate: KV-cache decoding gives the tokens of recomputing the whole forward pass every step (all
variants, scanned or unrolled params, left-padded batches), the model's cache path gives full-forward logits,
sampling filters match a NumPy reference, stop sequences end rows, bad requests are one clear error, greedy
decoding matches transformers' GPT-2 `generate`, sharded params decode like one device, and `complete()` trims
text at stop strings."""
import copy
import functools
import json
import os
import subprocess
import sys
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from omni import generate as gen_lib
from omni.config import base_config
from omni.generate import GenerationError, Generator, Sampling, complete, process_logits, trim_at_stop
from omni.models import GPT
from omni.models.gpt import KVCache

GREEDY = Sampling(temperature=0.0)
NEW = 20  # new tokens of the shared runs
PROMPT_LENGTHS = (1, 7, 20)  # one bucket of 32 (left padding 31, 25 and 12)
PAD = 77  # the shared generators left-pad with a real token id: its value must not matter


def tiny(variant="gpt2", **kw):
    m = base_config().model
    m.update(dict(dict(variant=variant, num_layers=2, num_heads=4, d_model=64, d_ff=128, vocab_size=128, max_len=64,
                       attention="xla"), **kw))
    return m


def spread_params(m, seed=0):
    """Random params with large, distinct values (LayerNorm scales around 1): logits spread over several
    units, so a greedy choice is never a near tie that float rounding could flip."""
    shapes = nn.unbox(jax.eval_shape(lambda: GPT(m).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]))
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        keys = [getattr(k, "key", "") for k in path]
        if keys[-1] == "scale":
            return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        return (rng.standard_normal(x.shape) * (0.2 if keys[-1] == "bias" else 0.3)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(redraw, shapes)


def prompts_of(lengths, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


_FORWARD = {}


def forward(m):
    """jit'd full forward pass (no cache) of GPT(m): [batch, length] -> logits (one per config)."""
    key = json.dumps(m.to_dict(), sort_keys=True)
    if key not in _FORWARD:
        model = GPT(m)
        _FORWARD[key] = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return _FORWARD[key]


def full_logits(m, params, seqs):
    """Logits of every position of each sequence by one full forward pass per call. Rows are right-padded to
    max_len: the model is causal, so a real position's logits do not see the padding after it."""
    batch = np.zeros((len(seqs), m.max_len), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    return np.asarray(forward(m)(params, batch), np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_penalise(logits, seen, counts, s):
    x = np.array(logits, np.float64)
    if s.repetition_penalty != 1.0:
        x = np.where(seen & (x > 0), x / s.repetition_penalty, x)
        x = np.where(seen & (x <= 0), x * s.repetition_penalty, x)
    return x - s.frequency_penalty * counts


def np_keep(logits, s):
    """[batch, vocab] bool: the tokens top-k and then top-p leave to sample from (logits already penalised and
    divided by the temperature). Top-p keeps the smallest set of most probable tokens (after top-k) whose
    probability reaches p, at least one."""
    keep = np.ones(logits.shape, bool)
    for b, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")
        n = s.top_k or len(row)
        if s.top_p < 1.0:
            top = row[order[:n]]
            probs = np.exp(top - top.max())
            probs /= probs.sum()
            cum = np.cumsum(probs)
            # A cumulative mass within rounding of p would make the reference itself ambiguous.
            assert np.abs(cum - s.top_p).min() > 1e-5, "ill-posed test row"
            n = int(np.argmax(cum >= s.top_p)) + 1
        keep[b] = False
        keep[b, order[:n]] = True
    return keep


def np_process(logits, seen, counts, s):
    x = np_penalise(logits, seen, counts, s)
    if s.temperature == 0.0:
        return x
    x = x / s.temperature
    return np.where(np_keep(x, s), x, -np.inf)


def reference_decode(m, params, prompts, n, sampling=GREEDY):
    """Greedy decoding by recomputing the full forward pass for every new token: (tokens, logprobs) [batch, n],
    with the sampling's penalties (prompt tokens count as seen; only generated ones are counted)."""
    seqs = [list(p) for p in prompts]
    counts = np.zeros((len(seqs), m.vocab_size))
    tokens, logprobs = np.zeros((len(seqs), n), np.int64), np.zeros((len(seqs), n))
    for t in range(n):
        logits = full_logits(m, params, seqs)
        last = np.stack([logits[i, len(s) - 1] for i, s in enumerate(seqs)])
        seen = np.zeros_like(last, bool)
        for i, s in enumerate(seqs):
            seen[i, s] = True
        scores = np_penalise(last, seen, counts, sampling)
        chosen = np.argmax(scores, axis=-1)
        assert np.all(np.sort(scores, -1)[:, -2] < scores.max(-1) - 1e-4), "near tie: the test is ill-posed"
        for i, c in enumerate(chosen):
            seqs[i].append(int(c))
            counts[i, c] += 1
        tokens[:, t] = chosen
        logprobs[:, t] = log_softmax(last)[np.arange(len(seqs)), chosen]
    return tokens, logprobs


# --- greedy decoding against recomputing the full forward pass ------------------------------------------

VARIANTS = {
    "gpt1": dict(variant="gpt1"),
    "gpt2": dict(variant="gpt2"),
    "gpt2-unrolled": dict(variant="gpt2", scan_layers=False),
    # Window 4, far below every row's prompt + new tokens; chunks of 16, so the prefill (32 slots) runs two.
    "gpt3": dict(variant="gpt3", sparse_window=4, attention_chunk=16),
}


@functools.lru_cache(maxsize=None)
def shared_run(name):
    """(config, params, prompts, generator, Generation, reference tokens, reference logprobs) of variant `name`:
    the greedy run of the shared prompts, built once."""
    m = tiny(**VARIANTS[name])
    params = spread_params(m, seed=len(name))
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


# --- sampling ----------------------------------------------------------------------------------------------

def _rows(seed, batch=4, vocab=40, scale=2.5):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    seen = rng.random((batch, vocab)) < 0.3
    counts = np.where(seen, rng.integers(0, 4, (batch, vocab)), 0).astype(np.int32)
    return logits, seen, counts


@pytest.mark.parametrize("sampling", [
    Sampling(),
    Sampling(temperature=0.7),
    Sampling(temperature=1.3, top_k=5),
    Sampling(top_k=1),
    Sampling(top_p=0.6),
    Sampling(temperature=0.5, top_p=0.8),
    Sampling(temperature=2.0, top_k=8, top_p=0.5),
    Sampling(top_k=3, top_p=0.999),
    Sampling(top_p=0.01),  # less than the top token's mass: still one token
    Sampling(repetition_penalty=1.7),
    Sampling(repetition_penalty=0.6, temperature=0.8),
    Sampling(frequency_penalty=0.9),
    Sampling(frequency_penalty=-0.4, repetition_penalty=1.3, temperature=0.9, top_k=10, top_p=0.9),
    Sampling(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3, top_k=2, top_p=0.1),
])
def test_process_logits_matches_numpy(sampling):
    logits, seen, counts = _rows(zlib.crc32(repr(sampling).encode()))
    got = np.asarray(process_logits(jnp.asarray(logits), jnp.asarray(seen), jnp.asarray(counts), sampling))
    want = np_process(logits, seen, counts, sampling)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert finite.sum(-1).min() >= 1
    if sampling.temperature and (sampling.top_k or sampling.top_p < 1):
        assert finite.sum(-1).max() <= (sampling.top_k or 40) and finite.sum() < finite.size
    if sampling.repetition_penalty != 1.0 or sampling.frequency_penalty:
        plain = Sampling(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        assert not np.allclose(np.nan_to_num(want), np.nan_to_num(np_process(logits, seen, counts, plain)))


def test_penalties_and_nucleus_by_hand():
    """Small numbers checked without any reference code."""
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    seen = np.array([[True, True, False, False]])
    counts = np.array([[3, 0, 1, 0]], np.int32)
    # CTRL: seen tokens' positive logits divided by the penalty, negative ones multiplied.
    got = process_logits(logits, seen, counts, Sampling(temperature=0.0, repetition_penalty=2.0))
    np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, -1.0]])
    # Frequency: minus penalty x count.
    got = process_logits(logits, seen, counts, Sampling(temperature=0.0, frequency_penalty=0.5))
    np.testing.assert_allclose(got, [[0.5, -2.0, 0.5, -1.0]])
    got = process_logits(logits, seen, counts, Sampling(temperature=0.5, repetition_penalty=2.0))
    np.testing.assert_allclose(got, [[2.0, -8.0, 2.0, -2.0]])  # penalty first, then temperature
    # Probabilities 0.5, 0.25, 0.15, 0.1: top-p 0.7 keeps two tokens, 0.4 one, 0.8 three.
    logits = np.log(np.array([[0.15, 0.5, 0.1, 0.25]], np.float32))
    kept = lambda **kw: np.isfinite(np.asarray(process_logits(logits, None, None, Sampling(**kw))))[0].tolist()
    assert kept(top_p=0.7) == [False, True, False, True]
    assert kept(top_p=0.4) == [False, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, True]
    # Top-k first, then top-p on the renormalised rest: 0.5/0.9 + 0.25/0.9 already reaches 0.8.
    assert kept(top_k=3, top_p=0.8) == [False, True, False, True]
    assert kept(top_k=3) == [True, True, False, True]


def _draws(logits, sampling, n=4000, seed=0):
    """n draws of the next token (the decode loop's own _choose on process_logits), one per rng key."""
    keys = jax.random.split(jax.random.key(seed), n)
    processed = process_logits(jnp.asarray(logits)[None], None, None, sampling)
    return np.asarray(jax.vmap(lambda k: gen_lib._choose(processed, k, sampling)[0])(keys))


@pytest.mark.parametrize("sampling", [Sampling(top_k=4), Sampling(top_p=0.7),
                                      Sampling(temperature=0.5, top_k=6, top_p=0.9), Sampling(temperature=1.5)])
def test_samples_stay_in_the_kept_set_with_renormalised_frequencies(sampling):
    logits = np.random.default_rng(5).standard_normal(30).astype(np.float32) * 1.5
    draws = _draws(logits, sampling)
    scaled = logits.astype(np.float64) / sampling.temperature
    keep = np_keep(scaled[None], sampling)[0]
    assert set(np.unique(draws)) <= set(np.flatnonzero(keep))
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    freq = np.bincount(draws, minlength=30) / len(draws)
    assert np.abs(freq - probs).max() < 0.03, (freq, probs)
    assert keep.sum() > 1 and len(np.unique(draws)) > 1  # not trivially a single token


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits, _, _ = _rows(7)
    for s in (Sampling(temperature=0.0), Sampling(temperature=0.0, top_k=3, top_p=0.2)):
        processed = process_logits(jnp.asarray(logits), None, None, s)
        for seed in range(3):
            np.testing.assert_array_equal(gen_lib._choose(processed, jax.random.key(seed), s), logits.argmax(-1))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny sentencepiece tokenizer (the repo's trainer) of 320 ids: the sampling model's vocabulary."""
    from omni.data import train_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly ducks".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) + ".\n" for _ in range(60)]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok") / "tok.model"))


@pytest.fixture(scope="module")
def sampling_model(tokenizer):
    m = tiny("gpt2", vocab_size=tokenizer.vocab_size)
    params = spread_params(m, seed=11)
    return m, params, prompts_of(PROMPT_LENGTHS, m.vocab_size, seed=4), Generator(m, params)


def _check_support_and_logprobs(m, params, prompts, out, sampling):
    """Every chosen token is in the top-k/top-p set of the recomputed logits (no penalties here), and its
    logprob is the recomputed log_softmax(logits / temperature). Returns the kept sets' sizes."""
    seqs = [list(p) + out.row(i) for i, p in enumerate(prompts)]
    logits = full_logits(m, params, seqs)
    sizes = []
    for i, p in enumerate(prompts):
        for t in range(out.lengths[i]):
            row = logits[i, len(p) - 1 + t] / sampling.temperature
            # Rounding of the logits (~1e-6) is amplified by 1 / temperature.
            assert abs(log_softmax(row)[out.tokens[i, t]] - out.logprobs[i, t]) < 1e-5 / min(sampling.temperature, 1)
            if sampling.repetition_penalty == 1.0 and not sampling.frequency_penalty:
                keep = np_keep(row[None], sampling)[0]
                assert keep[out.tokens[i, t]], (i, t)
                sizes.append(keep.sum())
    return np.array(sizes)


def test_sampling_seeds_and_top_k_top_p(sampling_model):
    m, params, prompts, generator = sampling_model
    s = Sampling(temperature=1.0, top_k=40, top_p=0.9)
    a = generator.generate(prompts, NEW, s, seed=0)
    b = generator.generate(prompts, NEW, s, seed=0)
    c = generator.generate(prompts, NEW, s, seed=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    for row in range(3):  # every row differs, not only one of them
        assert (a.tokens[row] != c.tokens[row]).sum() > 3
    sizes = np.concatenate([_check_support_and_logprobs(m, params, prompts, out, s) for out in (a, c)])
    assert sizes.min() < 40 and sizes.max() > 1  # top-p cut below top-k at some steps; not always greedy
    greedy, _ = reference_decode(m, params, prompts, NEW)
    assert (a.tokens != greedy).any()


def test_sampled_tokens_follow_the_distribution(sampling_model):
    """With the final LayerNorm's scale at 0 the logits are the same at every step (ln_f's bias times the
    embedding), so each step is an independent draw from one known distribution: the tokens must come from
    its top-k/top-p set with about its renormalised frequencies, and vary from step to step."""
    m, params, prompts, generator = sampling_model
    params = jax.tree.map(np.copy, params)
    params["ln_f"]["scale"][:] = 0.0
    constant = copy.copy(generator)  # the same compiled program with other params
    constant.params = gen_lib.unrolled(m, params)[1]
    s = Sampling(temperature=1.0, top_k=40, top_p=0.9)
    outs = [constant.generate(prompts, NEW, s, seed=seed) for seed in range(4)]
    logits = params["ln_f"]["bias"].astype(np.float64) @ params["wte"]["embedding"].astype(np.float64).T
    keep = np_keep(logits[None], s)[0]
    probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    draws = np.concatenate([out.tokens.ravel() for out in outs])
    assert keep[draws].all() and 3 <= keep.sum() < 40
    freq = np.bincount(draws, minlength=m.vocab_size) / len(draws)
    assert np.abs(freq - probs).max() < 0.1, np.abs(freq - probs).max()
    assert all(len(set(row)) > 3 for out in outs for row in out.tokens.tolist())
    for out in outs:
        np.testing.assert_allclose(out.logprobs, log_softmax(logits)[out.tokens], atol=1e-5)


def test_penalties_in_the_decode_loop(sampling_model):
    """Penalties inside the loop (seen: prompt and output so far; counts: output only) against the reference
    loop applying np_penalise to recomputed logits. top_k=1 makes sampling deterministic (the penalised
    argmax), while logprobs are of the unpenalised logits over the temperature."""
    m, params, prompts, generator = sampling_model
    s = Sampling(temperature=0.5, top_k=1, repetition_penalty=1.8, frequency_penalty=0.7)
    out = generator.generate(prompts, NEW, s, seed=5)
    want, _ = reference_decode(m, params, prompts, NEW, s)
    np.testing.assert_array_equal(out.tokens, want)
    _check_support_and_logprobs(m, params, prompts, out, s)
    plain, _ = reference_decode(m, params, prompts, NEW)
    assert (want != plain).any()  # the penalties changed the outcome


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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert r["spec"] == "P(None, 'fsdp', None, 'tensor', None)" and r["shard"] == r["full"] // 4
    assert r["one"] == r["many"]
    assert r["lp"] < 1e-5  # sharded sums add in another order: not bit for bit


# --- text level ---------------------------------------------------------------------------------------------

def test_trim_at_stop():
    assert trim_at_stop("abc\n\ndef", ["\n\n"]) == "abc"
    assert trim_at_stop("abc\n\ndef", ["zz", "c\n", "\n\n"]) == "ab"  # the earliest match wins
    assert trim_at_stop("abc", ["zz", ""]) == "abc"
    assert trim_at_stop("abc", []) == "abc"
    assert trim_at_stop("stop", ["stop"]) == ""


class _OtherEos:
    """The tokenizer with another token id as its EOS (one the model really emits)."""

    def __init__(self, tokenizer, eos_id):
        self.encode, self.decode, self.eos_id = tokenizer.encode, tokenizer.decode, eos_id


def _cut(row, eos_id):
    return row[: row.index(eos_id)] if eos_id in row else row


def test_complete_trims_at_stop_strings_and_eos(sampling_model, tokenizer):
    m, params, _, generator = sampling_model
    prompts = ["the quick brown", "seven wizards", "a"]
    # The reference: greedy tokens by recomputing the forward pass, cut at the first EOS, decoded.
    tokens, _ = reference_decode(m, params, [tokenizer.encode(p) for p in prompts], NEW)
    rows = tokens.tolist()
    full = [tokenizer.decode(_cut(row, tokenizer.eos_id)) for row in rows]
    assert complete(generator, tokenizer, prompts, NEW, GREEDY, stop=["ZZZ"]) == [trim_at_stop(t, ["ZZZ"])
                                                                                   for t in full]
    # A stop string from the middle of row 0's text: every row ends before its first occurrence.
    stop = next(c for c in full[0][len(full[0]) // 2:] if c.isascii() and c.isprintable())
    got = complete(generator, tokenizer, prompts, NEW, GREEDY, stop=[stop, ""])
    assert got == [text[: text.find(stop)] if stop in text else text for text in full]
    assert len(got[0]) < len(full[0])
    # An EOS the model emits (row 1's 4th token, which decodes to text): the text ends before it.
    eos = rows[1][3]
    assert tokenizer.decode([eos]) and eos != tokenizer.eos_id
    got = complete(generator, _OtherEos(tokenizer, eos), prompts, NEW, GREEDY, stop=["ZZZ"])
    assert got == [trim_at_stop(tokenizer.decode(_cut(row, eos)), ["ZZZ"]) for row in rows]
    assert len(got[1]) < len(full[1])
