"""omni.engine: continuous batching gives each greedy request Generator's tokens and logprobs whatever else shares
the batch and whenever it joins; per-row sampling filters match NumPy; seeded draws depend on their seed alone and
come from the top-k/top-p set; stop sequences, max_tokens and the context's end finish rows; the queue is bounded,
bad requests are refused, and a cancelled request frees its row."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding_reference import GREEDY, PAD, full_logits, log_softmax, np_keep, np_process, prompts_of, spread_params, tiny
from omni.engine import TOP_LOGPROBS, Engine, QueueFull, Request
from omni.generate import GenerationError, Generator, Sampling, process_rows

NEW = 12


class Collect:
    """A request's `emit`: keeps its tokens; `done` is set by the last one (or an error)."""

    def __init__(self):
        self.tokens, self.error, self.done = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Exception):
            self.error = event
            self.done.set()
            return
        self.tokens.append(event)
        if event.finish:
            self.done.set()

    @property
    def ids(self):
        return [t.id for t in self.tokens]

    def wait(self, timeout=120):
        assert self.done.wait(timeout), "the request did not finish"
        assert self.error is None, self.error
        return self


def _request(prompt, max_tokens=NEW, sampling=GREEDY, **kw):
    out = Collect()
    return Request(prompt, max_tokens, out, sampling, **kw), out


def _wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model():
    m = tiny("gpt2")
    return m, spread_params(m, seed=7)


@pytest.fixture(scope="module")
def generator(model):
    return Generator(*model, pad_id=PAD)


@pytest.fixture(scope="module")
def engine(generator):
    engine = Engine(generator, slots=3, queue=16)
    yield engine
    engine.close()


# --- sampling filters per row --------------------------------------------------------------------------------

def test_process_rows_matches_numpy():
    settings = [Sampling(temperature=0.0), Sampling(), Sampling(temperature=0.6), Sampling(temperature=1.3, top_k=5),
                Sampling(top_k=1), Sampling(top_p=0.6), Sampling(temperature=0.5, top_p=0.8),
                Sampling(temperature=2.0, top_k=8, top_p=0.5), Sampling(top_p=0.01), Sampling(top_k=3, top_p=0.999)]
    logits = (np.random.default_rng(3).standard_normal((len(settings), 40)) * 2.5).astype(np.float32)
    got = np.asarray(process_rows(jnp.asarray(logits), jnp.asarray([s.temperature for s in settings]),
                                  jnp.asarray([s.top_k for s in settings]), jnp.asarray([s.top_p for s in settings])))
    zeros = np.zeros((1, 40))
    for i, s in enumerate(settings):
        want = np_process(logits[i:i + 1], zeros.astype(bool), zeros, s)[0]
        np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want), err_msg=str(s))
        np.testing.assert_allclose(got[i][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)
    kept = np.isfinite(got).sum(-1)
    assert kept[0] == kept[1] == 40 and kept[4] == kept[8] == 1 and 1 < kept[5] < 40  # the filters did cut
    # rows that all keep every token skip the sorting: only the temperature divides them
    plain = [0, 1, 2]
    got = np.asarray(process_rows(jnp.asarray(logits[plain]), jnp.asarray([settings[i].temperature for i in plain]),
                                  jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.float32)))
    np.testing.assert_allclose(got, logits[plain] / np.array([[1.0], [1.0], [0.6]]), rtol=1e-6)


# --- greedy rows against Generator --------------------------------------------------------------------------

