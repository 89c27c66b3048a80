"""The one training loop every stage reuses.

A stage hands the trainer a `Task`: its model, its loss, its data. The trainer owns everything else: the
mesh, sharded initialisation, the jit'd step with gradient accumulation, evaluation, metrics, checkpoints,
resumption, preemption and non-finite-loss handling.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from omni import parallel
from omni.models import count_params
from omni.models.params import abstract_params
from omni.train import checkpoint, metrics
from omni.train.optim import lr_schedule, optimizer
from omni.workdir import METRICS, TENSORBOARD, Workdir

# loss_fn(params, batch, dropout_rng or None) -> (loss_sum, sums). `sums` holds per-batch sums, among them
# 'loss' and 'weight' (the loss's denominator, e.g. the number of target tokens); the trainer divides every
# sum by the total weight, so gradient accumulation gives exactly the full-batch gradient. A sum 'x' that has
# a companion 'x_weight' is divided by that instead (e.g. correct pairs over pairs, where the loss counts prompts).
LossFn = Callable[[Any, dict, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
    """What a stage gives the trainer."""
    model: nn.Module
    loss_fn: LossFn
    train_iter: Any  # grain DatasetIterator of host-local numpy batches (state is checkpointed)
    eval_batches: list[dict]
    tokenizer_path: str
    flops_per_token: float
    example_batch: dict  # one host-local batch: gives shapes for init ('inputs' [batch, ..., length])
    summary_extras: dict = dataclasses.field(default_factory=dict)
    # eval_extra(params, evals) -> more metrics at each evaluation (e.g. scores of generated samples).
    eval_extra: Callable[[Any, dict], dict] | None = None
    # finalize(params) -> (params, metrics), applied once after the last step, before the final checkpoint.
    finalize: Callable[[Any], tuple[Any, dict]] | None = None
    language_model: bool = True  # eval_loss is a per-token NLL: report perplexity
    tokens_per_example: int | None = None  # positions the model runs per batch element; None: 'inputs' [batch, ...]
    # On-policy stages (PPO): before_step(params, step) -> metrics runs before each step's batch is drawn, with
    # the parameters that step trains (e.g. to sample new rollouts); its metrics are logged with the next line.
    before_step: Callable[[Any, int], dict] | None = None
    # initial_params(target, fresh) -> params of a new run, in place of restoring config.init_from's params.
    initial_params: Callable[[Any, Any], Any] | None = None
    # A params tree of several models (PPO's {'policy', 'value'}): name -> model config of each, the one the stage
    # trains for use first. Recorded in every checkpoint so that omni.load finds its model; None: one model.
    checkpoint_models: dict[str, ml_collections.ConfigDict] | None = None


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


class NonFiniteLoss(RuntimeError):
    pass


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory per device than the devices have (raised before allocating)."""


def check_fits(memory: dict[str, float] | None, device) -> None:
    capacity = parallel.device_memory_bytes(device)
    if memory and capacity and memory["peak"] > capacity:
        raise DoesNotFit(f"the compiled train step needs {memory['peak'] / 2 ** 30:.1f} GiB per device, and this "
                         f"host's {device.platform} devices have {capacity / 2 ** 30:.1f} GiB each "
                         "(--config.force=True tries anyway)")


def abstract_state(config: ml_collections.ConfigDict, model: nn.Module, tokens_shape: tuple[int, int],
                   mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState, Callable]:
    """(abstract TrainState, its shardings, init_fn(rng) -> TrainState) without allocating or running anything:
    under a TPU topology's mesh on a CPU host (omni/aot.py) not even a key may be made eagerly."""
    tx = optimizer(config.optim)

    def init_fn(rng):
        params = nn.unbox(model.init(rng, jnp.zeros(tokens_shape, jnp.int32))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    rng = jax.eval_shape(jax.random.key, 0)
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    boxed = jax.eval_shape(lambda r, t: model.init(r, t)["params"], rng, tokens)
    param_shardings = parallel.logical_shardings(boxed, mesh)
    abstract = jax.eval_shape(init_fn, rng)
    rep = parallel.replicated(mesh)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                          transform_non_params=lambda _: rep)
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings)
    return abstract, shardings, init_fn


