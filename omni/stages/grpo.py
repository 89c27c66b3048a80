"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): policy gradients without a value model. Each prompt is
sampled G = ppo.samples_per_prompt times; an episode's advantage is its reward against the rest of its group,
the same for all its tokens (grpo.advantage: 'grpo' standardises within the group, 'rloo' subtracts the mean of
the other G - 1). The KL to the frozen reference is not in the reward, as PPO's is, but in the loss: the k3
estimator per sampled token times grpo.beta.

Rewards (grpo.reward): the reward model of ppo.reward_from, the offline suite's labeler (RL with verifiable
rewards) or a user's Python function. Rollouts, minibatches, checkpointed iterator state and the held-out
evaluation are PPO's (omni/stages/rollout.py, its keys in config.ppo: rollout_batch, samples_per_prompt, epochs,
max_new_tokens, temperature, eval_*); the trained tree is {'policy'} alone.

Batch (PPO's layout, omni/stages/ppo.py: whole groups, each prompt read once): prefix, prefix_start per group; per
episode inputs, targets int32; mask float32, 1 where the target is a response token (0 for a whole group without
reward spread with grpo.skip_zero_spread); old_logprobs, ref_logprobs and advantages float32 from the rollout.
Loss per response token: the clipped ratio objective -min(ratio A, clip(ratio) A) + beta k3(logp, ref_logp),
averaged over the minibatch's response tokens (DAPO's token-level mean: a long answer is not worth less per token).
"""
from __future__ import annotations

import importlib
from typing import Callable

import jax.numpy as jnp
import ml_collections

from omni import parallel
from omni.config import ConfigError, require
from omni.data.instructions import labeler_score
from omni.generate import Generator
from omni.losses import group_advantages, k3_kl, rloo_advantages, token_logprobs  # noqa: F401 (the contracts)
from omni.models.actor_critic import ActorCritic
from omni.stages import ppo
from omni.stages.evaluation import HeldOut
from omni.stages.rollout import (Rollouts, batch_shapes, fitting_prompts, flops_per_row_token, frozen_params,
                                 labeler_of, pretraining)
from omni.train.trainer import Task
from omni.workdir import Workdir, starting_point


def check(c: ml_collections.ConfigDict) -> None:
    """GRPO's own keys and the rollout keys it shares with PPO; derives train.steps from ppo.iterations."""
    g = c.grpo
    require(g.advantage in ("grpo", "rloo"), "grpo.advantage", g.advantage, "expected 'grpo' or 'rloo'")
    require(g.beta >= 0, "grpo.beta", g.beta, "must be >= 0")
    require(g.eps > 0, "grpo.eps", g.eps, "must be > 0")
    require(g.reward in ("model", "labeler") or ":" in g.reward, "grpo.reward", g.reward,
            "expected 'model', 'labeler' or MODULE:FUNCTION")
    require(g.reward != "labeler" or c.data.name == "instructions", "grpo.reward", g.reward,
            "'labeler' needs the instruction suite (data.name='instructions')")
    ppo.check(c)
    require(c.ppo.ptx_coef == 0, "ppo.ptx_coef", c.ppo.ptx_coef, "GRPO/RLOO have no pretraining term (PPO-ptx's)")
    require(c.ppo.samples_per_prompt >= 2, "ppo.samples_per_prompt", c.ppo.samples_per_prompt,
            "is GRPO's group size G: it needs at least 2 samples of a prompt to compare")


