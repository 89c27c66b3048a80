"""Continuous batching: requests decoded together by one compiled step, each joining and leaving at any token.

    engine = Engine(generator, slots=8, queue=64)      # a Generator's model and params; starts the step thread
    engine.submit([Request(prompt_ids, max_tokens=32, emit=on_token, sampling=Sampling(temperature=0.7),
                           seed=1, stop=[[eos_id]])])  # on_token(Token) runs on the engine's thread
    engine.cancel(request)                             # a client went away: its row is free at the next step
    engine.close()

The KV cache has `slots` rows of model.max_len positions each. A row holds one request's tokens at slots 0, 1, ...
in order, so a token's slot is its position and each row needs only its own length: no left padding and no
index shared by the batch (Generator's layout). Each step feeds every busy row its latest token at that row's
position: the model runs vmapped over rows, each row a batch-1 KVCache whose scalar index is the row's position.
The step writes the token's keys and values there and chooses the next token with the row's own temperature,
top-k, top-p and random key (generate.process_rows), so differently sampled requests share the compiled step.
Idle rows compute garbage that nobody reads. Attention reads only the cache's first `window` slots, the
power-of-two bucket above the busiest row's position: one compiled step per bucket, and a step's cost follows
the lengths in use, not model.max_len.

A new request is prefilled alone into a free row: its prompt but the last token, right-padded to a power-of-two
bucket (generate.bucket) so that prompt lengths share compiled programs. The padding's slots lie at and past the
row's position, where attention never looks, and the row's next tokens overwrite them. The next step then feeds
the prompt's last token along with every other row's. A row whose request ends (a stop sequence, max_tokens, the
context's end) or is cancelled is free for the next waiting request at once.

Each step reads back [slots] tokens and log-probabilities (and the most likely alternatives): the host sync that
lets requests join, stop and stream at every token. A request's sampled tokens depend on its seed alone, never
on what else is in the batch (they are not Generator's draws for the same seed: the keys are laid out per row).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from omni.generate import GenerationError, Generator, Sampling, bucket, check_prompt, process_rows
from omni.models import GPT
from omni.models.gpt import KVCache

TOP_LOGPROBS = 20  # alternatives reported with each token (the most OpenAI's chat API asks for)


class QueueFull(RuntimeError):
    """No room left in the queue of waiting requests: try again later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token: its id, its log-probability under the model's distribution divided by the temperature
    (as Generation.logprobs), the most likely (id, logprob) pairs of that distribution, best first, and on the
    request's last token why it ended: "stop" (a stop sequence, kept in the output) or "length" (max_tokens or
    the context's end)."""
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    finish: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """What to generate. `emit` is called on the engine's thread with each Token, or once with an exception
    when the engine fails; it must not block (hand the event over to another thread or an event loop)."""
    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Token | Exception], None]
    sampling: Sampling = Sampling()
    seed: int = 0  # in [0, 2**32)
    stop: Sequence[Sequence[int]] = ()
    cancelled: bool = False  # set by Engine.cancel, read by the engine's thread


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    tokens: list[int]  # the prompt, then the generated tokens: the last one is fed at position len - 1

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]


