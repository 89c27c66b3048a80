"""The reward model (InstructGPT's second stage): the SFT model with its unembedding replaced by a scalar head
(model.head='scalar'), read at the last token of a response, trained on K-way human rankings.

Batch: one element per prompt, its K responses side by side (omni/data/finetune.py): inputs int32
[prompts, K, length], last int32 [prompts, K] (where each response's score is read), ranks int32 [prompts, K]
(0 = best, equal = tie), exists float32 [prompts, K]. Every response runs through the model once, and all
C(K, 2) comparisons of a prompt form one batch element, as InstructGPT found necessary: shuffling comparisons
into separate elements lets the model see each response K - 1 times per epoch, and it overfits.
Loss: per prompt, -1/(untied pairs) * sum over untied pairs of log sigmoid(r_better - r_worse); mean over prompts.
After training the score head's bias is shifted so that SFT demonstrations score 0 on average (InstructGPT did),
so the checkpoint's scores are already normalised; the shift is reported as `reward_bias`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import parallel
from omni.config import ConfigError
from omni.data import finetune
from omni.losses import ranked_pairs, ranking_loss_sum, ranking_terms, response_scores
from omni.losses import ranking_loss  # noqa: F401 (the documented loss: other tools import it from here)
from omni.models import GPT, flops_per_token
from omni.train.trainer import Task
from omni.workdir import Workdir, starting_point


def rm_loss(model: GPT):
    """loss_fn of the ranking loss (this module's docstring): summed over prompts, weighed by the prompts with
    an untied pair; also pairwise accuracy and the scores' first two moments."""

    def loss_fn(params, batch: dict, rng: jax.Array | None):
        scores = response_scores(model, params, batch["inputs"], batch["last"], rng)
        terms = ranking_terms(scores, batch["ranks"], batch["exists"])
        loss, prompts = ranking_loss_sum(terms)
        exists = batch["exists"]
        sums = {"loss": loss, "weight": prompts,
                "pairwise_accuracy": terms["correct"].sum(), "pairwise_accuracy_weight": terms["pairs"].sum(),
                "reward": (scores * exists).sum(), "reward_weight": exists.sum(),
                "reward_sq": (scores ** 2 * exists).sum(), "reward_sq_weight": exists.sum()}
        return loss, sums

    return loss_fn


def _reward_stats(params, evals: dict) -> dict:
    """Held-out headline metrics from the evaluation sums."""
    mean = evals["eval_reward"]
    return {"heldout_pairwise_accuracy": evals["eval_pairwise_accuracy"], "reward_mean": mean,
            "reward_std": math.sqrt(max(evals["eval_reward_sq"] - mean ** 2, 0.0))}


def demonstration_bias(model: GPT, tokenizer, demonstrations: list[tuple[str, str]], seq_len: int, mesh):
    """finalize for the trainer: shift the score head's bias so that `demonstrations` (prompt, response) score
    0 on average."""
    groups = finetune.preference_groups(tokenizer, [(p, [r], [0]) for p, r in demonstrations], seq_len, 1)
    score = jax.jit(lambda params, inputs, last: response_scores(model, params, inputs, last))

    def finalize(params):
        total, count = 0.0, 0
        for b in finetune.fixed_batches(groups, 64, math.ceil(len(groups["inputs"]) / 64), weight_keys=("exists",)):
            s = np.asarray(score(params, jnp.asarray(b["inputs"]), jnp.asarray(b["last"])))
            total += float((s * b["exists"]).sum())
            count += int(b["exists"].sum())
        bias = total / max(count, 1)
        head = dict(params["score_head"])
        head["bias"] = head["bias"] - bias
        return {**params, "score_head": head}, {"reward_bias": bias}

    return finalize


def _bias_demonstrations(config: ml_collections.ConfigDict, prefs: list) -> list[tuple[str, str]]:
    """What the reward is normalised on: the SFT demonstrations of the offline suite, or elsewhere the best-ranked
    response of each training prompt."""
    n = config.rm.bias_demonstrations
    if config.data.name == "instructions":
        dialogues = finetune.demonstrations(config.data, "train")
        return [dialogues[i][-1] for i in range(min(n, len(dialogues)))]
    return [(prompt, responses[int(np.argmin(ranks))]) for prompt, responses, ranks in prefs[:n]]


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) from the config alone, for label.responses responses per prompt:
    what omni/aot.py compiles."""
    groups, k, length = config.train.batch_size, config.label.responses, config.train.seq_len
    model = GPT(config.model)
    batch = {"inputs": ((groups, k, length), np.int32), "last": ((groups, k), np.int32),
             "ranks": ((groups, k), np.int32), "exists": ((groups, k), np.float32)}
    return model, rm_loss(model), batch


def check(config: ml_collections.ConfigDict) -> None:
    if config.model.head != "scalar":
        raise ConfigError(f"config.model.head={config.model.head!r}: the reward model needs 'scalar'")
    if config.mesh.sequence != 1:
        raise ConfigError(f"config.mesh.sequence={config.mesh.sequence}: the reward model does not split length")


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    starting_point(config, "the reward model starts from an SFT workdir (e.g. --config.init_from=runs/sft_tiny)")
    tokenizer = Workdir(workdir).stage_tokenizer(config)
    train, held_out = (list(finetune.preferences(config.data, split)) for split in ("train", "validation"))
    num_responses = max(len(r) for _, r, _ in train + held_out)
    seq_len = config.train.seq_len
    mesh = parallel.make_mesh(config.mesh)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    train_groups = finetune.preference_groups(tokenizer, train, seq_len, num_responses)
    eval_batches = finetune.fixed_batches(finetune.preference_groups(tokenizer, held_out, seq_len, num_responses),
                                          config.train.batch_size, config.train.eval_batches, rows, ("exists",))
    pairs = int(np.asarray(ranked_pairs(train_groups["ranks"], train_groups["exists"])).sum())
    print(f"reward model: {len(train_groups['inputs']):,} ranked prompts ({pairs:,} comparisons, up to "
          f"{num_responses} responses each); {len(held_out):,} held out", flush=True)
    model = GPT(config.model)
    return Task(model=model, loss_fn=rm_loss(model), train_iter=finetune.train_iterator(train_groups, config, rows),
                eval_batches=eval_batches, tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, seq_len), language_model=False,
                eval_extra=_reward_stats,
                finalize=demonstration_bias(model, tokenizer, _bias_demonstrations(config, train), seq_len, mesh),
                summary_extras={"ranked_prompts": len(train), "comparisons": pairs})
