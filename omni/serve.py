"""An OpenAI-compatible HTTP server over omni workdirs, decoding requests with continuous batching (omni/engine.py);
it needs the serve extra (pip install -e ".[serve]"):

    python -m omni.serve --workdir=runs/sft_tiny [--workdir=DIR ...] [--host=127.0.0.1] [--port=8000]
        [--api-key=KEY] [--slots=8] [--queue=64] [--review_log=PATH] [--blocklist=FILE|none] [--classifier=mod:fn]

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.completions.create(model="sft_tiny", prompt="def main(", max_tokens=32, stream=True)

Each workdir is a model named by its path as given, and by its basename too when no other workdir has that
basename; `GET /v1/models` lists the names. `POST /v1/completions` continues `prompt` (a string or a list of them)
as it is, up to max_tokens or the context's end (finish_reason "length"). `POST /v1/chat/completions` answers the last of `messages` in omni's chat template
(omni/data/template.py): user and assistant messages alternate and end with the user's; system messages' text goes
before the last user message. As in omni.chat, the oldest turns are dropped when the dialogue would leave the reply
fewer than max_tokens (default: half the context), the user's message and the reply pass the safety filter
(--blocklist, --classifier) and the reply is post-processed (cut at a stop, repeated lines and loops removed). A
refused message or withheld reply is answered with omni.chat.REFUSAL as a normal reply (finish_reason "stop") and
appended as one JSON line to the review log (--review_log; default serve_review.jsonl in the first workdir).
Completions stream token by token; a chat reply streams as its text settles (omni.chat.settled_reply: a few words
behind the tokens, where a loop or a blocked phrase could still complete, so that nothing sent is ever taken back
and no word of a blocked phrase is sent). A reply withheld after part of it was sent ends with finish_reason
"content_filter", as OpenAI's do. With a classifier (it judges whole replies) or with logprobs, a chat reply
streams in one piece once it is whole.

Both endpoints take model, max_tokens (or max_completion_tokens), temperature (0: greedy), top_p, top_k,
seed, stop (a string or a list of up to 4), n, stream (server-sent events ending with `data: [DONE]`; usage in a
last chunk with stream_options.include_usage) and logprobs (completions: the number of alternatives, 0 to 5;
chat: true, with top_logprobs 0 to 20), and report usage. Log-probabilities are the model's after the temperature,
before top-k and top-p (as omni.generate's). A given seed makes sampled choices reproducible whatever else the
server is doing.

Security: the server listens on 127.0.0.1 unless --host says otherwise, and refuses to start on a non-loopback
host without an API key (--api-key, or the environment variable OMNI_API_KEY); with a key, every request needs
`Authorization: Bearer KEY`. Errors are OpenAI's JSON, {"error": {"message", "type", "code"}}: 400 (malformed JSON,
a missing or mistyped field, a bad value, a prompt the context cannot hold), 401 (API key), 404 (unknown model or
path), 413 (a body over 1 MiB), 429 (the queue of waiting requests is full: retry later).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import hmac
import ipaddress
import json
import os
import pathlib
import sys
import time
import uuid
from typing import Any, AsyncIterator, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omni import engine as engine_lib
from omni.chat import REFUSAL, STOP_STRINGS, SafetyFilter, fit_history, postprocess, settled_reply
from omni.engine import Engine, QueueFull, Token
from omni.generate import GenerationError, Sampling, stop_sequences
from omni.openai_format import (MAX_N, ApiError, ChoiceText, chat_logprobs, check_supported, choice_seeds,
                                completion_choice, dialogue, envelope, field, stop_strings, usage_counts)
from omni.train.checkpoint import CheckpointError
from omni.workdir import Workdir, WorkdirError

MAX_BODY = 1 << 20  # bytes: a context's worth of text is far less
REVIEW_LOG = "serve_review.jsonl"
PAGE = pathlib.Path(__file__).parent / "web" / "chat.html"


# ---------------------------------------------------------------------------------------------------------
# A call's engine requests

@dataclasses.dataclass(frozen=True)
class Model:
    """A served workdir: its engine (and through it the Generator) and tokenizer."""
    engine: Engine
    tokenizer: Any

    @property
    def context(self) -> int:
        return self.engine.generator.config.max_len


@dataclasses.dataclass(frozen=True)
class _Call:
    """What both endpoints read from a request body."""
    name: str
    model: Model
    max_tokens: int
    n: int
    sampling: Sampling
    seed: int | None
    stop: list[str]
    stream: bool
    usage_in_stream: bool


class _Run:
    """The engine requests of one API call (each prompt's n choices, in order) and their tokens as they come."""

    def __init__(self, engine: Engine, requests: list[engine_lib.Request], events: asyncio.Queue):
        self.engine, self.requests, self.events = engine, requests, events
        self.live = set(range(len(requests)))

    async def tokens(self) -> AsyncIterator[tuple[int, Token]]:
        """(choice, token) until every choice is done."""
        while self.live:
            i, event = await self.events.get()
            if i not in self.live:  # finished early by finish(i)
                continue
            if isinstance(event, Exception):
                raise ApiError(500, f"generation failed: {event}", "generation_failed", "server_error")
            if event.finish:
                self.live.discard(i)
            yield i, event

    def finish(self, i: int) -> None:
        """Choice i is done (a stop string): its row is freed."""
        self.live.discard(i)
        self.engine.cancel(self.requests[i])

    def close(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)


async def _consume(run: _Run, texts: list[ChoiceText]) -> None:
    """Feeds every choice's tokens to its text until all are done (or this is cancelled: the run ends too)."""
    try:
        async for i, token in run.tokens():
            texts[i].add(token)
            if texts[i].finish:
                run.finish(i)
    finally:
        run.close()


async def _unless_gone(request: Request, work: asyncio.Future):
    """`work`'s result; when the client hangs up first, `work` is cancelled (its engine requests with it)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            continue

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ApiError(499, "the client closed the connection", "client_closed")
        return work.result()
    finally:
        work.cancel()
        watch.cancel()


# ---------------------------------------------------------------------------------------------------------
# Responses

def _delta(i: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _chat_chunk(call: _Call, ident: str, choices: list[dict], usage: dict | None = None) -> dict:
    return envelope(call.name, "chat.completion.chunk", ident, choices, usage)


def _role_chunk(call: _Call, ident: str) -> dict:
    """A chat stream's first chunk: every choice's role."""
    return _chat_chunk(call, ident, [_delta(i, {"role": "assistant", "content": ""}, None) for i in range(call.n)])


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: each chunk as `data: JSON`, then `data: [DONE]` (or an error event if one comes)."""
    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _api_error(request: Request, e: ApiError) -> Response:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: HTTPException) -> Response:
    """An unknown path (404) or method (405), in the API's error format."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return await _api_error(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                              code))


async def _internal_error(request: Request, e: Exception) -> Response:
    return await _api_error(request, ApiError(500, f"internal error ({type(e).__name__})", "internal_error",
                                              "server_error"))


# ---------------------------------------------------------------------------------------------------------
# The API

class Api:
    """The HTTP API over `models` ({name: Model}); `app()` is its ASGI application. Every refused or withheld chat
    exchange is appended to `review_log`."""

    def __init__(self, models: dict[str, Model], review_log: str, api_key: str | None = None,
                 safety: SafetyFilter | None = None, max_body: int = MAX_BODY):
        self.models, self.review_log, self.api_key = models, review_log, api_key
        self.safety, self.max_body = safety or SafetyFilter(), max_body
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/", self.page, methods=["GET"]),
                  Route("/v1/models", self.list_models, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- endpoints ---------------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        """The chat page (omni/web/chat.html): it holds no data, so it needs no key; the API calls it makes do. It
        may talk to this server only."""
        policy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": policy})

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "omni"} for name in self.models]})

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        call = self._call(body, default_max_tokens=16)  # OpenAI's default
        logprobs = field(body, "logprobs", (int,), "an integer from 0 to 5", None, lambda v: 0 <= v <= 5)
        prompts, ids = self._prompts(body, call.model)
        prompts, ids = [p for p in prompts for _ in range(call.n)], [p for p in ids for _ in range(call.n)]
        texts = [ChoiceText(call.model.tokenizer, call.stop, p[-1]) for p in ids]
        run = self._start(call, ids, stop_sequences(call.model.tokenizer, call.stop), logprobs or 0)
        ident, prompt_tokens = f"cmpl-{uuid.uuid4().hex}", sum(map(len, ids[::call.n]))
        if call.stream:
            return _sse(self._completion_chunks(call, ident, run, texts, logprobs, prompts, prompt_tokens))
        await _unless_gone(request, asyncio.ensure_future(_consume(run, texts)))
        choices = [completion_choice(i, t, t.sent, logprobs, len(prompts[i]), range(len(t.tokens)))
                   for i, t in enumerate(texts)]
        return JSONResponse(envelope(call.name, "text_completion", ident, choices, usage_counts(prompt_tokens, texts)))

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        call = self._call(body, default_max_tokens=None)
        turns, message = dialogue(body.get("messages"))
        logprobs = field(body, "logprobs", (bool,), "true or false", False)
        top = field(body, "top_logprobs", (int,), f"an integer from 0 to {engine_lib.TOP_LOGPROBS}", 0,
                     lambda v: 0 <= v <= engine_lib.TOP_LOGPROBS)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if reason := self.safety.reason(message):
            self._review(call.name, body["messages"], "message refused", reason)
            answer = asyncio.ensure_future(self._refusal(call))
        else:
            ids = self._fit(call, turns, message)
            stop = list(STOP_STRINGS) + call.stop
            texts = [ChoiceText(call.model.tokenizer, stop, ids[-1]) for _ in range(call.n)]
            run = self._start(call, [ids] * call.n, stop_sequences(call.model.tokenizer, stop), top if logprobs else 0)
            if call.stream and not logprobs and not self.safety.judges_whole:
                return _sse(self._chat_stream(call, ident, body["messages"], run, texts, len(ids)))
            answer = asyncio.ensure_future(self._reply(call, body["messages"], run, texts, logprobs, top, len(ids)))
        if call.stream:
            return _sse(self._chat_chunks(call, ident, answer))
        choices, usage = await _unless_gone(request, answer)
        return JSONResponse(envelope(call.name, "chat.completion", ident, choices, usage))

    # -- completions -------------------------------------------------------------------------------------------
    async def _completion_chunks(self, call: _Call, ident: str, run: _Run, texts: list[ChoiceText],
                                 logprobs: int | None, prompts: list[str], prompt_tokens: int):
        """A chunk per token of any choice (its new text may be empty while held back, or with logprobs)."""
        try:
            async for i, token in run.tokens():
                text = texts[i]
                new = text.add(token)
                if text.finish:
                    run.finish(i)
                if new or text.finish or logprobs is not None:
                    j = len(text.tokens) - 1
                    choice = completion_choice(i, text, new, logprobs, len(prompts[i]), range(j, j + 1))
                    yield envelope(call.name, "text_completion", ident, [choice])
            if call.usage_in_stream:
                yield envelope(call.name, "text_completion", ident, [], usage_counts(prompt_tokens, texts))
        finally:
            run.close()

    # -- chat --------------------------------------------------------------------------------------------------
    def _fit(self, call: _Call, turns: list[tuple[str, str]], message: str) -> list[int]:
        """The prompt's ids, without the oldest turns that leave the reply fewer than max_tokens."""
        budget = call.model.context - call.max_tokens
        fitted = fit_history(call.model.tokenizer, turns, message, budget)
        if fitted is None:
            raise ApiError(400, f"the last user message does not fit: the model's context is {call.model.context} "
                                f"tokens and max_tokens={call.max_tokens} are kept for the reply",
                           "context_length_exceeded")
        return fitted[0]

    async def _reply(self, call: _Call, messages: list, run: _Run, texts: list[ChoiceText], logprobs: bool, top: int,
                     prompt_tokens: int) -> tuple[list[dict], dict]:
        """(choices, usage) once every choice is generated, post-processed and checked."""
        await _consume(run, texts)
        choices = []
        for i, text in enumerate(texts):
            content = self._checked(call, messages, text)
            choices.append({"index": i, "message": {"role": "assistant", "content": content or REFUSAL},
                            "logprobs": chat_logprobs(text, top) if logprobs and content is not None else None,
                            "finish_reason": text.finish if content is not None else "stop"})
        return choices, usage_counts(prompt_tokens, texts)

    def _checked(self, call: _Call, messages: list, text: ChoiceText) -> str | None:
        """A whole reply post-processed, or None where the safety filter withholds it (and a reviewer is told)."""
        content = postprocess(text.sent)
        if reason := self.safety.reason(content):
            self._review(call.name, messages, "reply withheld", reason, content)
            return None
        return content

    async def _chat_stream(self, call: _Call, ident: str, messages: list, run: _Run, texts: list[ChoiceText],
                           prompt_tokens: int):
        """The role, then each choice's reply as it settles (omni.chat.settled_reply: none of it can change or be
        withheld later), then its finish. A reply withheld once part of it was sent (the part before a blocked
        phrase) ends with finish_reason 'content_filter', OpenAI's; one withheld before is the refusal."""
        def delta(i: int, content: str | None, finish: str | None = None) -> dict:
            return _chat_chunk(call, ident, [_delta(i, {} if content is None else {"content": content}, finish)])

        sent = [""] * call.n
        try:
            yield _role_chunk(call, ident)
            async for i, token in run.tokens():
                text = texts[i]
                text.add(token)
                if not text.finish:
                    settled = settled_reply(text.sent, self.safety)
                    if len(settled) > len(sent[i]) and settled.startswith(sent[i]):
                        yield delta(i, settled[len(sent[i]):])
                        sent[i] = settled
                    continue
                run.finish(i)
                content = self._checked(call, messages, text)
                if content is None:
                    yield delta(i, None, "content_filter") if sent[i] else delta(i, REFUSAL, "stop")
                else:
                    yield delta(i, content[len(sent[i]):], text.finish)
            if call.usage_in_stream:
                yield _chat_chunk(call, ident, [], usage_counts(prompt_tokens, texts))
        finally:
            run.close()

    async def _refusal(self, call: _Call) -> tuple[list[dict], dict]:
        choice = {"message": {"role": "assistant", "content": REFUSAL}, "logprobs": None, "finish_reason": "stop"}
        return [dict(choice, index=i) for i in range(call.n)], usage_counts(0, [])

    async def _chat_chunks(self, call: _Call, ident: str, answer: asyncio.Future):
        """The role at once, then each choice's whole reply and its finish."""
        try:
            yield _role_chunk(call, ident)
            choices, usage = await answer
            for c in choices:
                yield _chat_chunk(call, ident, [_delta(c["index"], {"content": c["message"]["content"]}, None,
                                                       c["logprobs"])])
                yield _chat_chunk(call, ident, [_delta(c["index"], {}, c["finish_reason"])])
            if call.usage_in_stream:
                yield _chat_chunk(call, ident, [], usage)
        finally:
            answer.cancel()

    def _review(self, model: str, messages: list, kind: str, reason: str, reply: str | None = None) -> None:
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model": model, "kind": kind, "reason": reason, "messages": messages}
        if reply is not None:
            record["reply"] = reply
        with open(self.review_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- reading a request -------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        """The JSON object of the body, read no further than max_body bytes."""
        too_large = ApiError(413, f"the request body is over {self.max_body} bytes", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body:
                raise too_large
        try:
            body = json.loads(data)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        return body

    def _call(self, body: dict, default_max_tokens: int | None) -> _Call:
        """The fields both endpoints share; default_max_tokens None: half the context (omni.chat's cap)."""
        check_supported(body)
        name = field(body, "model", (str,), "the name of a served model (GET /v1/models)")
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served here (GET /v1/models lists them)", "model_not_found")
        model = self.models[name]
        context, vocab = model.context, model.engine.generator.config.vocab_size
        limit = f"an integer from 1 to {context - 1} (the model's context is {context} tokens)"
        max_tokens = field(body, "max_completion_tokens", (int,), limit, None, lambda v: 0 < v < context)
        if max_tokens is None:
            max_tokens = field(body, "max_tokens", (int,), limit, default_max_tokens or context // 2,
                                lambda v: 0 < v < context)
        sampling = Sampling(
            temperature=float(field(body, "temperature", (int, float), "a number from 0 to 2", 1.0,
                                     lambda v: 0 <= v <= 2)),
            top_p=float(field(body, "top_p", (int, float), "a number in (0, 1]", 1.0, lambda v: 0 < v <= 1)),
            top_k=field(body, "top_k", (int,), f"an integer from 0 to {vocab} (0: off)", 0,
                         lambda v: 0 <= v <= vocab))
        options = field(body, "stream_options", (dict,), "an object", {})
        return _Call(name=name, model=model, max_tokens=max_tokens,
                     n=field(body, "n", (int,), f"an integer from 1 to {MAX_N}", 1, lambda v: 1 <= v <= MAX_N),
                     sampling=sampling, seed=field(body, "seed", (int,), "an integer", None), stop=stop_strings(body),
                     stream=field(body, "stream", (bool,), "true or false", False),
                     usage_in_stream=field(options, "include_usage", (bool,), "true or false", False))

    def _prompts(self, body: dict, model: Model) -> tuple[list[str], list[list[int]]]:
        """The prompt strings and their token ids, each with room to generate."""
        prompt = field(body, "prompt", (str, list), "a string or a list of strings")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings")
        ids = [model.tokenizer.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ApiError(400, f"prompt {i} is empty: give at least one token of text")
            if len(p) >= model.context:
                raise ApiError(400, f"prompt {i} is {len(p)} tokens but the model's context is {model.context}, "
                                    "which leaves no room to generate", "context_length_exceeded")
        return prompts, ids

    def _start(self, call: _Call, prompts: list[list[int]], stop: list[list[int]], alternatives: int) -> _Run:
        """Queues a request per choice, handing its tokens (with the `alternatives` likeliest tokens each) from the
        engine's thread to this event loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(i: int):
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (i, event))

        seeds = choice_seeds(call.seed, len(prompts))
        requests = [engine_lib.Request(p, call.max_tokens, emitter(i), call.sampling, seeds[i], stop, alternatives)
                    for i, p in enumerate(prompts)]
        try:
            call.model.engine.submit(requests)
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full", "rate_limit_error") from None
        except GenerationError as e:
            raise ApiError(400, str(e)) from None
        return _Run(call.model.engine, requests, events)


# ---------------------------------------------------------------------------------------------------------
# The program

def model_names(paths: Sequence[str]) -> dict[str, str]:
    """{name: workdir}: each path as given, and its basename where no other path has the same basename."""
    base = {p: os.path.basename(os.path.normpath(p)) for p in paths}
    counts = collections.Counter(base.values())
    names = {p: p for p in paths}
    for p in paths:
        if counts[base[p]] == 1:
            names.setdefault(base[p], p)
    return names


def load_models(paths: Sequence[str], slots: int = 8, queue: int = 64) -> dict[str, Model]:
    """{name (model_names): Model} of the workdirs' latest checkpoints, each behind its own engine."""
    served = {}
    for path in paths:
        _, generator, tokenizer = Workdir(path).generator()
        served[path] = Model(Engine(generator, slots, queue), tokenizer)
    return {name: served[path] for name, path in model_names(paths).items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")  # one line (argparse's own prints the usage first)


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        if not (text.isdigit() and low <= int(text) <= high):
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer from {low} to {high}")
        return int(text)
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m omni.serve", allow_abbrev=False,
                description="An OpenAI-compatible HTTP API over omni workdirs (see omni/serve.py).")
    p.add_argument("--workdir", action="append", required=True, help="A model's workdir; repeat for more models.")
    p.add_argument("--host", default="127.0.0.1", help="A non-loopback address needs an API key.")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000)
    p.add_argument("--api-key", "--api_key", dest="api_key", help="Required from clients (default: $OMNI_API_KEY).")
    p.add_argument("--slots", type=_int_in(1, 4096), default=8, help="Requests decoded together, per model.")
    p.add_argument("--queue", type=_int_in(0, 1 << 20), default=64, help="Requests waiting for a slot before 429.")
    p.add_argument("--review_log", "--review-log", help=f"JSONL of refused chats (default: WORKDIR/{REVIEW_LOG}).")
    p.add_argument("--blocklist", default="", help="Blocked phrases' file, one per line; 'none': off.")
    p.add_argument("--classifier", default="", help="module:function(text) -> bool or score; > 0.5 refuses.")
    return p


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("OMNI_API_KEY") or None
    if api_key is None and not _loopback(args.host):
        _exit(f"--host={args.host} is not a loopback address: serving other machines needs an API key "
              "(--api-key=KEY or the OMNI_API_KEY environment variable)")
    for path in args.workdir:
        if not os.path.isdir(path):
            _exit(f"--workdir={path}: no such directory")
    if len({os.path.realpath(p) for p in args.workdir}) < len(args.workdir):
        _exit(f"a workdir is given twice: {args.workdir}")
    review_log = args.review_log or os.path.join(args.workdir[0], REVIEW_LOG)
    if not os.access(os.path.dirname(os.path.abspath(review_log)), os.W_OK):
        _exit(f"--review_log={review_log}: its directory is not writable")
    try:
        safety = SafetyFilter.from_flags(args.blocklist, args.classifier)
        models = load_models(args.workdir, args.slots, args.queue)
    except (ValueError, OSError, CheckpointError, WorkdirError) as e:  # GenerationError is a ValueError
        _exit(str(e))
    print(f"omni.serve: {', '.join(models)} at http://{args.host}:{args.port}/v1 (review log: {review_log})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(Api(models, review_log, api_key, safety).app(), host=args.host, port=args.port)
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again: done
        pass
    finally:
        for model in set(models.values()):
            model.engine.close()


if __name__ == "__main__":
    main()
