"""DPO and IPO against independent truth: the pair losses against NumPy (finite at huge margins); the objective on
a real (tiny) GPT, each prompt read once with its responses side by side, against a NumPy recomputation of every
response's log-probability; its gradient against finite differences and its small-beta limit; its saturation on
pairs already ordered; the reference's log-probabilities from text, kept in the reference's workdir."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learning_probe import CharTokenizer
from omni.config import base_config
from omni.data import finetune
from omni.data.finetune import preference_groups
from omni.data.template import prompt_ids, response_ids
from omni.losses import ipo_loss
from omni.models import GPT
from omni.stages import dpo
from omni.stages.dpo import dpo_loss


# ---------------------------------------------------------------------------------------------------------
# The pair losses


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_dpo_loss_matches_numpy_and_stays_finite_at_huge_margins():
    rng = np.random.default_rng(0)
    c, r, rc, rr = (rng.normal(scale=20.0, size=64) for _ in range(4))
    for beta in (0.01, 0.1, 1.0):
        margin = (c - rc) - (r - rr)
        want = _softplus(-beta * margin)  # -log sigmoid(x) = log(1 + e^-x)
        got = np.asarray(dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (c, r, rc, rr)), beta))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # |beta * margin| = 1e4: the loss is 0 for a pair ordered right and beta * |margin| for one ordered wrong
    big = jnp.asarray([1e5, -1e5, 0.0], jnp.float32)
    zero = jnp.zeros(3, jnp.float32)
    got = np.asarray(dpo_loss(big, zero, zero, zero, 0.1))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [0.0, 1e4, np.log(2.0)], rtol=1e-6, atol=1e-30)
    # ... and so is its gradient: d/d chosen = -beta * sigmoid(-beta * margin), -beta at the wrong extreme
    grad = np.asarray(jax.grad(lambda x: dpo_loss(x, zero, zero, zero, 0.1).sum())(big))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, [0.0, -0.1, -0.05], rtol=1e-6, atol=1e-30)
    # the reference enters with the opposite sign of the policy: shifting both by the same amount changes nothing
    np.testing.assert_allclose(np.asarray(dpo_loss(jnp.float32(3.0), jnp.float32(1.0), jnp.float32(2.0),
                                                   jnp.float32(-1.0), 1.0)),
                               _softplus(-((3.0 - 2.0) - (1.0 + 1.0))), rtol=1e-6)


def test_ipo_loss_matches_numpy():
    rng = np.random.default_rng(1)
    c, r, rc, rr = (rng.normal(scale=5.0, size=32) for _ in range(4))
    for beta in (0.05, 0.5, 2.0):
        want = ((c - rc) - (r - rr) - 1.0 / (2.0 * beta)) ** 2
        got = np.asarray(ipo_loss(*(jnp.asarray(x, jnp.float32) for x in (c, r, rc, rr)), beta))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # minimised (0) exactly at the margin 1 / (2 beta), not beyond it
    assert float(ipo_loss(jnp.float32(2.5), jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0), 0.2)) == 0.0


# ---------------------------------------------------------------------------------------------------------
# DPO's objective on a tiny GPT


def _dpo_config(beta, loss="sigmoid", nll_coef=0.0):
    c = base_config()
    c.stage = "dpo"
    # two layers: a gradient through a cached prefix's attention reaches the first layer's queries and keys
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=64, max_len=32, scan_layers=False)
    c.dpo.update(beta=beta, loss=loss, nll_coef=nll_coef)
    return c


@pytest.fixture(scope="module")
def tiny_gpt():
    c = _dpo_config(0.3)
    model = GPT(c.model)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # a little bigger than the init: the log-probabilities differ between responses by more than rounding
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    return model, params


@pytest.fixture(scope="module")
def objective(tiny_gpt):
    """(beta, loss) -> jitted (params, batch) -> ((loss, sums), gradient) of dpo_objective, compiled once each."""
    model, _ = tiny_gpt
    cache = {}

    def get(beta, loss="sigmoid", nll_coef=0.0):
        if (beta, loss, nll_coef) not in cache:
            fn = dpo.dpo_objective(model, _dpo_config(beta, loss, nll_coef).dpo)
            cache[beta, loss, nll_coef] = jax.jit(jax.value_and_grad(lambda q, b: fn(q, b, None), has_aux=True))
        return cache[beta, loss, nll_coef]

    return get


LENGTH = 12


def _groups():
    """4 prompts x 3 responses by hand: ragged prompt and response lengths, a tie, a missing response (with
    garbage where it would be), a prompt whose responses all tie (no pair)."""
    rng = np.random.default_rng(4)
    inputs = rng.integers(4, 64, size=(4, 3, LENGTH)).astype(np.int32)
    first = np.array([[3, 3, 3], [2, 2, 2], [5, 5, 3], [4, 4, 4]], np.int32)
    last = np.array([[4, 10, 11], [2, 7, 9], [8, 5, 9], [6, 7, 11]], np.int32)
    ranks = np.array([[0, 1, 2], [0, 0, 1], [1, 0, 5], [2, 2, 2]], np.int32)
    exists = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], np.float32)
    for p in range(4):
        for k in range(3):
            inputs[p, k, last[p, k] + 1:] = PAD  # pad after the response
            inputs[p, k, :first[p, k]] = inputs[p, 0, :first[p, k]]  # one prompt per group
    return {"inputs": inputs, "first": first, "last": last, "ranks": ranks, "exists": exists,
            "id": np.arange(12, dtype=np.int32).reshape(4, 3)}  # which response a packed slot holds


PAD = 3


def _packed(groups, prompts=1, rows=3, slots=3):
    """`groups` (a row per response, as preference_groups lays them out) in DPO's batch layout: each prompt once,
    its responses side by side (finetune.pack_prompts); by default one prompt per element."""
    return finetune.pack_prompts(groups, PAD, prompts=prompts, rows=rows, row_len=LENGTH, slots=slots,
                                 prompt_len=LENGTH - 1)


def _per_slot(values, packed):
    """values [prompts, K] at the packed slots (0 where a slot is empty)."""
    return np.where(packed["exists"] > 0, np.asarray(values).reshape(-1)[packed["id"]], 0)


def _numpy_response_logps(model, params, groups):
    """Sum over response tokens j = first..last of log p(token j | tokens < j), float64, one token at a time."""
    inputs = groups["inputs"]
    p_, k_, length = inputs.shape
    logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs.reshape(-1, length)), np.float64)
    logits = logits.reshape(p_, k_, length, -1)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out = np.zeros((p_, k_))
    for p in range(p_):
        for k in range(k_):
            for j in range(groups["first"][p, k], groups["last"][p, k] + 1):
                out[p, k] += logp[p, k, j - 1, inputs[p, k, j]]
    return out


def _pairs(groups, p):
    """Prompt p's (better, worse) pairs: both responses exist and are not tied."""
    k = groups["ranks"].shape[1]
    return [(i, j) for i in range(k) for j in range(k) if groups["exists"][p, i] and groups["exists"][p, j]
            and groups["ranks"][p, i] < groups["ranks"][p, j]]


