"""Ahead-of-time compilation: a stage's real train step compiled for a TPU slice (or this host's devices) with
every input abstract, so that its memory and FLOPs are known before a slice is booked.

libtpu (`pip install -e ".[tpu]"`) describes any TPU topology on any host, and XLA compiles for its chips
there; nothing runs and nothing is allocated (MaxText's train_compile does the same). Under the topology's
mesh every array must stay abstract (ShapeDtypeStructs, jax.eval_shape) until `.lower().compile()`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import flax.linen as nn
import jax
import ml_collections

from omni import parallel
from omni.config import ConfigError
from omni.estimate import GIB
from omni.models.attention import resolve
from omni.stages import registry
from omni.train import trainer



@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # what JAX calls its devices
    hbm_gib: float
    peak_flops: float  # dense bf16 FLOP/s per chip, from the data sheet
    megacore: bool  # two TensorCores run as one device; Cloud TPU names these slices by cores (v4-32: 16 chips)


# Data sheets: cloud.google.com/tpu/docs/v4, v5e, v5p, v6e.
CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, True),
    "v5e": Chip("TPU v5 lite", 16, 197e12, False),
    "v5p": Chip("TPU v5", 95, 459e12, True),
    "v6e": Chip("TPU v6 lite", 32, 918e12, False),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    topology: str  # libtpu's name, e.g. "v4:2x2x4"
    chip: Chip
    chips: int

    @property
    def name(self) -> str:
        """Cloud TPU's accelerator type, e.g. v4-32 (cores) for v4:2x2x4 (16 chips)."""
        return f"{self.topology.split(':')[0]}-{self.chips * (2 if self.chip.megacore else 1)}"

    @property
    def accelerator_type(self) -> str:
        """gcloud's --accelerator-type (v5e is v5litepod there)."""
        return self.name.replace("v5e-", "v5litepod-")


def parse_topology(topology: str) -> Slice:
    """A topology string GENERATION:AxB[xC] (chips along each axis), checked without libtpu."""
    match = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", topology)
    if not match or match.group(1) not in CHIPS:
        raise ConfigError(f"config.topology={topology!r}: expected GENERATION:AxB or GENERATION:AxBxC (chips "
                          f"along each axis) with GENERATION one of {tuple(CHIPS)}, e.g. 'v5e:4x4' (a v5e-16) or "
                          "'v4:2x2x4' (a v4-32: 16 chips)")
    chips = math.prod(int(n) for n in match.group(2).split("x"))
    return Slice(topology, CHIPS[match.group(1)], chips)


def topology_devices(slice_: Slice, num_slices: int = 1) -> list:
    """The devices of `num_slices` copies of the slice (joined by DCN), for compilation only."""
    from jax.experimental import topologies

    # No TPU is used, only described: no metadata server to ask, and no single-process lock to take.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", slice_.accelerator_type)):
        os.environ.setdefault(key, value)
    try:
        desc = topologies.get_topology_desc(
            topology_name=slice_.topology, platform="tpu", num_slices=num_slices, chips_per_host_bounds=(2, 2, 1),
            chip_config_name="megacore" if slice_.chip.megacore else "default")
    except Exception as e:  # no libtpu here, or a layout it rejects: say which, in one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config.topology={slice_.topology!r}: cannot compile for it here ({first}); "
                          "ahead-of-time TPU compilation needs libtpu: pip install -e '.[tpu]'") from None
    return list(desc.devices)


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """The config with model.attention='auto' resolved for the target platform, not for this host's."""
    config = ml_collections.ConfigDict(config.to_dict())
    m = config.model
    m.attention = resolve(m.attention, m.dtype, m.dropout, platform, config.train.seq_len)
    return config


