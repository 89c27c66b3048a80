"""Where numbers go: <workdir>/metrics.jsonl, TensorBoard events in <workdir>/tb, a progress bar; and the
peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import numpy as np
import tqdm
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# Dense bf16 peak per chip from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@functools.lru_cache(maxsize=None)
def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, how it was found). Accelerators: the data sheet; CPU: a measured fp32 matmul."""
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops, f"spec sheet ({kind})"
    return _measured_matmul_flops(), f"measured fp32 matmul ({kind}, {os.cpu_count()} cores)"


def _measured_matmul_flops(n: int = 1024, reps: int = 10) -> float:
    """This host's fp32 matmul rate with every local device multiplying at once, shared out per device: a host
    split into several CPU devices (config.cpu_devices) shares the same cores."""
    devices = jax.local_devices()
    mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(AxisType.Auto,), devices=devices)
    a = jax.device_put(np.ones((len(devices), n, n), np.float32), NamedSharding(mesh, P("d")))
    f = jax.jit(jax.shard_map(lambda x: (x[0] @ x[0])[None], mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    with jax.set_mesh(mesh):  # callers may be inside another mesh's context
        f(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


class MetricsWriter:
    """Writes on process 0 only; every process may call it."""

    def __init__(self, jsonl_path: str, tensorboard_dir: str, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # heavy import, process 0 only

        self.jsonl = open(jsonl_path, "a")
        self.tb = SummaryWriter(tensorboard_dir)
        self.total = total_steps
        # A live bar on a terminal; plain lines when piped to a log file (CI, TPU launch logs).
        self.bar = (tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout)
                    if sys.stdout.isatty() else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def progress(self, step: int, shown: dict[str, float]) -> None:
        if not self.active:
            return
        shown = {k: _fmt(v) for k, v in shown.items()}
        if self.bar is None:
            print(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        else:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if self.active:
            tqdm.tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.jsonl.close()
            self.tb.close()


def _fmt(v: float) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def to_host(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}
