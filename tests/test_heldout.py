"""omni.stages.heldout: the held-out measures against loops written out by hand over a made-up labeler."""
import itertools

import numpy as np
import pytest

from omni.stages import heldout


def _labeler(prompt: str, response: str) -> float:
    """Full marks for the prompt's upper case, 0.5 for its lower case, 0 otherwise."""
    return 1.0 if response == prompt.upper() else 0.5 if response == prompt.lower() else 0.0


def test_quality_against_loops():
    rng = np.random.default_rng(0)
    prompts = ["ab", "Cd", "ef", "GH", "ij"]
    choices = lambda p: [p.upper(), p.lower(), "zz"]  # noqa: E731
    greedy = [choices(p)[int(rng.integers(3))] for p in prompts]
    sampled = [[choices(p)[int(rng.integers(3))] for _ in range(4)] for p in prompts]
    tasks = ["upper" if p[0].isupper() else "lower" for p in prompts]
    q = heldout.quality(*heldout.scores(prompts, greedy, sampled, _labeler), tasks)

    def expected(idx):
        g = [_labeler(prompts[i], greedy[i]) for i in idx]
        s = [[_labeler(prompts[i], x) for x in sampled[i]] for i in idx]
        return {"prompts": len(idx), "labeler_score": sum(g) / len(g),
                "exact_match": sum(x == 1.0 for x in g) / len(g),
                "sampled_labeler_score": sum(map(sum, s)) / (4 * len(idx)),
                "pass@1": sum(x == 1.0 for row in s for x in row) / (4 * len(idx)),
                "pass@4": sum(any(x == 1.0 for x in row) for row in s) / len(idx)}

    by_task = q.pop("by_task")
    assert q == pytest.approx(expected(range(5)))
    assert set(by_task) == {"upper", "lower"}
    assert by_task["upper"] == pytest.approx(expected([1, 3]))
    assert by_task["lower"] == pytest.approx(expected([0, 2, 4]))


def test_best_of_and_agreement_against_loops():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, (6, 5)) / 2.0  # ties within a prompt, as a labeler gives
    rewards = rng.standard_normal((6, 5))
    assert heldout.best_of(true, rewards) == pytest.approx(
        np.mean([row[int(np.argmax(r))] for row, r in zip(true, rewards)]))
    agree = total = 0
    for row, r in zip(true, rewards):
        for i, j in itertools.permutations(range(5), 2):
            if row[i] > row[j]:  # a pair the labeler separates
                total += 1
                agree += r[i] > r[j]
    assert heldout.agreement(true, rewards) == pytest.approx(agree / total)
    assert heldout.agreement(true, true) == 1.0 and heldout.agreement(true, -true) == 0.0
    assert np.isnan(heldout.agreement(np.ones((2, 3)), rewards[:2, :3]))  # nothing to order