def make_train_step(config: ml_collections.ConfigDict, loss_fn: LossFn) -> Callable:
    tx = optimizer(config.optim)
    schedule = lr_schedule(config.optim)
    accum, seed = config.train.grad_accum, config.train.seed

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout masks depend only on seed and step

        # Micro-batch i takes rows i, i+accum, ...: every device keeps its share of every micro-batch.
        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

        def grads_and_sums(micro, i):
            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, micro, jax.random.fold_in(rng, i))
            return grads, sums

        if accum == 1:  # no loop: XLA fuses across the whole step (a 1-trip loop costs ~5% on CPU)
            grads, sums = grads_and_sums(batch, 0)
        else:
            micro_batches = jax.tree.map(split, batch)
            first = jax.tree.map(lambda x: x[0], micro_batches)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_sums, first, 0))
            (grads, sums), _ = jax.lax.scan(lambda acc, xs: (jax.tree.map(jnp.add, acc, grads_and_sums(*xs)), None),
                                            zeros, (micro_batches, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = normalise(sums)
        out.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

    return train_step


def normalise(sums: dict) -> dict:
    """Every sum over its denominator: its own 'x_weight' if it has one, else 'weight'."""
    out = {}
    for k, v in sums.items():
        if k != "weight" and not k.endswith("_weight"):
            out[k] = v / jnp.maximum(sums.get(f"{k}_weight", sums["weight"]), 1.0)
    return out


class Preemption:
    """SIGTERM (TPU maintenance, spot reclaim) or Ctrl-C (SIGINT) asks the loop to checkpoint and stop after the
    step it is in. A second Ctrl-C stops at once, without saving."""

    def __init__(self):
        self.requested = 0  # the signal received, 0 while none
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signum  # no printing here: it may interrupt a print

    def should_stop(self, step: int, every: int) -> bool:
        """One process alone reads its own flag at every step. Several must stop at the same step (saving is
        collective), so they agree every `every` steps: any process signalled -> all stop there."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """Runs (or resumes) a stage to config.train.steps. Returns the summary; {'preempted': step} if stopped."""
    t = config.train
    mesh = parallel.make_mesh(config.mesh)
    tokens_shape = (t.batch_size // t.grad_accum, task.example_batch["inputs"].shape[-1])
    run = Workdir(workdir)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        abstract, shardings, init_fn = abstract_state(config, task.model, tokens_shape, mesh)
        meta = checkpoint.meta(config, task.tokenizer_path, task.checkpoint_models)
        batch_sharding = parallel.batch_sharding(mesh)
        # Global shapes: every key's local rows scaled as 'inputs' are (PPO-ptx's pretraining rows differ in number).
        scale = t.batch_size // task.example_batch["inputs"].shape[0]
        batch_shapes = {k: ((v.shape[0] * scale,) + v.shape[1:], v.dtype) for k, v in task.example_batch.items()}
        # Compiled before anything is allocated, so an OOM shows here, with the compiler's own numbers.
        step_fn = compile_train_step(config, task.loss_fn, abstract, shardings, batch_shapes, mesh)
        memory = compiled_memory(step_fn)
        if memory and jax.process_index() == 0:
            print(memory_line(memory), flush=True)
        if not config.force:  # every process checks its own (memory_stats is local)
            check_fits(memory, jax.local_devices()[0])
        state = _initial_state(config, run, abstract, shardings, init_fn, task)
        eval_fn = jax.jit(lambda p, b: task.loss_fn(p, b, None)[1], in_shardings=(shardings.params, batch_sharding))
        start = int(jax.device_get(state.step))
        mngr = run.writer(t.keep_checkpoints)  # after any damaged step was set aside: Orbax lists steps once
        if jax.process_index() == 0:  # training starts: the workdir now holds this run (its identity)
            run.write_config(config)
            run.keep_metrics_until(start)
        return _Loop(config, workdir, task, mesh, mngr, meta, step_fn, eval_fn, start).run(state)


def compile_train_step(config: ml_collections.ConfigDict, loss_fn: LossFn, abstract: TrainState,
                       shardings: TrainState, batch_shapes: dict[str, tuple], mesh: jax.sharding.Mesh):
    """The train step compiled ahead of time for abstract inputs (global batch shapes); nothing is allocated."""
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(make_train_step(config, loss_fn), donate_argnums=0, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in batch_shapes.items()}
    return step.lower(checkpoint.with_shardings(abstract, shardings), batch).compile()


def compiled_memory(compiled) -> dict[str, float] | None:
    """Per-device bytes from the compiler's memory analysis (None where the backend gives none)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    parts = {name: float(getattr(analysis, f"{name}_size_in_bytes"))
             for name in ("argument", "output", "alias", "temp", "generated_code")}
    parts["peak"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
    return parts


def memory_line(memory: dict[str, float]) -> str:
    gib = {k: v / 2 ** 30 for k, v in memory.items()}
    return (f"compiled train step: {gib['peak']:.3f} GiB per device (arguments {gib['argument']:.3f}, "
            f"temporaries {gib['temp']:.3f}, outputs {gib['output']:.3f}, donated {gib['alias']:.3f})")


def _initial_state(config, run: Workdir, abstract, shardings, init_fn, task) -> TrainState:
    target = checkpoint.with_shardings(abstract, shardings)
    had_steps, data_start = bool(checkpoint.step_dirs(run.path)), task.train_iter.get_state()
    resumed = run.resume(target, task.train_iter)
    if resumed is not None:
        return resumed[0]
    if had_steps:  # every step was damaged: a failed restore may have moved the data iterator
        task.train_iter.set_state(data_start)
        print(f"warning: no intact checkpoint left in {run.file('checkpoints')}: starting again from step 0",
              flush=True)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.train.seed))
    if task.initial_params is not None or config.init_from:
        params = (task.initial_params(target.params, state.params) if task.initial_params is not None
                  else _params_from(config, target.params, state.params))
        state = jax.jit(lambda s, p: s.replace(params=p, opt_state=optimizer(config.optim).init(p)),
                        out_shardings=shardings, donate_argnums=0)(state, params)
    return state


