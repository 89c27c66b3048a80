"""An offline instruction-following suite whose quality a program can judge: SFT, reward model and RL data.

Eight tasks over short digit lists and words: sort the digits, reverse them, count one digit, list the even
ones, name a digit that is missing, find the repeated one, name a digit between two bounds, and repeat a word.
Every answer is built token by token from the prompt by a rule (digits are single tokens of omni's tokenizer,
and a repeated word is copied whole, never spelled), so a small model can learn each task as a skill that
carries over to prompts it never saw. Two tasks are open ('missing', 'between'): any right digit earns full
marks, and demonstrations name a random right one, as people would.

The labeler. `labeler_score(prompt, response)` is the ground truth every stage is judged by: 1.0 for the
reference answer only (any right digit of an open task); otherwise graded credit below 0.9, mostly for the content (the right number, the
right digits in the right order, with formatting stripped), less for the format and the length, with
penalties for chatter-like repetition and rambling. Correctness ranks above format: the right answer in a
wrong format scores above a well-formatted wrong one.

Held-out prompts are chosen by a stable hash of the task instance (the task and the values in the prompt),
not of its wording: no stage trains on any phrasing of a held-out instance.

Noise. A human labeler (InstructGPT-style K-way ranking) perceives `labeler_score + Normal(0, noise)` per
distinct response and ranks by that. NOISE is calibrated by simulation (`agreement`) so that two independent
labelers order ~73% of untied pairs the same way, as InstructGPT's labelers agreed with each other.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import string
import dataclasses
from dataclasses import dataclass

import numpy as np

from omni.files import write_atomic

NOISE: float = 0.32  # agreement(NOISE) = 0.732 (seed 0; 0.731, 0.740 at seeds 1, 2): InstructGPT's ~73%
HELD_OUT_PERCENT = 10  # task instances whose stable hash falls here are evaluation-only
VERSION = 2  # of the tasks, answers and candidates: a suite written by another version is rewritten

_WORDS = tuple(dict.fromkeys(w for w in """
the and for are but not you all any can had her was one our out day get has him his how man new now old see
two way who boy did its let put say she too use act add age ago air arm art ask bad bag bed big bit box bus
buy car cat cow cry cup cut dad dog dry ear eat egg end eye far fat few fix fly fun gas hat hit hot ice job
joy key kid lay leg lie lot low map mix mom net odd oil pay pen pet pig pin pop pot raw red row run sea set
sit six sky son sun tax tea ten tie tip toe top toy try van wet win yes yet zoo able acid also area away
baby back ball band bank base bath bear beat bell belt best bike bird blow blue boat body bone book born
both bowl busy cake call calm camp card care case cash cell chip city club coal coat code cold come cook
cool copy core corn cost crew crop dark data date deal dear deep desk disk door down draw drop duck dust
duty each earn east easy edge else even ever face fact fair fall farm fast feel file fill film find fine
fire firm fish five flag flat flow food foot form four free frog fuel full game gate gift girl give glad
goal gold golf good gray grow hair half hall hand hard head hear heat help here hero high hill hold hole
home hope horn host hour huge idea inch iron item join jump just keep kind king knee know lady lake lamp
land last late lead leaf left less life lift like line link lion list live load lock long look loud love
luck mail main make many mark meal milk mind miss mode moon more most move much name near neck need news
next nice nine node none nose note once only open over page pair park part pass past path peak pick pink
pipe plan play plot plus poem pole pool port post pull pure push race rain rank rate read real rest rice
rich ride ring rise road rock role roof room root rope rose rule safe sail salt same sand save seat seed
self sell send ship shoe shop show sign sing site size skin slow snow soft soil song soon sort soup star
stay step stop suit sure swim tail take talk tall tape task team tell tent term test text than that then
they thin this tiny tone tool tour town tree trip true tube tune turn type unit upon used user vast very
view vote wait wake walk wall want warm wash wave wear week well west what when wide wild wind wing wire
wise wish with wolf wood word work yard year zero about above actor adult after again agent agree ahead
album alive allow alone along apple apply arena array aside audio award aware basic beach begin below bench
black blade block board bread break brick brief bring broad brown brush build bunch cabin cable candy carry
catch chain chair chart cheap check chest chief child claim class clean clear climb clock close cloud coach
coast count cover cream cross crowd dance depth doubt dozen draft drama dream dress drink drive eager early
earth eight empty enjoy enter entry equal error event every exact extra field fifth final first flame floor
fluid focus frame fresh front fruit funny giant given glass globe grace grade grain grand grass great green
group guard guess guest guide happy heart heavy horse hotel house human ideal image index inner input issue
joint judge juice label large laser later laugh layer learn leave level light limit local logic lucky lunch
magic major maker match medal metal minor model money month motor mouse movie music never night noise north
novel ocean offer often olive order other owner paint panel paper party peace phase phone photo piano piece
pilot place plain plane plant plate point power press price prime print prize proof queen quick quiet radio
range rapid ratio reach ready river robot round route salad scale scene score sense serve seven shade shape
share sharp sheep sheet shelf shell shift shirt short sight skill sleep slice small smart smile solid solve
sound south space speak speed spend split sport stage stand start state steam steel stick still stock stone
store storm story sugar table taste teach thank theme thick thing think third three tiger title today topic
total touch tower track trade train treat trend trial truck trust truth twice uncle under union until upper
usual valid value video visit voice watch water wheel where which while white whole world write young
action animal answer artist autumn basket beauty before better bottle bottom branch bridge bright bucket
button camera candle carpet castle center change cheese circle coffee corner cotton cousin dinner doctor
dollar double dragon drawer driver energy engine enough family farmer father finger flower forest friend
future garden ginger golden ground guitar hammer honest island jacket jungle kitten ladder leader letter
listen little lovely market memory middle minute mirror moment monkey mother nature number object office
orange parent pencil people pepper planet pocket potato purple rabbit reason record rocket school second
silver simple singer sister spring square street summer system tomato travel turtle valley window winter
wonder yellow""".split() if 3 <= len(w) <= 6))
_SHORT = ("go", "up", "hi", "no", "on", "so", "we", "me", "at", "it") + tuple(w for w in _WORDS if len(w) <= 4)

# Sizes of each task's inputs (lists of digits, repeat counts): the suite's difficulty.
_DIGITS = {"sort": (3, 6), "reverse": (3, 6), "count": (4, 8), "even": (4, 7), "missing": (5, 8), "twice": (3, 6)}
_TIMES = (2, 3)
_FIELDS = {"w": r"[a-z]{1,12}", "xs": r"\d(?: \d){1,9}", "d": r"\d", "a": r"\d", "b": r"\d", "n": r"[1-9]"}
_PHRASINGS = {
    "sort": ("Sort: {xs}", "Sort these digits: {xs}"),
    "reverse": ("Reverse: {xs}", "Write {xs} backwards."),
    "count": ("How many {d}s in {xs}?", "Count the {d}s in {xs}."),
    "even": ("Write the even digits of {xs}.", "Which digits of {xs} are even?"),
    "missing": ("Name a digit that is not in {xs}.", "Which digit is missing from {xs}?"),
    "twice": ("Which digit appears twice in {xs}?", "Find the repeated digit: {xs}"),
    "between": ("Name a digit between {a} and {b}.", "Give a digit larger than {a} and smaller than {b}."),
    "repeat": ("Repeat '{w}' {n} times", "Say {w} {n} times."),
}
_PATTERNS = [(task, re.compile("".join(f"(?P<{p[1:-1]}>{_FIELDS[p[1:-1]]})" if p.startswith("{") else re.escape(p)
                                       for p in re.split(r"(\{\w+\})", fmt))))
             for task, fmts in _PHRASINGS.items() for fmt in fmts]
TASKS: tuple[str, ...] = tuple(_PHRASINGS)
# What a well-formed answer looks like, per task: the labeler's format check.
_LIST = r"\d(?: \d)*"
_FORMAT = {"count": r"\d", "missing": r"\d", "twice": r"\d", "between": r"\d", "sort": _LIST, "reverse": _LIST,
           "even": _LIST, "repeat": r"[a-z]+(?: [a-z]+)*"}
_NUMERIC = ("count", "missing", "twice", "between")
_OPEN = ("missing", "between")  # any of several digits is right
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _num_words(n: int) -> str:
    if n >= 100:
        return "one hundred" + (f" {_num_words(n - 100)}" if n > 100 else "")
    return _ONES[n] if n < 20 else _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")


_WORD_NUM = {_num_words(n).replace("-", " "): n for n in range(200)}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    task: str
    instance: str  # the task and its values, whatever the wording: what the held-out split hashes


def _right_digits(task: str, f: dict[str, str]) -> list[str]:
    """The digits that answer an open task (any one is right)."""
    if task == "missing":
        return [d for d in "0123456789" if d not in f["xs"].split()]
    return [str(d) for d in range(int(f["a"]) + 1, int(f["b"]))]


def _answer(task: str, f: dict[str, str]) -> str:
    """The reference answer (for an open task, the smallest right digit)."""
    digits = f.get("xs", "").split()
    if task in _OPEN:
        return _right_digits(task, f)[0]
    if task == "sort":
        return " ".join(sorted(digits))
    if task == "reverse":
        return " ".join(reversed(digits))
    if task == "count":
        return str(digits.count(f["d"]))
    if task == "even":
        return " ".join(d for d in digits if int(d) % 2 == 0)
    if task == "twice":
        return next(d for d in digits if digits.count(d) == 2)
    return " ".join([f["w"]] * int(f["n"]))


def _example(task: str, prompt: str, f: dict[str, str]) -> Example:
    values = {k: v for k, v in sorted(f.items()) if v is not None}
    return Example(prompt, _answer(task, f), task, f"{task}:{json.dumps(values, sort_keys=True)}")


def _digits(rng: np.random.Generator, size: int, distinct: bool = False) -> list[int]:
    return [int(d) for d in (rng.permutation(10)[:size] if distinct else rng.integers(0, 10, size))]


def _fields(task: str, rng: np.random.Generator) -> dict[str, str]:
    """Random values of a task's prompt. Only valid instances: a list with an even digit, a missing digit, one
    repeated digit, a gap between the bounds."""
    if task == "repeat":
        return {"w": _SHORT[int(rng.integers(len(_SHORT)))], "n": str(rng.integers(_TIMES[0], _TIMES[1] + 1))}
    if task == "between":
        a = int(rng.integers(0, 8))
        return {"a": str(a), "b": str(rng.integers(a + 2, 10))}
    size = int(rng.integers(_DIGITS[task][0], _DIGITS[task][1] + 1))
    if task == "count":  # the asked digit is planted 0..4 times among others, so every count is common
        d = int(rng.integers(10))
        planted = min(int(rng.integers(0, 5)), size)
        others = [x for x in range(10) if x != d]
        xs = [d] * planted + [others[int(i)] for i in rng.integers(0, 9, size - planted)]
        return {"d": str(d), "xs": " ".join(str(x) for x in rng.permutation(xs))}
    if task == "missing":
        xs = _digits(rng, size, distinct=True)
    elif task == "twice":
        xs = _digits(rng, size, distinct=True)
        xs = [int(x) for x in rng.permutation(xs + [xs[int(rng.integers(size))]])]
    else:
        xs = _digits(rng, size)
        while task == "even" and all(x % 2 for x in xs):
            xs = _digits(rng, size)
    return {"xs": " ".join(str(x) for x in xs)}


def make_example(rng: np.random.Generator, task: str | None = None) -> Example:
    """One prompt of `task` (uniform over TASKS if None) in a random phrasing, with its reference answer."""
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    fmts = _PHRASINGS[task]
    fmt = fmts[int(rng.integers(len(fmts)))]
    f = _fields(task, rng)
    ex = _example(task, fmt.format(**f), f)
    if task in _OPEN:  # a demonstration names any right digit, as a person would
        right = _right_digits(task, f)
        ex = dataclasses.replace(ex, answer=right[int(rng.integers(len(right)))])
    return ex


@functools.lru_cache(maxsize=65536)
def _match(prompt: str) -> tuple[str, dict[str, str]]:
    """(task, the prompt's values) of a suite prompt in any phrasing; ValueError for anything else."""
    for task, pattern in _PATTERNS:
        m = pattern.fullmatch(prompt.strip()) if isinstance(prompt, str) else None
        if m:
            return task, m.groupdict()
    raise ValueError(f"not an instruction-suite prompt: {prompt!r}")


def parse_prompt(prompt: str) -> Example:
    """The task and reference answer of a suite prompt (any phrasing); ValueError for anything else."""
    task, f = _match(prompt)
    return _example(task, prompt, f)


@functools.lru_cache(maxsize=65536)
def _lev_sim(a: str, b: str) -> float:
    """1 - normalised Levenshtein distance, in [0, 1]."""
    a = a[:64]  # answers are < 25 characters: longer responses score ~0 here anyway, and this bounds the cost
    if not a or not b:
        return float(a == b)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            x, y, z = prev[j - 1] + (ca != cb), prev[j] + 1, cur[-1] + 1
            cur.append(x if x < y and x < z else y if y < z else z)
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def _number(s: str) -> int | None:
    """The number a response states, in digits or in words; None if none (or too long to be meant)."""
    digits = re.sub(r"\D", "", s)
    if digits:
        return int(digits) if len(digits) <= 6 else None
    return _WORD_NUM.get(" ".join(re.findall(r"[a-z]+", s.lower())))


def _content(task: str, r: str, ref: str) -> float:
    """How close the content of a response is to the reference's, in [0, 1], with its formatting stripped: 1
    for the right number (any notation), the right digits in order, or the right words."""
    if task in _NUMERIC:
        value = _number(r)
        return 0.0 if value is None else math.exp(-abs(value - int(ref)) / 3)
    if task in ("sort", "reverse", "even"):
        return _lev_sim(re.sub(r"\D", "", r), re.sub(r"\D", "", ref))
    return _lev_sim(" ".join(re.findall(r"[a-z]+", r.lower())), ref)


@functools.lru_cache(maxsize=65536)
def labeler_score(prompt: str, response: str) -> float:
    """Ground-truth quality in [0, 1] of any `response` to a suite prompt (ValueError for another prompt):
    1.0 exactly for the reference answer (surrounding whitespace ignored), at most 0.9 for anything else.
    Being right dominates: the right content in a wrong format ("three", "The answer is 3") scores about 0.77,
    a wrong answer in the right format at most about 0.35, however close."""
    ex = parse_prompt(prompt)
    ref, r = ex.answer, str(response).strip()
    if ex.task in _OPEN:  # any right digit is the answer: judge the stated one against the nearest right one
        right = _right_digits(*_match(prompt))
        stated = _number(r)
        ref = r if r in right else str(stated) if stated is not None and str(stated) in right else ref
    if r == ref:
        return 1.0
    if not r:
        return 0.0
    # an open task's content is right or wrong: no wrong digit is closer to right than another
    content = float(str(_number(r)) == ref) if ex.task in _OPEN else _content(ex.task, r, ref)
    formatted = re.fullmatch(_FORMAT[ex.task], r) is not None
    length = 1.0 - abs(len(r) - len(ref)) / max(len(r), len(ref))
    quality = 0.6 * (content == 1.0) + 0.25 * content + 0.075 * formatted + 0.075 * length
    toks, ref_toks = r.split(), ref.split()
    excess = (len(toks) - len(set(toks))) - (len(ref_toks) - len(set(ref_toks)))
    penalty = max(0.5, 1.0 - 0.15 * excess) if excess > 0 and ex.task != "repeat" else 1.0
    if len(r) > 3 * len(ref) + 15:  # rambling
        penalty *= 0.6
    return float(min(0.9, max(0.0, 0.9 * quality * penalty)))  # < 1: only the reference earns full marks


_KINDS = ("reference", "near_miss", "format", "chatter", "repeated", "truncated", "empty", "garbage")
_KIND_P = np.array([0.15, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.1])
_CHATTER = ("The answer is {}", "Sure! {}", "{}. Hope this helps!", "Answer: {}", "I think it is {}.")
_CODE = ("def __init__(self):", "import os", "return None", "self.x = x", "# TODO", "if __name__ ==")
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-_()#:=\u00e9\u4e2d"


def _change_char(s: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(len(s)))
    while s[i] == " ":
        i = int(rng.integers(len(s)))
    pool = string.digits if s[i].isdigit() else string.ascii_uppercase if s[i].isupper() else string.ascii_lowercase
    pool = pool.replace(s[i], "")
    return s[:i] + pool[int(rng.integers(len(pool)))] + s[i + 1:]


def _near_miss(ex: Example, rng: np.random.Generator, pick) -> str:
    """A plausible wrong answer: the kind of mistake a policy learning the task makes."""
    ref, task, parts = ex.answer, ex.task, ex.answer.split()
    out = ref
    if task in _OPEN:  # a digit that is not right: one of the list's, or outside the bounds
        _, f = _match(ex.prompt)
        right = _right_digits(task, f)
        return pick([d for d in "0123456789" if d not in right])
    if task in _NUMERIC and rng.random() < 0.7:
        out = str(max(0, int(ref) + pick((-2, -1, 1, 2))))
    elif task in ("sort", "reverse", "even") and len(set(parts)) > 1 and rng.random() < 0.6:
        xs = list(parts)
        while xs == parts:  # two elements swapped
            i, j = rng.choice(len(parts), 2, replace=False)
            xs[i], xs[j] = xs[j], xs[i]
        out = " ".join(xs)
    elif task in ("reverse", "even") and rng.random() < 0.5:
        out = _match(ex.prompt)[1]["xs"]  # copied the input instead of transforming it
    elif task == "repeat" and rng.random() < 0.5:
        out = " ".join(parts[:1] * (len(parts) + pick((-1, 1))))  # wrong count
    if out == ref:  # one letter or digit changed
        out = " ".join([_change_char(parts[0], rng)] * len(parts)) if task == "repeat" else _change_char(ref, rng)
    return out


def _corrupt(ex: Example, kind: str, rng: np.random.Generator) -> str:
    ref, task, parts = ex.answer, ex.task, ex.answer.split()
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if kind == "reference":
        return ref
    if kind == "near_miss":
        return _near_miss(ex, rng, pick)
    if kind == "format":
        if task in _NUMERIC:
            return _num_words(int(ref))
        return pick((", ".join(parts), "".join(parts), "-".join(parts) if task == "repeat"
                     else "[" + ", ".join(parts) + "]"))
    if kind == "chatter":
        return pick(_CHATTER).format(ref)
    if kind == "repeated":
        return pick((" ", "\n")).join([ref] * int(rng.integers(2, 4)))
    if kind == "truncated":
        return ref[:int(rng.integers(1, len(ref)))].strip() if len(ref) > 1 else ""
    if kind == "empty":
        return pick(("", " ", "\n"))
    mode = int(rng.integers(3))  # garbage: random characters, unrelated words or code the base model has seen
    if mode == 0:
        return "".join(pick(_ALPHABET) for _ in range(int(rng.integers(1, 21))))
    if mode == 1:
        return " ".join(pick(_WORDS) for _ in range(int(rng.integers(1, 5))))
    return pick(_CODE)


def sample_candidates(example_or_prompt: Example | str, k: int, rng: np.random.Generator) -> list[str]:
    """k synthetic policy samples of widely spread quality: the reference, near misses, format errors,
    chatter, repetition, truncation, empty and garbage. Kinds are drawn without replacement while k allows,
    so a set is a mix."""
    ex = example_or_prompt if isinstance(example_or_prompt, Example) else parse_prompt(example_or_prompt)
    kinds = rng.choice(len(_KINDS), size=k, replace=k > len(_KINDS), p=_KIND_P)
    return [_corrupt(ex, _KINDS[i], rng) for i in kinds]


def noisy_ranks(prompt: str, responses: list[str], noise: float, rng: np.random.Generator) -> list[int]:
    """One labeler's ranking: rank of responses[i], 0 = best, dense; identical strings tie (one perception)."""
    unique = list(dict.fromkeys(responses))
    perceived = np.array([labeler_score(prompt, r) for r in unique]) + noise * rng.standard_normal(len(unique))
    order = {v: d for d, v in enumerate(sorted(set(perceived.tolist()), reverse=True))}  # dense: ties share
    rank = {r: order[v] for r, v in zip(unique, perceived.tolist())}
    return [rank[r] for r in responses]


def agreement(noise: float, num_prompts: int = 2000, k: int = 4, seed: int = 0) -> float:
    """Fraction of pairs untied by both of two independent labelers that they order the same way, simulated
    on `num_prompts` suite prompts with k sample_candidates each."""
    return _agreement(float(noise), int(num_prompts), int(k), int(seed))


@functools.lru_cache(maxsize=64)  # positional and normalised, so that equal arguments share an entry
def _agreement(noise: float, num_prompts: int, k: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    agree = total = 0
    for _ in range(num_prompts):
        ex = make_example(rng)
        responses = sample_candidates(ex, k, rng)
        r1, r2 = (noisy_ranks(ex.prompt, responses, noise, rng) for _ in range(2))
        for i in range(k):
            for j in range(i + 1, k):
                if r1[i] != r1[j] and r2[i] != r2[j]:
                    total += 1
                    agree += (r1[i] < r1[j]) == (r2[i] < r2[j])
    return agree / total if total else 1.0


def held_out(example: Example) -> bool:
    """Whether an instance is evaluation-only, in every wording (md5, not hash(): the same in every process)."""
    return int(hashlib.md5(example.instance.encode("utf-8")).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def _draw(rng: np.random.Generator, want_held_out: bool) -> Example:
    while True:
        ex = make_example(rng)
        if held_out(ex) == want_held_out:
            return ex


def write_suite(directory: str, seed: int = 0, num_sft: int = 2400, num_prompts: int = 8000, num_eval: int = 200,
                num_prefs: int = 3000, num_eval_prefs: int = 300, k_min: int = 4, k_max: int = 6,
                noise: float = NOISE) -> dict[str, str]:
    """Writes the suite's JSONL files (deterministic for a seed) and suite.json; returns name -> path.
    Evaluation prompts are disjoint from training ones (`held_out`: no training prompt states a held-out
    instance). If suite.json already records the same arguments and VERSION, nothing is rewritten."""
    if not 2 <= k_min <= k_max:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    args = dict(version=VERSION, seed=seed, num_sft=num_sft, num_prompts=num_prompts, num_eval=num_eval,
                num_prefs=num_prefs, num_eval_prefs=num_eval_prefs, k_min=k_min, k_max=k_max, noise=float(noise))
    names = ("sft_train", "sft_eval", "prompts_train", "prompts_eval", "prefs_train", "prefs_eval")
    paths = {f"{n}.jsonl": os.path.join(directory, f"{n}.jsonl") for n in names}
    paths["suite.json"] = os.path.join(directory, "suite.json")
    try:
        with open(paths["suite.json"], encoding="utf-8") as f:
            if json.load(f).get("args") == args and all(os.path.exists(p) for p in paths.values()):
                return paths
    except (OSError, ValueError):
        pass
    os.makedirs(directory, exist_ok=True)

    def sft(rng, evaluation):
        ex = _draw(rng, evaluation)
        return {"prompt": ex.prompt, "response": ex.answer}

    def prefs(rng, evaluation):
        ex = _draw(rng, evaluation)
        responses = sample_candidates(ex, int(rng.integers(k_min, k_max + 1)), rng)
        ranking = noisy_ranks(ex.prompt, responses, noise, rng)
        return {"prompt": ex.prompt, "responses": responses, "ranking": ranking}

    makers = {"sft_train": (sft, False, num_sft), "sft_eval": (sft, True, num_eval),
              "prompts_train": (lambda rng, h: {"prompt": _draw(rng, h).prompt}, False, num_prompts),
              "prompts_eval": (lambda rng, h: {"prompt": _draw(rng, h).prompt}, True, num_eval),
              "prefs_train": (prefs, False, num_prefs), "prefs_eval": (prefs, True, num_eval_prefs)}
    counts = {}
    for index, name in enumerate(names):
        make, evaluation, count = makers[name]
        rng = np.random.default_rng([seed, index])  # a stream per file: no file depends on another's size
        lines = [json.dumps(make(rng, evaluation), ensure_ascii=False) + "\n" for _ in range(count)]
        write_atomic(paths[f"{name}.jsonl"], "".join(lines).encode())
        counts[name] = count
    meta = {"seed": seed, "noise": float(noise), "measured_agreement": agreement(float(noise), seed=seed),
            "counts": counts, "tasks": list(TASKS), "args": args}
    write_atomic(paths["suite.json"], (json.dumps(meta, indent=1) + "\n").encode())  # last: marks the suite complete
    return paths
