"""PPO from human feedback (InstructGPT's third stage): the SFT policy learns to please the reward model while a
per-token KL penalty keeps it near the SFT model.

Four models: the policy (init_from, trained), its value function (a scalar head, started from the reward model
as InstructGPT did, trained), the reference policy (the SFT model, frozen) and the reward model (frozen). The two
trained ones live in one parameter tree {'policy', 'value'} (`ActorCritic`) that the trainer optimises as any
other stage's. Each iteration (omni/stages/rollout.py) samples ppo.rollout_batch responses from the policy at
ppo.temperature, scores them, and serves them as ppo.epochs passes of minibatches of train.batch_size episodes.

Batch (per episode, [episodes, length], aligned with next-token targets): inputs, targets int32; mask float32,
1 where the target is a response token (an action); old_logprobs, old_values, advantages, returns float32 from
the rollout. PPO-ptx adds ptx_inputs, ptx_targets, ptx_weights: pretraining rows whose next-token loss, times
ppo.ptx_coef, joins the same update.
Loss per action token: clipped policy loss + value_coef x clipped value loss - entropy_coef x entropy, averaged
over the minibatch's action tokens.
"""
from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import data, parallel
from omni.config import ARCHITECTURE, ConfigError
from omni.data import DataError, finetune
from omni.data.template import prompt_ids
from omni.generate import Generator
from omni.models import GPT, flops_per_token
from omni.stages.pretrain import lm_loss, stage_tokenizer, token_nll
from omni.train import checkpoint
from omni.train.trainer import Task, evaluate


def value_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The policy's architecture with a scalar head: the value function's and the reward model's."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    config.head = "scalar"
    return config


class ActorCritic(nn.Module):
    """The trained pair: params {'policy': GPT with the LM head, 'value': GPT with a scalar head}."""
    config: ml_collections.ConfigDict  # the policy's model config

    def setup(self):
        self.policy = GPT(self.config)
        self.value = GPT(value_config(self.config))

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits [batch, length, vocab], values [batch, length]); no dropout (PPO runs without it)."""
        return self.policy(tokens), self.value(tokens)

    def logits(self, tokens: jax.Array) -> jax.Array:
        return self.policy(tokens)


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


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position."""
    return -token_nll(logits, targets)


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the distribution at each position."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def update_kl_coef(kl_coef: float, kl: float, episodes: int, target: float, horizon: float) -> float:
    """The adaptive KL controller of Ziegler et al. (2019): beta grows when the measured KL is above target and
    shrinks below it, by at most 20% of the error per `horizon` episodes."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * episodes / horizon)


def ppo_loss(model: ActorCritic, p: ml_collections.ConfigDict):
    """loss_fn for the trainer from config.ppo `p`: sums over the minibatch's action tokens."""

    def loss_fn(params, batch: dict, rng: jax.Array | None):
        del rng  # no dropout anywhere in PPO
        logits, values = model.apply({"params": params}, batch["inputs"])
        logits = logits / p.temperature
        logp = token_logprobs(logits, batch["targets"])
        m, advantages = batch["mask"], batch["advantages"]
        log_ratio = (logp - batch["old_logprobs"]) * m
        ratio = jnp.exp(log_ratio)
        policy = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - p.clip, 1 + p.clip))
        old = batch["old_values"]
        clipped = old + jnp.clip(values - old, -p.value_clip, p.value_clip)
        value = 0.5 * jnp.maximum((values - batch["returns"]) ** 2, (clipped - batch["returns"]) ** 2)
        ent = entropy(logits)
        per_token = policy + p.value_coef * value - p.entropy_coef * ent
        loss = (per_token * m).sum()
        sums = {"weight": m.sum(), "policy_loss": (policy * m).sum(), "value_loss": (value * m).sum(),
                "entropy": (ent * m).sum(), "clip_fraction": ((jnp.abs(ratio - 1) > p.clip) * m).sum(),
                "approx_kl": ((ratio - 1 - log_ratio) * m).sum()}
        if "ptx_inputs" in batch:  # PPO-ptx: ptx_coef x the mean pretraining NLL, in the same update
            ptx_logits = model.apply({"params": params}, batch["ptx_inputs"], method=ActorCritic.logits)
            w = batch["ptx_weights"]
            nll = (token_nll(ptx_logits, batch["ptx_targets"]) * w).sum()
            # The trainer divides by the action tokens; scaling by actions / ptx tokens makes this term a mean.
            loss = loss + p.ptx_coef * nll * m.sum() / jnp.maximum(w.sum(), 1.0)
            sums.update(ptx_loss=nll, ptx_loss_weight=w.sum())
        sums["loss"] = loss
        return loss, sums

    return loss_fn


