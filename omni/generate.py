"""Generation with a KV cache: one jit'd program per (batch, prompt bucket, max new tokens, sampling).

    gen = Generator(model_config, params)            # params as restored (sharded under a mesh or not)
    out = gen.generate(prompts, max_new_tokens=64, sampling=Sampling(temperature=0.7, top_p=0.9), seed=0)
    out.tokens, out.logprobs, out.lengths            # numpy [batch, max_new_tokens], ..., [batch]

Prompts are left-padded to a power-of-two bucket, so prompts of different lengths share compiled programs;
each row's positions start at its first real token. The prompt is processed in one pass (prefill), then a
`lax.while_loop` decodes one token per iteration for the whole batch until every row has stopped (an EOS or
stop sequence) or `max_new_tokens` are out: no Python per token, no recompilation per prompt.

`complete()` is the text-level front end (tokenize, generate, detokenize, trim at stop strings).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import parallel
from omni.models import GPT
from omni.models.gpt import KVCache
from omni.models.params import transposed, unrolled

MIN_BUCKET = 16
MAX_STOP_TOKENS = 16  # longest stop sequence (in tokens) checked inside the decode loop


class GenerationError(ValueError):
    """A request that cannot be generated (empty or over-long prompt, bad sampling value)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    Applied in Hugging Face's order: repetition penalty (CTRL: a logit of an already seen token, prompt
    included, is divided by the penalty when positive and multiplied when negative), frequency penalty
    (OpenAI: minus penalty x times generated so far), temperature, top-k, top-p."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0

    def check(self, vocab_size: int) -> None:
        bad = [(name, v, why) for name, v, ok, why in (
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size,
             f"an int in [0, {vocab_size}] (0: off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1: off)"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1: off)"),
            ("frequency_penalty", self.frequency_penalty, math.isfinite(self.frequency_penalty), "finite (0: off)"),
        ) if not ok]
        if bad:
            name, value, why = bad[0]
            raise GenerationError(f"sampling {name}={value!r}: must be {why}")


