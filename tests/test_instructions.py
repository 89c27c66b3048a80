"""omni.data.instructions: reference answers against independent solutions, the labeler's score, candidate
sampling, noisy rankings and their calibration, and the suite files."""
import json
import os
import re

import numpy as np
import pytest

from omni.data import instructions as ins


def _right(prompt: str) -> list[str]:
    """Every right answer to a suite prompt, from an independent solver reading the prompt with plain string
    tools (open tasks have several; the rest one)."""
    low = prompt.lower()
    digits = re.findall(r"\d", prompt.split(" in ")[-1] if low.startswith(("how many", "count")) else prompt)
    if low.startswith(("repeat", "say")):
        word, times = re.search(r"'?([a-z]+)'? (\d) times", prompt).groups()
        return [" ".join([word] * int(times))]
    if low.startswith("sort"):
        return [" ".join(sorted(digits))]
    if low.startswith("reverse") or "backwards" in low:
        return [" ".join(digits[::-1])]
    if low.startswith(("how many", "count")):
        target = re.search(r"(\d)s in", prompt).group(1)
        return [str(digits.count(target))]
    if "even" in low:
        return [" ".join(d for d in digits if int(d) % 2 == 0)]
    if "twice" in low or "repeated" in low:
        return [d for d in set(digits) if digits.count(d) == 2]
    if "between" in low or "larger than" in low:
        a, b = map(int, digits)
        return [str(d) for d in range(a + 1, b)]
    assert "not in" in low or "missing" in low, prompt
    return [d for d in "0123456789" if d not in digits]


def _examples(n_per_task=60, seed=0):
    rng = np.random.default_rng(seed)
    return [ins.make_example(rng, task) for task in ins.TASKS for _ in range(n_per_task)]


def test_reference_answers_are_correct_and_short():
    examples = _examples()
    for ex in examples:
        right = _right(ex.prompt)
        assert ex.answer in right and (len(right) == 1 or ex.task in ("missing", "between")), ex
        assert len(ex.prompt) < 60 and 0 < len(ex.answer) < 25, ex
    for task in ins.TASKS:  # every phrasing of every task occurs
        prompts = {re.sub(r"[a-z]+|\d+", "_", ex.prompt.lower()) for ex in examples if ex.task == task}
        assert len(prompts) >= 2, (task, prompts)
    rng = np.random.default_rng(1)
    tasks = [ins.make_example(rng).task for _ in range(1200)]
    assert all(100 < tasks.count(t) < 200 for t in ins.TASKS)  # uniform over tasks
    with pytest.raises(ValueError):
        ins.make_example(rng, "translate")


def test_parse_prompt_round_trip_and_rejects_other_text():
    for ex in _examples(20, seed=3):
        parsed = ins.parse_prompt(ex.prompt)
        assert (parsed.prompt, parsed.task, parsed.instance) == (ex.prompt, ex.task, ex.instance)
        assert parsed.answer == ex.answer or (ex.task in ("missing", "between") and parsed.answer in _right(ex.prompt))
    for bad in ["", "hello", "Sort: ", "Sort: 12 3", "Reverse: a b c", "Say Home 3 times.", "Say home 0 times.",
                "Sort: 3 1 2 Please.", "User: Sort: 3 1 2", "How many 12s in 1 2?"]:
        with pytest.raises(ValueError):
            ins.parse_prompt(bad)


def test_labeler_full_marks_only_for_a_right_answer():
    for ex in _examples(30, seed=4):
        for right in _right(ex.prompt):
            assert ins.labeler_score(ex.prompt, right) == 1.0, (ex, right)
        for wrong in set("0123456789") - set(_right(ex.prompt)) if ex.task in ("missing", "between") else ():
            assert ins.labeler_score(ex.prompt, wrong) <= 0.35, (ex, wrong)
        assert ins.labeler_score(ex.prompt, f"  {ex.answer}\n") == 1.0
        for wrong in (ex.answer + "x", ex.answer[:-1], ex.answer.swapcase(), f"The answer is {ex.answer}",
                      f"{ex.answer} {ex.answer}", "", "?"):
            if wrong == ex.answer:  # swapcase of digits
                continue
            assert ins.labeler_score(ex.prompt, wrong) < 1.0, (ex, wrong)


