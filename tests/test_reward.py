"""The reward model's loss against a plain NumPy loop over comparisons, its batch layout, and its head."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omni.config import base_config
from omni.data import finetune
from omni.models import GPT
from omni.stages import reward


def numpy_ranking_loss(scores, ranks, mask):
    """InstructGPT's loss written out: per prompt, every untied pair once, better minus worse."""
    losses = []
    for s, r, m in zip(scores, ranks, mask):
        pairs = [(i, j) for i, j in itertools.permutations(range(len(s)), 2) if m[i] and m[j] and r[i] < r[j]]
        if pairs:
            losses.append(-np.mean([np.log(1 / (1 + np.exp(-(s[i] - s[j])))) for i, j in pairs]))
    return np.mean(losses)


def test_ranking_loss_matches_numpy_with_ties_and_missing_responses():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 5)).astype(np.float32)
    ranks = rng.integers(0, 3, size=(6, 5))  # ranks drawn from 3 values among 5 responses: many ties
    mask = (rng.random((6, 5)) < 0.8).astype(np.float32)
    mask[:, :2] = 1
    ranks[0] = 0  # a prompt whose responses all tie: no pair, no weight
    got = reward.ranking_loss(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(mask))
    np.testing.assert_allclose(got, numpy_ranking_loss(scores, ranks, mask), rtol=1e-5)


def test_pairwise_case_is_log_sigmoid_of_margin():
    scores = jnp.array([[2.0, 0.5], [0.0, 1.0]])
    ranks = jnp.array([[0, 1], [0, 1]])
    got = reward.ranking_loss(scores, ranks, jnp.ones((2, 2)))
    expected = -(np.log(1 / (1 + np.exp(-1.5))) + np.log(1 / (1 + np.exp(1.0)))) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_one_prompt_with_k_responses_weighs_as_one_element():
    """C(K,2) comparisons of one prompt count as one batch element, not as C(K,2) elements."""
    k4 = reward.ranking_terms(jnp.array([[3.0, 2.0, 1.0, 0.0]]), jnp.array([[0, 1, 2, 3]]), jnp.ones((1, 4)))
    assert float(k4["pairs"][0]) == 6 and float(k4["correct"][0]) == 6
    two = jnp.array([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    terms = reward.ranking_terms(two, jnp.array([[0, 1, 2, 3], [1, 0, 1, 1]]), jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    # second prompt: only responses 0 and 1 exist, 1 is better and scores equal: one pair, loss log 2
    np.testing.assert_allclose(terms["loss"][1], np.log(2), rtol=1e-6)
    assert float(terms["pairs"][1]) == 1 and float(terms["correct"][1]) == 0


class ToyTokenizer:
    eos_id, pad_id = 1, 0

    def encode(self, text):
        return [2 + ord(c) % 50 for c in text]


def test_preference_groups_layout():
    records = [("hi", ["ab", "abcd", "a"], [1, 0, 1]), ("yo", ["x", "y"], [0, 1])]
    groups = finetune.preference_groups(ToyTokenizer(), records, seq_len=32, num_responses=4)
    prompt = len(ToyTokenizer().encode("User: hi\nAssistant: "))
    assert groups["inputs"].shape == (2, 4, 32)
    np.testing.assert_array_equal(groups["exists"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(groups["ranks"][0, :3], [1, 0, 1])
    assert groups["last"][0, 1] == prompt + 4  # 4 response tokens, then EOS at the last index
    assert groups["inputs"][0, 1, groups["last"][0, 1]] == ToyTokenizer.eos_id


def test_scalar_head_reads_the_last_response_token():
    m = ml_collections.ConfigDict(base_config().model.to_dict())
    m.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=64, max_len=16, head="scalar")
    model = GPT(m)
    tokens = jax.random.randint(jax.random.key(0), (2, 3, 16), 2, 64)
    params = model.init(jax.random.key(1), tokens[0])["params"]
    assert "score_head" in params and jax.eval_shape(model.apply, {"params": params}, tokens[0]).shape == (3, 16)
    last = jnp.array([[4, 15, 0], [7, 7, 2]])
    score = jax.jit(lambda t: reward.response_scores(model, params, t, last))
    scores = score(tokens)
    # causal: the score at `last` ignores what comes after it
    np.testing.assert_allclose(score(tokens.at[0, 0, 5:].set(3))[0, 0], scores[0, 0], rtol=1e-5)
    full = jax.jit(model.apply)({"params": params}, tokens[1, 1][None])[0]
    np.testing.assert_allclose(scores[1, 1], full[7], rtol=1e-5)


@pytest.mark.parametrize("count", [5, 8])
def test_fixed_batches_pad_with_zero_weight(count):
    arrays = {"x": np.arange(count * 2).reshape(count, 2), "exists": np.ones((count, 2), np.float32)}
    batches = finetune.fixed_batches(arrays, batch_size=4, max_batches=5, weight_keys=("exists",))
    assert len(batches) == 2
    assert sum(b["exists"].sum() for b in batches) == count * 2
