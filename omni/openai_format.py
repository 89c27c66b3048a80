"""OpenAI's API on the wire, apart from the server (omni/serve.py) and its engine: the request fields read and
checked (a bad one raises ApiError, answered as OpenAI's JSON error), each choice's text assembled from the tokens
as they arrive (held back where a stop string may begin, cut at one), and the response objects: envelopes,
choices, log-probabilities and usage counts."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Sequence

import numpy as np

from omni.data.template import messages_to_turns
from omni.engine import Token
from omni.generate import trim_at_stop

MAX_STOPS = 4
MAX_N = 16
MISSING = object()
# Fields of OpenAI's API this server does not implement, with the values that mean "not used".
UNSUPPORTED = {"echo": (False,), "suffix": ("",), "best_of": (1,), "logit_bias": ({},), "presence_penalty": (0,),
               "frequency_penalty": (0,), "tools": ([],), "functions": ([],)}


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, code: str = "invalid_value", kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Reading a request

def field(body: dict, name: str, kinds: tuple, must: str, default: Any = MISSING, ok=lambda value: True) -> Any:
    """body[name] if it is one of `kinds` (bool only where named: JSON's true is no number) and `ok`; absent or
    null: `default`, or a 400 when there is none."""
    value = body.get(name)
    if value is None:
        if default is MISSING:
            raise ApiError(400, f"'{name}' is missing: it must be {must}", "missing_field")
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or not ok(value):
        raise ApiError(400, f"'{name}' must be {must}, got {json.dumps(value)[:80]}")
    return value


def stop_strings(body: dict) -> list[str]:
    stop = field(body, "stop", (str, list), f"a string or a list of at most {MAX_STOPS} strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings")
    return [s for s in stop if s]


def check_supported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in unused:
            raise ApiError(400, f"'{name}' is not supported by this server", "unsupported_parameter")


def dialogue(messages: Any) -> tuple[list[tuple[str, str]], str]:
    """(earlier (user, assistant) turns, the user's message) of the API's `messages`; system (or developer)
    messages' text goes before the user's last message, the template having no place of its own for it."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {'role', 'content'} objects",
                       "missing_field" if messages is None else "invalid_value")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ("system", "developer", "user", "assistant")):
            raise ApiError(400, f"messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}")
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    dialogue = [m for m in messages if m["role"] in ("user", "assistant")]
    if not dialogue or dialogue[-1]["role"] != "user":
        raise ApiError(400, "the last user or assistant message must be the user's")
    try:
        turns = messages_to_turns(dialogue[:-1]) if len(dialogue) > 1 else []
    except ValueError as e:
        raise ApiError(400, f"user and assistant messages must alternate from a user's: {e}") from None
    return turns, "\n\n".join(system + [dialogue[-1]["content"]])


def choice_seeds(seed: int | None, count: int) -> list[int]:
    """An engine seed per choice: from the request's seed (choices differ, calls repeat), or random."""
    if seed is None:
        return [secrets.randbits(32) for _ in range(count)]
    return [int(np.random.SeedSequence([seed % 2 ** 64, i]).generate_state(1)[0]) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------
# A choice's text as its tokens arrive

def piece(tokenizer, before: int, token: int) -> str:
    """The text `token` adds after the token `before` (decoded alone, a piece would lose its leading space)."""
    return tokenizer.decode([before, token])[len(tokenizer.decode([before])):]


class ChoiceText:
    """One choice's text as its tokens arrive, ending before the first stop string or EOS. `add` returns the text
    that became final: it holds back an end that could begin a stop string, and an unfinished UTF-8 character
    (U+FFFD until its last byte comes)."""

    def __init__(self, tokenizer, stop: Sequence[str], last_prompt_token: int):
        self.tokenizer, self.stop, self.prompt_last = tokenizer, [s for s in stop if s], last_prompt_token
        self.tokens: list[Token] = []
        self.pieces: list[str] = []  # each token's text and its offset in the choice's text: for logprobs
        self.offsets: list[int] = []
        self.sent, self.finish = "", None

    def add(self, token: Token) -> str:
        before = self.tokens[-1].id if self.tokens else self.prompt_last
        self.offsets.append(self.offsets[-1] + len(self.pieces[-1]) if self.pieces else 0)
        self.pieces.append(piece(self.tokenizer, before, token.id))
        self.tokens.append(token)
        text = self.tokenizer.decode([t.id for t in self.tokens if t.id != self.tokenizer.eos_id])
        cut = trim_at_stop(text, self.stop)
        if len(cut) < len(text):
            self.finish, text = "stop", cut
        elif token.finish:
            self.finish = token.finish
        else:
            text = text[: len(text) - self._held(text)]
        new = text[len(self.sent):]
        self.sent += new
        return new

    def _held(self, text: str) -> int:
        partial = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return max(partial, len(text) - len(text.rstrip("\ufffd")))

    def alternatives(self, j: int, count: int) -> list[tuple[str, float]]:
        """(text, logprob) of the `count` likeliest tokens in place of the j-th."""
        before = self.tokens[j - 1].id if j else self.prompt_last
        return [(piece(self.tokenizer, before, t), lp) for t, lp in self.tokens[j].top[:count]]


# ---------------------------------------------------------------------------------------------------------
# Responses

def usage_counts(prompt_tokens: int, texts: Sequence[ChoiceText]) -> dict:
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def envelope(model: str, kind: str, ident: str, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    return out if usage is None else dict(out, usage=usage)


def completion_choice(i: int, text: ChoiceText, content: str, logprobs: int | None, prompt_chars: int,
                       tokens: range) -> dict:
    """A completions choice; with logprobs, those of `tokens` (text offsets count the prompt's characters)."""
    lp = None
    if logprobs is not None:
        lp = {"tokens": [text.pieces[j] for j in tokens],
              "token_logprobs": [text.tokens[j].logprob for j in tokens],
              "top_logprobs": [dict(text.alternatives(j, logprobs)) for j in tokens],
              "text_offset": [prompt_chars + text.offsets[j] for j in tokens]}
    return {"index": i, "text": content, "logprobs": lp, "finish_reason": text.finish}


def chat_logprobs(text: ChoiceText, top: int) -> dict:
    def entry(piece: str, logprob: float) -> dict:
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {"content": [dict(entry(text.pieces[j], token.logprob),
                             top_logprobs=[entry(*a) for a in text.alternatives(j, top)])
                        for j, token in enumerate(text.tokens)]}
