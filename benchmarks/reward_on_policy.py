"""How well a reward model ranks a policy's own samples, which is what PPO optimises against (the suite's
rankings of widely spread candidates are easier). For each held-out suite prompt the policy samples K responses
at temperature 1; the reward model scores them and the suite's noise-free labeler says which is better. Prints
one JSON line: the reward model's agreement with the labeler on every pair the labeler separates, the labeler
score of the reward model's best of K next to a random sample and the labeler's own best, and their correlation;
per task, how often any of the K samples is exactly the reference answer (what PPO can find by sampling).
`--reward=likelihood` ranks the samples by the policy's own log-probability of each instead: the verifier a
reward model started from the policy has before any training.

    python benchmarks/reward_on_policy.py [--policy=runs/sft_tiny] [--reward=runs/rm_tiny|likelihood] [--prompts=200]
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import numpy as np

import omni
from omni.config import base_config
from omni.data import finetune
from omni.data.instructions import labeler_score, parse_prompt
from omni.data.template import prompt_ids
from omni.generate import Generator, Sampling
from omni.models import GPT
from omni.stages import heldout
from omni.stages.rollout import SCORED_KEYS, episode_scores, episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="runs/sft_tiny")
    p.add_argument("--reward", default="runs/rm_tiny")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--split", default="validation", help="validation, or train (prompts after --skip)")
    p.add_argument("--skip", type=int, default=0, help="leading prompts of the split left out (e.g. those ranked "
                   "by the label stage, which the reward model trained on)")
    p.add_argument("--samples", type=int, default=8, help="K responses per prompt")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=56)
    p.add_argument("--reward_step", type=int, default=None, help="the reward model's checkpoint (default: latest)")
    args = p.parse_args()
    k = args.samples
    policy_config, params, tokenizer = omni.load(args.policy)
    likelihood = args.reward == "likelihood"
    if not likelihood:
        rm_config, rm_params, _ = omni.load(args.reward, args.reward_step)
        reward = GPT(rm_config.model)
        score = jax.jit(functools.partial(episode_scores, reward))
    layout = base_config()  # the episodes' layout: rows of seq_len slots, responses of max_new_tokens
    layout.train.seq_len, layout.ppo.max_new_tokens = args.seq_len, args.max_new_tokens
    data = layout.data
    data.name = "instructions"
    room = args.seq_len - args.max_new_tokens  # prompts that leave room for a full response, as PPO keeps them
    prompts = [t for t in finetune.prompts(data, args.split)[args.skip:] if len(prompt_ids(tokenizer, t)) <= room]
    prompts = prompts[:args.prompts]
    generator = Generator(policy_config.model, params, pad_id=tokenizer.pad_id)
    true, predicted = [], []
    for start in range(0, len(prompts), 8):
        chunk = prompts[start:start + 8]
        ids = [prompt_ids(tokenizer, t) for t in chunk]
        out = generator.generate(ids, args.max_new_tokens, Sampling(temperature=1.0), stop=[[tokenizer.eos_id]],
                                 seed=start, samples=k)
        if likelihood:  # the sampler's log-probability (temperature 1) of each response, EOS included; 0 after it
            scores = out.logprobs.sum(1)
        else:
            rows = episodes(ids, [out.row(i) for i in range(len(ids) * k)], layout, tokenizer.pad_id)
            scores = np.asarray(score(rm_params, {key: rows[key] for key in SCORED_KEYS}))
        for j, prompt in enumerate(chunk):
            texts = [tokenizer.decode([t for t in out.row(j * k + i) if t != tokenizer.eos_id]).strip()
                     for i in range(k)]
            true.append([labeler_score(prompt, t) for t in texts])
            predicted.append(scores[j * k:(j + 1) * k])
    true, predicted = np.array(true), np.array(predicted)
    print(json.dumps({
        "benchmark": "reward_on_policy", "policy": args.policy, "reward": args.reward, "prompts": len(prompts),
        "samples": k, "pairs": int((true[:, :, None] > true[:, None, :]).sum()),
        "agreement_with_labeler": heldout.agreement(true, predicted),
        "best_of_k_by_reward": heldout.best_of(true, predicted),
        "random_sample": float(true.mean()), "best_of_k_by_labeler": float(true.max(1).mean()),
        "correlation": float(np.corrcoef(true.ravel(), predicted.ravel())[0, 1]),
        "by_task": by_task(prompts, true, predicted)}))


def by_task(prompts: list[str], true: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """Per task: prompts, the reward model's agreement with the labeler, mean labeler score of a sample, of the
    reward model's and of the labeler's best of K, and the share of prompts where some sample is exactly the
    reference answer (score 1)."""
    tasks = np.array([parse_prompt(t).task for t in prompts])
    out = {}
    for task in sorted(set(tasks)):
        t, s = true[tasks == task], predicted[tasks == task]
        out[task] = {"prompts": len(t), "agreement_with_labeler": heldout.agreement(t, s),
                     "random_sample": float(t.mean()), "best_of_k_by_reward": heldout.best_of(t, s),
                     "best_of_k_by_labeler": float(t.max(1).mean()), "some_sample_exact": float((t == 1.0).any(1).mean())}
    return out


if __name__ == "__main__":
    main()