def _numpy_dpo(logps, ref, groups, beta, loss):
    """(loss summed over prompts with a pair, their count, untied pairs, correctly ordered pairs, summed margin)."""
    total, prompts, pairs, correct, margin_sum = 0.0, 0, 0, 0, 0.0
    for p in range(len(logps)):
        terms = []
        for i, j in _pairs(groups, p):
            m = (logps[p, i] - ref[p, i]) - (logps[p, j] - ref[p, j])
            terms.append(_softplus(-beta * m) if loss == "sigmoid" else (m - 1 / (2 * beta)) ** 2)
            correct += beta * m > 0
            margin_sum += beta * m
        if terms:
            total += sum(terms) / len(terms)
            prompts += 1
            pairs += len(terms)
    return total, prompts, pairs, correct, margin_sum


@pytest.fixture(scope="module")
def scored_groups(tiny_gpt):
    model, params = tiny_gpt
    groups = _groups()
    logps = _numpy_response_logps(model, params, groups)
    ref = logps + np.random.default_rng(5).normal(scale=2.0, size=logps.shape)
    return {**groups, "ref_logps": ref.astype(np.float32)}, logps


def test_response_logps_match_numpy(tiny_gpt, scored_groups):
    """Each prompt read once and its responses side by side give every response's log-probability as a row of
    its own does (the NumPy recomputation), whatever sits in the padding."""
    model, params = tiny_gpt
    groups, logps = scored_groups
    logps_of = jax.jit(lambda q, b: dpo.response_logps(model, q, b))
    for batch in (_packed(groups), _packed(groups, prompts=4, rows=12, slots=12)):
        exists = batch["exists"] == 1
        assert exists.sum() == groups["exists"].sum()
        np.testing.assert_allclose(np.asarray(logps_of(params, batch))[exists], _per_slot(logps, batch)[exists],
                                   rtol=1e-5, atol=1e-4)
        garbage = {**batch, "inputs": np.where(batch["segments"] > 0, batch["inputs"], 7),
                   "prompt": np.where(np.arange(LENGTH - 2) < batch["prompt_start"][..., None], 7, batch["prompt"])}
        np.testing.assert_allclose(np.asarray(logps_of(params, garbage))[exists], _per_slot(logps, batch)[exists],
                                   rtol=1e-5, atol=1e-4)
    assert np.ptp(logps[groups["exists"] == 1]) > 5  # the responses differ: a wrong mask would show
    assert batch["group"].max() > 0 and batch["segments"].max() > 1  # prompts share elements, responses rows


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_objective_matches_numpy(tiny_gpt, scored_groups, objective, loss):
    _, params = tiny_gpt
    groups, logps = scored_groups
    batch = _packed(groups)
    beta = 0.3
    (total, sums), _ = objective(beta, loss)(params, batch)
    want, prompts, pairs, correct, margin_sum = _numpy_dpo(logps, groups["ref_logps"], groups, beta, loss)
    assert (prompts, pairs) == (3, 6)  # the tie and the missing response make no pair; prompt 3 none at all
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    np.testing.assert_allclose(float(sums["loss"]), want, rtol=1e-4)
    assert float(sums["weight"]) == prompts
    assert float(sums["reward_accuracy_weight"]) == pairs and float(sums["reward_accuracy"]) == correct
    assert 0 < correct < pairs  # the reference's noise orders some pairs each way
    np.testing.assert_allclose(float(sums["reward_margin"]), margin_sum, rtol=1e-4, atol=1e-4)
    # whatever sits in an empty slot changes nothing
    garbage = {**batch, "first": np.where(batch["exists"] > 0, batch["first"], 1),
               "ranks": np.where(batch["exists"] > 0, batch["ranks"], -5)}
    np.testing.assert_allclose(float(objective(beta, loss)(params, garbage)[0][0]), float(total), rtol=1e-6)


