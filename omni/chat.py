"""A chat loop over any workdir's model, in a terminal or from a pipe:

    python -m omni.chat --workdir=runs/tiny [--temperature=0.7 --top_p=0.9 --max_new_tokens=128 --seed=0]
    printf 'hello\\nwhat is a list?\\n' | python -m omni.chat --workdir=runs/tiny

Each input line is one user message (`/reset` forgets the dialogue, `/quit` or the end of the input ends it);
each message gets one line "Assistant: ..." on stdout, a reply's line breaks shown as `\\n` (and a backslash as
`\\\\`, so the line reads back exactly). Input is UTF-8: a line that is not is skipped with a notice on stderr and
the dialogue goes on. The whole dialogue is the model's context: when it would not leave room for the reply,
the oldest turns are dropped (said on stderr), and a message that cannot fit even alone is refused with a
notice and a fixed answer, never a crash.

The chat template is omni/data/template.py, the one supervised fine-tuning, the reward model and PPO use.
Replies are post-processed (cut at a stop sequence, repeated lines and looping phrases removed) and a
safety filter checks both the message and the reply: a blocklist of phrases (--blocklist=FILE, one per line,
or the built-in one; they match in any case and spacing, and with plural words) and an optional classifier
hook (--classifier=module:function, True or a score above 0.5 = unsafe); either one refuses with a fixed answer.
"""
from __future__ import annotations

import importlib
import itertools
import os
import re
import sys
from typing import Callable, Iterator, Sequence

from absl import app, flags, logging

from omni.data.template import ASSISTANT, encode_dialogue
from omni.generate import GenerationError, Sampling, stop_sequences, trim_at_stop
from omni.train.checkpoint import CheckpointError
from omni.workdir import Workdir

STOP_STRINGS = ("\nUser:",)  # a model that was never taught to emit EOS would go on to write the user's turn
REFUSAL = "Sorry, I can't help with that."
TOO_LONG = "Sorry, your message is too long for me; please shorten it."

# The built-in blocklist: requests for serious harm (SafetyFilter says how a phrase matches).
DEFAULT_BLOCKLIST = (
    "build a bomb", "make a bomb", "make explosives", "make a pipe bomb", "synthesize nerve agent",
    "make nerve gas", "make ricin", "weaponize anthrax", "buy a gun illegally", "make meth",
    "child sexual", "kill myself", "how to kill someone", "steal credit card", "write ransomware",
)


# ---------------------------------------------------------------------------------------------------------
# History

def fit_history(tokenizer, turns: list[tuple[str, str]], message: str, budget: int
                ) -> tuple[list[int], int] | None:
    """(prompt ids, number of oldest turns dropped) such that the prompt has at most `budget` tokens, or None
    when the message alone does not fit."""
    for dropped in range(len(turns) + 1):
        ids, _ = encode_dialogue(tokenizer, turns[dropped:], message)
        if len(ids) <= budget:
            return ids, dropped
    return None


# ---------------------------------------------------------------------------------------------------------
# Post-processing and safety

def postprocess(text: str, stop: Sequence[str] = STOP_STRINGS, ngram: int = 4, max_repeats: int = 2) -> str:
    """Cuts at the first stop string, drops a line identical to the one before it, and ends the text before
    any phrase of `ngram` words comes back more than `max_repeats` times (small models loop)."""
    text = "\n".join(_kept_lines(trim_at_stop(text, stop)))
    seen: dict[tuple[str, ...], int] = {}
    words = list(re.finditer(r"\S+", text))
    for i in range(len(words) - ngram + 1):
        key = tuple(w.group() for w in words[i:i + ngram])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > max_repeats:
            text = text[: words[i].start()]
            break
    return text.strip()


def _kept_lines(text: str) -> list[str]:
    """The lines of `text` less each one identical to the line kept before it (blank lines are all kept)."""
    lines: list[str] = []
    for line in text.split("\n"):
        if not lines or line.strip() == "" or line != lines[-1]:
            lines.append(line)
    return lines