# One episode's rows in a minibatch (this module's docstring); PPO-ptx adds PTX_KEYS.
BATCH_KEYS = ("inputs", "targets", "mask", "old_logprobs", "old_values", "advantages", "returns")
PTX_KEYS = ("ptx_inputs", "ptx_targets", "ptx_weights")


def batch_shapes(config: ml_collections.ConfigDict, episodes: int, ptx_rows: int) -> dict[str, tuple]:
    """Shapes and dtypes of a minibatch of `episodes` (plus `ptx_rows` pretraining rows with ppo.ptx_coef)."""
    length = config.train.seq_len
    keys = BATCH_KEYS + (PTX_KEYS if config.ppo.ptx_coef > 0 else ())
    return {k: ((ptx_rows if k.startswith("ptx_") else episodes, length),
                np.int32 if k in ("inputs", "targets", "ptx_inputs", "ptx_targets") else np.float32) for k in keys}


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) of the policy+value update from the config alone: what
    omni/aot.py compiles."""
    model = ActorCritic(config.model)
    return model, ppo_loss(model, config.ppo), batch_shapes(config, config.train.batch_size, config.ppo.ptx_batch)


def _frozen_params(config: ml_collections.ConfigDict, workdir: str, head: str, key: str, mesh) -> Any:
    """The params of the model in `workdir` (config key `key`), checked against the policy's architecture
    and `head`, placed as the trainer places the policy's (or value's)."""
    source, _, _ = checkpoint.read_meta(workdir)
    if source.model.get("head", "lm") != head:
        raise ConfigError(f"config.{key}={workdir} holds a model with model.head={source.model.get('head', 'lm')!r}; "
                          f"PPO needs {head!r} there")
    wrong = [k for k in ARCHITECTURE if source.model.get(k) != config.model.get(k)]
    if wrong:
        raise ConfigError(f"config.{key}={workdir} holds a model with {', '.join(f'{k}={source.model.get(k)!r}' for k in wrong)}"
                          f" but the policy (config.init_from={config.init_from}) has "
                          f"{', '.join(f'{k}={config.model.get(k)!r}' for k in wrong)}")
    _, params, _, _ = checkpoint.model_params(workdir, lambda boxed: parallel.logical_shardings(boxed, mesh))
    return params


def _pretraining(config: ml_collections.ConfigDict, tokenizer, mesh):
    """PPO-ptx's pretraining rows (iterator, this process's rows) and policy params -> held-out pretraining
    perplexity (None without ppo.ptx_eval_batches)."""
    p = config.ppo
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.update(name=p.ptx_data, path=p.ptx_path)
    c.train.update(batch_size=p.ptx_batch, eval_batches=max(p.ptx_eval_batches, 1))
    ptx = None
    if p.ptx_coef > 0:
        rows = parallel.process_rows(mesh, p.ptx_batch)
        ptx = (data.train_iterator(c, tokenizer, rows), rows)
    lm_eval = None
    if p.ptx_eval_batches > 0:
        batches = data.eval_batches(c, tokenizer, parallel.process_rows(mesh, p.ptx_batch))
        eval_fn = jax.jit(lambda params, batch: lm_loss(GPT(config.model))(params, batch, None)[1])
        lm_eval = lambda params: evaluate(eval_fn, params, batches, mesh)["eval_perplexity"]  # noqa: E731
    return ptx, lm_eval


def _prompts(config: ml_collections.ConfigDict, tokenizer, split: str) -> list[str]:
    """The split's prompts that leave room for ppo.max_new_tokens within train.seq_len."""
    room = config.train.seq_len - config.ppo.max_new_tokens
    prompts = finetune.prompts(config.data, split)
    kept = [t for t in prompts if len(prompt_ids(tokenizer, t)) <= room]
    if len(kept) < len(prompts):
        print(f"warning: {len(prompts) - len(kept)} of {len(prompts)} {split} prompts are longer than "
              f"train.seq_len - ppo.max_new_tokens = {room} tokens and were dropped", file=sys.stderr, flush=True)
    if not kept:
        raise DataError(f"no {split} prompt fits train.seq_len={config.train.seq_len} with "
                        f"ppo.max_new_tokens={config.ppo.max_new_tokens}")
    return kept


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    from omni.stages import rollout  # rollout builds on this module's functions

    p = config.ppo
    if not config.init_from:
        raise ConfigError("config.init_from is empty: PPO starts from an SFT workdir (e.g. runs/sft_tiny)")
    if not p.reward_from:
        raise ConfigError("config.ppo.reward_from is empty: PPO needs a reward model workdir (e.g. runs/rm_tiny)")
    if config.model.head != "lm":
        raise ConfigError(f"config.model.head={config.model.head!r}: the PPO policy needs 'lm'")
    if config.mesh.sequence != 1:
        raise ConfigError(f"config.mesh.sequence={config.mesh.sequence}: PPO does not split length")
    tokenizer = stage_tokenizer(config, workdir)
    mesh = parallel.make_mesh(config.mesh)
    ref_params = _frozen_params(config, p.reference_from or config.init_from,
                                "lm", "ppo.reference_from" if p.reference_from else "init_from", mesh)
    rm_params = _frozen_params(config, p.reward_from, "scalar", "ppo.reward_from", mesh)
    train_prompts, eval_prompts = (_prompts(config, tokenizer, s) for s in ("train", "validation"))
    labeler = task_of = None
    if config.data.name == "instructions":
        from omni.data.instructions import labeler_score as labeler, parse_prompt
        task_of = lambda prompt: parse_prompt(prompt).task  # noqa: E731
    ptx, lm_eval = _pretraining(config, tokenizer, mesh)
    generator = Generator(config.model, ref_params, mesh, pad_id=tokenizer.pad_id)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    rollouts = rollout.Rollouts(config, tokenizer, train_prompts, generator, (ref_params, rm_params), rows, ptx,
                                labeler)
    print(f"PPO: {len(train_prompts):,} prompts, {p.rollout_batch} episodes x {p.epochs} epoch(s) per iteration "
          f"in minibatches of {config.train.batch_size}: {config.train.steps} updates; "
          f"{len(eval_prompts[:p.eval_prompts]):,} held-out prompts", flush=True)

    def initial_params(target, fresh):
        del target, fresh
        place = lambda boxed: parallel.logical_shardings(boxed, mesh)  # noqa: E731 (as the trainer places them)
        _, policy, _, step = checkpoint.model_params(config.init_from, place)  # SFT, or an earlier round's PPO
        _, value, _, rm_step = checkpoint.model_params(p.reward_from, place)
        if p.value_head == "zero":
            value = {**value, "score_head": jax.tree.map(jnp.zeros_like, value["score_head"])}
        print(f"policy from {config.init_from} step {step}; value function from {p.reward_from} step {rm_step}"
              f" ({'head at zero' if p.value_head == 'zero' else 'its head too'})", flush=True)
        return {"policy": policy, "value": value}

    model = ActorCritic(config.model)
    seq_len = config.train.seq_len
    return Task(model=model, loss_fn=ppo_loss(model, p), train_iter=rollouts, eval_batches=[],
                tokenizer_path=tokenizer.model_path, example_batch=rollouts.example(),
                flops_per_token=flops_per_token(config.model, seq_len) + flops_per_token(value_config(config.model),
                                                                                       seq_len),
                eval_extra=rollout.HeldOut(rollouts, eval_prompts[:p.eval_prompts], lm_eval, task_of),
                before_step=rollouts.before_step, initial_params=initial_params, language_model=False,
                summary_extras={"prompts": len(train_prompts), "episodes": p.iterations * p.rollout_batch})
