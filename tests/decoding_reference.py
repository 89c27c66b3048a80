"""Shared by the generation tests: tiny models with well-separated logits, and reference decoding that
recomputes the full forward pass for every new token, with NumPy versions of the sampling filters."""
import json

import flax.linen as nn
import jax
import numpy as np

from omni.config import base_config
from omni.generate import Sampling
from omni.models import GPT

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
