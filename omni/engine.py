"""Continuous batching: requests decoded together by one compiled step, each joining and leaving at any token.

    engine = Engine(generator, slots=8, queue=64)      # a Generator's model and params; starts the step thread
    engine.submit([Request(prompt_ids, max_tokens=32, emit=on_token, sampling=Sampling(temperature=0.7),
                           seed=1, stop=[[eos_id]])])  # on_token(Token) runs on the engine's thread
    engine.cancel(request)                             # a client went away: its row is free at the next step
    engine.close()

The KV cache has `slots` rows of `capacity` slots each, in Generator's layout: one write index shared by every row,
each row's tokens left-padded so that they end just before it (row b's tokens fill slots start[b]..index-1, a
token's position is its slot minus start[b]). A step feeds every busy row its latest token at slot `index`: the
model runs once on the batch, as Generator's decode step, writing each row's keys and values in place, and then
index advances. The batch is the rows up to the last busy one, rounded up to a power of two (requests take the
lowest free rows, so one client costs one row); idle rows among them compute garbage that nobody reads.

New requests are prefilled together (one alone, or several as `slots` rows), each prompt but its last token
left-padded to a common power-of-two bucket (generate.bucket, so that prompt lengths share compiled programs)
and written to its row's slots just before `index`; the next step feeds their last tokens along with every
other row's. A row whose request ends (a stop
sequence, max_tokens, the context's end) or is cancelled is free for the next waiting request at once.

The capacity follows the lengths in use, so a step's cost does too, not model.max_len: when the index reaches
the capacity, when a new prompt needs more slots before the index than there are, or when the busy rows fill at
most half of it, the cache is shifted (every row by the same number of slots, so its rows' positions do not
change) and resized to the power-of-two bucket that holds the longest row: one copy, and one compiled step per
capacity.

The step is compiled per (rows, capacity). One not compiled yet compiles ahead of time on a worker thread while
a compiled step with more rows serves (idle rows cost compute; a compile would stall every busy row for seconds);
only where none is does the first call compile it.

Each step reads back its rows' tokens and log-probabilities (and the most likely alternatives): the host sync that
lets requests join, stop and stream at every token. A request's sampled tokens depend on its seed alone, never
on what else is in the batch (they are not Generator's draws for the same seed: the keys are laid out per row).
"""
from __future__ import annotations

