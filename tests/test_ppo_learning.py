"""Learning probes: tests that fail when PPO cannot learn, whatever the cause. A tiny policy is fine-tuned to
answer one prompt with "a", "b" or "c" (probabilities about 0.2, 0.3, 0.5); then the stage's own pieces
(Rollouts: sampling, scoring, reward normalisation, advantages; ppo_loss; the trainer's step) train it
against a reward that prefers "a". Measured against exact probabilities of each answer, computed from the
model's logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learning_probe import PROMPT, CharTokenizer, answer_logprobs, fine_tuned, unpacked
from omni.config import base_config
from omni.data.template import prompt_ids
from omni.generate import Generator
from omni.models import GPT
from omni.stages import ppo, rollout
from omni.train.optim import optimizer
from omni.train.trainer import TrainState, make_train_step

def _config(lr=3e-3):
    c = base_config()
    c.stage = "ppo"
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=64, max_len=32, scan_layers=False)
    c.train.update(batch_size=16, seq_len=28, seed=0)
    c.ppo.update(rollout_batch=32, samples_per_prompt=8, max_new_tokens=3, kl_coef=0.02, sample_every=10_000)
    c.optim.update(lr=lr, warmup_steps=0, decay_steps=1000, min_lr_ratio=1.0, weight_decay=0.0)
    return c


@pytest.fixture(scope="module")
def sft():
    """The policy after "SFT" (tests/learning_probe.py), and a fresh value model."""
    c, tok = _config(), CharTokenizer()
    value = nn.unbox(GPT(ppo.value_config(c.model)).init(jax.random.key(2), jnp.zeros((1, 8), jnp.int32))["params"])
    return c, tok, fine_tuned(c.model, tok, lr=3e-3, steps=300), value


@pytest.fixture(scope="module")
def machinery(sft):
    """The generator and the jitted PPO train step, compiled once for every run of this module."""
    c, tok, policy, _ = sft
    step = jax.jit(make_train_step(c, ppo.ppo_loss(ppo.ActorCritic(c.model), c.ppo)))
    return Generator(c.model, policy, pad_id=tok.pad_id), step


def _train(sft, machinery, reward, iterations):
    """PPO from the SFT policy against reward(response) -> float; per iteration: P("a") before it, and the first
    minibatch's metrics."""
    c, tok, policy, value = sft
    generator, step = machinery
    rollouts = rollout.Rollouts(c, tok, [PROMPT], generator, (policy, value), range(c.train.batch_size),
                                reward_fn=lambda prompts, texts: [reward(t) for t in texts])
    params = {"policy": policy, "value": {**value, "score_head": jax.tree.map(jnp.zeros_like, value["score_head"])}}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c.optim).init(params))
    curve, first = [], []
    per_iteration = c.ppo.rollout_batch // c.train.batch_size
    for i in range(iterations * per_iteration):
        if i % per_iteration == 0:
            curve.append(float(np.exp(answer_logprobs(GPT(c.model), state.params["policy"], tok)[0])))
        rollouts.before_step(state.params, i)
        state, metrics = step(state, next(rollouts))
        if i % per_iteration == 0:
            first.append(jax.device_get(metrics))
    curve.append(float(np.exp(answer_logprobs(GPT(c.model), state.params["policy"], tok)[0])))
    return np.array(curve), first


def test_ppo_raises_the_preferred_answer_above_0_9(sft, machinery):
    """With the value function and the KL penalty on, P("a") goes from its SFT value (~0.2) above 0.9."""
    curve, _ = _train(sft, machinery, lambda text: float(text == "a"), iterations=15)
    assert curve[0] < 0.3
    assert curve.max() > 0.9 and curve[-1] > 0.9, curve.round(3)


def test_first_minibatch_of_every_iteration_is_on_policy(sft, machinery):
    """Each iteration's first minibatch recomputes the rollout's own log-probs: ratio 1, nothing clipped."""
    _, first = _train(sft, machinery, lambda text: float(text == "a"), iterations=6)
    for m in first:
        assert abs(float(m["approx_kl"])) < 1e-6 and float(m["clip_fraction"]) == 0.0, m


