"""Orbax checkpoints: one step directory holds params, optimizer state, the data iterator's position, the
resolved config and the tokenizer, so a workdir alone is enough to resume, start the next stage or sample."""
from __future__ import annotations

import base64
import os
import tempfile
from typing import Any, Callable

import grain
from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from omni import config as config_lib
from omni.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, file_name
from omni.train import metrics


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names its path."""


def manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    # Read-only: options that save nothing, which Orbax would otherwise force with a warning on every open.
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    level = logging.get_verbosity()
    if read_only:  # ...and it still warns that the directory is read-only, which is the point here
        logging.set_verbosity(logging.ERROR)
    try:
        return ocp.CheckpointManager(path, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    finally:
        logging.set_verbosity(level)


def meta(config: ml_collections.ConfigDict, tokenizer_path: str) -> dict:
    """The JSON item of every checkpoint: the resolved config and the tokenizer file (bytes and name)."""
    with open(tokenizer_path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return {"config": config.to_dict(), "tokenizer_file": file_name(tokenizer_path), "tokenizer_b64": data}


def write_model(workdir: str, config: ml_collections.ConfigDict, params, tokenizer_path: str) -> None:
    """A workdir holding one model and no training state (an imported or a compressed one): a step-0 checkpoint
    of params and meta, and config.json. Stages can init_from it and omni.load reads it."""
    if latest_step(workdir) is not None:
        raise CheckpointError(f"{workdir} already holds checkpoints; write the model into a new workdir")
    os.makedirs(workdir, exist_ok=True)
    mngr = manager(workdir, keep=1)
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         meta=ocp.args.JsonSave(meta(config, tokenizer_path))))
    mngr.wait_until_finished()
    mngr.close()
    metrics.write_json(os.path.join(workdir, "config.json"), config.to_dict())


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta_json: dict) -> None:
    """Starts an (asynchronous where possible) save of the train state at `step`."""
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
        data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta_json)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """Restores params and optimizer state onto the shardings in `abstract_state`; moves `data_iter`."""
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise CheckpointError(f"cannot restore checkpoint {mngr.directory}/{step}: {type(e).__name__}: {e}") from e
    step_array = jax.device_put(np.int32(step), abstract_state.step.sharding)
    return abstract_state.replace(step=step_array, params=out.params, opt_state=out.opt_state)


def latest_step(workdir: str) -> int | None:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return None
    return manager(workdir, keep=1, read_only=True).latest_step()


def read_meta(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, str, int]:
    """(config, path of the tokenizer file written beside the checkpoints, step) of a workdir's checkpoint."""
    mngr = manager(workdir, keep=1, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    try:
        m = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {mngr.directory}/{step}: {type(e).__name__}: {e}") from e
    # Checkpoints written before HF tokenizers existed hold only a sentencepiece model.
    name, data = m.get("tokenizer_file", SENTENCEPIECE_FILE), m.get("tokenizer_b64", m.get("tokenizer_model_b64"))
    if name not in (SENTENCEPIECE_FILE, HF_FILE) or data is None:  # the name becomes a path: trust only ours
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} holds no readable tokenizer "
                              f"(tokenizer_file={name!r})")
    tok_path = os.path.join(workdir, name)
    if not os.path.exists(tok_path):
        _write_atomic(tok_path, base64.b64decode(data))
    return config_lib.with_defaults(m["config"]), tok_path, step


def restore_params(workdir: str, step: int, abstract_params):
    """Only the parameters of a checkpoint (for init_from and omni.load), onto `abstract_params`' shardings."""
    mngr = manager(workdir, keep=1, read_only=True)
    try:
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot restore params from {mngr.directory}/{step}: {type(e).__name__}: {e}") from e


def model_params(workdir: str, place: Callable[[Any], Any], step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, Any, str, int]:
    """(config, params, tokenizer path, step) of the model a workdir holds, its params restored onto
    `place(boxed abstract params)` (a tree of shardings). A PPO workdir holds the policy and its value function
    ({'policy', 'value'}): its model is the policy."""
    from omni.estimate import abstract_params  # estimate imports the model; checkpoint stays light otherwise

    config, tokenizer_path, step = read_meta(workdir, step)
    boxed = abstract_params(config.model)
    if config.stage == "ppo":
        value = ml_collections.ConfigDict(config.model.to_dict())
        value.head = "scalar"
        boxed = {"policy": boxed, "value": abstract_params(value)}
    # Unboxed by hand: nn.unbox under a mesh would add sharding constraints to these abstract values.
    shapes = jax.tree.map(lambda a: a.value if isinstance(a, nn.Partitioned) else a, boxed,
                          is_leaf=lambda a: isinstance(a, nn.Partitioned))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, place(boxed))
    params = restore_params(workdir, step, target)
    return config, params["policy"] if config.stage == "ppo" else params, tokenizer_path, step


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
