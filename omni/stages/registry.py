"""Every stage omni runs, in one table: adding a stage is its own file and one line here.

A stage either trains (it hands the one trainer a `Task`: its model, batch, loss and metrics) or is a tool that
reads a workdir and writes one (sampling, labelling, compression, evaluation). `main`, the pipeline, the sweep,
validation and the dry run all read this table.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import ml_collections

from omni import config as config_lib
from omni import estimate as estimate_lib
from omni.stages import best_of_n, compress, dpo, evaluate, grpo, label, ppo, pretrain, reward, sample, sft


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    # Trains: task(config, workdir) -> Task, which the trainer runs. A tool: run(config, workdir) -> summary.
    start: Callable
    trains: bool
    # check(config) -> None: a training stage's own keys, run by validate before anything is built or compiled;
    # it may derive values in place (PPO's train.steps from its iterations). A tool checks its keys first thing
    # in run, which is also called on its own. Stage defaults are sections of config.base_config().
    check: Callable[[ml_collections.ConfigDict], None] | None = None
    # step(config) -> (model, loss_fn, global batch shapes): the train step a dry run compiles (omni/aot.py).
    step: Callable | None = None
    # models(config) -> {name: model config}: what a training stage trains and its checkpoints hold, the model it
    # is for first (PPO: its policy, then the value function); None: config.model alone.
    models: Callable[[ml_collections.ConfigDict], dict[str, ml_collections.ConfigDict]] | None = None
    headline: tuple[str, ...] = ()  # summary.json keys a pipeline reports for it


# What every post-training method is judged by on held-out prompts (omni/stages/evaluation.py HeldOut).
POLICY_HEADLINE = ("labeler_score", "sampled_labeler_score", "win_rate_vs_sft", "kl_to_sft", "pretrain_perplexity")

STAGES = {s.name: s for s in (
    Stage("pretrain", pretrain.task, trains=True, step=pretrain.step,
          headline=("eval_perplexity", "unigram_perplexity", "tokens_per_s")),
    Stage("sft", sft.task, trains=True, check=sft.check, step=sft.step,
          headline=("eval_loss", "labeler_score", "exact_match")),
    Stage("rm", reward.task, trains=True, check=reward.check, step=reward.step,
          headline=("heldout_pairwise_accuracy", "reward_std", "reward_bias")),
    Stage("ppo", ppo.task, trains=True, check=ppo.check, step=ppo.step, models=ppo.models,
          headline=("reward", "kl", "labeler_score", "win_rate_vs_sft", "kl_to_sft", "pretrain_perplexity")),
    Stage("dpo", dpo.task, trains=True, check=dpo.check, step=dpo.step, headline=POLICY_HEADLINE),
    Stage("grpo", grpo.task, trains=True, check=grpo.check, step=grpo.step, models=grpo.models,
          headline=("reward", "kl") + POLICY_HEADLINE),
    Stage("best_of_n", best_of_n.task, trains=True, check=best_of_n.check, step=best_of_n.step,
          headline=POLICY_HEADLINE),
    Stage("sample", sample.run, trains=False),
    Stage("label", label.run, trains=False, headline=("train_ranked_prompts", "train_sample_labeler_score")),
    Stage("compress", compress.run, trains=False),
    Stage("eval", evaluate.run, trains=False),
)}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise config_lib.ConfigError(f"config.stage={name!r}: expected one of {tuple(STAGES)}")
    return STAGES[name]


def validate(c: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """Checks a config for `num_devices` devices before anything compiles: the stage's own keys, then what
    every run shares (config.validate). Returns a copy with derived values resolved."""
    stage = get(c.stage)
    c = ml_collections.ConfigDict(c.to_dict())
    if c.model.quant in config_lib.QUANT[1:] and stage.trains:
        raise config_lib.ConfigError(
            f"config.model.quant={c.model.quant!r}: INT8 weights are for inference (sample, chat, label, "
            f"evaluation); stage {c.stage!r} trains float weights (use model.quant='none', and init_from the "
            "float model)")
    if stage.check is not None:
        stage.check(c)
    return config_lib.validate(c, num_devices)


def estimate(config: ml_collections.ConfigDict) -> dict:
    """The analytic size of a validated config's training step (omni/estimate.py): the models its stage trains,
    and the sequences one step's batch holds (a reward model's row holds label.responses of them)."""
    stage = get(config.stage)
    models = list(stage.models(config).values()) if stage.models else [config.model]
    sequences = config.train.batch_size
    if stage.step is not None:
        inputs_shape = stage.step(config)[2]["inputs"][0]
        sequences = math.prod(inputs_shape[:-1])
    return estimate_lib.estimate(config, models, sequences)