@pytest.mark.parametrize("prompt,ordered", [
    # best to worst; each strictly better than the next. Right content in a wrong format beats any wrong answer.
    ("How many 3s in 3 1 3 3 5?", ["3", "three", "The answer is 3", "4", "1", "hello", ""]),
    ("Sort: 3 1 2", ["1 2 3", "1, 2, 3", "2 1 3", "2 1", "def f():", ""]),
    ("Reverse: 5 1 4 2", ["2 4 1 5", "[2, 4, 1, 5]", "2 4 5 1", "5 1 4 2", "dog", ""]),
    ("Write the even digits of 4 7 2 9 8.", ["4 2 8", "428", "4 2", "4 7 2 9 8", ""]),
    ("Which digit appears twice in 6 0 6 2?", ["6", "six", "5", "2", "x", ""]),
    ("Name a digit that is not in 0 1 2 3 4 5 6 7.", ["9", "nine", "Sure! 8", "7", "cat", ""]),
    ("Repeat 'ab' 3 times", ["ab ab ab", "ab, ab, ab", "ab ab", "ab", "zz", ""]),
])
def test_labeler_orders_obvious_cases(prompt, ordered):
    scores = [ins.labeler_score(prompt, r) for r in ordered]
    assert all(a > b for a, b in zip(scores, scores[1:])), list(zip(ordered, scores))
    assert ordered[-1] != "" or scores[-1] == 0.0


def test_labeler_accepts_any_string():
    rng = np.random.default_rng(5)
    alphabet = list("abcXYZ019 \n\t.,'\"\\\x00\u00e9\u4e2d\U0001f600\u2028")
    fuzz = ["", " ", "\x00", "\U0001f600" * 3, "9" * 5000, "a " * 3000, "68" * 40, "-1", "0" * 30, "NaN"]
    fuzz += ["".join(rng.choice(alphabet, int(rng.integers(0, 40)))) for _ in range(100)]
    for ex in _examples(3, seed=6):
        for r in fuzz:
            s = ins.labeler_score(ex.prompt, r)
            assert isinstance(s, float) and 0.0 <= s <= 1.0, (ex.prompt, r, s)
            assert s < 1.0 or r.strip() in _right(ex.prompt), (ex.prompt, r, s)


def test_sample_candidates_spread_and_mix():
    rng = np.random.default_rng(7)
    scores, with_reference, examples = [], 0, _examples(30, seed=8)
    for ex in examples:
        cands = ins.sample_candidates(ex if rng.random() < 0.5 else ex.prompt, 6, rng)
        assert len(cands) == 6 and all(isinstance(c, str) for c in cands)
        s = [ins.labeler_score(ex.prompt, c) for c in cands]
        assert max(s) - min(s) > 0.2  # a mix, not six of a kind
        with_reference += ex.answer in cands
        scores += s
    scores = np.array(scores)
    assert 0.1 < with_reference / len(examples) < 0.9
    assert (scores == 1).mean() > 0.05 and (scores < 0.1).mean() > 0.05
    assert ((scores > 0.05) & (scores < 0.9)).mean() > 0.4  # partial credit: a graded signal
    assert ((scores > 0.6) & (scores < 1)).mean() > 0.1  # right content in a wrong format, above wrong answers
    assert ((scores > 0.1) & (scores < 0.6)).mean() > 0.1  # wrong but close
    assert len(ins.sample_candidates("Sort: 3 1 2", 20, rng)) == 20  # k beyond the number of kinds


def test_noisy_ranks_ties_and_exact_order():
    prompt = "Sort: 8 6"
    responses = ["8 6", "6 8", "", "hello", "8 6", "The answer is 6 8", "", "6, 8", "6 8"]
    rng = np.random.default_rng(9)
    for noise in (0.0, ins.NOISE, 5.0):
        for _ in range(20):
            ranks = ins.noisy_ranks(prompt, responses, noise, rng)
            for i, a in enumerate(responses):
                for j, b in enumerate(responses):
                    if a == b:
                        assert ranks[i] == ranks[j]
            assert sorted(set(ranks)) == list(range(len(set(ranks))))  # dense from 0
    scores = [ins.labeler_score(prompt, r) for r in responses]
    ranks = ins.noisy_ranks(prompt, responses, 0.0, rng)
    for i in range(len(responses)):
        for j in range(len(responses)):
            assert (ranks[i] < ranks[j]) == (scores[i] > scores[j])
    assert ranks[responses.index("6 8")] == 0 and ranks[responses.index("")] == max(ranks)


