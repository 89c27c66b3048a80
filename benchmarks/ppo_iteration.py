"""Where a PPO iteration's time goes: generation (rollouts), scoring (policy, reference, value and reward model
forward passes + GAE) and training (the minibatch updates), and rollout tokens/s. Also checks that generation
reuses the generator's compiled programs: the number of compiled decode programs must not grow after the first
iteration. Prints one JSON line.

    python benchmarks/ppo_iteration.py [--sft=runs/sft_tiny] [--rm=runs/rm_tiny] [--iterations=8]

Uses configs/ppo_tiny.py's settings; the first iteration (compilation) is left out of the averages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import ppo_tiny  # noqa: E402
from omni import config as config_lib  # noqa: E402
from omni.stages import ppo, registry  # noqa: E402
from omni.train import trainer  # noqa: E402
from omni.workdir import Workdir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="runs/sft_tiny")
    p.add_argument("--rm", default="runs/rm_tiny")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--rollout_batch", type=int, default=0, help="episodes per iteration (0: ppo_tiny's)")
    args = p.parse_args()
    c = ppo_tiny.get_config()
    c.init_from, c.ppo.reward_from = args.sft, args.rm
    c.ppo.update(iterations=args.iterations, rollout_batch=args.rollout_batch or c.ppo.rollout_batch, eval_prompts=8,
                 ptx_eval_rows=0)
    c.train.batch_size = min(c.train.batch_size, c.ppo.rollout_batch)
    c.optim.warmup_steps = 0  # a few iterations are timed; the schedule does not matter
    c.train.update(eval_every=10 ** 6, checkpoint_every=10 ** 6, log_every=1)  # each iteration's split its own line
    c = config_lib.inherit_architecture(c, Workdir(args.sft).meta()[0])
    c = registry.validate(c, jax.device_count())
    with tempfile.TemporaryDirectory() as workdir:
        task = ppo.task(c, workdir)
        compiled = []
        rollouts = task.train_iter

        def before_step(params, step):
            out = rollouts.before_step(params, step)
            if out:
                compiled.append(rollouts.generator._run._cache_size())
            return out

        task.before_step = before_step
        task.eval_extra = None  # time the iterations alone
        trainer.train(c, workdir, task)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "iteration" in r]
    steady = rows[1:]
    mean = lambda key: float(np.mean([r[key] for r in steady if key in r]))  # noqa: E731
    generate, score, train = mean("generate_s"), mean("score_s"), mean("train_s")
    total = generate + score + train
    print(json.dumps({
        "benchmark": "ppo_iteration", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "rollout_batch": c.ppo.rollout_batch, "minibatch": c.train.batch_size, "iterations_timed": len(steady),
        "rollout_tokens_per_s": mean("rollout_tokens_per_s"), "response_length": mean("response_length"),
        "generate_s": generate, "score_s": score, "train_s": train, "iteration_s": total,
        "generate_share": generate / total, "score_share": score / total, "train_share": train / total,
        "decode_programs_compiled_per_iteration": compiled,
        "recompiled_after_first_iteration": compiled[-1] != compiled[0]}))


if __name__ == "__main__":
    main()