def settled_reply(raw: str, safety: "SafetyFilter", ngram: int = 4) -> str:
    """The start of a reply still being generated (its text so far, `raw`) that no continuation changes: what a
    stream may send now (its post-processed text, less its last words where a loop of `ngram` words or a blocked
    phrase may still complete, and less a last line that may yet repeat the one before it). Nothing while the
    held text has a blocked phrase in it (the reply will be withheld: none of the phrase is ever sent), and
    nothing until the end where a classifier judges the whole reply."""
    if safety.judges_whole:
        return ""
    reply = postprocess(raw, ngram=ngram)
    words = [m.start() for m in re.finditer(r"\S+", reply)]
    hold = max(ngram, safety.phrase_words)  # the last word may be unfinished
    end = words[-hold] if len(words) >= hold else 0
    lines = _kept_lines(trim_at_stop(raw, STOP_STRINGS))
    if len(lines) > 1 and lines[-2].startswith(lines[-1]):  # the line so far may yet be dropped as a repeat
        end = min(end, reply.rfind("\n") + 1)
    if safety.reason(reply[:words[-1]] if words else ""):
        return ""
    return reply[:end].rstrip()


def _phrase_pattern(phrase: str) -> str:
    """A blocklist phrase as a regex: its words in any spacing (spaces, tabs, newlines), each also with a plural
    "s" or "es", and the whole never part of a longer word ("make a bomb" matches "Make  a\\tBOMBS", not
    "make a bombastic")."""
    words = (re.escape(word) + "(?:e?s)?" for word in phrase.split())
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


class SafetyFilter:
    """Blocklist phrases (any case, spacing and plural, whole words) and an optional classifier(text) -> bool or
    score."""

    def __init__(self, blocklist: Sequence[str] = DEFAULT_BLOCKLIST,
                 classifier: Callable[[str], object] | None = None):
        patterns = [_phrase_pattern(p) for p in blocklist if p.strip()]
        self._pattern = re.compile("|".join(patterns), re.IGNORECASE) if patterns else None
        self._classifier = classifier
        self.phrase_words = max((len(p.split()) for p in blocklist), default=0)  # the longest phrase's
        self.judges_whole = classifier is not None  # a classifier sees only a whole reply

    def reason(self, text: str) -> str | None:
        """Why `text` is unsafe, or None when it is not."""
        if self._pattern is not None and (hit := self._pattern.search(text)):
            return f"blocklisted phrase {hit.group(0)!r}"
        if self._classifier is not None:
            verdict = self._classifier(text)
            if verdict is True or (not isinstance(verdict, bool) and float(verdict) > 0.5):
                return f"classifier {getattr(self._classifier, '__name__', 'hook')} flagged it"
        return None

    @classmethod
    def from_flags(cls, blocklist: str, classifier: str) -> "SafetyFilter":
        """blocklist: '' (the built-in list), 'none', or a file with one phrase per line ('#' comments);
        classifier: '' or 'module:function'."""
        phrases: Sequence[str] = DEFAULT_BLOCKLIST
        if blocklist == "none":
            phrases = ()
        elif blocklist:
            try:
                with open(blocklist) as f:
                    phrases = [line for line in f.read().splitlines() if not line.lstrip().startswith("#")]
            except OSError as e:
                raise ValueError(f"--blocklist={blocklist}: cannot read it ({e.strerror})") from e
        hook = None
        if classifier:
            module, _, name = classifier.partition(":")
            try:
                hook = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"--classifier={classifier}: cannot load it, expected module:function "
                                 f"({type(e).__name__}: {e})") from e
        return cls(phrases, hook)


# ---------------------------------------------------------------------------------------------------------
# The loop