def test_an_affine_reward_gives_the_same_learning_curve(sft, machinery):
    """Normalised rewards: 3 x score - 5 teaches exactly what the score teaches."""
    score = lambda text: {"a": 1.0, "b": 0.4}.get(text, 0.0)  # noqa: E731
    plain, _ = _train(sft, machinery, score, iterations=5)
    affine, _ = _train(sft, machinery, lambda text: 3 * score(text) - 5, iterations=5)
    assert plain[-1] > plain[0] + 0.1
    np.testing.assert_allclose(affine, plain, atol=2e-3)


@pytest.mark.parametrize("temperature", [pytest.param(1.0, marks=pytest.mark.slow), 0.7])  # CI: the harder one
def test_kl_estimate_matches_the_sampler_and_is_unbiased(sft, temperature):
    """PPO's log-probs of sampled tokens are the sampler's own (same temperature, same positions, for prompts of
    any length), and the rollout's KL (their summed log-ratio to the reference) averages to the exact KL of the
    per-token distributions along the same samples, which is >= 0."""
    _, tok, ref, value = sft
    c = _config()
    c.ppo.update(temperature=temperature, max_new_tokens=4)
    policy = jax.tree.map(lambda x: x + 0.03 * jax.random.normal(jax.random.key(3), x.shape), ref)
    # prompts of several lengths: the sampler's positions and the scorer's must agree on each
    prompts = [prompt_ids(tok, text) for text in (PROMPT, "a", "pick a", "ab")] * 128
    rows, out = rollout.sample(Generator(c.model, policy, pad_id=tok.pad_id), tok, c, policy, prompts, 0, temperature)
    params = {"policy": policy, "value": value}
    logp, ref_logp, _, _ = rollout.score_rows(rollout.scorer(c), params, ref, value, rows)
    sampled = out.logprobs[np.arange(out.logprobs.shape[1])[None] < out.lengths[:, None]]
    np.testing.assert_allclose(logp[rows["mask"] == 1], sampled, atol=1e-4)
    estimate = ((logp - ref_logp) * rows["mask"]).sum(1)
    model = GPT(c.model)
    full = unpacked(rows)
    p = jax.nn.log_softmax(model.apply({"params": policy}, full["inputs"]) / temperature)
    q = jax.nn.log_softmax(model.apply({"params": ref}, full["inputs"]) / temperature)
    exact = np.asarray(((jnp.exp(p) * (p - q)).sum(-1) * full["mask"]).sum(1))
    assert np.all(exact >= 0) and exact.mean() > 0.1
    assert abs(estimate.mean() - exact.mean()) < 4 * estimate.std() / np.sqrt(len(estimate))


def test_padding_carries_no_reward_advantage_or_kl():
    """Advantages, returns and the KL penalty are zero off the response tokens, and whatever sits in padded
    positions changes nothing on them (whitening counts response tokens only)."""
    c = _config()
    rng = np.random.default_rng(0)
    n, length = 8, 12
    mask = np.zeros((n, length), np.float32)
    for i, (a, b) in enumerate(zip(rng.integers(0, 5, n), rng.integers(6, 12, n))):
        mask[i, a:b] = 1
    last = (mask * np.arange(length)).max(1).astype(np.int32) + 1
    logp, ref_logp, values = (rng.normal(size=(n, length)).astype(np.float32) for _ in range(3))
    scores = rng.normal(size=n).astype(np.float32)
    advantages = rollout._advantages(c.ppo)
    clean = [np.asarray(x) for x in advantages(logp * mask, ref_logp * mask, values * mask, scores, mask, last, 0.1)]
    noise = lambda x: x * mask + 100 * (1 - mask) * rng.normal(size=x.shape).astype(np.float32)  # noqa: E731
    dirty = [np.asarray(x) for x in advantages(noise(logp), noise(ref_logp), noise(values), scores, mask, last, 0.1)]
    for a, b in zip(clean, dirty):
        assert np.all(a[mask == 0] == 0) and np.all(b[mask == 0] == 0)
        np.testing.assert_allclose(a, b, atol=1e-5)
    adv = clean[0][mask == 1]
    np.testing.assert_allclose([adv.mean(), adv.std()], [0.0, 1.0], atol=1e-4)
