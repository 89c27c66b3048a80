"""Device mesh, the one logical-axis rules table, and placement helpers.

Nothing else in omni names a mesh axis: models name logical axes, this table decides where they live.
"""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis -> mesh axes. Rules are tried in order and a mesh axis is used at most once per array, so for
# activations `batch` takes data+fsdp and `embed` stays whole, while for parameters (which have no batch axis)
# `embed` is sharded over fsdp (ZeRO-3 style) and heads/mlp/vocab over tensor (Megatron style).
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def split_cpu_host(devices: int) -> None:
    """Runs this host's CPU backend as `devices` XLA devices (0: JAX's default of one) with Eigen's intra-op
    threading off. On a 2-core host a small model trains faster data-parallel over one device per core than on
    one device whose operations are each split across the cores, which not all of them use well (the
    attention's batched matmuls); separate devices overlap them (benchmarks/RESULTS.md). No effect on GPU or TPU
    devices. Must run before JAX initialises its backends."""
    if devices == 0:
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.local_device_count("cpu") == devices:
            return
        raise RuntimeError(f"cpu_devices={devices}: JAX's backends are already initialised "
                           f"with {jax.local_device_count('cpu')} CPU devices")
    jax.config.update("jax_num_cpu_devices", devices)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def device_memory_bytes(device) -> float | None:
    """Memory one device can hold: its allocator's limit (GPU, TPU), or for a CPU device this host's physical
    memory shared among its CPU devices; None where unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count("cpu")
    return None


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A mesh of the resolved `config.mesh` sizes (no -1 left) over all (or the given) devices. With dcn_* > 1
    (several slices) data and fsdp span slices, so only their gradient reductions cross the slower network."""
    ici = tuple(mesh_config[a] for a in MESH_AXES)
    dcn = (mesh_config.dcn_data, mesh_config.dcn_fsdp, 1, 1)
    devices = jax.devices() if devices is None else devices
    # On a TPU an axis may split a physical axis where no product of them gives its size (fsdp 32 on a v4's
    # 4x4x4); the devices are laid along the torus otherwise.
    if math.prod(dcn) == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:  # Slices are TPU pods joined by DCN; where devices carry no slice index (GPU, CPU) each process is one.
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True,
                                                    process_is_granule=not hasattr(devices[0], "slice_index"))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays; unboxed leaves replicate."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] data array: rows over data x fsdp."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), LOGICAL_RULES)
    return NamedSharding(mesh, spec)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def process_rows(mesh: Mesh, batch_size: int) -> list[int]:
    """The rows of a global batch that this process's devices hold, in the order `global_batch` takes its
    local rows: what this process's data loader must produce (processes holding replicas get the same)."""
    length = mesh.devices.size  # any length the mesh divides: only the rows matter
    rows = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((batch_size, length)).values():
        rows.update(range(batch_size)[index[0]])
    return sorted(rows)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_shape(shape: tuple[int, ...], spec: P, mesh_sizes: dict[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` placed by `spec` on a mesh of `mesh_sizes` (no devices needed)."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        div = int(np.prod([mesh_sizes[a] for a in axes])) if axes else 1
        out.append(-(-dim // div))
    return tuple(out)