def _numpy_best_nll(logps, groups):
    """Summed over prompts with a pair: the mean over the prompt's best responses (lowest rank, ties all) of their
    negative log-probability per token."""
    total = 0.0
    for p in range(len(logps)):
        if not _pairs(groups, p):
            continue
        ks = [k for k in range(logps.shape[1]) if groups["exists"][p, k]]
        best = [k for k in ks if groups["ranks"][p, k] == min(groups["ranks"][p, j] for j in ks)]
        total += np.mean([-logps[p, k] / (groups["last"][p, k] - groups["first"][p, k] + 1) for k in best])
    return total


def test_dpo_with_the_best_responses_nll_matches_numpy(tiny_gpt, scored_groups, objective):
    """dpo.nll_coef adds that multiple of the best responses' per-token NLL (Pang et al. 2024), per prompt with a
    pair, to the loss; its gradient raises the best responses' likelihood where DPO's alone may lower it."""
    _, params = tiny_gpt
    groups, logps = scored_groups
    batch = _packed(groups, prompts=2, rows=6, slots=6)
    (plain, sums), plain_grad = objective(0.3)(params, batch)
    (total, nll_sums), grad = objective(0.3, "sigmoid", 0.5)(params, batch)
    want = _numpy_best_nll(logps, groups)
    assert want > 0
    np.testing.assert_allclose(float(sums["best_nll"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(total), float(plain) + 0.5 * want, rtol=1e-4)
    assert float(nll_sums["best_nll_weight"]) == float(sums["weight"]) == 3
    best = dpo.best_weights(batch, dpo.prompt_pairs(batch)[0])

    def best_logps(q):
        return (dpo.response_logps(tiny_gpt[0], q, batch) * best).sum()

    up = jax.jit(jax.grad(best_logps))(params)  # the direction that raises the best responses' log-probabilities
    added = jax.tree.map(lambda g, h: g - h, grad, plain_grad)  # the NLL term's gradient
    assert sum(float((a * u).sum()) for a, u in zip(jax.tree.leaves(added), jax.tree.leaves(up))) < 0


def test_dpo_objective_is_the_same_on_prompts_packed_together(tiny_gpt, scored_groups, objective):
    """finetune.pack_prompts puts whole prompts side by side in elements of 2 prompts, 6 rows and 6 slots: the
    same responses, the same loss and sums as one prompt per element (checked against NumPy above); no pair
    crosses two prompts."""
    _, params = tiny_gpt
    groups, _ = scored_groups
    single, packed = _packed(groups), _packed(groups, prompts=2, rows=6, slots=6)
    assert packed["group"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, -1]]  # next fit, in the stored order
    assert packed["exists"].sum() == groups["exists"].sum() and packed["inputs"].shape == (2, 6, LENGTH)
    for fn in (objective(0.3), objective(0.3, "ipo")):
        (total, sums), _ = fn(params, single)
        (got, got_sums), _ = fn(params, packed)
        np.testing.assert_allclose(float(got), float(total), rtol=1e-5)
        for k in sums:
            np.testing.assert_allclose(float(got_sums[k]), float(sums[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    # packed in a random order (as DPO packs a label stage's files): the same prompts, the same loss
    shuffled = finetune.pack_prompts(groups, PAD, prompts=2, rows=6, row_len=LENGTH, slots=6, prompt_len=LENGTH - 1,
                                     shuffle=0)
    order = list(dict.fromkeys((shuffled["id"][shuffled["exists"] > 0] // 3).tolist()))  # prompts, as packed
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3], order
    np.testing.assert_allclose(float(objective(0.3)(params, shuffled)[0][0]),
                               float(objective(0.3)(params, single)[0][0]), rtol=1e-5)
    # ranked as one prompt, the six responses of an element would make more pairs than the two prompts have
    merged = {**packed, "group": np.where(packed["exists"] > 0, 0, -1).astype(np.int32)}
    assert float(objective(0.3)(params, merged)[0][1]["reward_accuracy_weight"]) > float(sums["reward_accuracy_weight"])
    with pytest.raises(ValueError, match="needs 2 response rows and 3 slots: more than an element's dpo.rows=1"):
        _packed(groups, rows=1)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_dpo_gradient_matches_finite_differences(tiny_gpt, scored_groups, objective):
    """The gradient of the summed loss along a random unit direction in parameter space, against a central
    difference of the loss itself (float32: a step of 1e-2 keeps rounding ~1e-5 against a slope of ~1e-2)."""
    _, params = tiny_gpt
    groups, _ = scored_groups
    batch = _packed(groups, prompts=3, rows=6, slots=6)  # each element with an empty prompt row
    assert np.all(batch["prompt_start"][:, -1] == LENGTH - 2)
    fn = objective(0.3)
    (_, _), grad = fn(params, batch)
    leaves = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    direction = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    norm = np.sqrt(sum(float((d ** 2).sum()) for d in direction))
    direction = jax.tree.unflatten(jax.tree.structure(params), [d / norm for d in direction])
    eps = 1e-2
    shifted = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, params, direction)  # noqa: E731
    numeric = (float(fn(shifted(1.0), batch)[0][0]) - float(fn(shifted(-1.0), batch)[0][0])) / (2 * eps)
    analytic = float(_flat(grad) @ _flat(direction))
    assert abs(numeric) > 0.01  # a direction the loss moves along
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_dpo_gradient_at_small_beta_is_minus_half_beta_times_the_margins_gradient(tiny_gpt, scored_groups, objective):
    """-log sigmoid(beta m) = log 2 - beta m / 2 + O(beta^2): as beta -> 0 the gradient is -beta / 2 times the
    gradient of the summed per-prompt mean of (chosen - rejected), computed here with our own masks."""
    model, params = tiny_gpt
    batch, _ = scored_groups  # a row per response, as preference_groups lays them out
    beta = 1e-4
    (_, _), grad = objective(beta)(params, _packed(batch, prompts=3, rows=6, slots=6))
    # per prompt, the weight of each response in the mean of (chosen - rejected) over its untied pairs
    weights = np.zeros(batch["exists"].shape, np.float32)
    positions = np.zeros(batch["inputs"].shape, np.float32)
    for p in range(weights.shape[0]):
        pairs = _pairs(batch, p)
        for i, j in pairs:
            weights[p, i] += 1 / len(pairs)
            weights[p, j] -= 1 / len(pairs)
        for k in range(3):
            positions[p, k, batch["first"][p, k] - 1:batch["last"][p, k]] = 1.0  # predicting first..last
    targets = np.concatenate([batch["inputs"][..., 1:], batch["inputs"][..., -1:]], -1)

    @jax.jit
    @jax.grad
    def margins(q):
        logits = model.apply({"params": q}, batch["inputs"].reshape(-1, LENGTH)).reshape(*batch["inputs"].shape, -1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return ((logp * positions).sum(-1) * weights).sum()

    want = -beta / 2 * _flat(margins(params))
    got = _flat(grad)
    assert np.linalg.norm(got - want) < 1e-2 * np.linalg.norm(want), (np.linalg.norm(got), np.linalg.norm(want))


def test_dpo_hardly_moves_pairs_it_already_orders_by_a_wide_margin(tiny_gpt, scored_groups, objective):
    """The same pairs, the reference set so that every implicit margin beta * m is >= +50 (already preferred) or
    <= -50 (dispreferred): SGD moves the first essentially nowhere (sigmoid(-50) ~ 2e-22), the second a lot."""
    _, params = tiny_gpt
    batch, logps = scored_groups
    beta = 0.3
    fn = objective(beta)

    def train(sign):
        # (c - ref_c) - (r - ref_r) = sign * 50 / beta * (rank_r - rank_c), at least 50 / beta for untied pairs
        ref = (logps + sign * 50 / beta * batch["ranks"]).astype(np.float32)
        b = _packed({**batch, "ref_logps": ref})
        q, losses = params, []
        for _ in range(5):
            (loss, sums), grads = fn(q, b)
            q = jax.tree.map(lambda x, g: x - 0.05 * g / sums["weight"], q, grads)
            losses.append(float(loss))
        losses.append(float(fn(q, b)[0][0]))
        return np.linalg.norm(_flat(q) - _flat(params)), np.array(losses)

    moved_preferred, preferred = train(+1.0)
    moved_dispreferred, dispreferred = train(-1.0)
    assert moved_dispreferred > 0.1 and dispreferred[-1] < dispreferred[0] - 1.0, dispreferred
    assert moved_preferred < 1e-2 * moved_dispreferred, (moved_preferred, moved_dispreferred)
    assert np.all(preferred < 1e-6)


def _ranked_text(seq_len, records):
    """preference_groups of `records` packed as DPO reads them (two prompts an element), with 'id': p * 3 + k."""
    groups = preference_groups(CharTokenizer(), records, seq_len, 3)
    groups["id"] = np.arange(groups["exists"].size, dtype=np.int32).reshape(groups["exists"].shape)
    return groups, finetune.pack_prompts(groups, CharTokenizer().pad_id, prompts=2, rows=4, row_len=seq_len,
                                         slots=6, prompt_len=seq_len - 1)


RECORDS = [("pick", ["a", "bb", "c"], [0, 1, 1]), ("go", ["long answer here", "x"], [1, 0])]


def test_preference_groups_and_with_reference_score_the_response_tokens_and_eos(tiny_gpt):
    """From text: 'first'..'last' are the response's tokens and EOS (cut at seq_len), and with_reference's
    ref_logps of the packed prompts are their summed log-probabilities given everything before them."""
    model, params = tiny_gpt
    tok = CharTokenizer()
    seq_len = 28
    groups, packed = _ranked_text(seq_len, RECORDS)
    ref_logps = dpo.with_reference(packed, model, params)["ref_logps"]
    got = dict(zip(packed["id"][packed["exists"] > 0].tolist(), ref_logps[packed["exists"] > 0].tolist()))
    logits = np.asarray(model.apply({"params": params}, groups["inputs"].reshape(-1, seq_len)), np.float64)
    logp = jax.nn.log_softmax(logits).reshape(2, 3, seq_len, -1)
    for p, (prompt, responses, _) in enumerate(RECORDS):
        head = prompt_ids(tok, prompt)
        for k, response in enumerate(responses):
            ids = (head + response_ids(tok, response))[:seq_len]
            assert groups["first"][p, k] == len(head) and groups["last"][p, k] == len(ids) - 1
            want = sum(float(logp[p, k, j - 1, ids[j]]) for j in range(len(head), len(ids)))
            np.testing.assert_allclose(got.pop(p * 3 + k), want, rtol=1e-5, atol=1e-4)
    assert not got  # and nothing else: the missing third response of "go" has no slot
    assert len(prompt_ids(tok, "go")) + len(response_ids(tok, "long answer here")) > seq_len  # one was cut


def test_dpo_reference_logps_are_kept_in_the_reference_workdir_for_the_same_rankings(tiny_gpt, tmp_path):
    """with_reference(..., reference_dir) gives the very numbers it computes without one, keeps them in the
    reference's cache/, and the next run on the same rankings and reference reads them from there (a file
    altered by hand is what it returns); other rankings or another reference are computed anew."""
    model, params = tiny_gpt
    seq_len, ref = 28, str(tmp_path / "sft")
    _, groups = _ranked_text(seq_len, RECORDS)
    want = dpo.with_reference(groups, model, params)["ref_logps"]
    np.testing.assert_array_equal(dpo.with_reference(groups, model, params, ref)["ref_logps"], want)
    [name] = os.listdir(os.path.join(ref, "cache"))
    np.savez(os.path.join(ref, "cache", name), ref_logps=want + 1.0)
    np.testing.assert_array_equal(dpo.with_reference(groups, model, params, ref)["ref_logps"], want + 1.0)
    _, other = _ranked_text(seq_len, RECORDS[:1])
    pick = (groups["id"] < 3) & (groups["exists"] > 0)  # the first prompt's slots, in the order `other` has them
    np.testing.assert_allclose(dpo.with_reference(other, model, params, ref)["ref_logps"][0, :3], want[pick],
                               rtol=1e-6)
    moved = jax.tree.map(lambda x: x * 1.01, params)
    np.testing.assert_array_equal(dpo.with_reference(groups, model, moved, ref)["ref_logps"],
                                  dpo.with_reference(groups, model, moved)["ref_logps"])
    assert len(os.listdir(os.path.join(ref, "cache"))) == 3
