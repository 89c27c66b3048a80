"""Size a run without allocating it: parameter count (from jax.eval_shape) and per-device memory on the
config's mesh, counted by hand. This is what `--config.dry_run=True` prints first, so a user learns of an OOM
before booking a slice; omni/aot.py then compiles the step and prints the compiler's own numbers beside it."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import parallel
from omni.models import count_params, flops_per_token
from omni.models.params import abstract_params

GIB = 2 ** 30


def _shard_elements(boxed, mesh: dict[str, int]) -> int:
    specs = nn.get_partition_spec(boxed)
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
        mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s)), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return sum(int(np.prod(parallel.shard_shape(p.shape, s, mesh)))
               for p, s in zip(jax.tree.leaves(nn.unbox(boxed)), leaves))


def estimate(config: ml_collections.ConfigDict, models: list[ml_collections.ConfigDict], sequences: int) -> dict:
    """Parameter count (of the first model), per-device memory (GiB) and training FLOPs of a validated config's
    stage on its (resolved) mesh, for the `models` it trains and the `sequences` of train.seq_len in one step's
    batch (omni/stages/registry.py's estimate knows both for each stage)."""
    mesh = dict(config.mesh)
    boxed = [abstract_params(m) for m in models]
    p_bytes = jnp.dtype(config.model.param_dtype).itemsize
    # params + gradients + Adam's two moments, each sharded as the params are.
    state_bytes = sum(_shard_elements(b, mesh) for b in boxed) * p_bytes * 4
    act_bytes = sum(_activation_bytes(config, m, sequences) for m in models)
    seq_len = config.train.seq_len
    step_flops = sum(flops_per_token(m, seq_len) for m in models) * sequences * seq_len
    devices = int(np.prod(list(mesh.values())))
    return {
        "name": config.name, "stage": config.stage, "params": count_params(nn.unbox(boxed[0])), "mesh": mesh,
        "devices": devices, "batch_size": config.train.batch_size, "grad_accum": config.train.grad_accum,
        "train_state_gib_per_device": state_bytes / GIB,
        "activations_gib_per_device": act_bytes / GIB,
        "total_gib_per_device": (state_bytes + act_bytes) / GIB,
        "train_flops_per_token": flops_per_token(config.model, seq_len),
        "step_flops_per_device": step_flops / devices,
    }


def _activation_bytes(config: ml_collections.ConfigDict, m: ml_collections.ConfigDict, sequences: int) -> float:
    """Rough activation memory of one micro-batch (Korthikanti et al. 2022: 34sbh bytes per layer at 16 bits;
    their 5as^2b for stored attention scores is dropped, since the chunked path and the flash kernels never
    store them), sharded over the batch and sequence axes and, for the heads/mlp parts, over tensor."""
    t, mesh = config.train, config.mesh
    b = sequences // t.grad_accum / (mesh.data * mesh.fsdp * mesh.dcn_data * mesh.dcn_fsdp)
    s, h, layers = t.seq_len / mesh.sequence, m.d_model, m.num_layers
    scale = jnp.dtype(m.dtype).itemsize / 2
    per_layer = 34 * s * b * h * scale / mesh.tensor
    layer_input = 2 * s * b * h * scale
    kept = layers * layer_input + per_layer if m.remat == "full" else layers * per_layer
    vocab = m.vocab_size if m.get("head", "lm") == "lm" else 1
    logits = 2 * 4 * s * b * vocab / mesh.tensor  # fp32 logits and their gradient
    return kept + logits


def report(est: dict) -> str:
    stage = "" if est["stage"] == "pretrain" else f" (stage {est['stage']})"
    return (f"{est['name']}{stage}: {est['params']:,} parameters ({est['params'] / 1e9:.3f}B) on mesh "
            f"{est['mesh']} ({est['devices']} devices)\n  per device: train state "
            f"{est['train_state_gib_per_device']:.2f} GiB + activations ~{est['activations_gib_per_device']:.2f} "
            f"GiB = ~{est['total_gib_per_device']:.2f} GiB\n  training FLOPs per token: "
            f"{est['train_flops_per_token']:.3e}")