class Engine:
    """A Generator's model and params behind a thread that admits queued requests into free rows of the KV cache
    and runs the compiled step while any row is busy. submit, cancel and load are safe from any thread."""

    def __init__(self, generator: Generator, slots: int = 8, queue: int = 64):
        if slots < 1 or queue < 0:
            raise ValueError(f"slots={slots}, queue={queue}: need at least one slot and a queue >= 0")
        self.generator, self.slots, self.queue = generator, slots, queue
        model = GPT(generator.config)
        options = generator.compiler_options
        self._prefill = jax.jit(functools.partial(_prefill, model), donate_argnames="cache",
                                compiler_options=options)
        self._decode = jax.jit(functools.partial(_decode, model), static_argnames="window", donate_argnames="cache",
                               compiler_options=options)
        self._cache = self._empty_cache()
        self._rows: list[_Row | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._step()  # compiles the step now (no row is busy): the first request does not wait for it
        self._thread = threading.Thread(target=self._loop, name="omni-engine", daemon=True)
        self._thread.start()

    # -- the callers' side ---------------------------------------------------------------------------------
    def submit(self, requests: Sequence[Request]) -> None:
        """Queues the requests, all or none (an API call's n choices): GenerationError names a bad one, QueueFull
        says the queue cannot take them all now."""
        for i, request in enumerate(requests):
            self._check(request, f"request {i}")
        with self._changed:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) + len(requests) > self.queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for one of {self.slots} slots and the "
                                f"queue holds {self.queue}; this call needs {len(requests)} places: retry later")
            self._waiting.extend(requests)
            self._changed.notify()

    def cancel(self, request: Request) -> None:
        """Stops a request: it gets no more tokens; its queue place is free at once, its row at the next step."""
        with self._changed:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
            self._changed.notify()

    def load(self) -> tuple[int, int]:
        """(rows held by live requests, requests waiting for a row): a cancelled request's row counts as free."""
        with self._changed:
            return sum(r is not None and not r.request.cancelled for r in self._rows), len(self._waiting)

    def close(self) -> None:
        """Ends the thread; requests still queued or running get an exception."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _check(self, request: Request, name: str) -> None:
        m, s = self.generator.config, request.sampling
        check_prompt(m, request.prompt, f"{name}'s prompt")
        s.check(m.vocab_size)
        if s.repetition_penalty != 1.0 or s.frequency_penalty != 0.0:
            raise GenerationError(f"{name}: the engine applies no repetition or frequency penalty")
        if request.max_tokens < 1:
            raise GenerationError(f"{name}: max_tokens={request.max_tokens}, must be >= 1")
        if not 0 <= request.seed < 2 ** 32:
            raise GenerationError(f"{name}: seed={request.seed}, must be in [0, 2**32)")
        if any(len(s) == 0 for s in request.stop):
            raise GenerationError(f"{name}: an empty stop sequence")

    # -- the engine's thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._waiting or any(self._rows))
                if self._closed:
                    break
                self._rows = [None if r is None or r.request.cancelled else r for r in self._rows]
                admitted = self._admit()
            try:
                for i in admitted:
                    self._fill(i)
                if any(self._rows):
                    self._step()
            except Exception as e:  # noqa: BLE001 - every request hears of it; the engine goes on
                logging.exception("engine step failed")
                self._fail(e)
                self._cache = self._empty_cache()  # a failed call may have consumed the donated cache
        self._fail(RuntimeError("the engine was closed"))

    def _admit(self) -> list[int]:
        """Moves waiting requests, oldest first, into free rows; returns those rows."""
        free = [i for i, r in enumerate(self._rows) if r is None]
        admitted = []
        while free and self._waiting:
            request, i = self._waiting.popleft(), free.pop(0)
            self._rows[i] = _Row(request, list(request.prompt))
            admitted.append(i)
        return admitted

    def _fill(self, i: int) -> None:
        """Prefills row i with its prompt but the last token (which the next step feeds)."""
        m, prompt = self.generator.config, self._rows[i].tokens[:-1]
        if prompt:
            tokens = np.full((1, bucket(len(prompt), m.max_len)), self.generator.pad_id, np.int32)
            tokens[0, :len(prompt)] = prompt
            self._cache = self._prefill(self.generator.params, self._cache, np.int32(i), tokens)

    def _step(self) -> None:
        """One token for every busy row, handed to its request."""
        feed = np.zeros((3, self.slots), np.int32)  # token, position, top_k
        floats = np.ones((2, self.slots), np.float32)  # temperature, top_p
        keys = np.zeros((2, self.slots), np.uint32)  # seed, tokens generated so far
        for i, row in enumerate(self._rows):
            if row is not None:
                s = row.request.sampling
                feed[:, i] = row.tokens[-1], len(row.tokens) - 1, s.top_k
                floats[:, i] = s.temperature, s.top_p
                keys[:, i] = row.request.seed, len(row.generated)
        window = bucket(int(feed[1].max()) + 1, self.generator.config.max_len)
        self._cache, out = self._decode(self.generator.params, self._cache, *feed, *floats, *keys, window=window)
        tokens, logprobs, top_logprobs, top_ids = jax.device_get(out)
        with self._changed:
            for i, row in enumerate(self._rows):
                if row is not None and not row.request.cancelled:
                    top = tuple(zip(top_ids[i].tolist(), top_logprobs[i].tolist()))
                    self._deliver(i, row, Token(int(tokens[i]), float(logprobs[i]), top))

    def _deliver(self, i: int, row: _Row, token: Token) -> None:
        row.tokens.append(token.id)
        token = dataclasses.replace(token, finish=self._finish(row))
        try:
            row.request.emit(token)
        except Exception:  # noqa: BLE001 - its consumer is gone (e.g. a closed event loop): stop the request
            row.request.cancelled = True
        if token.finish or row.request.cancelled:
            self._rows[i] = None

    def _finish(self, row: _Row) -> str | None:
        out, request = row.generated, row.request
        if any(len(s) <= len(out) and out[len(out) - len(s):] == list(s) for s in request.stop):
            return "stop"
        if len(out) >= request.max_tokens or len(row.tokens) >= self.generator.config.max_len:
            return "length"
        return None

    def _fail(self, error: Exception) -> None:
        """Hands `error` to every running and waiting request, and forgets them."""
        with self._changed:
            requests = [r.request for r in self._rows if r is not None] + list(self._waiting)
            self._rows, self._waiting = [None] * self.slots, collections.deque()
        for request in requests:
            try:
                request.emit(error)
            except Exception:  # noqa: BLE001 - its consumer is gone already
                continue

    def _empty_cache(self) -> tuple[tuple, tuple]:
        """(keys, values): per layer [slots, heads, max_len, head_dim]."""
        m = self.generator.config
        shape = (self.slots, m.num_heads, m.max_len, m.d_model // m.num_heads)
        return tuple(tuple(jnp.zeros(shape, m.dtype) for _ in range(m.num_layers)) for _ in range(2))


# ---------------------------------------------------------------------------------------------------------
# The compiled programs

def _prefill(model, params, cache, row, tokens):
    """Row `row` of the cache with slots 0..width-1 holding the keys and values of `tokens` [1, width]."""
    part = KVCache.zeros(model.config, jnp.zeros(1, jnp.int32), tokens.shape[1])
    _, part = model.apply({"params": params}, tokens, cache=part)

    def place(full, new):
        return jax.lax.dynamic_update_slice(full, new, (row, 0, 0, 0))

    return tuple(map(place, cache[0], part.k)), tuple(map(place, cache[1], part.v))


def _decode(model, params, cache, tokens, positions, top_k, temperature, top_p, seeds, counts, *, window):
    """Feeds each row's token at its position; returns the cache and, per row, the next token, its logprob and
    the TOP_LOGPROBS most likely tokens' (logprobs, ids). Rows attend over the cache's first `window` slots
    only (every busy row's position is below it): a step reads what the rows hold, not all max_len slots."""

    def one_row(k, v, token, position):
        row = KVCache(k=tuple(x[None, :, :window] for x in k), v=tuple(x[None, :, :window] for x in v),
                      start=jnp.zeros(1, jnp.int32), index=position)
        logits, row = model.apply({"params": params}, token.reshape(1, 1), cache=row)
        # Only the token's own keys and values go back to the full cache: copying the whole window back
        # would cost as much as attending over it.
        written = (tuple(jax.lax.dynamic_slice_in_dim(x[0], position, 1, axis=1) for x in c) for c in (row.k, row.v))
        return logits[0, 0], tuple(
            tuple(jax.lax.dynamic_update_slice_in_dim(full, new, position, axis=1) for full, new in zip(old, part))
            for old, part in zip((k, v), written))

    logits, cache = jax.vmap(one_row)(cache[0], cache[1], tokens, positions)
    keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds, counts)
    drawn = jax.vmap(jax.random.categorical)(keys, process_rows(logits, temperature, top_k, top_p))
    greedy = temperature == 0.0
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, temperature)[:, None], axis=-1)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    top = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
    return cache, (token, chosen, *top)
