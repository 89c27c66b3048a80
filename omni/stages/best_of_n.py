"""Best-of-n, or rejection-sampling fine-tuning (as Llama 2 and Anthropic used it): the SFT policy (init_from)
samples best_of_n.n responses to each of best_of_n.prompts training prompts, the reward model (ppo.reward_from)
keeps the best of each, and the policy is fine-tuned on those answers as SFT is.

The kept answers are written once to <workdir>/best_of_n.jsonl ({"prompt", "response", "reward"} per line), so a
resumed run trains on the same set and a person can read what the reward model chose. Sampling uses the rollout
keys of config.ppo (temperature, max_new_tokens, rollout_batch: the generation batch); a response that never
emits EOS loses ppo.missing_eos_penalty before the pick.
Batch and loss: SFT's (omni/stages/sft.py). Evaluation: SFT's held-out loss, and PPO's held-out measures of the
policy (omni/stages/evaluation.py HeldOut), so best-of-n is judged as every other post-training method is.
"""
from __future__ import annotations

import functools
import json

import jax
import ml_collections
import numpy as np

from omni import parallel
from omni.config import ConfigError, require
from omni.data import finetune
from omni.data.template import prompt_ids
from omni.files import write_atomic
from omni.generate import Generator
from omni.losses import lm_loss
from omni.models import GPT, flops_per_token
from omni.models.actor_critic import value_config
from omni.stages import sft
from omni.stages.evaluation import policy_evaluation
from omni.stages.rollout import SCORED_KEYS, episode_scores, fitting_prompts, frozen_params, response_text, sample
from omni.train.trainer import Task
from omni.workdir import Workdir, starting_point

KEPT = "best_of_n.jsonl"


def check(c: ml_collections.ConfigDict) -> None:
    b = c.best_of_n
    for key in ("n", "prompts"):
        require(isinstance(b[key], int) and b[key] > 0, f"best_of_n.{key}", b[key], "must be a positive int")
    require(c.ppo.max_new_tokens < c.train.seq_len, "ppo.max_new_tokens", c.ppo.max_new_tokens,
            f"leaves no room for a prompt in train.seq_len={c.train.seq_len}")
    require(c.ppo.temperature > 0, "ppo.temperature", c.ppo.temperature, "must be > 0 (best-of-n samples)")
    sft.check(c)


def step(config: ml_collections.ConfigDict):
    return sft.step(config)


def best_answers(config: ml_collections.ConfigDict, tokenizer, prompts: list[str], policy, reward, mesh
                 ) -> list[dict]:
    """For each prompt, the reward model's favourite of best_of_n.n samples of `policy`: {prompt, response,
    reward}."""
    p, n = config.ppo, config.best_of_n.n
    generator = Generator(config.model, policy, mesh, pad_id=tokenizer.pad_id)
    score = jax.jit(functools.partial(episode_scores, GPT(value_config(config.model))))
    ids = [prompt_ids(tokenizer, t) for t in prompts]
    texts, rewards = [], []
    size = max(p.rollout_batch // n, 1)  # prompts per chunk
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        real = len(chunk) * n
        rows, out = sample(generator, tokenizer, config, policy, chunk + [chunk[0]] * (size - len(chunk)),
                           config.train.seed * 1_000_003 + start * n, p.temperature, n)
        scores = np.asarray(score(reward, {k: rows[k] for k in SCORED_KEYS})) - p.missing_eos_penalty * (~out.stopped)
        rewards += scores[:real].tolist()
        texts += [response_text(tokenizer, out, i) for i in range(real)]
    best = np.asarray(rewards).reshape(-1, n).argmax(1)
    return [{"prompt": q, "response": texts[i * n + j], "reward": rewards[i * n + j]}
            for i, (q, j) in enumerate(zip(prompts, best.tolist()))]


def _kept(config: ml_collections.ConfigDict, run: Workdir, tokenizer, policy, reward, mesh) -> list[dict]:
    """The kept answers: the workdir's own (a resumed run), or sampled now and written there."""
    path = run.file(KEPT)
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        pass
    prompts = fitting_prompts(config, tokenizer, "train")
    order = np.random.default_rng(config.train.seed).permutation(len(prompts))[:config.best_of_n.prompts]
    kept = best_answers(config, tokenizer, [prompts[i] for i in order], policy, reward, mesh)
    if jax.process_index() == 0:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    starting_point(config, "best-of-n starts from an SFT workdir (e.g. --config.init_from=runs/sft_tiny)")
    if not config.ppo.reward_from:
        raise ConfigError("config.ppo.reward_from is empty: best-of-n needs a reward model workdir to pick with")
    run = Workdir(workdir)
    tokenizer = run.stage_tokenizer(config)
    mesh = parallel.make_mesh(config.mesh)
    policy = frozen_params(config, config.init_from, "lm", "init_from", mesh)
    reward = frozen_params(config, config.ppo.reward_from, "scalar", "ppo.reward_from", mesh)
    kept = _kept(config, run, tokenizer, policy, reward, mesh)
    seq_len, rows = config.train.seq_len, parallel.process_rows(mesh, config.train.batch_size)
    train_rows = finetune.pack_demonstrations(tokenizer, [[(r["prompt"], r["response"])] for r in kept], seq_len,
                                              run.file(KEPT))
    held_out = finetune.demonstrations(config.data, "validation")
    eval_batches = finetune.fixed_batches(
        finetune.pack_demonstrations(tokenizer, list(held_out), seq_len, held_out.where),
        config.train.batch_size, config.train.eval_batches, rows)
    print(f"best-of-{config.best_of_n.n}: {len(kept):,} kept answers (mean reward "
          f"{np.mean([r['reward'] for r in kept]):.3f}) in {len(train_rows['inputs']):,} packed rows of {seq_len}",
          flush=True)
    model = GPT(config.model)
    return Task(model=model, loss_fn=lm_loss(model), train_iter=finetune.train_iterator(train_rows, config, rows),
                eval_batches=eval_batches, tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, seq_len),
                eval_extra=policy_evaluation(config, tokenizer, mesh, policy, config.init_from),
                summary_extras={"kept_answers": len(kept)})