def test_greedy_rows_equal_generator_whatever_shares_the_batch(generator, engine):
    """Three slots for eight requests: greedy prompts of five lengths, two sampled ones, and one at the context's
    end; the later ones join rows as earlier ones free them, at different steps."""
    m = generator.config
    prompts = prompts_of((1, 4, 9, 17, 30), m.vocab_size, seed=2)
    long = prompts_of([m.max_len - 3], m.vocab_size, seed=3)[0]
    want = generator.generate(prompts, NEW, GREEDY)
    want_long = generator.generate([long], NEW, GREEDY)
    assert want_long.lengths[0] == 3  # Generator stops at the context's end too

    first = [_request(p) for p in prompts[:2]] + [_request(prompts[2], 20, Sampling(temperature=1.0), seed=1)]
    engine.submit([r for r, _ in first])
    _wait_for(lambda: all(len(out.tokens) >= 2 for _, out in first[:2]))  # these are decoding: the rest join
    later = [_request(p) for p in prompts[2:]] + [_request(long)]
    later.append(_request(prompts[1], 7, Sampling(temperature=0.8, top_k=10, top_p=0.9), seed=2))
    engine.submit([r for r, _ in later])
    greedy = [first[0], first[1], *later[:3]]
    for i, (_, out) in enumerate(greedy):
        out.wait()
        assert out.ids == want.row(i), i
        np.testing.assert_allclose([t.logprob for t in out.tokens], want.logprobs[i], atol=1e-4)
        assert [t.finish for t in out.tokens] == [None] * (NEW - 1) + ["length"]
        top_ids = [t.top[0][0] for t in out.tokens]
        assert top_ids == out.ids  # greedy: the chosen token is the likeliest alternative
    out = later[3][1].wait()
    assert out.ids == want_long.row(0) and out.tokens[-1].finish == "length"
    assert len(first[2][1].wait().tokens) == 20 and len(later[4][1].wait().tokens) == 7
    _wait_for(lambda: engine.load() == (0, 0))


def test_stop_sequences_end_rows(generator, engine):
    m = generator.config
    prompt = prompts_of([6], m.vocab_size, seed=4)[0]
    row = generator.generate([prompt], NEW, GREEDY).row(0)
    stop = row[5:7]
    cut = next(t + 2 for t in range(NEW - 1) if row[t:t + 2] == stop)
    request, out = _request(prompt, stop=[[m.vocab_size + 1], stop])  # an impossible one and a real one
    engine.submit([request])
    assert out.wait().ids == row[:cut] == generator.generate([prompt], NEW, GREEDY, stop=[stop]).row(0)
    assert out.tokens[-1].finish == "stop" and cut < NEW


# --- sampling --------------------------------------------------------------------------------------------------

def test_seeded_draws_depend_on_the_seed_alone(generator, engine):
    """A sampled request gives the same tokens alone and in a crowd, other tokens with another seed, and each
    token comes from the top-k/top-p set of the recomputed logits with its logprob."""
    m = generator.config
    prompt = prompts_of([5], m.vocab_size, seed=5)[0]
    s = Sampling(temperature=1.5, top_k=20, top_p=0.9)
    alone, out_alone = _request(prompt, 16, s, seed=11)
    engine.submit([alone])
    crowd = [_request(p, 10, Sampling(temperature=0.7), seed=3) for p in prompts_of((3, 8), m.vocab_size, seed=6)]
    crowded, out_crowded = _request(prompt, 16, s, seed=11)
    other, out_other = _request(prompt, 16, s, seed=12)
    engine.submit([crowd[0][0], crowded, crowd[1][0], other])
    out_alone.wait(), out_crowded.wait(), out_other.wait()
    assert out_alone.ids == out_crowded.ids and out_alone.ids != out_other.ids
    assert len(set(out_alone.ids)) > 3  # sampled, not stuck on one token


def test_draws_come_from_the_kept_set_with_their_logprobs(model, engine):
    m, params = model
    prompt = prompts_of([5], m.vocab_size, seed=8)[0]
    s = Sampling(temperature=1.5, top_k=20, top_p=0.9)
    request, out = _request(prompt, 16, s, seed=1)
    engine.submit([request])
    tokens = out.wait().ids
    logits = full_logits(m, params, [prompt + tokens])[0]
    sizes = []
    for t, token in enumerate(out.tokens):
        row = logits[len(prompt) - 1 + t] / s.temperature
        keep = np_keep(row[None], s)[0]
        assert keep[token.id], t
        assert abs(log_softmax(row)[token.id] - token.logprob) < 1e-4
        sizes.append(keep.sum())
    assert max(sizes) > 1  # a real choice at some step


# --- the queue, bad requests, cancelling --------------------------------------------------------------------

