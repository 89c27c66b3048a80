"""The experience of the on-policy stages (PPO, GRPO, RLOO): rollouts sampled from the policy, scored, turned into
advantages and served as minibatches. Also the minibatch layout (omni/stages/ppo.py's and omni/stages/grpo.py's
docstrings), which both sides share, and the frozen models, prompts and labeler that every post-training stage
loads (the held-out evaluation that judges them all, omni/stages/evaluation.py, samples through these too).

PPO learns a value function (its advantages are GAE's); GRPO and RLOO have none: an episode's advantage comes
from the other samples of its prompt, the same for all its tokens (omni/losses.py).

Each prompt is read once for its group of ppo.samples_per_prompt samples, everywhere: the generator fills its KV
cache once for the group's rows, and scoring and training run the prompt (but its last token) once into a cache
that the group's episode rows continue (`episodes`' layout, gpt.continue_prefixes), so a minibatch holds whole
groups. The numbers are those of a row per episode holding its prompt (tests/test_ppo.py), at a fraction of the
work: a prompt here is about 28 tokens and a response 5.

Generation reuses one `Generator` (omni/generate.py) whose compiled prefill/decode programs are kept across
iterations: each rollout only hands it the new parameters. Rollouts sample purely (temperature only: top-k,
top-p or a minimum length would make the KL estimate biased and exploitable) and stop at EOS.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import data, parallel
from omni.config import ARCHITECTURE, ConfigError, require
from omni.data import DataError, finetune
from omni.data.instructions import labeler_score, parse_prompt
from omni.data.template import prompt_ids
from omni.generate import Generator, Sampling
from omni.losses import (explained_variance, gae, group_advantages, lm_loss, rloo_advantages,
                         token_logprobs, whiten)
from omni.models import GPT, flops_per_token
from omni.models.gpt import continue_prefixes
from omni.models.actor_critic import ActorCritic, value_config
from omni.train.trainer import evaluate
from omni.workdir import Workdir


# ----- what the on-policy stages load: frozen models, prompts, the labeler, pretraining data


def frozen_params(config: ml_collections.ConfigDict, workdir: str, head: str, key: str, mesh) -> Any:
    """The params of the model in `workdir` (config key `key`), checked against the policy's architecture
    and `head`, placed as the trainer places the policy's (or value's)."""
    source, _, _ = Workdir(workdir).meta()
    if source.model.get("head", "lm") != head:
        raise ConfigError(f"config.{key}={workdir} holds a model with model.head={source.model.get('head', 'lm')!r}; "
                          f"stage {config.stage} needs {head!r} there")
    wrong = [k for k in ARCHITECTURE if source.model.get(k) != config.model.get(k)]
    if wrong:
        raise ConfigError(f"config.{key}={workdir} holds a model with {', '.join(f'{k}={source.model.get(k)!r}' for k in wrong)}"
                          f" but the policy (config.init_from={config.init_from}) has "
                          f"{', '.join(f'{k}={config.model.get(k)!r}' for k in wrong)}")
    _, params, _, _ = Workdir(workdir).model_params(lambda boxed: parallel.logical_shardings(boxed, mesh))
    return params


def pretraining(config: ml_collections.ConfigDict, tokenizer, mesh) -> tuple:
    """PPO-ptx's pretraining rows and pretraining perplexity (below): config with ppo.ptx_data in place of the
    prompts."""
    p = config.ppo
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.update(name=p.ptx_data, path=p.ptx_path)
    c.train.update(batch_size=p.ptx_batch, eval_batches=max(p.ptx_eval_rows // p.ptx_batch, 1))
    return pretraining_rows(c, tokenizer, mesh), pretraining_perplexity(c, tokenizer, mesh)


def pretraining_rows(ptx_config: ml_collections.ConfigDict, tokenizer, mesh) -> tuple | None:
    """(iterator, this process's rows) of the pretraining rows each update adds; None without ppo.ptx_coef."""
    p = ptx_config.ppo
    if p.ptx_coef <= 0:
        return None
    rows = parallel.process_rows(mesh, p.ptx_batch)
    return data.train_iterator(ptx_config, tokenizer, rows), rows


def pretraining_perplexity(ptx_config: ml_collections.ConfigDict, tokenizer, mesh) -> Callable | None:
    """policy params -> held-out pretraining perplexity, by the trainer's evaluation loop; None without
    ppo.ptx_eval_rows."""
    p = ptx_config.ppo
    require(isinstance(p.ptx_eval_rows, int) and p.ptx_eval_rows >= 0 and p.ptx_eval_rows % p.ptx_batch == 0,
            "ppo.ptx_eval_rows", p.ptx_eval_rows, f"must be 0 or a multiple of ppo.ptx_batch={p.ptx_batch}")
    if p.ptx_eval_rows == 0:
        return None
    batches = data.eval_batches(ptx_config, tokenizer, parallel.process_rows(mesh, p.ptx_batch))
    eval_fn = jax.jit(lambda params, batch: lm_loss(GPT(ptx_config.model))(params, batch, None)[1])

    def perplexity(policy_params) -> float:
        return evaluate(eval_fn, policy_params, batches, mesh)["eval_perplexity"]

    return perplexity


def fitting_prompts(config: ml_collections.ConfigDict, tokenizer, split: str) -> list[str]:
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


def labeler_of(config: ml_collections.ConfigDict) -> tuple[Callable | None, Callable | None]:
    """(labeler(prompt, response) -> score, task_of(prompt) -> its task) on the offline instruction suite, where
    the true score is known; (None, None) elsewhere."""
    if config.data.name != "instructions":
        return None, None
    return labeler_score, lambda prompt: parse_prompt(prompt).task


# ----- episodes: sampled and scored


def layout(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(prefix width, row length) of an episode: a prompt that fits (fitting_prompts) but for its last token, left-
    padded; then a row of that token and up to ppo.max_new_tokens response tokens. train.seq_len slots in all."""
    return max(config.train.seq_len - config.ppo.max_new_tokens - 1, 1), config.ppo.max_new_tokens + 1


def flops_per_row_token(config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of `model_config` per token of the episodes' rows, their group's prefix's share included
    (the trainer counts the rows' tokens)."""
    (width, length), group = layout(config), config.ppo.samples_per_prompt
    return flops_per_token(model_config, config.train.seq_len) * (1 + width / (length * group))


def episodes(prompts: Sequence[list[int]], responses: Sequence[list[int]], config: ml_collections.ConfigDict,
             pad_id: int) -> dict[str, np.ndarray]:
    """Responses to prompts, `group` = len(responses) / len(prompts) in a row to each, laid out for scoring and
    training with each prompt read once (gpt.continue_prefixes): 'prefix' [prompts, width] a prompt but its last
    token, left-padded from slot 'prefix_start' [prompts, 1]; per episode 'inputs', 'targets' [n, length] (the
    prompt's last token then the response, and their next tokens; right-padded), 'mask' 1 where the target is a
    response token, 'last' [n] (the final token's index in inputs: where the reward model reads)."""
    width, length = layout(config)
    group = len(responses) // len(prompts)
    prefix = np.full((len(prompts), width), pad_id, np.int32)
    start = np.zeros((len(prompts), 1), np.int32)
    for i, p in enumerate(prompts):
        start[i] = width - (len(p) - 1)
        prefix[i, start[i, 0]:] = p[:-1]
    tokens = np.full((len(responses), length + 1), pad_id, np.int32)
    mask = np.zeros((len(responses), length), np.float32)
    last = np.zeros(len(responses), np.int32)
    for e, r in enumerate(responses):
        tokens[e, :1 + len(r)] = [prompts[e // group][-1]] + list(r)
        mask[e, :len(r)] = 1.0
        last[e] = len(r)
    return {"prefix": prefix, "prefix_start": start, "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "mask": mask, "last": last}


def sample(generator: Generator, tokenizer, config: ml_collections.ConfigDict, policy_params,
           prompts: Sequence[list[int]], seed: int, temperature: float, group: int = 1
           ) -> tuple[dict[str, np.ndarray], Any]:
    """The policy's `group` responses to each of `prompts` (token ids), stopping at EOS, laid out as `episodes`;
    and the Generation (lengths, stopped), a row per episode."""
    generator.set_params(policy_params)
    out = generator.generate(prompts, config.ppo.max_new_tokens, Sampling(temperature=temperature),
                             stop=[[tokenizer.eos_id]], seed=seed, samples=group)
    rows = episodes(prompts, [out.row(i) for i in range(len(out.lengths))], config, tokenizer.pad_id)
    return rows, out


def response_text(tokenizer, out, i: int) -> str:
    return tokenizer.decode([t for t in out.row(i) if t != tokenizer.eos_id]).strip()


def critic(config: ml_collections.ConfigDict) -> bool:
    """Whether the stage trains a value function beside its policy (PPO); its params are then {'policy',
    'value'}, else {'policy'}."""
    return config.stage == "ppo"


def _through(model: GPT, params) -> Callable:
    return lambda tokens, cache: model.apply({"params": params}, tokens, cache=cache)


def episode_scores(model: GPT, params, rows: dict) -> jax.Array:
    """The scalar-head `model`'s score of each episode of `rows` (`episodes`' layout), read at its last token."""
    per_token = continue_prefixes(_through(model, params), model.config, rows["prefix"], rows["prefix_start"],
                                  rows["inputs"])
    return jnp.take_along_axis(per_token, rows["last"][:, None], axis=1)[:, 0]


SCORED_KEYS = ("prefix", "prefix_start", "inputs", "targets", "mask", "last")


def scorer(config: ml_collections.ConfigDict) -> Callable:
    """jit'd score(params, ref_params, rm_params, rows) -> (log-probs of the policy and of the reference at
    temperature T, values, reward-model scores), each per token (0 off mask) or per episode, of `rows`
    (`episodes`' SCORED_KEYS). Without a critic the values are 0; without a reward model (rm_params None) so
    are its scores."""
    m = config.model
    model, reference, reward = ActorCritic(m, critic=critic(config)), GPT(m), GPT(value_config(m))
    temperature = config.ppo.temperature

    @jax.jit
    def score(params, ref_params, rm_params, rows):
        inputs, targets, mask = rows["inputs"], rows["targets"], rows["mask"]
        logits, values = model.apply({"params": params}, inputs, rows["prefix"], rows["prefix_start"])
        logp = token_logprobs(logits / temperature, targets)
        ref_logits = continue_prefixes(_through(reference, ref_params), m, rows["prefix"], rows["prefix_start"],
                                       inputs)
        ref_logp = token_logprobs(ref_logits / temperature, targets)
        if rm_params is None:
            scores = jnp.zeros(inputs.shape[0], jnp.float32)
        else:
            scores = episode_scores(reward, rm_params, rows)
        return logp * mask, ref_logp * mask, values * mask, scores

    return score


def score_rows(score: Callable, params, ref_params, rm_params, rows: dict[str, np.ndarray]
               ) -> tuple[np.ndarray, ...]:
    """`score` on the episodes `rows`, fetched to the host."""
    return jax.device_get(score(params, ref_params, rm_params, {k: rows[k] for k in SCORED_KEYS}))


def summed_log_ratio(logp: np.ndarray, ref_logp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per episode, the policy's log-ratio to the reference summed over the response: its KL estimate."""
    return ((logp - ref_logp) * mask).sum(1)


# ----- rewards and advantages


def shaped_scores(p: ml_collections.ConfigDict, normalised: np.ndarray, stopped: np.ndarray) -> np.ndarray:
    """The per-episode scores that GAE is given, from config.ppo `p`: the normalised rewards less
    ppo.missing_eos_penalty for a response cut at the length limit, clipped to +-ppo.reward_clip, and divided
    by their batch std with ppo.whiten_rewards."""
    scores = normalised - p.missing_eos_penalty * (~stopped)
    if p.reward_clip > 0:
        scores = np.clip(scores, -p.reward_clip, p.reward_clip)
    if p.whiten_rewards:
        scores = scores / (scores.std() + 1e-8)
    return scores


def _advantages(p: ml_collections.ConfigDict) -> Callable:
    @jax.jit
    def advantages(logp, ref_logp, values, scores, mask, last, kl_coef):
        """Per-token rewards (-beta x log-ratio everywhere, the score at the last response token), GAE and
        whitened advantages."""
        rewards = -kl_coef * (logp - ref_logp) * mask
        rewards = rewards + jax.nn.one_hot(last - 1, mask.shape[1]) * scores[:, None]
        adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
        return whiten(adv, mask, shift_mean=True), returns

    return advantages


def episode_advantages(g: ml_collections.ConfigDict, scores: np.ndarray, group_size: int) -> np.ndarray:
    """GRPO's or RLOO's advantage of each episode (config.grpo `g`), from the scores of its group of
    `group_size` consecutive episodes."""
    groups = scores.reshape(-1, group_size)
    adv = group_advantages(groups, g.eps) if g.advantage == "grpo" else rloo_advantages(groups)
    return np.asarray(adv, np.float32).reshape(-1)


def spread_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """Per episode, whether its group's scores differ at all: a group without spread has no signal (DAPO)."""
    groups = scores.reshape(-1, group_size)
    return np.repeat(groups.max(1) - groups.min(1) > 1e-6, group_size)


def update_kl_coef(kl_coef: float, kl: float, episodes: int, target: float, horizon: float) -> float:
    """The adaptive KL controller of Ziegler et al. (2019): beta grows when the measured KL is above target and
    shrinks below it, by at most 20% of the error per `horizon` episodes."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * episodes / horizon)


@dataclasses.dataclass
class Scored:
    """A rollout batch as scored: per token [episodes, length] (0 off the response) or per episode."""
    texts: list[str]  # the responses, decoded
    logprobs: np.ndarray  # the policy's, at the rollout temperature
    ref_logprobs: np.ndarray  # the reference policy's
    values: np.ndarray
    raw: np.ndarray  # the reward before normalisation
    true: np.ndarray | None  # the labeler's scores, where there is a labeler
    advantages: np.ndarray
    returns: np.ndarray


def score_metrics(raw: np.ndarray, true: np.ndarray | None, group_size: int) -> dict[str, float]:
    """`zero_spread_groups` and, with a labeler, its mean score and share of exact answers."""
    # Groups whose samples all score the same teach nothing about that prompt (trl's frac_reward_zero_std):
    # judged by the labeler's true score where there is one, the reward model's never ties.
    judged = true if true is not None else raw
    groups = judged.reshape(-1, group_size)
    out = {"zero_spread_groups": float((groups.max(1) - groups.min(1) < 1e-6).mean())}
    if true is not None:
        out.update(rollout_labeler_score=float(true.mean()), rollout_exact=float((true == 1.0).mean()))
    return out


# ----- minibatches


# One episode's rows in a minibatch (omni/stages/ppo.py's and grpo.py's docstrings), and its group's prompt
# (PREFIX_KEYS, a row per group); PPO-ptx adds PTX_KEYS.
BATCH_KEYS = ("inputs", "targets", "mask", "old_logprobs", "old_values", "advantages", "returns")
GROUP_BATCH_KEYS = ("inputs", "targets", "mask", "old_logprobs", "ref_logprobs", "advantages")
PREFIX_KEYS = ("prefix", "prefix_start")
PTX_KEYS = ("ptx_inputs", "ptx_targets", "ptx_weights")


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return (BATCH_KEYS if critic(config) else GROUP_BATCH_KEYS) + PREFIX_KEYS


def batch_shapes(config: ml_collections.ConfigDict, episodes: int, ptx_rows: int) -> dict[str, tuple]:
    """Shapes and dtypes of a minibatch of `episodes`, in whole groups of ppo.samples_per_prompt (plus
    `ptx_rows` pretraining rows with ppo.ptx_coef)."""
    width, length = layout(config)
    groups = episodes // config.ppo.samples_per_prompt
    shapes = {k: ((episodes, length), np.int32 if k in ("inputs", "targets") else np.float32)
              for k in batch_keys(config) if k not in PREFIX_KEYS}
    shapes.update(prefix=((groups, width), np.int32), prefix_start=((groups, 1), np.int32))
    if config.ppo.ptx_coef > 0:
        shapes.update({k: ((ptx_rows, config.train.seq_len), np.float32 if k == "ptx_weights" else np.int32)
                       for k in PTX_KEYS})
    return shapes


def _pack(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpack(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as f:
        return {k: f[k] for k in f.files}


def _group_rows(rows: Sequence[int], group: int) -> list[int]:
    """The groups of a minibatch that a process holding its episode `rows` holds: whole groups, or a ConfigError."""
    groups = sorted({r // group for r in rows})
    if sorted(rows) != [g * group + j for g in groups for j in range(group)]:
        raise ConfigError(f"config.ppo.samples_per_prompt={group}: this process holds episodes "
                          f"{min(rows)}..{max(rows)} "
                          f"of a minibatch, not whole groups (train.batch_size / samples_per_prompt must divide "
                          f"evenly over the mesh's batch shards)")
    return groups


class Rollouts:
    """The data iterator of PPO, GRPO and RLOO. `before_step(params, step)` (the trainer calls it) samples and scores a
    new rollout batch when the last one is used up; `next()` serves this process's rows of the next minibatch
    (plus pretraining rows for PPO-ptx). Its state (iteration, position, KL coefficient, the unfinished rollout
    batch, the pretraining iterator's) is checkpointed, so a preempted run resumes at the same minibatch."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, prompts: list[str], generator: Generator,
                 frozen: tuple, rows: Sequence[int], ptx: tuple | None = None, labeler: Callable | None = None,
                 reward_fn: Callable | None = None):
        self.config, self.p, self.g = config, config.ppo, config.grpo
        self.critic, self.keys = critic(config), batch_keys(config)
        self.tokenizer, self.prompts, self.generator = tokenizer, prompts, generator
        self.prompt_ids = [prompt_ids(tokenizer, text) for text in prompts]
        self.ref_params, self.rm_params = frozen
        self.rows, self.labeler = list(rows), labeler
        self.group_rows = _group_rows(self.rows, self.p.samples_per_prompt)  # this process's groups of a minibatch
        # reward_fn(prompts, responses) -> raw rewards [n], in place of the reward model's scores
        self.reward_fn = reward_fn
        self.ptx_iter, self.ptx_rows = ptx if ptx is not None else (None, [])  # pretraining (iterator, rows)
        self.per_epoch = self.p.rollout_batch // config.train.batch_size
        self.score = scorer(config)
        self.advantages = _advantages(self.p)
        self.iteration, self.position, self.kl_coef = 0, 0, float(self.p.kl_coef)
        self.reward_stats: tuple[float, float] | None = None  # (mean, std) of the starting policy's raw rewards
        self.buffer: dict[str, np.ndarray] | None = None
        self.trained_since: float | None = None

    # ----- serving
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next minibatch: whole groups (a prompt's samples share its prefix), in a new order every epoch."""
        epoch, j = divmod(self.position, self.per_epoch)
        k = self.p.samples_per_prompt
        groups = np.random.default_rng([self.config.train.seed, self.iteration, epoch]).permutation(
            self.p.rollout_batch // k)
        b = self.config.train.batch_size // k
        picked = groups[j * b:(j + 1) * b][self.group_rows]
        batch = {key: self.buffer[key][picked if key in PREFIX_KEYS else (picked[:, None] * k + np.arange(k)).ravel()]
                 for key in self.keys}
        self.position += 1
        if self.ptx_iter is not None:
            batch.update({f"ptx_{k}": v for k, v in next(self.ptx_iter).items() if k in ("inputs", "targets", "weights")})
        return batch

    def example(self) -> dict[str, np.ndarray]:
        """A batch of the right shapes (zeros) for compiling the train step before any rollout."""
        shapes = batch_shapes(self.config, len(self.rows), len(self.ptx_rows))
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}

    # ----- sampling
    def before_step(self, params, step: int) -> dict[str, float]:
        del step
        if self.buffer is not None and self.position < self.per_epoch * self.p.epochs:
            return {}
        metrics = {}
        if self.trained_since is not None:
            metrics["train_s"] = time.perf_counter() - self.trained_since
        if self.buffer is not None:
            self.iteration += 1
        metrics.update(self._rollout(params))
        self.position, self.trained_since = 0, time.perf_counter()
        return metrics

    def _batch_prompts(self) -> list[int]:
        """Indices of this iteration's prompts, each sampled ppo.samples_per_prompt times (a group): the prompt
        set in a new seeded order every epoch."""
        n, size = len(self.prompts), self.p.rollout_batch // self.p.samples_per_prompt
        orders = {}
        out = []
        for j in range(self.iteration * size, (self.iteration + 1) * size):
            epoch, i = divmod(j, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.config.train.seed, 1_000_003, epoch]).permutation(n)
            out.append(int(orders[epoch][i]))
        return out

    def _rollout(self, params) -> dict[str, float]:
        """Samples and scores this iteration's rollout batch with `params`, keeps it as the buffer the coming
        minibatches are drawn from; its metrics."""
        indices = self._batch_prompts()
        prompts = [self.prompts[i] for i in indices for _ in range(self.p.samples_per_prompt)]  # per episode
        start = time.perf_counter()
        rows, out = sample(self.generator, self.tokenizer, self.config, params["policy"],
                           [self.prompt_ids[i] for i in indices], self.config.train.seed * 1_000_003 + self.iteration,
                           self.p.temperature, self.p.samples_per_prompt)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        s = self._score(params, prompts, rows, out)
        score_s = time.perf_counter() - start
        kl = float(summed_log_ratio(s.logprobs, s.ref_logprobs, rows["mask"]).mean())
        metrics = {"reward": float(s.raw.mean()), "kl": kl,
                   "response_length": float(out.lengths.mean()), "no_eos": float(1 - out.stopped.mean()),
                   "rollout_tokens_per_s": float(out.lengths.sum()) / generate_s, "generate_s": generate_s,
                   "score_s": score_s, "iteration": self.iteration + 1}
        if self.critic:
            metrics.update(kl_coef=self.kl_coef,
                           explained_variance=explained_variance(s.values, s.returns, rows["mask"]))
        metrics.update(score_metrics(s.raw, s.true, self.p.samples_per_prompt))
        self._show_samples(prompts, s.texts, s.raw)
        self._adapt_kl_coef(kl)
        mask = rows["mask"]
        if not self.critic and self.g.skip_zero_spread:  # DAPO's dynamic sampling: groups without signal drop out
            kept = spread_groups(s.raw, self.p.samples_per_prompt)
            metrics["skipped_episodes"] = float(1 - kept.mean())
            mask = mask * kept[:, None]
        self.buffer = {"prefix": rows["prefix"], "prefix_start": rows["prefix_start"],
                       "inputs": rows["inputs"], "targets": rows["targets"], "mask": mask,
                       "old_logprobs": s.logprobs, "old_values": s.values, "ref_logprobs": s.ref_logprobs,
                       "advantages": s.advantages, "returns": s.returns}
        self.buffer = {k: self.buffer[k] for k in self.keys}
        return metrics

    # ----- scoring
    def _score(self, params, prompts: list[str], rows: dict[str, np.ndarray], out) -> Scored:
        """The episodes `rows` (Generation `out`) through the policy, the reference, the value function and the
        reward, and their advantages under the current KL coefficient."""
        # The reward model scores the episodes only when it is the reward (not for a verifier or gold reward)
        rm_params = self.rm_params if self.reward_fn is None and not self.p.gold_reward else None
        logp, ref_logp, values, rm_scores = score_rows(self.score, params, self.ref_params, rm_params, rows)
        texts = [response_text(self.tokenizer, out, i) for i in range(len(prompts))]
        true = (np.array([self.labeler(q, t) for q, t in zip(prompts, texts)], np.float32)
                if self.labeler is not None else None)
        raw = self._raw_rewards(prompts, texts, rm_scores, true)
        scores = shaped_scores(self.p, self._normalised(raw), out.stopped)
        if self.critic:
            adv, returns = jax.device_get(self.advantages(logp, ref_logp, values, scores, rows["mask"],
                                                          rows["last"], np.float32(self.kl_coef)))
        else:  # GRPO / RLOO: the KL is in the loss, not the reward; one advantage per episode
            adv = episode_advantages(self.g, scores, self.p.samples_per_prompt)[:, None] * rows["mask"]
            returns = np.zeros_like(adv)
        return Scored(texts, logp, ref_logp, values, raw, true, adv, returns)

    def _raw_rewards(self, prompts: list[str], texts: list[str], rm_scores: np.ndarray,
                     true: np.ndarray | None) -> np.ndarray:
        """The reward before normalisation: the reward model's score, the labeler's true one (gold_reward) or
        reward_fn's."""
        if self.reward_fn is not None:
            return np.asarray(self.reward_fn(prompts, texts), np.float32)
        if self.p.gold_reward:
            return true
        return rm_scores

    def _normalised(self, raw: np.ndarray) -> np.ndarray:
        """Raw rewards in units of the starting policy's: mean 0 and std 1 on the first rollout batch, a fixed
        affine map after it (OpenAI normalised its reward model so on the initial policy's samples). The KL
        penalty's beta then means the same whatever the reward's scale. A first batch without spread (every
        sample scored the same) gives no scale: it only shifts."""
        if not self.p.reward_norm:
            return raw
        if self.reward_stats is None:
            std = float(raw.std())
            self.reward_stats = (float(raw.mean()), std if std > 1e-6 else 1.0)
        mean, std = self.reward_stats
        return (raw - mean) / std

    def _adapt_kl_coef(self, kl: float) -> None:
        """With ppo.target_kl, the adaptive controller sets the next rollout's KL coefficient."""
        if self.p.target_kl > 0:
            self.kl_coef = update_kl_coef(self.kl_coef, kl, self.p.rollout_batch, self.p.target_kl, self.p.kl_horizon)

    def _show_samples(self, prompts: list[str], texts: list[str], raw: np.ndarray) -> None:
        """Every ppo.sample_every iterations, the batch's first and last episode, on process 0."""
        if self.iteration % self.p.sample_every == 0 and jax.process_index() == 0:
            for i in (0, len(prompts) - 1):
                print(f"  sample (iteration {self.iteration + 1}): {prompts[i]!r} -> {texts[i]!r} "
                      f"(reward {raw[i]:.3f})", flush=True)

    # ----- checkpointing (grain's Orbax handler: bytes for an iterator that is not grain's own)
    def get_state(self) -> bytes:
        state = {"iteration": self.iteration, "position": self.position, "kl_coef": self.kl_coef,
                 "reward_stats": self.reward_stats, "buffer": _pack(self.buffer) if self.buffer is not None else "",
                 "ptx": self.ptx_iter.get_state() if self.ptx_iter is not None else None}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state.decode())
        self.iteration, self.position, self.kl_coef = s["iteration"], s["position"], s["kl_coef"]
        self.reward_stats = tuple(s["reward_stats"]) if s.get("reward_stats") else None
        self.buffer = _unpack(s["buffer"]) if s["buffer"] else None
        if self.ptx_iter is not None and s["ptx"] is not None:
            self.ptx_iter.set_state(s["ptx"])

    def start_prefetch(self) -> None:
        """Called by grain's handler after a restore; rollouts are made on demand."""