def test_agreement_is_calibrated():
    assert abs(ins.agreement(ins.NOISE) - 0.73) <= 0.03
    assert ins.agreement(0.0, num_prompts=100) == 1.0
    assert abs(ins.agreement(20.0, num_prompts=300) - 0.5) < 0.06  # pure noise: a coin flip
    assert ins.agreement(0.1, num_prompts=300) > ins.agreement(0.5, num_prompts=300)


SMALL = dict(num_sft=300, num_prompts=200, num_eval=60, num_prefs=200, num_eval_prefs=50)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_suite(tmp_path, monkeypatch):
    paths = ins.write_suite(str(tmp_path / "a"), seed=0, **SMALL)
    again = ins.write_suite(str(tmp_path / "b"), seed=0, **SMALL)
    other = ins.write_suite(str(tmp_path / "c"), seed=1, **SMALL)
    names = {"sft_train.jsonl", "sft_eval.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl",
             "prefs_train.jsonl", "prefs_eval.jsonl", "suite.json"}
    assert set(paths) == names and sorted(os.listdir(tmp_path / "a")) == sorted(names)  # no temp files left
    for name in names:
        with open(paths[name], "rb") as f, open(again[name], "rb") as g, open(other[name], "rb") as h:
            data = f.read()
            assert data == g.read()
            assert name == "suite.json" or data != h.read()

    rows = {name: _read(paths[name]) for name in names - {"suite.json"}}
    counts = {"sft_train": 300, "sft_eval": 60, "prompts_train": 200, "prompts_eval": 60, "prefs_train": 200,
              "prefs_eval": 50}
    for name, n in counts.items():
        assert len(rows[f"{name}.jsonl"]) == n
    train = {r["prompt"] for n in ("sft_train", "prompts_train", "prefs_train") for r in rows[f"{n}.jsonl"]}
    held_out = {r["prompt"] for n in ("sft_eval", "prompts_eval", "prefs_eval") for r in rows[f"{n}.jsonl"]}
    assert held_out and not train & held_out
    instance = lambda prompts: {ins.parse_prompt(p).instance for p in prompts}  # noqa: E731
    assert not instance(train) & instance(held_out)  # no wording of a held-out instance is trained on
    for r in rows["sft_train.jsonl"] + rows["sft_eval.jsonl"]:
        assert r["response"] in _right(r["prompt"])
    for r in rows["prefs_train.jsonl"] + rows["prefs_eval.jsonl"]:
        responses, ranking = r["responses"], r["ranking"]
        assert 4 <= len(responses) == len(ranking) <= 6
        assert sorted(set(ranking)) == list(range(len(set(ranking))))
        for i in range(len(responses)):
            for j in range(len(responses)):
                assert (responses[i] == responses[j]) <= (ranking[i] == ranking[j])
    # the noisy labeler still mostly prefers the better response
    pairs = [(s[i] > s[j]) == (r["ranking"][i] < r["ranking"][j])
             for r in rows["prefs_train.jsonl"] for s in [[ins.labeler_score(r["prompt"], x) for x in r["responses"]]]
             for i in range(len(s)) for j in range(len(s)) if s[i] != s[j] and r["ranking"][i] != r["ranking"][j]]
    assert 0.75 < np.mean(pairs) < 0.95

    with open(paths["suite.json"], encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["seed"] == 0 and meta["noise"] == ins.NOISE and meta["tasks"] == list(ins.TASKS)
    assert meta["counts"] == counts and abs(meta["measured_agreement"] - 0.73) <= 0.03

    stamps = {n: os.stat(p).st_mtime_ns for n, p in paths.items()}
    assert ins.write_suite(str(tmp_path / "a"), seed=0, **SMALL) == paths  # idempotent: nothing rewritten
    assert {n: os.stat(p).st_mtime_ns for n, p in paths.items()} == stamps
    monkeypatch.setattr(ins, "VERSION", ins.VERSION + 1)  # a suite written by other code: rewritten
    ins.write_suite(str(tmp_path / "a"), seed=0, **SMALL)
    assert all(os.stat(p).st_mtime_ns != stamps[n] for n, p in paths.items())
    ins.write_suite(str(tmp_path / "a"), seed=0, **dict(SMALL, num_sft=10))  # other arguments: rewritten
    assert len(_read(paths["sft_train.jsonl"])) == 10
