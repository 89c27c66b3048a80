"""The workdir: one directory per run, and the one place that knows what is in it.

    config.json       the resolved config of the run
    metrics.jsonl     one JSON object per logged step (eval lines carry eval_loss); tb/ the same for TensorBoard
    checkpoints/      Orbax steps: params, optimizer state, data position, and meta (config + tokenizer bytes)
    tokenizer.model   the run's tokenizer (tokenizer.json for an imported Hugging Face one)
    samples.jsonl     what the sample and label stages drew
    summary.json      the stage's headline metrics, written when it finishes: a workdir with it is done

Stages, the trainer, the pipeline and the sweep read and write these files only through `Workdir`.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from omni import config as config_lib
from omni import data
from omni.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE
from omni.generate import GenerationError, Generator
from omni.models.actor_critic import value_config
from omni.models.params import abstract_params
from omni.train import checkpoint
from omni.train.checkpoint import CheckpointError

CONFIG, SUMMARY, METRICS, TENSORBOARD = "config.json", "summary.json", "metrics.jsonl", "tb"
CHECKPOINTS, SAMPLES = "checkpoints", "samples.jsonl"


def write_atomic(path: str, data_: bytes) -> None:
    """Readers see the old file or the new one, never half of one (a kill mid-write, or several processes)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data_)
    os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=2, default=lambda x: float(x) if np.isscalar(x) else str(x))
    write_atomic(path, text.encode())


class Workdir:
    """A run's directory. Reading a checkpoint's meta or params opens one read-only Orbax manager, kept."""

    def __init__(self, path: str):
        self.path = path
        self._reader: ocp.CheckpointManager | None = None
        self._metas: dict[int, tuple[ml_collections.ConfigDict, str, dict | None]] = {}

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self) -> "Workdir":
        os.makedirs(self.path, exist_ok=True)
        return self

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
        """Every line of metrics.jsonl, in order (empty before the first logged step)."""
        if not os.path.isfile(self.file(METRICS)):
            return []
        with open(self.file(METRICS)) as f:
            return [json.loads(line) for line in f if line.strip()]

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

    def meta(self, step: int | None = None) -> tuple[ml_collections.ConfigDict, str, int]:
        """(config, path of the tokenizer file written beside the checkpoints, step) of a checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.file(CHECKPOINTS)}")
        if step not in self._metas:
            self._metas[step] = self._read_meta(step)
        config, tokenizer_path, _ = self._metas[step]
        return config, tokenizer_path, step

    def _read_meta(self, step: int) -> tuple[ml_collections.ConfigDict, str, dict | None]:
        where = f"{self._read().directory}/{step}"
        try:
            m = self._read().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
            raise CheckpointError(f"cannot read checkpoint {where}: {type(e).__name__}: {e}") from e
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
                                  f"{type(e).__name__}: {e}") from e

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
        if config.init_from:
            _, path, _ = Workdir(config.init_from).meta()
            tokenizer = data.Tokenizer(path)
            if tokenizer.vocab_size != config.model.vocab_size:
                raise data.DataError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer of "
                                     f"config.init_from={config.init_from} has {tokenizer.vocab_size} pieces")
        else:
            tokenizer = data.get_tokenizer(config)
        return data.Tokenizer(tokenizer.save(self.create().path))  # atomic: every process writes the same file


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
