"""Orbax checkpoints: one step directory holds params, optimizer state, the data iterator's position, the
resolved config and the tokenizer, so a workdir alone is enough to resume, start the next stage or sample.
This module is the Orbax side (items, handlers, save, restore); omni/workdir.py is what reads a workdir's."""
from __future__ import annotations

import base64
import os

import grain
from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from omni.data.tokenizer import file_name


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


def meta(config: ml_collections.ConfigDict, tokenizer_path: str, models: dict | None = None) -> dict:
    """The JSON item of every checkpoint: the resolved config, the tokenizer file (bytes and name) and, where the
    params tree holds several models, each one's model config (name -> config.model dict; the first is the one
    the stage trains for use, e.g. PPO's policy beside its value function)."""
    with open(tokenizer_path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    out = {"config": config.to_dict(), "tokenizer_file": file_name(tokenizer_path), "tokenizer_b64": data}
    if models:
        out["models"] = {name: m.to_dict() for name, m in models.items()}
    return out


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


def with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