@dataclasses.dataclass
class Generation:
    """tokens [batch, max_new] (pad_id after a row stops; the stop tokens themselves are kept), logprobs
    [batch, max_new] (log-probability of each chosen token under the model's distribution divided by the
    temperature, before penalties, top-k and top-p: what PPO recomputes; 0 after a row stops), lengths
    [batch] (new tokens per row, stop tokens included) and stopped [batch] (ended by a stop, not the limit)."""
    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def row(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


def bucket(length: int, limit: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), at most `limit`."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


def check_prompt(m: ml_collections.ConfigDict, prompt: Sequence[int], name: str = "the prompt") -> None:
    """Raises GenerationError unless `prompt` is 1 to max_len - 1 ids of the model's vocabulary."""
    if len(prompt) == 0:
        raise GenerationError(f"{name} is empty: give at least one token")
    if len(prompt) >= m.max_len:
        raise GenerationError(f"{name} has {len(prompt)} tokens but the model's context is {m.max_len} "
                              "(model.max_len), which leaves no room to generate")
    if max(prompt) >= m.vocab_size or min(prompt) < 0:
        raise GenerationError(f"{name} has token ids outside the model's vocabulary [0, {m.vocab_size}): "
                              "was it encoded with another tokenizer?")


class Generator:
    """A model's parameters with compiled prefill + decode programs. Under `mesh` (params already placed on
    it, as the trainer and omni.load leave them) activations and the cache follow the rules table."""

    def __init__(self, model_config: ml_collections.ConfigDict, params, mesh: jax.sharding.Mesh | None = None,
                 pad_id: int = 0):
        # Decoding runs the layers unrolled (under nn.scan XLA copies every layer's slice of the parameters
        # and of the cache on every token: measured 2x slower at batch 1), on kernels stored transposed.
        self._source_config = model_config
        self.config, self.params = transposed(*unrolled(model_config, nn.unbox(params)))
        self.mesh = mesh
        self.pad_id = pad_id
        # INT8 weights (model.quant) must stay int8 inside the decode loop: XLA's loop-invariant code motion would
        # convert them to float once before it and stream 4x the bytes every token (measured at batch 1 on the
        # benchmark's model: 149-206 tokens/s with it, 283-413 without; float weights gained nothing measurable).
        quantized = model_config.get("quant", "none") != "none"
        self.compiler_options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if quantized else {}
        self._run = jax.jit(functools.partial(_generate, GPT(self.config)),
                            static_argnames=("max_new", "slots", "sampling", "samples"),
                            compiler_options=self.compiler_options)

    def set_params(self, params) -> None:
        """New values for the same model (e.g. after training steps): the compiled programs are kept."""
        self.params = transposed(*unrolled(self._source_config, nn.unbox(params)))[1]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop: Sequence[Sequence[int]] = (), seed: int = 0, samples: int = 1) -> Generation:
        """Continues every prompt (token ids) by up to `max_new_tokens`, fewer if the context ends first,
        `samples` times: rows i * samples .. (i + 1) * samples - 1 are prompt i's, all from one prefill of it (the
        same rows as the prompt repeated, at a fraction of the prefill). A row stops after emitting any of the
        `stop` token sequences (e.g. [[eos_id]])."""
        m = self.config
        sampling.check(m.vocab_size)
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if samples < 1:
            raise GenerationError(f"samples={samples}: must be >= 1")
        tokens, start, longest = self._left_pad(prompts)
        max_new = min(max_new_tokens, m.max_len - longest)  # positions stop at the context's end
        stops = _stop_table(stop)
        with _mesh_context(self.mesh):
            out = self._run(self.params, tokens, start, stops, jax.random.key(seed), max_new=max_new,
                            slots=tokens.shape[1] + max_new, sampling=sampling, samples=samples)
        tokens, logprobs, lengths, stopped = jax.device_get(out)
        tokens = np.where(np.arange(max_new)[None] < lengths[:, None], tokens, self.pad_id)
        return Generation(tokens=tokens, logprobs=logprobs, lengths=lengths, stopped=stopped)

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, int]:
        m = self.config
        if len(prompts) == 0:
            raise GenerationError("no prompts given")
        for i, p in enumerate(prompts):
            check_prompt(m, p, f"prompt {i}")
        lengths = [len(p) for p in prompts]
        width = bucket(max(lengths), m.max_len)
        tokens = np.full((len(prompts), width), self.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
        return tokens, np.array([width - n for n in lengths], np.int32), max(lengths)


@contextlib.contextmanager
def _mesh_context(mesh):
    """The mesh and rules table the model's sharding constraints resolve against (nothing without a mesh)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        yield


def _stop_table(stop: Sequence[Sequence[int]]) -> np.ndarray:
    """Stop sequences right-aligned in a [n, MAX_STOP_TOKENS] table, -1 where shorter ("any token")."""
    table = np.full((max(len(stop), 1), MAX_STOP_TOKENS), -1, np.int32)
    table[:, -1] = -2  # an empty table matches nothing (no token is -2)
    for i, seq in enumerate(stop):
        seq = list(seq)
        if not 0 < len(seq) <= MAX_STOP_TOKENS:
            raise GenerationError(f"stop sequence {seq!r}: must have 1 to {MAX_STOP_TOKENS} tokens")
        if min(seq) < 0:  # -1 and -2 are the table's own markers: they would match any token
            raise GenerationError(f"stop sequence {seq!r}: token ids must be >= 0")
        table[i, -1] = -1
        table[i, MAX_STOP_TOKENS - len(seq):] = seq
    return table


def process_logits(logits: jax.Array, seen: jax.Array, counts: jax.Array, sampling: Sampling) -> jax.Array:
    """Penalties, temperature, top-k and top-p applied to float32 logits [batch, vocab]; `seen` [batch, vocab]
    marks tokens of the prompt or output so far, `counts` how often each was generated."""
    s = sampling
    if s.repetition_penalty != 1.0:
        penalised = jnp.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if s.frequency_penalty:
        logits = logits - s.frequency_penalty * counts
    if s.temperature == 0.0:
        return logits
    logits = logits / s.temperature
    if s.top_k or s.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cutoff = ordered[:, s.top_k - 1] if s.top_k else ordered[:, -1]
        if s.top_p < 1.0:
            # Keep the smallest prefix of the (top-k) ordered tokens whose probability reaches top_p.
            ordered = jnp.where(ordered >= cutoff[:, None], ordered, -jnp.inf)
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
            kept = jnp.where(before < s.top_p, ordered, jnp.inf)
            cutoff = jnp.maximum(cutoff, jnp.min(kept, axis=-1))
        logits = jnp.where(logits >= cutoff[:, None], logits, -jnp.inf)
    return logits


def process_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """process_logits without penalties, each row [batch, vocab] with its own temperature, top_k and top_p
    ([batch] arrays), so that requests sampled differently share one compiled program (omni/engine.py). Rows
    at temperature 0 come back unchanged: their argmax is the greedy choice."""
    greedy = temperature == 0.0
    logits = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    # Sorting every row's vocabulary costs more than the rest of a decode step: only when some row filters.
    return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), _filter_rows, lambda x, *_: x,
                        logits, greedy, top_k, top_p)


def _filter_rows(logits, greedy, top_k, top_p):
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, top_k, logits.shape[-1])  # 0: every token, the last one sorted is the cutoff
    cutoff = jnp.take_along_axis(ordered, k[:, None] - 1, axis=-1)[:, 0]
    ordered = jnp.where(ordered >= cutoff[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    p = jnp.where(top_p < 1.0, top_p, jnp.inf)  # off: keep all, even where rounding takes the sum past 1
    kept = jnp.where(before < p[:, None], ordered, jnp.inf)
    cutoff = jnp.maximum(cutoff, jnp.min(kept, axis=-1))
    return jnp.where(greedy[:, None] | (logits >= cutoff[:, None]), logits, -jnp.inf)


def _choose(logits, rng, sampling):
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate(model, params, tokens, start, stops, rng, *, max_new, slots, sampling, samples=1):
    cache = KVCache.zeros(model.config, jnp.asarray(start), slots)
    logits, cache = model.apply({"params": params}, tokens, cache=cache)
    if samples > 1:  # each prompt's prefill serves its `samples` rows
        repeat = functools.partial(jnp.repeat, repeats=samples, axis=0)
        cache, tokens, start, logits = cache.repeat(samples), repeat(tokens), repeat(start), repeat(logits[:, -1:])
    batch, vocab = tokens.shape[0], model.config.vocab_size
    recent = jnp.full((batch, stops.shape[1]), -2, jnp.int32)  # last generated tokens, for stop matching
    out = jnp.zeros((batch, max_new), jnp.int32)
    init = dict(t=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1], out=out,
                logprobs=jnp.zeros((batch, max_new), jnp.float32), lengths=jnp.zeros(batch, jnp.int32),
                done=jnp.zeros(batch, bool), recent=recent)
    penalised = sampling.repetition_penalty != 1.0 or sampling.frequency_penalty != 0.0
    if penalised:  # [batch, vocab] bookkeeping only when a penalty needs it
        real = jnp.arange(tokens.shape[1])[None, :] >= start[:, None]
        init["seen"] = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], tokens].max(real)
        init["counts"] = jnp.zeros((batch, vocab), jnp.int32)

    def step(s):
        t = s["t"]
        token = _choose(process_logits(s["logits"], s.get("seen"), s.get("counts"), sampling),
                        jax.random.fold_in(rng, t), sampling)
        scaled = s["logits"] / (sampling.temperature or 1.0)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
        live = ~s["done"]
        recent = jnp.concatenate([s["recent"][:, 1:], token[:, None]], axis=1)
        hit = jnp.all((stops[None] == recent[:, None]) | (stops[None] == -1), axis=-1).any(axis=-1)
        new = dict(
            t=t + 1,
            out=s["out"].at[:, t].set(token),
            logprobs=s["logprobs"].at[:, t].set(jnp.where(live, logprob, 0.0)),
            lengths=s["lengths"] + live,
            done=s["done"] | hit,
            recent=recent)
        if penalised:
            rows = jnp.arange(batch)
            new["seen"] = s["seen"].at[rows, token].set(True)
            new["counts"] = s["counts"].at[rows, token].add(live.astype(jnp.int32))
        logits, new["cache"] = model.apply({"params": params}, token[:, None], cache=s["cache"])
        new["logits"] = logits[:, -1]
        return new

    def running(s):
        return (s["t"] < max_new) & ~jnp.all(s["done"])

    s = jax.lax.while_loop(running, step, init)
    return s["out"], s["logprobs"], s["lengths"], s["done"]


def complete(generator: Generator, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (), seed: int = 0) -> list[str]:
    """Text in, text out: each completion ends before the first stop string or the EOS token."""
    ids = [tokenizer.encode(p) for p in prompts]
    out = generator.generate(ids, max_new_tokens, sampling, stop=stop_sequences(tokenizer, stop), seed=seed)
    texts = []
    for i in range(len(prompts)):
        row = [t for t in out.row(i) if t != tokenizer.eos_id]
        texts.append(trim_at_stop(tokenizer.decode(row), stop))
    return texts


def stop_sequences(tokenizer, stop: Sequence[str]) -> list[list[int]]:
    """Token sequences that end a row inside the decode loop: EOS, and each stop string as it encodes alone
    (a string the model spells with other tokens is still cut afterwards by trim_at_stop)."""
    ids = [[tokenizer.eos_id]] + [tokenizer.encode(s) for s in stop if s]
    return [s for s in ids if 0 < len(s) <= MAX_STOP_TOKENS]


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