def test_queue_bound_and_bad_requests(generator):
    engine = Engine(generator, slots=1, queue=2)
    try:
        prompt = [1, 2, 3]
        with pytest.raises(QueueFull, match="queue holds 2"):
            engine.submit([_request(prompt)[0] for _ in range(3)])
        assert engine.load() == (0, 0)  # all or none
        m = generator.config
        bad = [dict(prompt=[]), dict(prompt=list(range(m.max_len))), dict(prompt=[m.vocab_size]),
               dict(max_tokens=0), dict(sampling=Sampling(temperature=-1.0)),
               dict(sampling=Sampling(repetition_penalty=1.2)), dict(seed=-1), dict(seed=2 ** 32), dict(stop=[[]]),
               dict(alternatives=-1), dict(alternatives=TOP_LOGPROBS + 1)]
        for fields in bad:
            args = {**dict(prompt=prompt, max_tokens=NEW, emit=Collect(), sampling=GREEDY), **fields}
            with pytest.raises(GenerationError):
                engine.submit([Request(**args)])
        request, out = _request(prompt)
        engine.submit([request])
        assert out.wait().ids == generator.generate([prompt], NEW, GREEDY).row(0)
    finally:
        engine.close()


def test_cancel_frees_the_row(generator):
    engine = Engine(generator, slots=1, queue=1)
    try:
        long, out_long = _request([5, 6, 7], max_tokens=50)
        engine.submit([long])
        _wait_for(lambda: len(out_long.tokens) >= 1)
        engine.cancel(long)
        request, out = _request([8, 9])  # waits for the one row
        engine.submit([request])
        assert len(out.wait().tokens) == NEW
        assert not out_long.done.is_set() and len(out_long.tokens) < 50
        assert engine.load() == (0, 0)
    finally:
        engine.close()


def test_a_row_count_seen_first_runs_on_a_larger_compiled_step_while_its_own_compiles(generator):
    """A burst of four requests compiles the four-row step at each capacity it reaches. A lone request later is
    served by it wherever its own one-row step is not compiled yet (that compiles on the worker, ahead of time,
    instead of stalling the step), and gets Generator's tokens either way; so does the next one, on the one-row
    steps then compiled."""
    engine = Engine(generator, slots=4, queue=8)
    try:
        prompts = prompts_of((9, 9, 9, 9), generator.config.vocab_size, seed=5)
        want = generator.generate(prompts, NEW, GREEDY)
        burst = [_request(p) for p in prompts]
        engine.submit([r for r, _ in burst])
        for i, (_, out) in enumerate(burst):
            assert out.wait().ids == want.row(i), i
        for round_ in range(2):
            request, out = _request(prompts[1])
            engine.submit([request])
            assert out.wait().ids == want.row(1), round_
            _wait_for(lambda: all(f.done() for f in engine._compiling.values()))
        ahead = [c for (rows, c), program in engine._programs.items()
                 if rows == 1 and isinstance(program, jax.stages.Compiled)]
        assert ahead, engine._programs.keys()  # at least one capacity's one-row step came from the worker
    finally:
        engine.close()


def test_each_token_carries_the_alternatives_its_request_asks_for(generator, engine):
    """Three requests in one batch asking for 0, 3 and all TOP_LOGPROBS alternatives: each gets that many, the
    likeliest first, the same tokens (greedy) as Generator's; alone, a request asking for none gets none (the
    step skips ranking the vocabulary) and the same tokens."""
    prompts = prompts_of((5, 5, 5), generator.config.vocab_size, seed=9)
    want = generator.generate(prompts, NEW, GREEDY)
    asked = [_request(p, alternatives=n) for p, n in zip(prompts, (0, 3, TOP_LOGPROBS))]
    engine.submit([r for r, _ in asked])
    full = asked[2][1].wait().tokens
    for i, ((_, out), n) in enumerate(zip(asked, (0, 3, TOP_LOGPROBS))):
        assert out.wait().ids == want.row(i)
        assert all(len(t.top) == n for t in out.tokens)
        for t in out.tokens:
            assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
    assert all(t.top[0] == (t.id, pytest.approx(t.logprob, abs=1e-5)) for t in full)
    request, out = _request(prompts[0], alternatives=0)
    engine.submit([request])
    assert out.wait().ids == want.row(0) and all(t.top == () for t in out.tokens)
