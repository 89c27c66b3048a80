"""The group methods after PPO (GRPO, RLOO) against independent truth: their per-group estimators against NumPy
loops; the k3 KL against the exact KL of a categorical policy; GRPO and RLOO learning probes (one prompt, a reward
that prefers "a", as tests/test_ppo_learning.py's PPO probe); DAPO's skipping of groups whose samples all score the
same; the reference's held-out measures computed once. DPO and IPO: tests/test_dpo.py."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from learning_probe import PROMPT, CharTokenizer, answer_logprobs, fine_tuned, unpacked
from omni.config import base_config
from omni.data.template import prompt_ids
from omni.generate import Generator
from omni.models import GPT
from omni.models.actor_critic import ActorCritic
from omni.stages import evaluation, grpo, rollout
from omni.stages.grpo import group_advantages, k3_kl, rloo_advantages
from omni.train.optim import optimizer
from omni.train.trainer import TrainState, make_train_step


# ---------------------------------------------------------------------------------------------------------
# The estimators


def numpy_group_advantages(rewards, eps):
    out = np.zeros_like(rewards, dtype=np.float64)
    for p, row in enumerate(np.asarray(rewards, np.float64)):
        mean = sum(row) / len(row)
        std = np.sqrt(sum((x - mean) ** 2 for x in row) / len(row))  # population std: ddof 0
        for i, x in enumerate(row):
            out[p, i] = (x - mean) / (std + eps)
    return out


def numpy_rloo(rewards):
    out = np.zeros_like(rewards, dtype=np.float64)
    for p, row in enumerate(np.asarray(rewards, np.float64)):
        for i, x in enumerate(row):
            others = [y for j, y in enumerate(row) if j != i]
            out[p, i] = x - sum(others) / len(others)
    return out


GROUPS = [
    np.array([[1.0, 0.0], [0.5, 0.5], [-2.0, 3.0]]),  # G = 2, one group tied
    np.array([[1.0, 1.0, 0.0], [0.2, 0.7, -1.3], [4.0, 4.0, 4.0]]),  # G = 3: a tie inside a group, a flat group
    np.array([[0.0, 0.0, 0.0, 0.0, 1.0], [3.0, -1.0, 3.0, -1.0, 0.5]]),  # G = 5: one success in five
    np.random.default_rng(2).normal(size=(4, 8)),  # G = 8
]


@pytest.mark.parametrize("rewards", GROUPS, ids=lambda r: f"G{r.shape[1]}")
@pytest.mark.parametrize("eps", [1e-4, 0.5])
def test_group_advantages_match_numpy_loop(rewards, eps):
    got = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), eps))
    np.testing.assert_allclose(got, numpy_group_advantages(rewards, eps), rtol=1e-4, atol=1e-5)
    # the population std: a ddof=1 std would give different numbers for any group with spread
    ddof1 = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + eps)
    spread = rewards.std(1) > 0
    assert not np.allclose(got[spread], ddof1[spread], rtol=1e-3)
    assert float(group_advantages(jnp.asarray([[0.0, 1.0]]), eps)[0, 1]) == pytest.approx(0.5 / (0.5 + eps))


@pytest.mark.parametrize("size", [2, 3, 8])
def test_group_advantages_of_a_group_without_spread_are_exactly_zero(size):
    """omni/losses.py's docstring: "A group without spread gets 0". Every sample the same score, any score:
    the advantage must be 0, not a rounding error of the mean divided by eps (which pushes the whole group's
    responses one way)."""
    values = np.float32([0.1, 1.0 / 3.0, -6.635352, 7.293494, 13.779509, 100.3])
    rewards = np.repeat(values[:, None], size, axis=1)
    got = np.asarray(group_advantages(jnp.asarray(rewards)))
    assert np.all(got == 0.0), dict(zip(values.tolist(), got[:, 0].tolist()))
    # ... and so in the rollout's own path (episode_advantages on float32 scores)
    g = ml_collections.ConfigDict(dict(advantage="grpo", eps=1e-4))
    assert np.all(rollout.episode_advantages(g, rewards.reshape(-1), size) == 0.0)


@pytest.mark.parametrize("rewards", GROUPS, ids=lambda r: f"G{r.shape[1]}")
def test_rloo_advantages_match_leave_one_out_loop(rewards):
    got = np.asarray(rloo_advantages(jnp.asarray(rewards, jnp.float32)))
    np.testing.assert_allclose(got, numpy_rloo(rewards), rtol=1e-5, atol=1e-5)
    flat = rewards.std(1) == 0
    np.testing.assert_allclose(got[flat], 0.0, atol=1e-5)
    # RLOO's advantages are G / (G - 1) times the plain centred rewards
    g = rewards.shape[1]
    np.testing.assert_allclose(got, g / (g - 1) * (rewards - rewards.mean(1, keepdims=True)), rtol=1e-4, atol=1e-5)


def test_k3_kl_matches_numpy_is_nonnegative_and_estimates_the_kl():
    rng = np.random.default_rng(3)
    logp = rng.normal(scale=2.0, size=1000).astype(np.float32)
    ref = rng.normal(scale=2.0, size=1000).astype(np.float32)
    got = np.asarray(k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
    d = ref.astype(np.float64) - logp
    np.testing.assert_allclose(got, np.exp(d) - d - 1.0, rtol=1e-4, atol=1e-5)
    assert np.all(got >= 0)
    assert float(k3_kl(jnp.float32(-1.3), jnp.float32(-1.3))) == 0.0
    # Monte Carlo: under samples of the policy p, the mean of k3 is KL(p || ref)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float((p * np.log(p / q)).sum())
    actions = rng.choice(len(p), size=200_000, p=p)
    samples = np.asarray(k3_kl(jnp.asarray(np.log(p)[actions], jnp.float32),
                               jnp.asarray(np.log(q)[actions], jnp.float32)))
    stderr = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - exact) < 4 * stderr, (samples.mean(), exact, stderr)
    # ... and not the mean of a biased estimator such as k2 = (log p - log q)^2 / 2
    assert abs(0.5 * (np.log(p / q) ** 2 * p).sum() - exact) > 10 * stderr


# ---------------------------------------------------------------------------------------------------------
# GRPO and RLOO learning probes (tests/test_ppo_learning.py's setup, with the group stages' pieces)

def _grpo_config(advantage="grpo", skip_zero_spread=False):
    c = base_config()
    c.stage = "grpo"
    # two layers: a gradient through a cached prefix's attention reaches the first layer's queries and keys
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=64, max_len=32, scan_layers=False)
    c.train.update(batch_size=16, seq_len=28, seed=0)
    c.ppo.update(rollout_batch=32, samples_per_prompt=8, max_new_tokens=3, sample_every=10_000, iterations=20)
    c.grpo.update(advantage=advantage, skip_zero_spread=skip_zero_spread)
    c.optim.update(lr=3e-3, warmup_steps=0, decay_steps=1000, min_lr_ratio=1.0, weight_decay=0.0)
    grpo.check(c)
    return c


@pytest.fixture(scope="module")
def sft():
    """The policy after "SFT" (tests/learning_probe.py)."""
    tok = CharTokenizer()
    return tok, fine_tuned(_grpo_config().model, tok, lr=1e-2, steps=150)


@pytest.fixture(scope="module")
def machinery(sft):
    """The generator and the jitted GRPO train step (the same for GRPO's and RLOO's advantages), compiled once."""
    tok, policy = sft
    c = _grpo_config()
    step = jax.jit(make_train_step(c, grpo.grpo_loss(ActorCritic(c.model, critic=False), c)))
    return Generator(c.model, policy, pad_id=tok.pad_id), step


def _train(sft, machinery, advantage, reward, iterations):
    """GRPO/RLOO from the SFT policy against reward(response) -> float; per iteration: P("a") before it, the
    first minibatch's metrics, the rollout's metrics."""
    tok, policy = sft
    generator, step = machinery
    c = _grpo_config(advantage)
    rollouts = rollout.Rollouts(c, tok, [PROMPT], generator, (policy, None), range(c.train.batch_size),
                                reward_fn=lambda prompts, texts: [reward(t) for t in texts])
    params = {"policy": policy}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c.optim).init(params))
    model = GPT(c.model)
    curve, first, rolled = [], [], []
    per_iteration = c.ppo.rollout_batch // c.train.batch_size
    for i in range(iterations * per_iteration):
        if i % per_iteration == 0:
            curve.append(float(np.exp(answer_logprobs(model, state.params["policy"], tok)[0])))
        rolled.append(rollouts.before_step(state.params, i))
        state, metrics = step(state, next(rollouts))
        if i % per_iteration == 0:
            first.append(jax.device_get(metrics))
    curve.append(float(np.exp(answer_logprobs(model, state.params["policy"], tok)[0])))
    return np.array(curve), first, [m for m in rolled if m]


@pytest.fixture(scope="module")
def runs(sft, machinery):
    """One training run per advantage, shared by the tests that read it."""
    cache = {}

    def get(advantage):
        if advantage not in cache:
            cache[advantage] = _train(sft, machinery, advantage, lambda text: float(text == "a"), iterations=15)
        return cache[advantage]

    return get


# RLOO's run is out of CI (the suite's budget): its baseline is checked against NumPy above, and the GRPO run
# exercises everything else it shares.
@pytest.mark.parametrize("advantage", ["grpo", pytest.param("rloo", marks=pytest.mark.slow)])
def test_group_baselines_raise_the_preferred_answer_above_0_9(runs, advantage):
    curve, _, rolled = runs(advantage)
    assert curve[0] < 0.3
    assert curve.max() > 0.9 and curve[-1] > 0.9, curve.round(3)
    assert rolled[-1]["reward"] > rolled[0]["reward"]
    assert "kl_coef" not in rolled[0] and "explained_variance" not in rolled[0]  # no critic, no KL in the reward


def test_first_grpo_minibatch_of_every_iteration_is_on_policy(runs):
    """Each iteration's first minibatch recomputes the rollout's own log-probs: ratio 1, nothing clipped; and the
    k3 KL to the reference (the SFT policy) grows from exactly 0 as the policy leaves it."""
    _, first, _ = runs("grpo")
    for m in first:
        assert abs(float(m["approx_kl"])) < 1e-6 and float(m["clip_fraction"]) == 0.0, m
    assert float(first[0]["kl_loss"]) < 1e-6 < float(first[-1]["kl_loss"])


def test_skip_zero_spread_masks_groups_whose_samples_score_the_same(sft, machinery):
    """Two prompts: every sample of "pick" scores 1 (no spread), "pack"'s score at random. With
    grpo.skip_zero_spread the served minibatches carry no response token of the "pick" groups and
    'skipped_episodes' says half the episodes; without it they carry them all."""
    tok, policy = sft
    generator, _ = machinery
    rng = np.random.default_rng(8)
    reward = lambda prompts, texts: [1.0 if q == "pick" else float(rng.normal()) for q in prompts]  # noqa: E731
    pick = np.array(prompt_ids(tok, "pick"))
    assert len(prompt_ids(tok, "pack")) == len(pick)
    served = {}
    for skip in (True, False):
        c = _grpo_config(skip_zero_spread=skip)
        rollouts = rollout.Rollouts(c, tok, ["pick", "pack"], generator, (policy, None), range(c.train.batch_size),
                                    reward_fn=reward)
        metrics = rollouts.before_step({"policy": policy}, 0)
        batches = [next(rollouts) for _ in range(c.ppo.rollout_batch // c.train.batch_size)]
        served[skip] = metrics, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    metrics, batch = served[True]
    is_pick = np.all(unpacked(batch)["inputs"][:, :len(pick)] == pick, axis=1)
    assert is_pick.sum() == 16  # 2 of the 4 groups of 8
    assert np.all(batch["mask"][is_pick] == 0)
    assert np.all(batch["mask"][~is_pick].sum(1) >= 1)
    assert metrics["skipped_episodes"] == pytest.approx(0.5)
    assert metrics["zero_spread_groups"] == pytest.approx(0.5)
    metrics, batch = served[False]
    is_pick = np.all(unpacked(batch)["inputs"][:, :len(pick)] == pick, axis=1)
    assert np.all(batch["mask"].sum(1) >= 1) and is_pick.sum() == 16
    assert "skipped_episodes" not in metrics


class FileCharTokenizer(CharTokenizer):
    def __init__(self, model_path):
        self.model_path = model_path


def test_the_reference_policys_held_out_measures_are_computed_once_per_fingerprint(sft, machinery, tmp_path):
    """HeldOut keeps the reference's own measures in its workdir: a second run against the same reference with the
    same judging settings reads them (here: a value altered by hand comes back), and they equal those computed
    without a cache; another seed of the policy's training shares them, a change in how the policy is judged
    (more samples per prompt) does not."""
    tok, policy = sft
    generator, _ = machinery
    (tmp_path / "tokenizer.model").write_bytes(b"chars")
    tok = FileCharTokenizer(str(tmp_path / "tokenizer.model"))
    ref = str(tmp_path / "sft")

    def measures(reference_dir, **changes):
        c = _grpo_config()
        c.ppo.update({"eval_samples": 4, **changes})
        rollouts = rollout.Rollouts(c, tok, [PROMPT], generator, (policy, None), range(c.train.batch_size),
                                    labeler=lambda prompt, answer: float(answer == "a") + 0.1 * len(answer))
        held = evaluation.HeldOut(rollouts, [PROMPT, "pack"], reference_dir=reference_dir)
        return {k: v for k, v in held({"policy": policy}, {}).items() if k.startswith("sft_")}, held

    uncached, _ = measures("")
    first, _ = measures(ref)
    assert first == uncached and {"sft_labeler_score", "sft_sampled_labeler_score", "sft_pass@4"} <= set(first)
    [name] = os.listdir(os.path.join(ref, "cache"))
    path = os.path.join(ref, "cache", name)
    kept = json.load(open(path))
    assert len(kept["greedy"]) == 2 and "kl_to_sft" not in kept
    kept["greedy"] = ["altered", "by hand"]
    with open(path, "w") as f:
        json.dump(kept, f)
    _, held = measures(ref)
    assert held._reference({"policy": policy})["greedy"] == ["altered", "by hand"]
    _, held = measures(ref, eval_samples=8)
    assert held._reference({"policy": policy})["greedy"] == measures("")[1]._reference({"policy": policy})["greedy"]
    assert len(os.listdir(os.path.join(ref, "cache"))) == 2


def test_a_short_last_chunk_of_held_out_prompts_samples_as_if_padded_to_the_rollout_batch(sft, machinery):
    """HeldOut pads a chunk of fewer prompts than ppo.rollout_batch only to the next power of two: the responses
    and log-ratios to the reference are those of padding to the whole rollout batch (each row's draws depend on
    its index alone)."""
    tok, policy = sft
    generator, _ = machinery
    c = _grpo_config()
    reference = jax.tree.map(lambda w: 0.9 * w, policy)  # another policy: log-ratios not all 0
    rollouts = rollout.Rollouts(c, tok, [PROMPT], generator, (reference, None), range(c.train.batch_size))
    held = evaluation.HeldOut(rollouts, [PROMPT, "pack", "pick"])
    ids = held.ids * 2  # 6 prompts: 8 rows, not the rollout batch's 32
    assert held._prompts(len(ids), 1) == 8 and held._prompts(32, 1) == 32 == c.ppo.rollout_batch
    assert held._prompts(3, 2) == 4 and held._prompts(16, 2) == 16
    short = held._generate(policy, {"policy": policy}, ids, 1.0)
    held._prompts = lambda real, group: c.ppo.rollout_batch // group
    padded = held._generate(policy, {"policy": policy}, ids, 1.0)
    assert short[0] == padded[0] and len(set(short[0])) > 1
    assert np.all(np.abs(short[1]) > 1e-3)
    np.testing.assert_allclose(short[1], padded[1], rtol=1e-5, atol=1e-5)
    texts, kls, rewards = held._generate(policy, {"policy": policy}, ids, 0.0, scored=False)
    assert len(texts) == 6 and kls.size == rewards.size == 0


class OneLogitPair(nn.Module):
    """A policy over two tokens with a logit each (the same at every position), no critic."""

    @nn.compact
    def __call__(self, tokens, prefix=None, prefix_start=None):
        logits = self.param("logits", nn.initializers.zeros_init(), (2,))
        return jnp.broadcast_to(logits, tokens.shape + (2,)), jnp.zeros(tokens.shape, jnp.float32)


@pytest.mark.parametrize("gap", [10.0, 100.0])
def test_grpo_loss_ignores_positions_off_the_response(gap):
    """Position 0 is a response token (token 0, sampled by this very policy: ratio 1, k3 0, advantage 1), position
    1 is not (mask 0; its target, token 1, at log-prob -gap, and the rollout's 0 there, as the scorer leaves it).
    The loss is the response tokens' mean, -1, with a finite gradient, however unlikely the masked target is
    (a padding or prompt token far below the policy's choice, e.g. at a low rollout temperature)."""
    c = ml_collections.ConfigDict(dict(ppo=dict(temperature=1.0, clip=0.2), grpo=dict(beta=0.04)))
    loss_fn = grpo.grpo_loss(OneLogitPair(), c)
    params = {"logits": jnp.array([0.0, -gap], jnp.float32)}
    taken = float(jax.nn.log_softmax(params["logits"])[0])
    batch = {"prefix": None, "prefix_start": None, "inputs": np.zeros((1, 2), np.int32),
             "targets": np.array([[0, 1]], np.int32), "mask": np.array([[1.0, 0.0]], np.float32), "old_logprobs": np.array([[taken, 0.0]], np.float32),
             "ref_logprobs": np.array([[taken, 0.0]], np.float32), "advantages": np.array([[1.0, 0.0]], np.float32)}
    (loss, sums), grads = jax.value_and_grad(lambda q: loss_fn(q, batch, None), has_aux=True)(params)
    assert float(loss) == pytest.approx(-1.0) and float(sums["kl_loss"]) == 0.0, {k: float(v) for k, v in sums.items()}
    assert np.all(np.isfinite(np.asarray(grads["logits"])))
