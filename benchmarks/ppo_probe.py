"""Does PPO's learning carry over to prompts it never trained on? An in-process PPO run on the offline suite with
the stage's own pieces (Rollouts, the PPO loss, the train step) and fixed evaluation sets, to tell apart a PPO
that cannot learn at all from one whose learning does not generalise:

- with `--prompts=16` PPO trains on 16 fixed prompts: their rollouts' true score should climb toward 1 (the
  algorithm and plumbing learn; held-out may fall, as any memorising does);
- with all training prompts each is seen about once, and only what generalises shows on held-out prompts.

Every `--every` iterations it prints one JSON line: greedy labeler score, exact match and pass@1 (4 samples at
T=1) on held-out prompts (`held`) and on training prompts PPO never sampled (`fresh`), per task too; every 4
iterations one line of the rollouts' true score, exact share, KL and groups without spread.

    python benchmarks/ppo_probe.py --sft=runs/instructgpt/sft --rm=runs/instructgpt/rm [--gold=1] [--prompts=16]
        [--set optim.lr=3e-5 --set ppo.rollout_batch=128 ...]   (keys of configs/ppo_tiny.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import omni  # noqa: E402
from configs import ppo_tiny  # noqa: E402
from omni.config import ConfigError  # noqa: E402
from omni.data import finetune  # noqa: E402
from omni.data.instructions import labeler_score, parse_prompt  # noqa: E402
from omni.data.template import prompt_ids  # noqa: E402
from omni.generate import Generator, Sampling  # noqa: E402
from omni.stages import heldout, ppo, rollout  # noqa: E402
from omni.train.optim import optimizer  # noqa: E402
from omni.train.trainer import TrainState, make_train_step  # noqa: E402


def _config(sft_config: ml_collections.ConfigDict, gold: bool, overrides: list[str]) -> ml_collections.ConfigDict:
    c = ppo_tiny.get_config()
    c.model = sft_config.model
    c.data = sft_config.data
    c.model.dropout = 0.0
    c.ppo.gold_reward = gold
    c.ppo.sample_every = 10 ** 6
    for item in overrides:
        key, _, value = item.partition("=")
        node, *path = c, *key.split(".")
        for name in path[:-1]:
            node = node[name]
        if path[-1] not in node:
            raise ConfigError(f"--set {item}: no key {key} in configs/ppo_tiny.py")
        kind = type(node[path[-1]])
        node[path[-1]] = value.lower() in ("1", "true") if kind is bool else kind(value)
    c.train.steps = c.ppo.iterations = 10 ** 6  # the run's length is --iterations
    c.optim.decay_steps = c.train.steps
    return c


def _evaluate(generator: Generator, tokenizer, prompts: list[str], max_new_tokens: int, samples: int = 4) -> dict:
    ids = [prompt_ids(tokenizer, p) for p in prompts]

    def decode(temperature, rows, seed):
        out = []
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            gen = generator.generate(chunk + [chunk[0]] * (64 - len(chunk)), max_new_tokens,
                                     Sampling(temperature=temperature), stop=[[tokenizer.eos_id]], seed=seed + start)
            out += [rollout.response_text(tokenizer, gen, i) for i in range(len(chunk))]
        return out

    greedy = decode(0.0, ids, 0)
    flat = decode(1.0, [i for i in ids for _ in range(samples)], 1)
    sampled = [flat[j * samples:(j + 1) * samples] for j in range(len(prompts))]
    q = heldout.quality(*heldout.scores(prompts, greedy, sampled, labeler_score),
                        [parse_prompt(p).task for p in prompts])
    return {"labeler_score": round(q["labeler_score"], 3), "exact_match": round(q["exact_match"], 3),
            "pass@1": round(q["pass@1"], 3),
            "exact_by_task": {t: round(v["exact_match"], 2) for t, v in q["by_task"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", required=True, help="the SFT workdir (policy and reference)")
    p.add_argument("--rm", required=True, help="the reward model's workdir (reward and value network)")
    p.add_argument("--gold", type=int, default=1, help="1: the labeler's true score is the reward")
    p.add_argument("--prompts", type=int, default=0, help="train on this many fixed prompts (0: all)")
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--every", type=int, default=12, help="iterations between evaluations")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE of configs/ppo_tiny.py")
    args = p.parse_args()

    sft_config, policy, tokenizer = omni.load(args.sft)
    _, reward, _ = omni.load(args.rm)
    c = _config(sft_config, bool(args.gold), args.set)
    room = c.train.seq_len - c.ppo.max_new_tokens
    fits = lambda prompts: [q for q in prompts if len(prompt_ids(tokenizer, q)) <= room]  # noqa: E731
    pool = fits(finetune.prompts(c.data, "train"))
    train = pool[:args.prompts or len(pool) // 2]
    fresh = pool[len(pool) // 2:][:400]  # training-split prompts this run never samples
    held = fits(finetune.prompts(c.data, "validation"))

    generator = Generator(c.model, policy, pad_id=tokenizer.pad_id)
    value = {**reward, "score_head": jax.tree.map(jnp.zeros_like, reward["score_head"])}
    rollouts = rollout.Rollouts(c, tokenizer, train, generator, (policy, reward), range(c.train.batch_size),
                                labeler=labeler_score)
    params = {"policy": policy, "value": value}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c.optim).init(params))
    step = jax.jit(make_train_step(c, ppo.ppo_loss(ppo.ActorCritic(c.model), c.ppo)))
    per_iteration = c.ppo.rollout_batch // c.train.batch_size * c.ppo.epochs
    logged, start = [], time.time()
    for it in range(args.iterations + 1):
        if it % args.every == 0 or it == args.iterations:
            generator.set_params(state.params["policy"])
            print(json.dumps({"iteration": it, "held": _evaluate(generator, tokenizer, held, c.ppo.max_new_tokens),
                              "fresh": _evaluate(generator, tokenizer, fresh, c.ppo.max_new_tokens)}), flush=True)
        if it == args.iterations:
            break
        for j in range(per_iteration):
            metrics = rollouts.before_step(state.params, it * per_iteration + j)
            logged += [metrics] if metrics else []
            state, _ = step(state, next(rollouts))
        if it % 4 == 3:
            last = logged[-4:]
            print(json.dumps({"iteration": it + 1, "seconds": round(time.time() - start),
                              **{k: round(float(np.mean([m[k] for m in last])), 3)
                                 for k in ("rollout_labeler_score", "rollout_exact", "kl", "zero_spread_groups")}}),
                  flush=True)


if __name__ == "__main__":
    main()
