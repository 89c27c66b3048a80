"""The losses and estimators the stages share: next-token cross-entropy (pretraining, SFT, PPO-ptx), the reward
model's ranking loss and scores, PPO's advantage estimation and per-token statistics, and the estimators of the
methods that followed it (DPO's pair loss, GRPO's and RLOO's group baselines, the k3 KL).

Each loss_fn follows the trainer's contract (omni/train/trainer.py, LossFn): it returns sums, which the trainer
divides by their weights, so gradient accumulation gives exactly the full-batch gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni.models import GPT

# ----- next-token prediction


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position. The target logit is picked with a one-hot product rather than a gather,
    so the backward pass is elementwise instead of a scatter over [batch, length, vocab]."""
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def lm_batch_shapes(config: ml_collections.ConfigDict, segments: bool) -> dict[str, tuple]:
    """Global shapes and dtypes of a next-token batch: inputs, targets (inputs shifted by one), weights (0 on
    padding and on tokens not trained), and with `segments` the packed documents' segment_ids and positions."""
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {"inputs": (shape, np.int32), "targets": (shape, np.int32), "weights": (shape, np.float32)}
    if segments:
        batch.update(segment_ids=(shape, np.int32), positions=(shape, np.int32))
    return batch


def lm_loss(model: GPT):
    """loss_fn of next-token prediction: cross-entropy summed over the weighted target tokens of a batch of
    inputs, targets, weights (and segment_ids, positions where documents are packed apart)."""

    def loss_fn(params, batch: dict, rng: jax.Array | None):
        train = rng is not None
        logits = model.apply({"params": params}, batch["inputs"], deterministic=not train,
                             segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                             rngs={"dropout": rng} if train else None)
        w = batch["weights"]
        nll = token_nll(logits, batch["targets"]) * w
        sums = {"loss": nll.sum(), "weight": w.sum()}
        if not train:  # accuracy costs an argmax over the vocabulary: evaluation only
            sums["accuracy"] = ((jnp.argmax(logits, -1) == batch["targets"]) * w).sum()
        return nll.sum(), sums

    return loss_fn


# ----- ranking (the reward model)


def ranked_pairs(ranks: jax.Array, mask: jax.Array) -> jax.Array:
    """[prompts, K, K]: 1 where response i is ranked strictly better than response j and both exist."""
    exists = mask.astype(bool)
    return (ranks[:, :, None] < ranks[:, None, :]) & exists[:, :, None] & exists[:, None, :]


def ranking_terms(scores: jax.Array, ranks: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per prompt: 'loss' (-1/pairs * sum of log sigmoid(r_better - r_worse), 0 without pairs), 'pairs' (untied
    comparisons) and 'correct' (comparisons the scores order as the ranking does)."""
    pairs = ranked_pairs(ranks, mask).astype(jnp.float32)
    margin = scores[:, :, None] - scores[:, None, :]
    count = pairs.sum((1, 2))
    loss = -(jax.nn.log_sigmoid(margin) * pairs).sum((1, 2)) / jnp.maximum(count, 1.0)
    return {"loss": loss, "pairs": count, "correct": ((margin > 0) * pairs).sum((1, 2))}


def ranking_loss_sum(terms: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(the per-prompt losses of `ranking_terms` summed over the prompts with at least one untied pair, the
    number of those prompts): ranking_loss's numerator and denominator."""
    has_pairs = (terms["pairs"] > 0).astype(jnp.float32)
    return (terms["loss"] * has_pairs).sum(), has_pairs.sum()


def ranking_loss(scores: jax.Array, ranks: jax.Array, mask: jax.Array) -> jax.Array:
    """InstructGPT's loss for `scores` [prompts, K] of K responses ranked `ranks` [prompts, K] (0 = best, equal =
    tie: no pair), `mask` [prompts, K] marking the responses that exist: the mean over prompts (those with at
    least one untied pair) of -1/pairs * sum over untied pairs of log sigmoid(r_better - r_worse)."""
    total, prompts = ranking_loss_sum(ranking_terms(scores, ranks, mask))
    return total / jnp.maximum(prompts, 1.0)


def response_scores(model: GPT, params, inputs: jax.Array, last: jax.Array, rng: jax.Array | None = None
                    ) -> jax.Array:
    """The score of each response [..., K] of `inputs` [..., K, length] by the scalar-head `model`, read at its
    `last` token."""
    flat = inputs.reshape(-1, inputs.shape[-1])
    train = rng is not None
    per_token = model.apply({"params": params}, flat, deterministic=not train,
                            rngs={"dropout": rng} if train else None)
    per_token = per_token.reshape(inputs.shape)
    return jnp.take_along_axis(per_token, last[..., None], axis=-1)[..., 0]


# ----- policy gradients (PPO)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position."""
    return -token_nll(logits, targets)


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the distribution at each position."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over per-token [batch, length] arrays, mask 1 on response tokens:
    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where position t + 1 counts only
    if it is a response token: no bootstrap past the last one. Returns (advantages, returns = A + V), 0 off mask."""
    mask = mask.astype(jnp.float32)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * next_mask
    deltas = rewards + gamma * next_values - values

    def back(carry, xs):
        delta, following = xs
        advantage = delta + gamma * lam * following * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_mask.T),
                                 reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """x scaled to unit variance over the masked entries; centred too with shift_mean (advantages are, rewards
    keep their mean: a shifted reward would change what ending a response early is worth)."""
    count = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / count
    var = (((x - mean) * mask) ** 2).sum() / count
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 is a perfect value function."""
    sel = mask > 0
    var = np.var(returns[sel])
    return float(1.0 - np.var(returns[sel] - values[sel]) / var) if var > 0 else float("nan")


# ----- the methods after PPO: DPO, GRPO, RLOO


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, beta: float) -> jax.Array:
    """DPO's loss per pair (Rafailov et al. 2023) from summed response log-probabilities of the policy and of the
    frozen reference: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))). log_sigmoid is
    -softplus(-x), finite for any margin."""
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -jax.nn.log_sigmoid(beta * margin)


def ipo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, beta: float) -> jax.Array:
    """IPO's loss per pair (Azar et al. 2023): the log-ratio margin regressed to 1 / (2 beta), so that a pair
    the policy already separates is not pushed further (DPO's sigmoid never stops pushing)."""
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return (margin - 1.0 / (2.0 * beta)) ** 2


def group_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """GRPO's advantage (Shao et al. 2024) of each of the G samples of a prompt, `rewards` [prompts, G]:
    (r - group mean) / (group std + eps), the population std (ddof 0). A group without spread gets 0."""
    mean = rewards.mean(-1, keepdims=True)
    spread = rewards.max(-1, keepdims=True) > rewards.min(-1, keepdims=True)
    # Without spread the rounding error of the mean, divided by eps, would push the whole group one way.
    return jnp.where(spread, (rewards - mean) / (rewards.std(-1, keepdims=True) + eps), 0.0)


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """RLOO's advantage (Ahmadian et al. 2024), `rewards` [prompts, G] with G >= 2: each reward less the mean of
    the other G - 1 of its group, a baseline that does not depend on the sample itself."""
    g = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdims=True) - rewards) / (g - 1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(policy || reference) per sampled token, as GRPO adds it to the loss:
    exp(ref - logp) - (ref - logp) - 1, never negative and unbiased under the policy's samples."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0