class Chat:
    """A dialogue with one model: `reply(message)` returns the assistant's (filtered, post-processed) answer,
    or a fixed one for a message it refuses (REFUSAL, TOO_LONG), and keeps an answered exchange in the history."""

    def __init__(self, generator, tokenizer, sampling, max_new_tokens: int = 128,
                 safety: SafetyFilter | None = None, seed: int = 0, notice: Callable[[str], None] = print):
        self.generator, self.tokenizer, self.sampling = generator, tokenizer, sampling
        context = generator.config.max_len
        # Half the context at most for the reply, so some dialogue always fits.
        self.max_new_tokens = max(1, min(max_new_tokens, context // 2))
        self.budget = context - self.max_new_tokens
        self.safety = safety or SafetyFilter()
        self.seed, self.turns, self.notice = seed, [], notice

    def reset(self) -> None:
        self.turns = []

    def reply(self, message: str) -> str:
        if reason := self.safety.reason(message):
            self.notice(f"(message refused: {reason})")
            return REFUSAL
        fitted = fit_history(self.tokenizer, self.turns, message, self.budget)
        if fitted is None:
            alone = len(encode_dialogue(self.tokenizer, [], message)[0])
            self.notice(f"(message not sent: it is {alone} tokens with the template, and the model's "
                        f"{self.generator.config.max_len}-token context keeps {self.max_new_tokens} for the "
                        f"reply, leaving {self.budget}; please shorten it)")
            return TOO_LONG
        ids, dropped = fitted
        if dropped:
            self.notice(f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the context)")
            self.turns = self.turns[dropped:]
        out = self.generator.generate([ids], self.max_new_tokens, self.sampling,
                                      stop=stop_sequences(self.tokenizer, STOP_STRINGS),
                                      seed=self.seed + len(self.turns))
        text = postprocess(self.tokenizer.decode([t for t in out.row(0) if t != self.tokenizer.eos_id]))
        if reason := self.safety.reason(text):
            self.notice(f"(reply withheld: {reason})")
            text = REFUSAL
        self.turns.append((message, text))
        return text


def _define_flags() -> None:
    """Only when run as a program: importing omni.chat (tests, SFT) must not claim absl flag names such as
    --workdir, which omni.main defines too."""
    flags.DEFINE_string("workdir", None, "Workdir of a trained model (any stage, or an imported HF model).")
    flags.DEFINE_integer("max_new_tokens", 128, "Longest reply, in tokens (at most half the context).")
    flags.DEFINE_float("temperature", 0.7, "0: greedy.")
    flags.DEFINE_integer("top_k", 0, "0: off.")
    flags.DEFINE_float("top_p", 0.9, "1: off.")
    flags.DEFINE_float("repetition_penalty", 1.1, "1: off.")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same dialogue and seed give the same replies.")
    flags.DEFINE_string("blocklist", "", "File of blocked phrases, one per line; 'none' turns the list off.")
    flags.DEFINE_string("classifier", "", "module:function(text) -> bool or score; True or > 0.5 refuses.")


FLAGS = flags.FLAGS


def _notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# Every character that str.splitlines breaks a line at, and the backslash that escapes them.
_LINE_BREAKS = re.compile(r"[\\\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` on one line, however a terminal or a line-reading program splits lines: each line break as its
    Python escape (`\\n`, `\\r`, `\\x0b`, ..., `\\u2028`), and a backslash as `\\\\` so that undoing the escapes gives
    the reply back exactly."""
    return _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _messages(interactive: bool) -> Iterator[str]:
    """stdin's lines without their line ending, until its end (or a closed stdin). Read as bytes: a line that
    is not UTF-8 is skipped with a notice and the dialogue goes on, where text mode would end the chat."""
    if sys.stdin is None:  # started with stdin closed (`<&-`): nothing to read
        return
    for number in itertools.count(1):
        if interactive:
            print("User: ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw:
            return
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            _notice(f"(line {number} skipped: not UTF-8, byte {e.start + 1} is {raw[e.start]:#04x})")


def _converse(chat: Chat, messages: Iterator[str]) -> None:
    """Answers each message with one "Assistant: ..." line on stdout, the commands aside."""
    for message in messages:
        if message.strip() == "/quit":
            return
        if message.strip() == "/reset":
            chat.reset()
            _notice("(dialogue forgotten)")
            continue
        if not message.strip():
            continue
        try:
            answer = chat.reply(message)
        except GenerationError as e:
            _notice(f"(message not sent: {e})")
            answer = REFUSAL
        print(f"{ASSISTANT}{one_line(answer)}", flush=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir=DIR (a trained model's workdir) is required")
    logging.set_verbosity(logging.WARNING)
    try:
        safety = SafetyFilter.from_flags(FLAGS.blocklist, FLAGS.classifier)
        sampling = Sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                            repetition_penalty=FLAGS.repetition_penalty)
        _, generator, tokenizer = Workdir(FLAGS.workdir).generator()
        sampling.check(generator.config.vocab_size)
    except (ValueError, CheckpointError) as e:  # GenerationError is a ValueError
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    chat = Chat(generator, tokenizer, sampling, FLAGS.max_new_tokens, safety, FLAGS.seed, notice=_notice)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        _notice(f"chatting with {FLAGS.workdir} (/reset forgets the dialogue, /quit or Ctrl-D ends)")
    try:
        _converse(chat, _messages(interactive))
    except KeyboardInterrupt:  # Ctrl-C ends the chat as Ctrl-D does
        print(file=sys.stderr)
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush


if __name__ == "__main__":
    _define_flags()
    app.run(main)
