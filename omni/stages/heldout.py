"""Held-out quality of a policy: what PPO's evaluation and the pipeline's report judge a policy by.

On held-out prompts a policy answers greedily once and samples k responses at temperature T; a labeler (the
offline suite's) scores them:
- `labeler_score`, `exact_match`: the greedy answers' mean score and share with full marks (right answers);
- `sampled_labeler_score`: the samples' mean score;
- `pass@1`, `pass@k`: the share of samples that are exact, and of prompts with at least one exact sample among
  the k (Chen et al. 2021's estimators with n = k). RL raises pass@1 toward what the policy already samples
  at pass@k (Yue et al. 2025), so the pair says how much room a policy leaves;
- `by_task`: the same per task of the suite.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


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
