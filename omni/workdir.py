"""The workdir: one directory per run, and the one place that knows what is in it.

    config.json       the resolved config of the run
    metrics.jsonl     one JSON object per logged step (eval lines carry eval_loss); tb/ the same for TensorBoard
    checkpoints/      Orbax steps: params, optimizer state, data position, and meta (config + tokenizer bytes)
    tokenizer.model   the run's tokenizer (tokenizer.json for an imported Hugging Face one)
    samples.jsonl     what the sample and label stages drew
    summary.json      the stage's headline metrics, written when it finishes: a workdir with it is done
    lock              while a run holds the workdir: who (host, pid, command)
    damaged/          checkpoint steps found damaged, set aside (never deleted)
    cache/            values computed from this run's model by later stages, keyed by a fingerprint of all they
                      depend on (the held-out measures of a reference policy, DPO's reference log-probabilities)

Stages, the trainer, the pipeline and the sweep read and write these files only through `Workdir`.

Nothing is lost: a run checks the workdir before it writes anything (`hold`), a checkpoint is checksummed
once saved and checked before it is read (the newest intact step is used), and config.json (the run's
identity) is written only once training starts, so a run refused at any check leaves the workdir as it was.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable

from flax import traverse_util

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from omni import config as config_lib
from omni.files import write_atomic
from omni import data
from omni.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE
from omni.generate import GenerationError, Generator
from omni.models.actor_critic import value_config
from omni.models.params import abstract_params
from omni.train import checkpoint
from omni.train.checkpoint import CheckpointError

CONFIG, SUMMARY, METRICS, TENSORBOARD = "config.json", "summary.json", "metrics.jsonl", "tb"
CHECKPOINTS, SAMPLES, LOCK, DAMAGED, CACHE = "checkpoints", "samples.jsonl", "lock", "damaged", "cache"

# The keys a rerun may change and still resume the workdir's run (a key, or a whole section "name."): how long
# and how fast it runs, its learning-rate schedule, how often it logs, evaluates and saves, and the devices.
# Every other key is the run's identity (stage, architecture, tokenizer and data, shapes, optimizer): a rerun
# that differs in one is refused before anything is written.
RESUMABLE = (
    "name", "dry_run", "force", "topology", "cpu_devices", "mesh.", "distributed.coordinator",
    "distributed.process_id", "data.data_dir", "model.remat", "model.attention", "model.attention_chunk",
    "model.dropout", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "optim.lr", "optim.warmup_steps", "optim.decay_steps",
    "optim.min_lr_ratio", "sft.", "ppo.iterations", "ppo.eval_prompts", "ppo.eval_samples",
    "ppo.ptx_eval_rows", "ppo.sample_every", "prompt", "sample.")


class WorkdirError(RuntimeError):
    """A workdir this run cannot use (a file, not writable, held by another run); the message names it."""


def write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=2, default=lambda x: float(x) if np.isscalar(x) else str(x))
    write_atomic(path, text.encode())


def fingerprint(settings: dict, *trees) -> str:
    """A key of everything a computed value depends on: JSON-able `settings` and the bytes of `trees` (params
    pytrees, NumPy arrays; gathered to this host), and the bytes of the files listed under settings['files'] (the
    modules that compute the value, so that changing how it is computed never serves a stale one; a tokenizer)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in settings.items() if k != "files"}, sort_keys=True, default=str).encode())
    for path in settings.get("files", []):  # by content: where they are does not matter
        with open(path, "rb") as f:
            part = f.read()
        h.update(hashlib.sha256(part).digest())
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            a = np.asarray(leaf)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


