"""omni.generate's sampling: the logit filters against a NumPy reference, draws inside the kept set with the
right frequencies, seeds, penalties inside the decode loop, and text-level completion trimmed at stop strings."""
import copy
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding_reference import (
    GREEDY, NEW, PROMPT_LENGTHS, full_logits, log_softmax, np_keep, np_process, prompts_of, reference_decode,
    spread_params, tiny)
from omni import generate as gen_lib
from omni.generate import Generator, Sampling, complete, process_logits, trim_at_stop


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
    constant.set_params(params)
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