def models(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    return {"policy": config.model}


def grpo_loss(model: ActorCritic, config: ml_collections.ConfigDict):
    """loss_fn for the trainer: sums over the minibatch's response tokens (this module's docstring)."""
    p, g = config.ppo, config.grpo

    def loss_fn(params, batch: dict, rng):
        del rng  # no dropout in RL
        logits, _ = model.apply({"params": params}, batch["inputs"], batch["prefix"], batch["prefix_start"])
        logp = token_logprobs(logits / p.temperature, batch["targets"])
        m, advantages = batch["mask"], batch["advantages"]
        log_ratio = (logp - batch["old_logprobs"]) * m
        ratio = jnp.exp(log_ratio)
        policy = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - p.clip, 1 + p.clip))
        kl = k3_kl(logp * m, batch["ref_logprobs"] * m) * m  # masked before exp: a pad target may be -inf
        loss = ((policy + g.beta * kl) * m).sum()
        sums = {"loss": loss, "weight": m.sum(), "policy_loss": (policy * m).sum(), "kl_loss": kl.sum(),
                "clip_fraction": ((jnp.abs(ratio - 1) > p.clip) * m).sum(),
                "approx_kl": ((ratio - 1 - log_ratio) * m).sum()}
        return loss, sums

    return loss_fn


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) of the policy update: what omni/aot.py compiles."""
    model = ActorCritic(config.model, critic=False)
    return model, grpo_loss(model, config), batch_shapes(config, config.train.batch_size, config.ppo.ptx_batch)


def reward_function(config: ml_collections.ConfigDict) -> Callable | None:
    """reward_fn(prompts, responses) -> rewards for the rollouts, from grpo.reward; None: the reward model."""
    spec = config.grpo.reward
    if spec == "model":
        return None
    if spec == "labeler":
        score = labeler_score
    else:
        module, _, name = spec.partition(":")
        try:
            score = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config.grpo.reward={spec!r}: cannot import it ({e})") from None
        if not callable(score):
            raise ConfigError(f"config.grpo.reward={spec!r} is not a function(prompt, response) -> float")
    return lambda prompts, responses: [float(score(q, r)) for q, r in zip(prompts, responses)]


def _initial_params(config: ml_collections.ConfigDict, mesh) -> Callable:
    def initial_params(target, fresh):
        del target, fresh
        _, policy, _, step = Workdir(config.init_from).model_params(lambda b: parallel.logical_shardings(b, mesh))
        print(f"policy from {config.init_from} step {step}", flush=True)
        return {"policy": policy}

    return initial_params


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    p, g = config.ppo, config.grpo
    starting_point(config, "GRPO starts from an SFT workdir (e.g. runs/sft_tiny)")
    if g.reward == "model" and not p.reward_from:
        raise ConfigError("config.ppo.reward_from is empty: grpo.reward='model' needs a reward model workdir "
                          "(or set grpo.reward='labeler' or MODULE:FUNCTION)")
    tokenizer = Workdir(workdir).stage_tokenizer(config)
    mesh = parallel.make_mesh(config.mesh)
    ref_params = frozen_params(config, p.reference_from or config.init_from, "lm",
                               "ppo.reference_from" if p.reference_from else "init_from", mesh)
    rm_params = frozen_params(config, p.reward_from, "scalar", "ppo.reward_from", mesh) if p.reward_from else None
    reward_fn = reward_function(config)
    train_prompts, eval_prompts = (fitting_prompts(config, tokenizer, s) for s in ("train", "validation"))
    labeler, task_of = labeler_of(config)
    ptx, lm_eval = pretraining(config, tokenizer, mesh)
    generator = Generator(config.model, ref_params, mesh, pad_id=tokenizer.pad_id)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    rollouts = Rollouts(config, tokenizer, train_prompts, generator, (ref_params, rm_params), rows, ptx, labeler,
                        reward_fn)
    method = "RLOO" if g.advantage == "rloo" else "GRPO"
    print(f"{method}: {len(train_prompts):,} prompts, {p.rollout_batch // p.samples_per_prompt} groups of "
          f"{p.samples_per_prompt} per iteration, reward {g.reward!r}, beta {g.beta}; {config.train.steps} updates; "
          f"{len(eval_prompts[:p.eval_prompts]):,} held-out prompts", flush=True)
    model = ActorCritic(config.model, critic=False)
    return Task(model=model, loss_fn=grpo_loss(model, config), train_iter=rollouts, eval_batches=[],
                tokenizer_path=tokenizer.model_path, example_batch=rollouts.example(),
                flops_per_token=flops_per_row_token(config, config.model),
                eval_extra=HeldOut(rollouts, eval_prompts[:p.eval_prompts], lm_eval, task_of,
                                   p.reference_from or config.init_from),
                before_step=rollouts.before_step, initial_params=_initial_params(config, mesh), language_model=False,
                checkpoint_models=models(config),
                summary_extras={"prompts": len(train_prompts), "episodes": p.iterations * p.rollout_batch})