def _params_from(config, target_params, fresh_params):
    """The parameters of config.init_from's latest checkpoint, onto this run's shardings. Parameters this model
    has and the source does not (a new reward/value head) keep their fresh initialisation."""
    source_dir = Workdir(config.init_from)
    source, _, step = source_dir.meta()
    source_keys = set(abstract_params(source.model))
    extra = sorted(source_keys - set(target_params))
    if extra:
        raise checkpoint.CheckpointError(
            f"config.init_from={config.init_from} holds a model with model.head="
            f"{source.model.get('head', 'lm')!r} (parameters {extra}), which a model with model.head="
            f"{config.model.head!r} cannot start from")
    print(f"initialising parameters from {config.init_from} step {step}"
          + "".join(f"; {k} initialised fresh" for k in sorted(set(target_params) - source_keys)), flush=True)
    restored = source_dir.restore_params(step, {k: target_params[k] for k in source_keys})
    return {**fresh_params, **restored}


class _Throughput:
    """Tokens per second in windows between log lines, timed at synced steps (metrics on the host). The first
    step includes compilation: it starts the first window instead of counting in it."""

    def __init__(self, tokens_per_step: int, start: int):
        self.tokens_per_step, self.last_done = tokens_per_step, start
        self.window_start: float | None = None
        self.window_tokens, self.timed_tokens, self.timed_s = 0, 0, 0.0

    def synced(self, done: int, now: float) -> None:
        """Step `done` has finished at `now`."""
        if self.window_start is None:
            self.window_start, self.window_tokens = now, 0
        else:
            self.window_tokens += self.tokens_per_step * (done - self.last_done)
        self.last_done = done

    def close_window(self, now: float) -> float:
        """The window's tokens per second (nan if it timed none); the next window starts at `now`."""
        elapsed = now - self.window_start
        tps = self.window_tokens / elapsed if elapsed > 0 and self.window_tokens else float("nan")
        if self.window_tokens:
            self.timed_tokens, self.timed_s = self.timed_tokens + self.window_tokens, self.timed_s + elapsed
        self.window_start, self.window_tokens = now, 0
        return tps

    def overall(self) -> float:
        """Tokens per second over every timed window."""
        return self.timed_tokens / self.timed_s if self.timed_s else float("nan")


