"""Orbax checkpoints: one step directory holds params, optimizer state, the data iterator's position, the
resolved config and the tokenizer, so a workdir alone is enough to resume, start the next stage or sample.
This module is the Orbax side (items, handlers, save, restore); omni/workdir.py is what reads a workdir's."""
from __future__ import annotations

import base64
import hashlib
import json
import os

import grain
from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from omni.data.tokenizer import file_name
from omni.files import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names its path."""


# Written into a step's directory once Orbax has finalized it: every file's size and SHA-256, so that a step
# damaged later (truncated, overwritten in place, deleted) is found before it is restored.
CHECKSUMS = "omni_checksums.json"


def _file_digests(step_dir: str) -> dict[str, list]:
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel.startswith(CHECKSUMS):  # the file itself, or its temporary twin mid-write
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            out[rel] = [os.path.getsize(path), digest.hexdigest()]
    return out


def seal(step_dir: str) -> None:
    """Records the checksums of a finalized step (process 0, after the save has finished)."""
    if not os.path.isdir(step_dir):  # already removed by keep_checkpoints
        return
    write_atomic(os.path.join(step_dir, CHECKSUMS), json.dumps(_file_digests(step_dir)).encode())


def damage(step_dir: str) -> str | None:
    """What is wrong with a step's files (the first difference found), or None when they are as saved. A step
    without checksums (written before they existed, or killed just after its save) cannot be checked: None."""
    try:
        with open(os.path.join(step_dir, CHECKSUMS)) as f:
            expected = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"its checksum file {CHECKSUMS} is unreadable ({type(e).__name__})"
    for rel, (size, sha) in sorted(expected.items()):
        path = os.path.join(step_dir, rel)
        try:
            if os.path.getsize(path) != size:
                return f"{rel} has {os.path.getsize(path)} bytes, {size} were saved"
        except OSError as e:
            return f"{rel} is missing or unreadable ({e.strerror or type(e).__name__})"
    try:
        actual = _file_digests(step_dir)
    except OSError as e:
        return f"a file is unreadable ({e.strerror or type(e).__name__}: {e.filename})"
    for rel, (_, sha) in sorted(expected.items()):
        if actual[rel][1] != sha:
            return f"{rel} differs from what was saved (SHA-256)"
    return None


def step_dirs(workdir: str) -> dict[int, str]:
    """Finalized steps of a workdir, step -> directory (Orbax names them by number; in-progress ones differ)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(root):
        return {}
    return {int(n): os.path.join(root, n) for n in os.listdir(root) if n.isdigit()}


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
    try:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta_json)))
    except OSError as e:  # the disk filled up or went read-only since start-up
        raise CheckpointError(f"cannot save step {step} in {mngr.directory}: {first_line(e)}") from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """Restores params and optimizer state onto the shardings in `abstract_state`; moves `data_iter`."""
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise CheckpointError(f"cannot restore checkpoint {mngr.directory}/{step}: {first_line(e)}") from e
    step_array = jax.device_put(np.int32(step), abstract_state.step.sharding)
    return abstract_state.replace(step=step_array, params=out.params, opt_state=out.opt_state)


def first_line(error: Exception, limit: int = 300) -> str:
    """An exception as one short line: Orbax's can run to pages (tree dumps)."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
