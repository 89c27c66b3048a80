"""Held-out quality of a policy: what PPO's evaluation and the pipeline's report judge a policy by.

On held-out prompts a policy answers greedily once and samples k responses at temperature T; a labeler (the
offline suite's) scores them:
- `labeler_score`, `exact_match`: the greedy answers' mean score and share with full marks (right answers);
- `sampled_labeler_score`: the samples' mean score;
- `pass@1`, `pass@k`: the share of samples that are exact, and of prompts with at least one exact sample among
  the k (Chen et al. 2021's estimators with n = k). RL raises pass@1 toward what the policy already samples
  at pass@k (Yue et al. 2025), so the pair says how much room a policy leaves;
- `by_task`: the same per task of the suite.

And of any language model: `model_quality` (held-out perplexity on its own data, and for an instruction-tuned one
the greedy answers' exact match and labeler score), what the SFT stage's evaluations, the eval stage and the
compress stage's before/after report.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from omni import parallel
from omni.data import DataError, finetune, pipelines
from omni.data.instructions import labeler_score
from omni.data.template import encode_dialogue
from omni.generate import Generator, Sampling, stop_sequences, trim_at_stop
from omni.losses import lm_loss
from omni.models import GPT
from omni.train import trainer


def scores(prompts: Sequence[str], greedy: Sequence[str], sampled: Sequence[Sequence[str]],
           labeler: Callable[[str, str], float]) -> tuple[np.ndarray, np.ndarray]:
    """The labeler's scores of the greedy answers [prompts] and of the samples [prompts, k]."""
    return (np.array([labeler(p, a) for p, a in zip(prompts, greedy)]),
            np.array([[labeler(p, x) for x in samples] for p, samples in zip(prompts, sampled)]))


def quality(greedy_scores: np.ndarray, sample_scores: np.ndarray, tasks: Sequence[str] | None = None) -> dict:
    """The measures of the module docstring from `scores`; an answer is exact when the labeler gives it full
    marks. With each prompt's task, also `by_task`."""
    k = sample_scores.shape[1]

    def summary(sel: np.ndarray) -> dict[str, float]:
        exact = sample_scores[sel] == 1.0
        return {"prompts": int(sel.sum()), "labeler_score": float(greedy_scores[sel].mean()),
                "exact_match": float((greedy_scores[sel] == 1.0).mean()),
                "sampled_labeler_score": float(sample_scores[sel].mean()),
                "pass@1": float(exact.mean()), f"pass@{k}": float(exact.any(1).mean())}

    out = summary(np.ones(len(greedy_scores), bool))
    if tasks is not None:
        tasks = np.asarray(tasks)
        out["by_task"] = {t: summary(tasks == t) for t in sorted(set(tasks.tolist()))}
    return out


def best_of(sample_scores: np.ndarray, rewards: np.ndarray) -> float:
    """Mean labeler score of the sample the reward model prefers among each prompt's n ([prompts, n] each):
    the best-of-n baseline RL should approach."""
    return float(sample_scores[np.arange(len(sample_scores)), rewards.argmax(1)].mean())


def agreement(sample_scores: np.ndarray, rewards: np.ndarray) -> float:
    """Share of the pairs of one prompt's samples that the labeler separates ([prompts, n] each) which the reward
    model orders the same way: how well it ranks this policy's own samples."""
    true = sample_scores[:, :, None] - sample_scores[:, None, :]
    predicted = rewards[:, :, None] - rewards[:, None, :]
    pairs = true > 0
    return float((predicted[pairs] > 0).mean()) if pairs.any() else float("nan")


STOP = ("\nUser:",)