class Workdir:
    """A run's directory. Reading a checkpoint's meta or params opens one read-only Orbax manager, kept."""

    def __init__(self, path: str):
        self.path = path
        self._reader: ocp.CheckpointManager | None = None
        self._metas: dict[int, tuple[ml_collections.ConfigDict, str, dict | None]] = {}
        self._intact: int | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self) -> "Workdir":
        os.makedirs(self.path, exist_ok=True)
        return self

    def cached(self, name: str, compute: Callable[[], dict]) -> dict:
        """compute()'s dict, kept in cache/NAME once computed and read from there after (NAME.json: JSON values;
        NAME.npz: arrays). NAME must carry a `fingerprint` of all the value depends on. Runs of several processes
        compute it every time (they would disagree on whether the file is there); a cache that cannot be read or
        written is computed anew, with a warning."""
        path = os.path.join(self.file(CACHE), name)
        if jax.process_count() > 1:
            return compute()
        if os.path.exists(path):
            try:
                return _read_cached(path)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                print(f"warning: {path} is unreadable ({e}): computing it again", file=sys.stderr, flush=True)
        value = compute()
        try:
            os.makedirs(self.file(CACHE), exist_ok=True)
            write_atomic(path, _cache_bytes(path, value))
        except OSError as e:
            print(f"warning: could not keep {path} ({e})", file=sys.stderr, flush=True)
        return value

    # -- holding the workdir for one run -------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, config: ml_collections.ConfigDict):
        """The workdir for one run of `config`, checked before anything is written: it must be a writable
        directory, hold no other run's identity and no live run's lock. Process 0 locks it while the run lasts;
        a run that fails or is stopped before it has started training (config.json) leaves it as it found it."""
        self.check_writable()
        self.check_identity(config)
        if jax.process_index() != 0:
            yield self
            return
        existed = os.path.isdir(self.path)
        before = set(os.listdir(self.path)) if existed else set()
        self._lock()
        try:
            yield self
        except BaseException:
            self._unlock()
            if not os.path.isfile(self.file(CONFIG)):
                self._remove_created(existed, before)
            raise
        self._unlock()

    def check_writable(self) -> None:
        """The workdir (or the directory it will be made in) and its checkpoints can be written: found now,
        not at the first save."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise WorkdirError(f"workdir {self.path} is a file, not a directory; name another --workdir")
        place = self.path
        while not os.path.isdir(place):
            place = os.path.dirname(os.path.abspath(place))
        for where in (place, self.file(CHECKPOINTS)):
            if where == self.file(CHECKPOINTS) and not os.path.lexists(where):
                continue
            if not os.path.isdir(where):
                raise WorkdirError(f"{where} is not a directory; the run cannot save checkpoints there")
            try:  # os.access is no proof (root, read-only mounts): try it
                fd, probe = tempfile.mkstemp(dir=where, prefix=".omni-write-test-")
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise WorkdirError(f"cannot write in {where} ({e.strerror}); the run would fail at its first "
                                   "save. Make it writable or name another --workdir") from e

    def check_identity(self, config: ml_collections.ConfigDict) -> None:
        """A workdir that holds a run can only be resumed by the same run: every key outside RESUMABLE equal."""
        saved = self.saved_config()
        if saved is None:
            return
        ours = traverse_util.flatten_dict(config.to_dict(), sep=".")
        theirs = traverse_util.flatten_dict(config_lib.with_defaults(saved).to_dict(), sep=".")
        differ = [k for k in sorted(ours, key=lambda k: (k != "stage", k))  # a different stage first
                  if k in theirs and ours[k] != theirs[k] and not _resumable(k)]
        if differ:
            shown = ", ".join(f"config.{k}={theirs[k]!r} (this run: {ours[k]!r})" for k in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise config_lib.ConfigError(
                f"{self.path} holds a {theirs.get('stage')!r} run with {shown}{more}; a rerun may change only "
                "steps, the lr schedule, logging/eval/checkpoint cadence and devices (workdir.RESUMABLE). "
                "Rerun with the workdir's values or name another --workdir")

    def _lock(self) -> None:
        """Takes the workdir's lock file: refused while a live run holds it; a dead run's is taken over."""
        self.create()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        while True:
            try:
                fd = os.open(self.file(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._lock_holder()
                if holder is not None:
                    raise WorkdirError(holder) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return

    def _lock_holder(self) -> str | None:
        """Who holds the existing lock, as the refusal's text; None after taking over a stale one."""
        try:
            with open(self.file(LOCK)) as f:
                held = json.load(f)
            host, pid = held["host"], int(held["pid"])
        except FileNotFoundError:
            return None  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(self.file(LOCK)) < 10:  # being written right now
                return f"{self.path} is being locked by another run (file {self.file(LOCK)})"
            host, pid, held = socket.gethostname(), -1, {}
        if host != socket.gethostname():
            return (f"{self.path} is in use by pid {pid} on host {host} since {held.get('since')}; if that run has "
                    f"ended, delete {self.file(LOCK)}")
        if pid > 0 and _process_start(pid) is not None and _process_start(pid) == held.get("started"):
            return (f"{self.path} is in use by another run (pid {pid}, since {held.get('since')}: "
                    f"{held.get('command', '')[:120]}); wait for it or name another --workdir")
        print(f"warning: taking over the lock of a run that is gone (pid {pid}, since {held.get('since')})",
              flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(LOCK))
        return None

    def _unlock(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            with open(self.file(LOCK)) as f:
                mine = json.load(f).get("pid") == os.getpid()
            if mine:
                os.unlink(self.file(LOCK))

    def _remove_created(self, existed: bool, before: set[str]) -> None:
        """Removes what this run created in the workdir (the workdir too, if it made it)."""
        if not os.path.isdir(self.path):
            return
        for name in set(os.listdir(self.path)) - before:
            path = self.file(name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    # -- the run's JSON files ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return os.path.isfile(self.file(SUMMARY))

    def summary(self) -> dict | None:
        """The stage's summary.json, or None while it has not finished."""
        if not self.finished:
            return None
        with open(self.file(SUMMARY)) as f:
            return json.load(f)

    def write_summary(self, summary: dict) -> None:
        write_json(self.create().file(SUMMARY), summary)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        write_json(self.create().file(CONFIG), config.to_dict())

    def saved_config(self) -> dict | None:
        """config.json as the run wrote it (None before it did)."""
        if not os.path.isfile(self.file(CONFIG)):
            return None
        with open(self.file(CONFIG)) as f:
            return json.load(f)

    def metrics(self) -> list[dict]:
        """Every line of metrics.jsonl, in order (empty before the first logged step). A line cut short by a
        kill mid-write is left out."""
        if not os.path.isfile(self.file(METRICS)):
            return []
        with open(self.file(METRICS), "rb") as f:
            return [r for r in map(_json_line, f) if r is not None]

    def keep_metrics_until(self, step: int) -> None:
        """Drops the metrics logged after `step` (the step a run resumes from), so that each step is in
        metrics.jsonl once however often the run was stopped and resumed."""
        if not os.path.isfile(self.file(METRICS)):
            return
        with open(self.file(METRICS), "rb") as f:
            lines = [line for line in f if line.strip()]
        kept = [r for r in map(_json_line, lines) if r is not None and r.get("step", 0) <= step]
        if len(kept) != len(lines):  # also a torn last line
            write_atomic(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in kept).encode())

    # -- checkpoints -----------------------------------------------------------------------------------------
    def writer(self, keep: int) -> ocp.CheckpointManager:
        """The manager a training run saves through (asynchronously), keeping the last `keep` steps."""
        return checkpoint.manager(self.path, keep)

    def _read(self) -> ocp.CheckpointManager:
        if self._reader is None:
            self._reader = checkpoint.manager(self.path, keep=1, read_only=True)
        return self._reader

    def latest_step(self) -> int | None:
        if not os.path.isdir(self.file(CHECKPOINTS)):
            return None
        return checkpoint.manager(self.path, keep=1, read_only=True).latest_step()  # fresh: steps get added

    def intact_step(self) -> int:
        """The newest step whose files are as they were saved. Newer damaged ones are named in a warning and
        left where they are (a reader changes nothing; the next training run sets them aside)."""
        if self._intact is not None:
            return self._intact
        damaged = []
        for step, path in sorted(checkpoint.step_dirs(self.path).items(), reverse=True):
            reason = checkpoint.damage(path)
            if reason is None:
                if damaged:
                    print(f"warning: {'; '.join(damaged)}: using step {step}", file=sys.stderr, flush=True)
                self._intact = step
                return step
            damaged.append(f"checkpoint {path} is damaged ({reason})")
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.file(CHECKPOINTS)}: {'; '.join(damaged)}")
        raise CheckpointError(f"no checkpoint in {self.file(CHECKPOINTS)}")

    def resume(self, target, data_iter):
        """(train state, step) from the newest intact checkpoint onto `target`, moving `data_iter` to its
        position; None when there is none. A newer step that is damaged or cannot be restored is set aside
        into damaged/ (never deleted), with a warning naming it."""
        for step, path in sorted(checkpoint.step_dirs(self.path).items(), reverse=True):
            reason = checkpoint.damage(path)
            if reason is None:
                try:
                    state = checkpoint.restore(checkpoint.manager(self.path, keep=1, read_only=True), step, target,
                                               data_iter)
                except CheckpointError as e:
                    reason = str(e)
                else:
                    print(f"resuming from {path}", flush=True)
                    return state, step
            self._set_aside(step, path, reason)
        return None

    def _set_aside(self, step: int, path: str, reason: str) -> None:
        """Moves a damaged step out of checkpoints/ (Orbax would restore or overwrite it) into damaged/."""
        dest = self.file(os.path.join(DAMAGED, str(step)))
        n = 1
        while os.path.exists(dest):
            n += 1
            dest = self.file(os.path.join(DAMAGED, f"{step}-{n}"))
        if jax.process_index() == 0:
            os.makedirs(self.file(DAMAGED), exist_ok=True)
            os.replace(path, dest)
        if jax.process_count() > 1:  # every process sees the same steps from here on
            multihost_utils.sync_global_devices(f"omni set aside {step}")
        print(f"warning: checkpoint {path} is damaged ({reason}); set aside in {dest}", flush=True)

    def meta(self, step: int | None = None) -> tuple[ml_collections.ConfigDict, str, int]:
        """(config, path of the tokenizer file written beside the checkpoints, step) of a checkpoint: the given
        step, or the newest intact one."""
        if step is None:
            step = self.intact_step()
        elif step not in self._metas:
            self._check_step(step)
        if step not in self._metas:
            self._metas[step] = self._read_meta(step)
        config, tokenizer_path, _ = self._metas[step]
        return config, tokenizer_path, step

    def _check_step(self, step: int) -> None:
        path = checkpoint.step_dirs(self.path).get(step)
        if path is None:
            raise CheckpointError(f"no step {step} in {self.file(CHECKPOINTS)} (steps: "
                                  f"{sorted(checkpoint.step_dirs(self.path))})")
        if reason := checkpoint.damage(path):
            raise CheckpointError(f"checkpoint {path} is damaged ({reason})")

    def _read_meta(self, step: int) -> tuple[ml_collections.ConfigDict, str, dict | None]:
        where = f"{self._read().directory}/{step}"
        try:
            m = self._read().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
            raise CheckpointError(f"cannot read checkpoint {where}: {checkpoint.first_line(e)}") from e
        # Checkpoints written before HF tokenizers existed hold only a sentencepiece model.
        name = m.get("tokenizer_file", SENTENCEPIECE_FILE)
        data_ = m.get("tokenizer_b64", m.get("tokenizer_model_b64"))
        if name not in (SENTENCEPIECE_FILE, HF_FILE) or data_ is None:  # the name becomes a path: only ours
            raise CheckpointError(f"checkpoint {where} holds no readable tokenizer (tokenizer_file={name!r})")
        tokenizer_path = self.file(name)
        if not os.path.exists(tokenizer_path):
            write_atomic(tokenizer_path, base64.b64decode(data_))
        config = config_lib.with_defaults(m["config"])
        return config, tokenizer_path, m.get("models") or _older_models(config)

    def restore_params(self, step: int, target):
        """Only the parameters of a checkpoint, onto `target`'s shapes and shardings."""
        try:
            return self._read().restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot restore params from {self._read().directory}/{step}: "
                                  f"{checkpoint.first_line(e)}") from e

    def model_params(self, place: Callable[[Any], Any], step: int | None = None
                     ) -> tuple[ml_collections.ConfigDict, Any, str, int]:
        """(config, params, tokenizer path, step) of the model the workdir holds, restored onto `place(boxed
        abstract params)` (a tree of shardings). A checkpoint holding several models (PPO's policy and value)
        gives its first, the one the stage trained to be used (the policy)."""
        config, tokenizer_path, step = self.meta(step)
        models = self._metas[step][2]
        boxed = ({name: abstract_params(ml_collections.ConfigDict(m)) for name, m in models.items()} if models
                 else abstract_params(config.model))
        # Unboxed by hand: nn.unbox under a mesh would add sharding constraints to these abstract values.
        shapes = jax.tree.map(lambda a: a.value if isinstance(a, nn.Partitioned) else a, boxed,
                              is_leaf=lambda a: isinstance(a, nn.Partitioned))
        params = self.restore_params(step, checkpoint.with_shardings(shapes, place(boxed)))
        return config, params[next(iter(models))] if models else params, tokenizer_path, step

    def load(self, step: int | None = None):
        """(config, params, tokenizer) of the latest (or given) checkpoint: `omni.load`.

        The params are uncommitted arrays on the default device, like freshly initialised ones. Committed ones
        (what Orbax restores onto a sharding) made a user's own `jax.jit` step compile twice: optax's fresh
        state holds an uncommitted step count, the first call's outputs all come back committed, so the second
        call's arguments are placed differently. So the params are restored into host memory (the CPU device)
        and each leaf handed to `jax.device_put` as a NumPy array (on a CPU-only host usually without a copy)."""
        try:
            host = jax.local_devices(backend="cpu")[0]
        except (RuntimeError, ValueError):  # JAX_PLATFORMS without cpu: the default device, copied through NumPy
            host = jax.local_devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(host)
        config, restored, tokenizer_path, _ = self.model_params(
            lambda boxed: jax.tree.map(lambda _: sharding, boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned)),
            step)
        leaves, treedef = jax.tree.flatten(restored)
        del restored
        for i, leaf in enumerate(leaves):  # each host copy is dropped as soon as its leaf is placed
            leaves[i] = jax.device_put(np.asarray(leaf))
        return config, jax.tree.unflatten(treedef, leaves), data.Tokenizer(tokenizer_path)

    def generator(self, step: int | None = None) -> tuple[ml_collections.ConfigDict, Generator, data.Tokenizer]:
        """(config, a Generator of the latest (or given) checkpoint, tokenizer) of a language model's workdir."""
        config, params, tokenizer = self.load(step)
        if config.model.get("head", "lm") != "lm":
            raise GenerationError(f"{self.path} holds a {config.stage} model with a scalar head (model.head="
                                  f"{config.model.head!r}): it scores text but cannot generate it")
        if tokenizer.vocab_size > config.model.vocab_size:
            raise GenerationError(f"{self.path}: its tokenizer has {tokenizer.vocab_size} pieces but the model's "
                                  f"vocabulary is {config.model.vocab_size} (model.vocab_size)")
        pad = tokenizer.pad_id if 0 <= tokenizer.pad_id < config.model.vocab_size else tokenizer.eos_id
        return config, Generator(config.model, params, pad_id=pad), tokenizer

    def write_model(self, config: ml_collections.ConfigDict, params, tokenizer_path: str) -> None:
        """A workdir holding one model and no training state (an imported or a compressed one): a step-0
        checkpoint of params and meta, and config.json. Stages can init_from it and omni.load reads it."""
        if self.latest_step() is not None:
            raise CheckpointError(f"{self.path} already holds checkpoints; write the model into a new workdir")
        mngr = self.create().writer(keep=1)
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             meta=ocp.args.JsonSave(checkpoint.meta(config, tokenizer_path))))
        mngr.wait_until_finished()
        mngr.close()
        self.write_config(config)

    # -- the tokenizer ---------------------------------------------------------------------------------------
    def stage_tokenizer(self, config: ml_collections.ConfigDict) -> data.Tokenizer:
        """The tokenizer of the stage this run starts from (config.init_from) or of its corpus, copied here."""
        own = [self.file(n) for n in (SENTENCEPIECE_FILE, HF_FILE) if os.path.isfile(self.file(n))]
        if own and self.saved_config() is not None:  # a resumed run keeps the tokenizer it was trained with
            return data.Tokenizer(own[0])
        if config.init_from:
            _, path, _ = Workdir(config.init_from).meta()
            tokenizer = data.Tokenizer(path)
            if tokenizer.vocab_size != config.model.vocab_size:
                raise data.DataError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer of "
                                     f"config.init_from={config.init_from} has {tokenizer.vocab_size} pieces")
        else:
            tokenizer = data.get_tokenizer(config)
        return data.Tokenizer(tokenizer.save(self.create().path))  # atomic: every process writes the same file


def _cache_bytes(path: str, value: dict) -> bytes:
    if path.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, **value)
        return buffer.getvalue()
    return json.dumps(value).encode()


def _read_cached(path: str) -> dict:
    if path.endswith(".npz"):
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    with open(path) as f:
        return json.load(f)


def _json_line(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:  # also not UTF-8
        return None
    return row if isinstance(row, dict) else None


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, Linux), so that a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError, OverflowError, ValueError):
            return None
        return "alive"


def _older_models(config: ml_collections.ConfigDict) -> dict | None:
    """The models of a checkpoint written before its meta named them (checkpoint.meta's `models`): only a PPO
    run's held two, its policy and value function."""
    if config.stage != "ppo":
        return None
    return {"policy": config.model.to_dict(), "value": value_config(config.model).to_dict()}


def starting_point(config: ml_collections.ConfigDict, needs: str) -> Workdir:
    """The workdir a stage starts from (config.init_from); empty, it is an error that says what it must hold."""
    if not config.init_from:
        raise config_lib.ConfigError(f"config.init_from is empty: {needs}")
    return Workdir(config.init_from)
