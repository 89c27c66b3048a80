"""Size a run without allocating it: parameter count (from jax.eval_shape) and per-device memory on the
config's mesh. This is what `--config.dry_run=True` prints, so a user learns of an OOM before booking a slice."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import parallel
from omni.config import ConfigError
from omni.models import GPT, count_params, flops_per_token

GIB = 2 ** 30


def abstract_params(model_config: ml_collections.ConfigDict, seq_len: int = 8):
    """Boxed (logically annotated) parameter shapes; nothing is allocated."""
    model = GPT(model_config)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r: model.init(r, tokens)["params"], jax.random.key(0))


def estimate(config: ml_collections.ConfigDict) -> dict:
    """Parameter count and per-device memory (GiB) of a validated config on its (resolved) mesh."""
    m, t, mesh = config.model, config.train, dict(config.mesh)
    boxed = abstract_params(m)
    specs = nn.get_partition_spec(boxed)
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
        mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s)), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = nn.unbox(boxed)
    shard_elems = sum(int(np.prod(parallel.shard_shape(p.shape, s, mesh)))
                      for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(
                          mesh_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))
    p_bytes = jnp.dtype(m.param_dtype).itemsize
    # params + gradients + Adam's two moments, each sharded as the params are.
    state_bytes = shard_elems * p_bytes * 4
    act_bytes = _activation_bytes(config)
    return {
        "name": config.name, "params": count_params(params), "mesh": mesh,
        "devices": int(np.prod(list(mesh.values()))),
        "train_state_gib_per_device": state_bytes / GIB,
        "activations_gib_per_device": act_bytes / GIB,
        "total_gib_per_device": (state_bytes + act_bytes) / GIB,
        "train_flops_per_token": flops_per_token(m, t.seq_len),
    }


def _activation_bytes(config: ml_collections.ConfigDict) -> float:
    """Rough activation memory of one micro-batch (Korthikanti et al. 2022: 34sbh bytes per layer at 16 bits;
    their 5as^2b for stored attention scores is dropped, since the chunked path and the flash kernels never
    store them), sharded over the batch and sequence axes and, for the heads/mlp parts, over tensor."""
    m, t, mesh = config.model, config.train, config.mesh
    b = t.batch_size // t.grad_accum / (mesh.data * mesh.fsdp * mesh.dcn_data * mesh.dcn_fsdp)
    s, h, layers = t.seq_len / mesh.sequence, m.d_model, m.num_layers
    scale = jnp.dtype(m.dtype).itemsize / 2
    per_layer = 34 * s * b * h * scale / mesh.tensor
    layer_input = 2 * s * b * h * scale
    kept = layers * layer_input + per_layer if m.remat == "full" else layers * per_layer
    logits = 2 * 4 * s * b * m.vocab_size / mesh.tensor  # fp32 logits and their gradient
    return kept + logits


def report(est: dict) -> str:
    return (f"{est['name']}: {est['params']:,} parameters ({est['params'] / 1e9:.3f}B) on mesh {est['mesh']} "
            f"({est['devices']} devices)\n  per device: train state {est['train_state_gib_per_device']:.2f} GiB "
            f"+ activations ~{est['activations_gib_per_device']:.2f} GiB = "
            f"~{est['total_gib_per_device']:.2f} GiB\n  training FLOPs per token: "
            f"{est['train_flops_per_token']:.3e}")


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as 'v5e:16x16' for ahead-of-time compilation (needs libtpu)."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # no libtpu here, or an unknown name: say which, in one line
        raise ConfigError(f"config.topology={name!r}: cannot compile for it here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); ahead-of-time TPU compilation needs "
                          "libtpu (pip install 'jax[tpu]')") from None


def compiled_estimate(config: ml_collections.ConfigDict, devices: list) -> dict[str, float] | None:
    """Per-device memory of the pretraining step as the compiler sees it, compiled ahead of time for
    `devices` (this host's, or a TPU topology's) on the config's mesh. Allocates nothing."""
    from omni.stages.pretrain import lm_loss
    from omni.train import trainer

    t = config.train
    mesh = parallel.make_mesh(config.mesh, devices)
    model = GPT(config.model)
    shape = (t.batch_size, t.seq_len)
    batch = {"inputs": (shape, np.int32), "targets": (shape, np.int32), "weights": (shape, np.float32)}
    if config.data.separate_documents:
        batch.update(segment_ids=(shape, np.int32), positions=(shape, np.int32))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        abstract, shardings, _ = trainer.abstract_state(config, model, (t.batch_size // t.grad_accum, t.seq_len),
                                                        mesh)
        compiled = trainer.compile_train_step(config, lm_loss(model), abstract, shardings, batch, mesh)
    return trainer.compiled_memory(compiled)