def _prompt_ids(tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """What the model answers: the dialogue up to its last user message, and the assistant's cue."""
    return encode_dialogue(tokenizer, turns[:-1], turns[-1][0])[0]


def answerable(config: ml_collections.ConfigDict, tokenizer, dialogues: Sequence[list[tuple[str, str]]],
               where: str) -> list[list[tuple[str, str]]]:
    """The first sft.eval_prompts held-out dialogues whose prompt leaves room for sft.eval_max_new_tokens within
    train.seq_len, the context the model learned, as PPO's prompts must. One warning counts those left out,
    naming `where` (their files); none left is a DataError."""
    room = config.train.seq_len - config.sft.eval_max_new_tokens
    fits = [turns for turns in dialogues if len(_prompt_ids(tokenizer, turns)) <= room]
    context = f"sft.eval_max_new_tokens={config.sft.eval_max_new_tokens} within train.seq_len={config.train.seq_len}"
    if len(fits) < len(dialogues):
        print(f"warning: {len(dialogues) - len(fits)} of {len(dialogues)} held-out prompts of {where} leave no room "
              f"for {context} and are not answered", file=sys.stderr, flush=True)
    if not fits:
        raise DataError(f"{where}: no held-out prompt leaves room for {context}")
    return fits[:config.sft.eval_prompts]


def answer_greedily(generator: Generator, tokenizer, dialogues: list[list[tuple[str, str]]], max_new: int
                    ) -> list[str]:
    """The model's greedy reply to the last user message of each dialogue (earlier turns as context)."""
    prompts = [_prompt_ids(tokenizer, turns) for turns in dialogues]
    out = generator.generate(prompts, max_new, Sampling(temperature=0.0),
                             stop=stop_sequences(tokenizer, STOP))
    return [trim_at_stop(tokenizer.decode([t for t in out.row(i) if t != tokenizer.eos_id]), STOP).strip()
            for i in range(len(prompts))]


def sample_metrics(config: ml_collections.ConfigDict, tokenizer, held_out: Sequence[list[tuple[str, str]]],
                   where: str, mesh):
    """eval_extra for the trainer: greedy answers to the `answerable` held-out prompts, scored. The prompts are
    chosen now, at start-up, so that one that cannot be answered stops nothing later."""
    dialogues = answerable(config, tokenizer, held_out, where)
    suite = config.data.name == "instructions"
    generator = None

    def metrics(params, evals: dict) -> dict:
        nonlocal generator
        if generator is None:
            generator = Generator(config.model, params, mesh, pad_id=tokenizer.pad_id)
        else:
            generator.set_params(params)
        answers = answer_greedily(generator, tokenizer, dialogues, config.sft.eval_max_new_tokens)
        if not suite:
            return {"exact_match": float(np.mean([a == turns[-1][1].strip() for a, turns in zip(answers, dialogues)]))}
        # The labeler's full marks: the reference, or any right answer of a task that has several.
        scores = np.array([labeler_score(turns[-1][0], a) for a, turns in zip(answers, dialogues)])
        return {"exact_match": float((scores == 1.0).mean()), "labeler_score": float(scores.mean())}

    return metrics


def instruction_tuned(config: ml_collections.ConfigDict) -> bool:
    return config.data.name in ("instructions", "jsonl")  # the fine-tuning stages' data


def model_quality(config: ml_collections.ConfigDict, params, tokenizer) -> dict[str, float]:
    """perplexity, loss, accuracy and (instruction-tuned) exact_match, labeler_score of the model that `config`
    (a workdir's resolved config) describes, with `params` on the default device."""
    one = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1, dcn_data=1, dcn_fsdp=1))
    mesh = parallel.make_mesh(one, jax.devices()[:1])
    extra = None
    if instruction_tuned(config):
        records = finetune.demonstrations(config.data, "validation")
        held_out = [records[i] for i in range(len(records))]
        packed = finetune.pack_demonstrations(tokenizer, held_out, config.train.seq_len, records.where)
        batches = finetune.fixed_batches(packed, config.train.batch_size, config.train.eval_batches,
                                         list(range(config.train.batch_size)))
        extra = sample_metrics(config, tokenizer, held_out, records.where, mesh)
    else:
        batches = pipelines.eval_batches(config, tokenizer)
    eval_fn = jax.jit(lambda p, batch: lm_loss(GPT(config.model))(p, batch, None)[1])
    out = trainer.evaluate(eval_fn, params, batches, mesh)
    if extra is not None:
        out.update(extra(params, out))
    return {k.removeprefix("eval_"): v for k, v in out.items()}