import collections
import concurrent.futures
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
    alternatives: int = TOP_LOGPROBS  # the likeliest tokens each Token carries in `top` (0 to TOP_LOGPROBS)
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
        # The prompts' keys and values, then their rows of the cache: two programs, so that the model's compiles
        # per (prompts, width) bucket and only the small copy per cache capacity.
        self._prefill = jax.jit(functools.partial(_prefill, model), compiler_options=options)
        self._place = jax.jit(_place, donate_argnames="cache", compiler_options=options)
        self._decode = jax.jit(functools.partial(_decode, model), donate_argnames="cache", compiler_options=options)
        self._shift = jax.jit(_shift, static_argnames="capacity", compiler_options=options)
        # The step compiled per (rows, capacity); a missing one compiles on the worker while a compiled step with
        # more rows serves (idle rows cost compute, a compile would stall every busy row).
        self._programs: dict[tuple[int, int], Callable] = {}
        self._compiling: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="omni-engine-compile")
        self._empty_cache()
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
        self._compiler.shutdown(wait=False, cancel_futures=True)

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
        if not 0 <= request.alternatives <= TOP_LOGPROBS:
            raise GenerationError(f"{name}: alternatives={request.alternatives}, must be 0 to {TOP_LOGPROBS}")
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
                if admitted:
                    self._fill(admitted)
                if any(self._rows):
                    self._step()
            except Exception as e:  # noqa: BLE001 - every request hears of it; the engine goes on
                logging.exception("engine step failed")
                self._fail(e)
                self._empty_cache()  # a failed call may have consumed the donated cache
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

    def _fill(self, rows: list[int]) -> None:
        """Makes room for the new rows' prompts before the write index, then prefills them in one call: each
        prompt but its last token (which the next step feeds)."""
        m = self.generator.config
        lengths = [len(self._rows[i].tokens) - 1 for i in rows]
        width = min(bucket(max(lengths), m.max_len), m.max_len - 1) if max(lengths) else 0
        self._fit(rows, width)
        for i, n in zip(rows, lengths):
            self._start[i] = self._index - n
        if not width:
            return
        group = 1 if len(rows) == 1 else self.slots  # two prefill programs per prompt bucket, not one per count
        order = rows + [rows[0]] * (group - len(rows))  # the padding entries repeat the first row's writes
        prompts = [self._rows[i].tokens[:-1] for i in order]
        tokens = np.full((group, width), self.generator.pad_id, np.int32)
        for j, prompt in enumerate(prompts):
            tokens[j, width - len(prompt):] = prompt
        starts = np.array([width - len(p) for p in prompts], np.int32)
        part = self._prefill(self.generator.params, tokens, starts)
        self._cache = self._place(self._cache, part, np.array(order, np.int32), np.int32(self._index))

    def _fit(self, new: list[int], width: int) -> None:
        """Shifts and resizes the cache so that the busy rows (but `new`) keep their tokens, `width` slots lie
        before the write index for the new prompts, and the step's write at the index fits: a copy, made only
        when the index reaches the capacity, the prompts do not fit, or the capacity is twice what is used."""
        busy = [i for i, r in enumerate(self._rows) if r is not None and i not in new]
        used = self._index - int(min(self._start[i] for i in busy)) if busy else 0
        index = max(used, width)  # the write index after the shift
        capacity = bucket(index + 1, self.generator.config.max_len)
        if self._index + 1 <= self._capacity and self._index >= width and 2 * capacity > self._capacity:
            return  # fits, and no more than twice the slots needed: leave it
        if not busy:  # nothing to keep
            if capacity != self._capacity:
                self._empty_cache(capacity)
            self._index = index
            return
        offset = self._index - index  # every slot moves this far left (right when negative)
        self._cache = self._shift(self._cache, np.int32(offset), capacity=capacity)
        self._start -= offset
        self._index, self._capacity = index, capacity

    def _step(self) -> None:
        """One token for every busy row, handed to its request. The step runs the rows up to the last busy one
        only (their number rounded up to a power of two): requests take the lowest free rows, so one client
        costs one row, not `slots`."""
        self._fit([], 0)
        last = max((i for i, r in enumerate(self._rows) if r is not None), default=0)
        rows, decode = self._program(min(1 << last.bit_length(), self.slots))
        feed = np.zeros((3, rows), np.int32)  # token, start (idle rows: past the index), top_k
        feed[1] = self._capacity
        floats = np.zeros((2, rows), np.float32)  # temperature (idle rows: greedy), top_p
        keys = np.zeros((2, rows), np.uint32)  # seed, tokens generated so far
        for i, row in enumerate(self._rows[:rows]):
            if row is not None:
                s = row.request.sampling
                feed[:, i] = row.tokens[-1], self._start[i], s.top_k
                floats[:, i] = s.temperature, s.top_p
                keys[:, i] = row.request.seed, len(row.generated)
        ranked = np.bool_(any(r is not None and r.request.alternatives for r in self._rows[:rows]))
        self._cache, out = decode(self.generator.params, self._cache, np.int32(self._index), *feed, *floats, *keys,
                                  ranked)
        self._index += 1
        tokens, logprobs, top_logprobs, top_ids = jax.device_get(out)
        with self._changed:
            for i, row in enumerate(self._rows[:rows]):
                if row is not None and not row.request.cancelled:
                    n = row.request.alternatives
                    top = tuple(zip(top_ids[i, :n].tolist(), top_logprobs[i, :n].tolist()))
                    self._deliver(i, row, Token(int(tokens[i]), float(logprobs[i]), top))

    def _program(self, rows: int) -> tuple[int, Callable]:
        """(rows it runs, the compiled step) for `rows` busy rows at the cache's capacity: the step for exactly
        those rows where it is compiled; else, while it compiles on the worker, the smallest compiled one with
        more rows. Compiled on first call (a stall) only where no larger one is, or on a mesh. The step for all
        rows at the next capacity compiles on the worker ahead of the cache's growing to it."""
        for key in [k for k, future in self._compiling.items() if future.done() and future.exception() is None]:
            self._programs[key] = self._compiling.pop(key).result()
        capacity, mesh = self._capacity, self.generator.mesh
        if mesh is None and capacity < self.generator.config.max_len:
            self._compile_later(self.slots, bucket(capacity + 1, self.generator.config.max_len))
        if (rows, capacity) in self._programs:
            return rows, self._programs[rows, capacity]
        larger = sorted(r for r, c in self._programs if c == capacity and r > rows)
        if not larger or mesh is not None:
            self._programs[rows, capacity] = self._decode  # jit: compiles on this first call
            return rows, self._decode
        self._compile_later(rows, capacity)
        return larger[0], self._programs[larger[0], capacity]

    def _compile_later(self, rows: int, capacity: int) -> None:
        """Queues the step for (rows, capacity) on the worker, unless it is compiled or queued (a failed compile
        is not retried: a larger step serves those rows)."""
        if (rows, capacity) not in self._programs and (rows, capacity) not in self._compiling:
            self._compiling[rows, capacity] = self._compiler.submit(self._compile, rows, capacity, self._cache[0][0])

    def _compile(self, rows: int, capacity: int, like: jax.Array):
        """On the worker: the step for `rows` rows of a cache of `capacity` slots (each layer's keys and values
        like `like` but for that), compiled ahead of time from abstract arguments while the engine's thread
        goes on stepping."""
        m = self.generator.config
        params = jax.tree.map(lambda x: _abstract(np.shape(x), x.dtype, x), self.generator.params)
        layer = _abstract((self.slots, m.num_heads, capacity, m.d_model // m.num_heads), like.dtype, like)
        cache = tuple(tuple(layer for _ in range(m.num_layers)) for _ in range(2))
        feed = [_abstract((rows,), dtype) for dtype in [np.int32] * 3 + [np.float32] * 2 + [np.uint32] * 2]
        feed.append(_abstract((), np.bool_))
        try:
            return self._decode.lower(params, cache, _abstract((), np.int32), *feed).compile()
        except Exception:
            logging.exception("compiling the engine's step for %d rows failed (a larger one serves them)", rows)
            raise

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

    def _empty_cache(self, capacity: int = 1) -> None:
        """No busy row: (keys, values) per layer [slots, heads, capacity, head_dim] (at least MIN_BUCKET slots)."""
        m = self.generator.config
        self._index, self._capacity, self._start = 0, bucket(capacity, m.max_len), np.zeros(self.slots, np.int32)
        shape = (self.slots, m.num_heads, self._capacity, m.d_model // m.num_heads)
        self._cache = tuple(tuple(jnp.zeros(shape, m.dtype) for _ in range(m.num_layers)) for _ in range(2))


# ---------------------------------------------------------------------------------------------------------
# The compiled programs

def _abstract(shape: tuple, dtype, like=None) -> jax.ShapeDtypeStruct:
    """An argument's shape and dtype for ahead-of-time compilation, placed as `like` is (if given)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(like, "sharding", None))


def _prefill(model, params, tokens, starts):
    """(keys, values) per layer [prompts, heads, width, head_dim] of `tokens` [prompts, width], prompts
    left-padded to `starts`."""
    part = KVCache.zeros(model.config, starts, tokens.shape[1])
    _, part = model.apply({"params": params}, tokens, cache=part)
    return part.k, part.v


def _place(cache, part, rows, index):
    """The cache with rows `rows` holding `part`'s keys and values in the slots just before `index`."""
    def place(full, new):
        for j in range(new.shape[0]):
            full = jax.lax.dynamic_update_slice(full, new[j:j + 1], (rows[j], 0, index - new.shape[2], 0))
        return full

    return tuple(map(place, cache[0], part[0])), tuple(map(place, cache[1], part[1]))


def _decode(model, params, cache, index, tokens, start, top_k, temperature, top_p, seeds, counts, ranked):
    """Feeds the first len(tokens) rows their tokens at slot `index` (rows left-padded to `start`); returns the
    cache and, per row, the next token, its logprob and the TOP_LOGPROBS most likely tokens' (logprobs, ids):
    zeros unless `ranked` (some row asks for them)."""
    n = tokens.shape[0]
    part = cache if n == cache[0][0].shape[0] else tuple(tuple(x[:n] for x in c) for c in cache)
    rows = KVCache(k=part[0], v=part[1], start=start, index=index)
    logits, rows = model.apply({"params": params}, tokens[:, None], cache=rows)
    logits = logits[:, 0]
    if n == cache[0][0].shape[0]:
        cache = rows.k, rows.v
    else:  # only the new keys and values go back: copying the rows' whole cache back would cost as much again
        cache = tuple(tuple(jax.lax.dynamic_update_slice(full, jax.lax.dynamic_slice_in_dim(new, index, 1, axis=2),
                                                         (0, 0, index, 0)) for full, new in zip(old, part))
                      for old, part in zip(cache, (rows.k, rows.v)))
    greedy = temperature == 0.0
    likeliest = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):  # per row: its seeded draw from its filtered distribution, or the likeliest token
        keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, process_rows(logits, temperature, top_k, top_p))
        return jnp.where(greedy, likeliest, drawn).astype(jnp.int32)

    # The draws (random bits for every row's whole vocabulary) cost a fifth of a 16-row step: none when all rows
    # are greedy (idle rows are).
    token = jax.lax.cond(jnp.all(greedy), lambda logits: likeliest, draw, logits)
    logprobs = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, temperature)[:, None], axis=-1)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    k = min(TOP_LOGPROBS, logprobs.shape[-1])
    nothing = lambda logprobs: (jnp.zeros((n, k), logprobs.dtype), jnp.zeros((n, k), jnp.int32))  # noqa: E731
    top = jax.lax.cond(ranked, lambda logprobs: tuple(jax.lax.top_k(logprobs, k)), nothing, logprobs)
    return cache, (token, chosen, *top)


def _shift(cache, offset, *, capacity):
    """The cache with every slot moved `offset` slots left (right when negative) and `capacity` slots per row:
    slot j holds what slot j + offset held (zeros where that is outside)."""
    def move(x):
        pad = max(x.shape[2], capacity)
        padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
        return jax.lax.dynamic_slice_in_dim(padded, pad + offset, capacity, axis=2)

    return tuple(tuple(map(move, c)) for c in cache)
