"""An offline instruction-following suite whose quality a program can judge: SFT, reward model and PPO data.

Tasks (adding numbers, reversing / uppercasing / counting / repeating a word, sorting digits) are small enough
for a tiny GPT to learn in a few hundred SFT steps, and each prompt determines one reference answer.

The labeler. `labeler_score(prompt, response)` is the ground truth every stage is judged by: 1.0 for the
reference answer, graded partial credit in [0, 0.9] otherwise (right format, right length, similarity to the
reference, a close number; penalties for chatter, repetition, rambling), so that the reward is learnable.

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
from dataclasses import dataclass

import numpy as np

TASKS: tuple[str, ...] = ("add", "reverse", "sort", "count", "upper", "repeat")
NOISE: float = 0.235  # agreement(NOISE) = 0.732 (seed 0; 0.735, 0.730 at seeds 1, 2): InstructGPT's ~73%
HELD_OUT_PERCENT = 10  # prompts whose stable hash falls here are evaluation-only

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

_FIELDS = {"a": r"0|[1-9]\d?", "b": r"0|[1-9]\d?", "w": r"[a-z]{1,12}", "xs": r"\d(?: \d){1,9}", "n": r"[1-9]"}
_PHRASINGS = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "reverse": ("Reverse the word: {w}", "Spell '{w}' backwards."),
    "sort": ("Sort: {xs}", "Sort these digits: {xs}"),
    "count": ("How many letters in '{w}'?", "Count the letters in {w}."),
    "upper": ("Uppercase: {w}", "Write '{w}' in capital letters."),
    "repeat": ("Repeat '{w}' {n} times", "Say {w} {n} times."),
}
_PATTERNS = [(task, re.compile("".join(f"(?P<{p[1:-1]}>{_FIELDS[p[1:-1]]})" if p.startswith("{") else re.escape(p)
                                       for p in re.split(r"(\{\w+\})", fmt))))
             for task, fmts in _PHRASINGS.items() for fmt in fmts]
# What a well-formed answer looks like, per task: the labeler's format check.
_FORMAT = {"add": r"\d+", "count": r"\d+", "sort": r"\d(?: \d)*", "reverse": r"[a-z]+", "upper": r"[A-Z]+",
           "repeat": r"[a-z]+(?: [a-z]+)*"}
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


def _answer(task: str, f: dict[str, str]) -> str:
    if task == "add":
        return str(int(f["a"]) + int(f["b"]))
    if task == "sort":
        return " ".join(sorted(f["xs"].split()))
    return {"reverse": lambda: f["w"][::-1], "count": lambda: str(len(f["w"])), "upper": lambda: f["w"].upper(),
            "repeat": lambda: " ".join([f["w"]] * int(f["n"]))}[task]()


def make_example(rng: np.random.Generator, task: str | None = None) -> Example:
    """One prompt of `task` (uniform over TASKS if None) in a random phrasing, with its reference answer."""
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    fmts = _PHRASINGS[task]
    fmt = fmts[int(rng.integers(len(fmts)))]
    words = _SHORT if task == "repeat" else _WORDS  # short words keep repeated answers short
    digits = rng.integers(0, 10, int(rng.integers(3, 6)))
    f = {"a": str(rng.integers(100)), "b": str(rng.integers(100)), "w": words[int(rng.integers(len(words)))],
         "xs": " ".join(str(d) for d in digits), "n": str(rng.integers(2, 4))}
    return Example(fmt.format(**f), _answer(task, f), task)


@functools.lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> Example:
    """The task and reference answer of a suite prompt (any phrasing); ValueError for anything else."""
    for task, pattern in _PATTERNS:
        m = pattern.fullmatch(prompt.strip()) if isinstance(prompt, str) else None
        if m:
            return Example(prompt, _answer(task, m.groupdict()), task)
    raise ValueError(f"not an instruction-suite prompt: {prompt!r}")


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


def _normalise(task: str, s: str) -> str:
    """The content of a response with its formatting stripped: what a lenient reader would extract."""
    if task in ("add", "count"):
        digits = re.sub(r"\D", "", s)
        value = _WORD_NUM.get(" ".join(re.findall(r"[a-z]+", s.lower())))
        return digits or ("" if value is None else str(value))
    if task == "sort":
        return re.sub(r"\D", "", s)
    sep = " " if task == "repeat" else ""
    return sep.join(re.findall(r"[a-z]+", s.lower()))


@functools.lru_cache(maxsize=65536)
def labeler_score(prompt: str, response: str) -> float:
    """Ground-truth quality in [0, 1] of any `response` to a suite prompt (ValueError for another prompt):
    1.0 exactly for the reference answer (surrounding whitespace ignored), at most 0.9 for anything else."""
    ex = parse_prompt(prompt)
    ref, r = ex.answer, str(response).strip()
    if r == ref:
        return 1.0
    if not r:
        return 0.0
    norm_r, norm_ref = _normalise(ex.task, r), _normalise(ex.task, ref)
    # similarity: exact characters, or case-blind (less credit), or content with the formatting stripped
    sim = max(_lev_sim(r, ref), 0.6 * _lev_sim(r.lower(), ref.lower()), 0.75 * _lev_sim(norm_r, norm_ref))
    formatted = re.fullmatch(_FORMAT[ex.task], r) is not None
    if ex.task in ("add", "count") and norm_r and len(norm_r) <= 6:  # a close number is nearly right
        sim = max(sim, math.exp(-abs(int(norm_r) - int(ref)) / 3) * (1.0 if formatted else 0.75))
    length = 1.0 - abs(len(r) - len(ref)) / max(len(r), len(ref))
    quality = 0.2 * formatted + 0.6 * sim + 0.2 * length
    if re.search(rf"(?<![A-Za-z0-9]){re.escape(ref)}(?![A-Za-z0-9])", r):  # right answer wrapped in chatter
        quality = max(quality, 0.5 + 0.3 * len(ref) / len(r))
    toks, ref_toks = r.split(), ref.split()
    excess = (len(toks) - len(set(toks))) - (len(ref_toks) - len(set(ref_toks)))
    penalty = max(0.5, 1.0 - 0.15 * excess) if excess > 0 else 1.0
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
    pool = string.digits if s[i].isdigit() else string.ascii_uppercase if s[i].isupper() else string.ascii_lowercase
    pool = pool.replace(s[i], "")
    return s[:i] + pool[int(rng.integers(len(pool)))] + s[i + 1:]


def _corrupt(ex: Example, kind: str, rng: np.random.Generator) -> str:
    ref, task, parts = ex.answer, ex.task, ex.answer.split()
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if kind == "reference":
        return ref
    if kind == "near_miss":
        out = ref
        if task in ("add", "count") and rng.random() < 0.5:
            out = str(max(0, int(ref) + pick((-2, -1, 1, 2))))
        elif task == "sort":  # two elements swapped
            i, j = rng.choice(len(parts), 2, replace=False)
            xs = list(parts)
            xs[i], xs[j] = xs[j], xs[i]
            out = " ".join(xs)
        elif task == "reverse" and rng.random() < 0.4:
            out = ref[::-1]  # copied the input instead of reversing it
        elif task == "repeat" and rng.random() < 0.5:
            out = " ".join(parts[:1] * (len(parts) + pick((-1, 1))))  # wrong count
        if out == ref:  # one letter or digit changed
            out = " ".join([_change_char(parts[0], rng)] * len(parts)) if task == "repeat" else _change_char(ref, rng)
        return out
    if kind == "format":
        if task in ("add", "count"):
            return _num_words(int(ref))
        return pick({"sort": (", ".join(parts), "".join(parts), "[" + ", ".join(parts) + "]"),
                     "repeat": (", ".join(parts), "".join(parts), "-".join(parts)),
                     "reverse": (ref.upper(), " ".join(ref)), "upper": (ref.lower(), ref.capitalize())}[task])
    if kind == "chatter":
        return pick(_CHATTER).format(ref)
    if kind == "repeated":
        return pick((" ", "\n")).join([ref] * int(rng.integers(2, 4)))
    if kind == "truncated":
        return ref[:int(rng.integers(1, len(ref)))] if len(ref) > 1 else ""
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


def _held_out(prompt: str) -> bool:
    # md5, not hash(): the split must be the same in every process.
    return int(hashlib.md5(prompt.encode("utf-8")).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def _draw(rng: np.random.Generator, held_out: bool) -> Example:
    while True:
        ex = make_example(rng)
        if _held_out(ex.prompt) == held_out:
            return ex


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_suite(directory: str, seed: int = 0, num_sft: int = 4000, num_prompts: int = 2000, num_eval: int = 200,
                num_prefs: int = 3000, num_eval_prefs: int = 300, k_min: int = 4, k_max: int = 6,
                noise: float = NOISE) -> dict[str, str]:
    """Writes the suite's JSONL files (deterministic for a seed) and suite.json; returns name -> path.
    Evaluation prompts are disjoint from training ones (by a stable hash of the prompt string). If suite.json
    already records the same arguments, nothing is rewritten."""
    if not 2 <= k_min <= k_max:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    args = dict(seed=seed, num_sft=num_sft, num_prompts=num_prompts, num_eval=num_eval, num_prefs=num_prefs,
                num_eval_prefs=num_eval_prefs, k_min=k_min, k_max=k_max, noise=float(noise))
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

    def sft(rng, held_out):
        ex = _draw(rng, held_out)
        return {"prompt": ex.prompt, "response": ex.answer}

    def prefs(rng, held_out):
        ex = _draw(rng, held_out)
        responses = sample_candidates(ex, int(rng.integers(k_min, k_max + 1)), rng)
        ranking = noisy_ranks(ex.prompt, responses, noise, rng)
        return {"prompt": ex.prompt, "responses": responses, "ranking": ranking}

    makers = {"sft_train": (sft, False, num_sft), "sft_eval": (sft, True, num_eval),
              "prompts_train": (lambda rng, h: {"prompt": _draw(rng, h).prompt}, False, num_prompts),
              "prompts_eval": (lambda rng, h: {"prompt": _draw(rng, h).prompt}, True, num_eval),
              "prefs_train": (prefs, False, num_prefs), "prefs_eval": (prefs, True, num_eval_prefs)}
    counts = {}
    for index, name in enumerate(names):
        make, held_out, count = makers[name]
        rng = np.random.default_rng([seed, index])  # a stream per file: no file depends on another's size
        lines = [json.dumps(make(rng, held_out), ensure_ascii=False) + "\n" for _ in range(count)]
        _write_atomic(paths[f"{name}.jsonl"], "".join(lines))
        counts[name] = count
    meta = {"seed": seed, "noise": float(noise), "measured_agreement": agreement(float(noise), seed=seed),
            "counts": counts, "tasks": list(TASKS), "args": args}
    _write_atomic(paths["suite.json"], json.dumps(meta, indent=1) + "\n")  # last: marks the suite complete
    return paths
