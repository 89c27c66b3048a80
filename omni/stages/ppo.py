"""PPO from human feedback (InstructGPT's third stage): the SFT policy learns to please the reward model while a
per-token KL penalty keeps it near the SFT model.

Four models: the policy (init_from, trained), its value function (a scalar head, started from the reward model
as InstructGPT did, trained), the reference policy (the SFT model, frozen) and the reward model (frozen). The two
trained ones live in one parameter tree {'policy', 'value'} (`ActorCritic`) that the trainer optimises as any
other stage's (`ActorCritic`, omni/models/actor_critic.py). Each iteration (omni/stages/rollout.py, which also
defines this batch layout)
samples ppo.rollout_batch responses from the policy at ppo.temperature, scores them, and serves them as
ppo.epochs passes of minibatches of train.batch_size episodes, whole groups of a prompt's samples.

Batch (rollout.episodes' layout: each prompt read once): per group prefix [groups, width] (its prompt but the last
token, left-padded) and prefix_start [groups, 1] int32; per episode [episodes, length], aligned with next-token
targets and continuing its group's prefix: inputs (the prompt's last token, then the response), targets int32;
mask float32, 1 where the target is a response token (an action); old_logprobs, old_values, advantages, returns
float32 from the rollout. PPO-ptx adds ptx_inputs, ptx_targets, ptx_weights: pretraining rows whose next-token loss, times
ppo.ptx_coef, joins the same update.
Loss per action token: clipped policy loss + value_coef x clipped value loss - entropy_coef x entropy, averaged
over the minibatch's action tokens.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from omni import parallel
from omni.config import ConfigError, require
from omni.generate import Generator
from omni.losses import entropy, token_logprobs, token_nll
from omni.losses import gae  # noqa: F401 (other tools import PPO's advantage estimator from here)
from omni.models.actor_critic import ActorCritic, value_config
from omni.stages.evaluation import HeldOut
from omni.stages.rollout import (Rollouts, batch_shapes, fitting_prompts, flops_per_row_token, frozen_params,
                                 labeler_of, pretraining)
from omni.train.trainer import Task
from omni.workdir import Workdir, starting_point


def check(c: ml_collections.ConfigDict) -> None:
    """PPO's own keys, before anything is built; derives train.steps from the iterations."""
    p, t = c.ppo, c.train
    require(isinstance(t.batch_size, int) and t.batch_size > 0, "train.batch_size", t.batch_size,
             "must be a positive int")
    for key in ("iterations", "rollout_batch", "samples_per_prompt", "epochs", "max_new_tokens", "eval_prompts",
                "eval_samples", "sample_every", "ptx_batch"):
        require(isinstance(p[key], int) and p[key] > 0, f"ppo.{key}", p[key], "must be a positive int")
    require(p.max_new_tokens < t.seq_len, "ppo.max_new_tokens", p.max_new_tokens,
             f"leaves no room for a prompt in train.seq_len={t.seq_len}")
    require(p.rollout_batch % t.batch_size == 0, "ppo.rollout_batch", p.rollout_batch,
             f"not divisible by train.batch_size={t.batch_size} (the minibatch, in episodes)")
    require(p.rollout_batch % p.samples_per_prompt == 0, "ppo.rollout_batch", p.rollout_batch,
             f"not divisible by ppo.samples_per_prompt={p.samples_per_prompt} (whole groups per batch)")
    require(t.batch_size % p.samples_per_prompt == 0, "train.batch_size", t.batch_size,
             f"not divisible by ppo.samples_per_prompt={p.samples_per_prompt} (a minibatch holds whole groups: a "
             f"prompt's samples share its prefix)")
    require(p.value_head in ("zero", "reward"), "ppo.value_head", p.value_head, "expected 'zero' or 'reward'")
    require(p.temperature > 0, "ppo.temperature", p.temperature, "must be > 0 (rollouts sample)")
    require(0 < p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma/lam", (p.gamma, p.lam), "need 0 < gamma <= 1, 0 <= lam <= 1")
    for key in ("kl_coef", "target_kl", "clip", "value_clip", "value_coef", "entropy_coef", "reward_clip",
                "missing_eos_penalty", "ptx_coef"):
        require(p[key] >= 0, f"ppo.{key}", p[key], "must be >= 0")
    require(p.kl_horizon > 0, "ppo.kl_horizon", p.kl_horizon, "must be positive")
    require(not p.gold_reward or c.data.name == "instructions", "ppo.gold_reward", p.gold_reward,
             "needs the instruction suite's labeler (data.name='instructions')")
    require(c.model.dropout == 0.0, "model.dropout", c.model.dropout,
             "PPO runs every model without dropout (its log-probabilities must match the rollout's)")
    t.steps = p.iterations * p.epochs * (p.rollout_batch // t.batch_size)
    require(c.optim.decay_steps != -1 or t.steps > c.optim.warmup_steps, "ppo.iterations", p.iterations,
            f"gives {t.steps} updates (iterations * epochs * rollout_batch / train.batch_size), which must "
            f"exceed optim.warmup_steps={c.optim.warmup_steps} (the cosine decay runs over them)")
    require(c.model.head == "lm", "model.head", c.model.head, "the PPO policy needs 'lm'")
    require(c.mesh.sequence == 1, "mesh.sequence", c.mesh.sequence, "PPO does not split length")


def models(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """What PPO trains and its checkpoints hold: the policy (the model it is for) and its value function."""
    return {"policy": config.model, "value": value_config(config.model)}


def ppo_loss(model: ActorCritic, p: ml_collections.ConfigDict):
    """loss_fn for the trainer from config.ppo `p`: sums over the minibatch's action tokens."""

    def loss_fn(params, batch: dict, rng: jax.Array | None):
        del rng  # no dropout anywhere in PPO
        logits, values = model.apply({"params": params}, batch["inputs"], batch["prefix"], batch["prefix_start"])
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


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) of the policy+value update from the config alone: what
    omni/aot.py compiles."""
    model = ActorCritic(config.model)
    return model, ppo_loss(model, config.ppo), batch_shapes(config, config.train.batch_size, config.ppo.ptx_batch)


def _initial_params(config: ml_collections.ConfigDict, mesh) -> Callable:
    """initial_params for the trainer: the policy from init_from (SFT, or an earlier round's PPO), the value
    function from the reward model (its head at zero with ppo.value_head='zero'), placed as the trainer would."""
    p = config.ppo

    def initial_params(target, fresh):
        del target, fresh
        place = lambda boxed: parallel.logical_shardings(boxed, mesh)  # noqa: E731
        _, policy, _, step = Workdir(config.init_from).model_params(place)
        _, value, _, rm_step = Workdir(p.reward_from).model_params(place)
        if p.value_head == "zero":
            value = {**value, "score_head": jax.tree.map(jnp.zeros_like, value["score_head"])}
        print(f"policy from {config.init_from} step {step}; value function from {p.reward_from} step {rm_step}"
              f" ({'head at zero' if p.value_head == 'zero' else 'its head too'})", flush=True)
        return {"policy": policy, "value": value}

    return initial_params


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    p = config.ppo
    starting_point(config, "PPO starts from an SFT workdir (e.g. runs/sft_tiny)")
    if not p.reward_from:
        raise ConfigError("config.ppo.reward_from is empty: PPO needs a reward model workdir (e.g. runs/rm_tiny)")
    tokenizer = Workdir(workdir).stage_tokenizer(config)
    mesh = parallel.make_mesh(config.mesh)
    ref_params = frozen_params(config, p.reference_from or config.init_from,
                                "lm", "ppo.reference_from" if p.reference_from else "init_from", mesh)
    rm_params = frozen_params(config, p.reward_from, "scalar", "ppo.reward_from", mesh)
    train_prompts, eval_prompts = (fitting_prompts(config, tokenizer, s) for s in ("train", "validation"))
    labeler, task_of = labeler_of(config)
    ptx, lm_eval = pretraining(config, tokenizer, mesh)
    generator = Generator(config.model, ref_params, mesh, pad_id=tokenizer.pad_id)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    rollouts = Rollouts(config, tokenizer, train_prompts, generator, (ref_params, rm_params), rows, ptx, labeler)
    print(f"PPO: {len(train_prompts):,} prompts, {p.rollout_batch} episodes x {p.epochs} epoch(s) per iteration "
          f"in minibatches of {config.train.batch_size}: {config.train.steps} updates; "
          f"{len(eval_prompts[:p.eval_prompts]):,} held-out prompts", flush=True)
    model = ActorCritic(config.model)
    return Task(model=model, loss_fn=ppo_loss(model, p), train_iter=rollouts, eval_batches=[],
                tokenizer_path=tokenizer.model_path, example_batch=rollouts.example(),
                flops_per_token=(flops_per_row_token(config, config.model)
                                 + flops_per_row_token(config, value_config(config.model))),
                eval_extra=HeldOut(rollouts, eval_prompts[:p.eval_prompts], lm_eval, task_of,
                                   p.reference_from or config.init_from),
                before_step=rollouts.before_step, initial_params=_initial_params(config, mesh), language_model=False,
                checkpoint_models=models(config),
                summary_extras={"prompts": len(train_prompts), "episodes": p.iterations * p.rollout_batch})