class _Loop:
    """The steps of one train() call and the work between them. The host waits for a step only at a boundary
    (a log, evaluation or checkpoint step, the last step, a preemption stop, and the first step, which ends
    compilation); other steps are dispatched without waiting."""

    def __init__(self, config, workdir, task: Task, mesh, mngr, meta, step_fn, eval_fn, start: int):
        self.t, self.task, self.mesh, self.mngr, self.meta = config.train, task, mesh, mngr, meta
        self.step_fn, self.eval_fn, self.start = step_fn, eval_fn, start
        self.tokens_per_step = self.t.batch_size * (task.tokens_per_example
                                                    or math.prod(task.example_batch["inputs"].shape[1:]))
        self.peak, self.peak_source = metrics.peak_flops_per_device()
        run = Workdir(workdir)
        self.writer = metrics.MetricsWriter(run.file(METRICS), run.file(TENSORBOARD), self.t.steps, start)
        self.throughput = _Throughput(self.tokens_per_step, start)
        # the last boundary's metrics, the last evaluation's, before_step's waiting for the next log line
        self.last, self.evals, self.pending = {}, {}, {}
        self.unsealed: list[int] = []  # steps saved (asynchronously) whose checksums are not written yet

    def run(self, state: TrainState) -> dict:
        """Steps to config.train.steps: the run's summary, or {'preempted': step} if stopped."""
        num_params = count_params(state.params)
        self.writer.message(f"{num_params:,} parameters; {self.tokens_per_step:,} tokens/step; peak "
                            f"{self.peak / 1e9:,.0f} GFLOP/s per device ({self.peak_source}); "
                            f"steps {self.start}..{self.t.steps}")
        preemption = Preemption()
        if self.start >= self.t.steps:  # already finished: report the final evaluation again
            self.evals = _evaluate(self.task, self.eval_fn, state.params, self.mesh)
        try:
            for step in range(self.start, self.t.steps):
                state, step_metrics = self._step(state, step)
                done = step + 1
                stop = preemption.should_stop(done, self.t.log_every)
                if self._is_boundary(done, stop):
                    state = self._at_boundary(state, step_metrics, done, stop)
                if stop:
                    self._seal_saved()
                    by = signal.Signals(preemption.requested).name if preemption.requested else "another process"
                    self.writer.message(f"stopped by {by}: saved step {done}; rerun the same command to resume")
                    return {"preempted": done}
        finally:
            self._seal_saved()
            preemption.restore()
            self.writer.close()
        return self._summary(num_params)

    def _step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        """The task's before_step (its metrics wait for the next log line), then one update on the next batch."""
        if self.task.before_step is not None:
            self.pending.update(self.task.before_step(state.params, step))
        batch = parallel.global_batch(next(self.task.train_iter), self.mesh)
        return self.step_fn(state, batch)

    def _is_boundary(self, done: int, stop: bool) -> bool:
        t = self.t
        return (done % t.log_every == 0 or done % t.eval_every == 0 or done % t.checkpoint_every == 0
                or done == t.steps or stop or done == self.start + 1)

    def _at_boundary(self, state: TrainState, step_metrics: dict, done: int, stop: bool) -> TrainState:
        """Waits for step `done`, checks its loss, then logs, finalizes, evaluates and checkpoints where due."""
        self.last = metrics.to_host(step_metrics)  # waits for this step: timings below are real
        self._check_finite(done)
        now = time.perf_counter()
        self.throughput.synced(done, now)
        t = self.t
        if done % t.log_every == 0 or done == t.steps:
            self._log_step(done, now)
        if done == t.steps and self.task.finalize is not None:
            state = self._finalize(state)
        if done % t.eval_every == 0 or done == t.steps:
            self._evaluate_and_log(state, done)
        if done % t.checkpoint_every == 0 or done == t.steps or stop:
            self._seal_saved()
            checkpoint.save(self.mngr, done, state, self.task.train_iter, self.meta)
            self.unsealed.append(done)
        return state

    def _seal_saved(self) -> None:
        """Waits for the saves in flight, then records their checksums (omni/train/checkpoint.py)."""
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            for step in self.unsealed:
                checkpoint.seal(os.path.join(str(self.mngr.directory), str(step)))
        self.unsealed = []

    def _check_finite(self, done: int) -> None:
        if not math.isfinite(self.last["loss"]):
            raise NonFiniteLoss(f"non-finite loss {self.last['loss']} at step {done}; last good checkpoint: "
                                f"{self.mngr.latest_step()} in {self.mngr.directory}")

    def _log_step(self, done: int, now: float) -> None:
        """Step `done`'s metrics line: with throughput and MFU since the last line, and before_step's metrics."""
        tps = self.throughput.close_window(now)
        self.last.update(tokens_per_s=tps, mfu=self._mfu(tps), **self.pending)
        self.pending = {}
        self.writer.write(done, self.last)
        self.writer.progress(done, {"loss": self.last["loss"], "tok/s": tps, "mfu": self.last["mfu"]})

    def _finalize(self, state: TrainState) -> TrainState:
        """The task's finalize on the last step's params, placed as they were; its metrics join the last ones."""
        params, final = self.task.finalize(state.params)
        state = state.replace(params=jax.device_put(params, jax.tree.map(lambda a: a.sharding, state.params)))
        self.writer.message(" ".join(f"{k} {v:.4g}" for k, v in final.items()))
        self.last.update(final)
        return state

    def _evaluate_and_log(self, state: TrainState, done: int) -> None:
        self.evals = _evaluate(self.task, self.eval_fn, state.params, self.mesh)
        self.writer.write(done, self.evals)
        self.writer.message(f"step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in self.evals.items()))

    def _summary(self, num_params: int) -> dict:
        tps = self.throughput.overall()
        mfu = self._mfu(tps)  # first: a rate above the measured peak raises it
        peak, source = metrics.peak_flops_per_device()
        return {"step": self.t.steps, **self.last, **self.evals, "params": num_params, "tokens_per_s": tps,
                "mfu": mfu, "peak_flops_per_device": peak, "peak_flops_source": source, **self.task.summary_extras}

    def _mfu(self, tokens_per_s: float) -> float:
        return metrics.mfu(tokens_per_s * self.task.flops_per_token / jax.device_count())


def _evaluate(task: Task, eval_fn, params, mesh) -> dict[str, float]:
    evals = evaluate(eval_fn, params, task.eval_batches, mesh, task.language_model)
    if task.eval_extra is not None:
        evals.update(task.eval_extra(params, evals))
    return evals


def evaluate(eval_fn, params, batches: list[dict], mesh, perplexity: bool = True) -> dict[str, float]:
    if not batches:  # a stage evaluated by eval_extra alone
        return {}
    totals = None
    for b in batches:
        sums = eval_fn(params, parallel.global_batch(b, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    out = {f"eval_{k}": v for k, v in metrics.to_host(normalise(totals)).items()}
    if perplexity:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 700.0))
    return out