def compile_step(config: ml_collections.ConfigDict, devices: list):
    """The stage's train step, compiled for `devices` on the validated config's mesh. Allocates nothing."""
    config = for_platform(config, devices[0].platform)
    t = config.train
    # The stage's step from its config alone: (model, loss_fn, global batch shapes {key: (shape, dtype)}).
    model, loss_fn, batch_shapes = registry.get(config.stage).step(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
        # Outside the topology's mesh: optax builds its state's layout by making a scalar eagerly.
        abstract, shardings, _ = trainer.abstract_state(config, model, (t.batch_size // t.grad_accum, t.seq_len),
                                                        mesh)
        with jax.set_mesh(mesh):
            return trainer.compile_train_step(config, loss_fn, abstract, shardings, batch_shapes, mesh)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def compiled_flops(config: ml_collections.ConfigDict, devices: list) -> float:
    """FLOPs per device of one train step by XLA's cost analysis. It counts a loop's body once, and the step
    loops over layers (nn.scan) and micro-batches, so the count comes from shallow unrolled copies of the
    model on one micro-batch: depth p and 2p (p = 2 for GPT-3's dense/banded pair, else 1) give the cost of
    everything outside the layers and of p layers, which scale to the full depth and batch."""
    m, t = config.model, config.train
    period = 2 if m.variant == "gpt3" else 1
    if m.num_layers % period:
        return 0.0
    shallow = ml_collections.ConfigDict(config.to_dict())
    shallow.model.scan_layers = False
    shallow.train.update(batch_size=t.batch_size // t.grad_accum, grad_accum=1)
    counts = []
    for layers in (period, 2 * period):
        shallow.model.num_layers = layers
        counts.append(_flops(compile_step(shallow, devices)))
    per_period = counts[1] - counts[0]
    return (counts[0] + (m.num_layers // period - 1) * per_period) * t.grad_accum


def compiled_report(config: ml_collections.ConfigDict, devices: list, est: dict, slice_: Slice | None = None,
                    flops: bool = True) -> dict:
    """Compiles the step and returns the compiler's per-device memory (GiB) and (with `flops`, at the price of
    two shallow compiles) FLOPs beside `est` (the analytic estimate), and for a TPU slice whether it fits the
    chip's HBM."""
    start = time.perf_counter()
    compiled = compile_step(config, devices)
    out = {"compile_s": round(time.perf_counter() - start, 1),
           "attention": for_platform(config, devices[0].platform).model.attention}
    memory = trainer.compiled_memory(compiled)
    if memory:
        out.update({f"{k}_gib": v / GIB for k, v in memory.items() if k != "generated_code"})
        out["compiled_vs_analytic"] = out["peak_gib"] / est["total_gib_per_device"]
    count = compiled_flops(config, devices) if flops else 0.0
    if count:
        out["compiled_flops_per_device"] = count
        out["analytic_flops_per_device"] = est["step_flops_per_device"]
    if slice_ is not None:
        out.update(slice=slice_.name, topology=slice_.topology, hbm_gib=slice_.chip.hbm_gib)
        if memory:
            out["fits"] = out["peak_gib"] <= slice_.chip.hbm_gib
    return out


def report_lines(out: dict) -> list[str]:
    where = f" for {out['slice']} ({out['topology']})" if "slice" in out else ""
    lines = [f"compiled{where} in {out['compile_s']:.0f} s, attention {out['attention']}"]
    if "peak_gib" in out:
        lines.append(f"compiled train step: {out['peak_gib']:.2f} GiB per device (arguments {out['argument_gib']:.2f}, "
                     f"temporaries {out['temp_gib']:.2f}, outputs {out['output_gib']:.2f}, donated "
                     f"{out['alias_gib']:.2f}); {out['compiled_vs_analytic']:.2f}x the analytic estimate")
    if "fits" in out:
        lines.append(f"{'fits' if out['fits'] else 'DOES NOT FIT'} the {out['hbm_gib']:g} GiB of HBM per chip")
    if "compiled_flops_per_device" in out:
        lines.append(f"FLOPs per device per step: compiled {out['compiled_flops_per_device']:.3e}, analytic "
                     f"{out['analytic_flops_per_device']:.3e} "
                     f"({out['compiled_flops_per_device'] / out['analytic_flops_per_device']:.2f}x)")
    return lines
