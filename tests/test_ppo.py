"""PPO's pieces against independent truth: GAE against a plain NumPy loop, the KL estimate of a policy against
itself, the first update's ratio, the clipped loss's gradient on a two-action toy, the KL controller."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omni import losses
from omni.config import base_config
from learning_probe import unpacked
from omni.models import GPT
from omni.models.actor_critic import value_config
from omni.stages import grpo, ppo, rollout


def numpy_gae(rewards, values, mask, gamma, lam):
    """The textbook recursion, one row and one step at a time, over each row's response positions only."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b])
        following = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            last = k == len(steps) - 1
            next_value = 0.0 if last else values[b, steps[k + 1]]
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            following = delta + (0.0 if last else gamma * lam * following)
            adv[b, t] = following
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(0)
    batch, length = 5, 12
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    mask = np.zeros((batch, length), np.float32)
    for b, (start, end) in enumerate([(0, 12), (3, 7), (5, 6), (2, 12), (11, 12)]):  # one-token and full rows
        mask[b, start:end] = 1
    rewards *= mask  # rewards only where actions are
    adv, ret = jax.device_get(ppo.gae(jnp.asarray(rewards), jnp.asarray(values * mask), jnp.asarray(mask),
                                      gamma, lam))
    want_adv, want_ret = numpy_gae(rewards, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(adv[mask == 0] == 0)


def test_whiten_shifts_advantages_but_keeps_reward_mean():
    x = jnp.asarray([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    centred = losses.whiten(x, mask)
    np.testing.assert_allclose(float(centred[0, :3].mean()), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(centred[0, :3].std()), 1.0, atol=1e-4)
    assert float(centred[0, 3]) == 0.0
    kept = losses.whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(float(kept[0, :3].mean()), 2.0, atol=1e-5)


def _config_of(seq_len: int, max_new: int) -> ml_collections.ConfigDict:
    c = base_config()
    c.train.seq_len, c.ppo.max_new_tokens = seq_len, max_new
    return c


def test_episodes_read_each_prompt_once_and_mark_response_targets_and_the_last_token():
    # two prompts, two responses each; rows of max_new + 1 = 4, prefixes of seq_len - max_new - 1 = 3
    rows = rollout.episodes([[5, 6, 7], [8]], [[1, 2], [3], [3, 4, 9], [2]], _config_of(7, 3), pad_id=0)
    np.testing.assert_array_equal(rows["prefix"], [[0, 5, 6], [0, 0, 0]])  # the prompt but its last token
    np.testing.assert_array_equal(rows["prefix_start"], [[1], [3]])
    np.testing.assert_array_equal(rows["inputs"], [[7, 1, 2, 0], [7, 3, 0, 0], [8, 3, 4, 9], [8, 2, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[1, 2, 0, 0], [3, 0, 0, 0], [3, 4, 9, 0], [2, 0, 0, 0]])
    np.testing.assert_array_equal(rows["mask"], [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["last"], [2, 1, 3, 1])


def test_adaptive_kl_moves_beta_towards_the_target():
    assert rollout.update_kl_coef(0.1, kl=12.0, episodes=64, target=6.0, horizon=10_000) > 0.1
    assert rollout.update_kl_coef(0.1, kl=1.0, episodes=64, target=6.0, horizon=10_000) < 0.1
    # the error is clipped at 20%
    np.testing.assert_allclose(rollout.update_kl_coef(0.1, 600.0, 10_000, 6.0, 10_000), 0.12)


def _tiny_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.stage = "ppo"
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=64, max_len=32, scan_layers=False)
    c.train.update(batch_size=4, seq_len=16)
    c.ppo.update(rollout_batch=8, max_new_tokens=6)
    return c


def _params(c, seed):
    model = ppo.ActorCritic(c.model)
    return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def _rollout_rows(c, group=2):
    """Random prompts of 1 to 8 tokens (a 1-token prompt has an empty prefix) and `group` responses to each."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, size=n).tolist() for n in [1] + rng.integers(2, 9, size=7).tolist()]
    responses = [rng.integers(3, 64, size=n).tolist() for n in rng.integers(1, 7, size=8 * group)]
    return rollout.episodes(prompts, responses, c, pad_id=0)


def _scored(c, params, ref, rm, rows):
    return jax.device_get(rollout.scorer(c)(params, ref, rm, {k: rows[k] for k in rollout.SCORED_KEYS}))


def _scored_against_itself(c):
    """A random policy's rows scored with that same policy as the reference (and its value as the RM)."""
    params = _params(c, 0)
    rows = _rollout_rows(c)
    return params, rows, _scored(c, params, params["policy"], params["value"], rows)


def test_a_prompt_read_once_scores_as_if_every_episode_held_it():
    """The policy's, the reference's, the value's and the reward model's numbers on the episodes, each prompt run
    once for its group (gpt.continue_prefixes), equal a plain forward pass over a row per episode holding its
    prompt, with prompts of 1 to 8 tokens (left padding of 0 to 7 slots)."""
    c = _tiny_config()
    params, ref, rm = _params(c, 0), _params(c, 1)["policy"], _params(c, 2)["value"]
    rows = _rollout_rows(c)
    logp, ref_logp, values, scores = _scored(c, params, ref, rm, rows)
    full = unpacked(rows)
    lm, scalar = GPT(c.model), GPT(value_config(c.model))
    on = full["mask"] == 1
    for mine, p in ((logp, params["policy"]), (ref_logp, ref)):
        want = np.asarray(losses.token_logprobs(lm.apply({"params": p}, full["inputs"]), full["targets"]))
        np.testing.assert_allclose(mine[rows["mask"] == 1], want[on], atol=2e-5)
    want = np.asarray(scalar.apply({"params": params["value"]}, full["inputs"]))
    np.testing.assert_allclose(values[rows["mask"] == 1], want[on], atol=2e-5)
    want = np.asarray(scalar.apply({"params": rm}, full["inputs"]))[np.arange(len(scores)), full["last"]]
    np.testing.assert_allclose(scores, want, atol=2e-5)


def test_the_loss_through_a_shared_prompt_has_the_gradient_of_a_row_per_episode():
    """GRPO's and PPO's losses (and so their updates) are the same whether each episode holds its prompt or the
    prompt runs once for its group: value and gradient against the loss on a row per episode."""
    c = _tiny_config()
    params = _params(c, 0)
    rows = _rollout_rows(c)
    logp, _, values, _ = _scored(c, _params(c, 1), params["policy"], None, rows)  # old numbers of another policy
    rng = np.random.default_rng(1)
    extra = {"old_logprobs": logp, "ref_logprobs": logp * 0.9, "old_values": values,
             "advantages": rng.normal(size=logp.shape).astype(np.float32) * rows["mask"],
             "returns": rng.normal(size=logp.shape).astype(np.float32) * rows["mask"]}
    batch = {**{k: rows[k] for k in ("prefix", "prefix_start", "inputs", "targets", "mask")}, **extra}
    full = unpacked(rows)
    width = rows["prefix"].shape[1]

    def spread(x):  # a per-token array of the episodes' rows at the same tokens of a row per episode
        out = np.zeros(full["mask"].shape, np.float32)
        for e in range(len(x)):
            n = width - rows["prefix_start"][e // 2, 0]
            out[e, n:n + x.shape[1]] = x[e]
        return out

    class Plain(ppo.ActorCritic):  # the same model, reading every row whole
        def __call__(self, tokens, prefix=None, prefix_start=None):
            return super().__call__(tokens)

    plain_batch = {**{k: full[k] for k in ("inputs", "targets", "mask")},
                   **{k: spread(v) for k, v in extra.items()}, "prefix": None, "prefix_start": None}
    policy_only = lambda m: ppo.ActorCritic(m, critic=False)  # noqa: E731
    for loss, model, tree in ((ppo.ppo_loss, ppo.ActorCritic, params),
                              (grpo.grpo_loss, policy_only, {"policy": params["policy"]})):
        cfg = c.ppo if loss is ppo.ppo_loss else c
        shared = jax.value_and_grad(lambda q: loss(model(c.model), cfg)(q, batch, None)[0])(tree)
        critic = loss is ppo.ppo_loss
        whole = jax.value_and_grad(lambda q: loss(Plain(c.model, critic=critic), cfg)(q, plain_batch, None)[0])(tree)
        np.testing.assert_allclose(shared[0], whole[0], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(whole[1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kl_to_an_identical_reference_is_zero():
    c = _tiny_config()
    _, rows, (logp, ref_logp, _, _) = _scored_against_itself(c)
    assert np.all(logp - ref_logp == 0.0)
    assert np.any(logp != 0)  # the log-probs were computed, on the response tokens
    assert np.all(logp[rows["mask"] == 0] == 0)


def test_first_minibatch_has_ratio_one():
    """The loss recomputes the rollout's log-probs with the same parameters: ratio 1, nothing clipped."""
    c = _tiny_config()
    params, rows, (logp, _, values, _) = _scored_against_itself(c)
    mb = slice(0, c.train.batch_size)  # a minibatch of the rollout batch, as the trainer sees it
    groups = slice(0, c.train.batch_size // 2)  # the minibatch's two groups
    batch = {"prefix": rows["prefix"][groups], "prefix_start": rows["prefix_start"][groups],
             "inputs": rows["inputs"][mb], "targets": rows["targets"][mb], "mask": rows["mask"][mb],
             "old_logprobs": logp[mb], "old_values": values[mb],
             "advantages": np.ones_like(logp[mb]), "returns": values[mb]}
    _, sums = jax.jit(ppo.ppo_loss(ppo.ActorCritic(c.model), c.ppo))(params, batch, None)
    assert float(sums["approx_kl"]) < 1e-7
    assert float(sums["clip_fraction"]) == 0.0
    # ratio 1 with advantage 1 on every action: the policy loss is -1 per action token
    np.testing.assert_allclose(float(sums["policy_loss"]) / float(sums["weight"]), -1.0, rtol=1e-6)
    assert float(sums["value_loss"]) < 1e-10  # values equal the returns


class TwoActions(nn.Module):
    """A policy over two actions with a logit each, and a constant value: the smallest thing PPO can train."""

    @nn.compact
    def __call__(self, tokens, prefix=None, prefix_start=None):
        logits = self.param("logits", nn.initializers.zeros_init(), (2,))
        value = self.param("value", nn.initializers.zeros_init(), ())
        shape = tokens.shape
        return jnp.broadcast_to(logits, shape + (2,)), jnp.broadcast_to(value, shape)


def _toy_grad(logits, old_logprob, advantage, clip=0.2):
    p = ml_collections.ConfigDict(dict(temperature=1.0, clip=clip, value_clip=0.2, value_coef=0.0,
                                       entropy_coef=0.0, ptx_coef=0.0))
    loss_fn = ppo.ppo_loss(TwoActions(), p)
    batch = {"prefix": None, "prefix_start": None,
             "inputs": np.zeros((1, 1), np.int32), "targets": np.zeros((1, 1), np.int32),  # action 0 taken
             "mask": np.ones((1, 1), np.float32), "old_logprobs": np.full((1, 1), old_logprob, np.float32),
             "old_values": np.zeros((1, 1), np.float32), "advantages": np.full((1, 1), advantage, np.float32),
             "returns": np.zeros((1, 1), np.float32)}
    params = {"logits": jnp.asarray(logits, jnp.float32), "value": jnp.zeros(())}
    return jax.grad(lambda q: loss_fn(q, batch, None)[0])(params)["logits"]


def test_loss_gradient_follows_the_advantage_and_stops_past_the_clip():
    old = float(np.log(0.5))  # both actions at 1/2 when the rollout was sampled
    better = _toy_grad([0.0, 0.0], old, advantage=1.0)
    assert better[0] < 0 < better[1]  # descending the loss raises action 0's logit, lowers action 1's
    worse = _toy_grad([0.0, 0.0], old, advantage=-1.0)
    assert worse[0] > 0 > worse[1]
    # Action 0 already at p = 0.9 (ratio 1.8 > 1 + clip) with a positive advantage: the clipped loss is flat.
    np.testing.assert_array_equal(_toy_grad([np.log(9.0), 0.0], old, advantage=1.0), [0.0, 0.0])
    # ... but with a negative advantage the unclipped term still pulls it back down.
    assert _toy_grad([np.log(9.0), 0.0], old, advantage=-1.0)[0] > 0
