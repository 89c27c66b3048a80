"""Where numbers go: <workdir>/metrics.jsonl, TensorBoard events in <workdir>/tb, a progress bar; and the
peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time

import jax
import numpy as np
import tqdm
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from omni.files import write_atomic

# Dense bf16 peak per chip from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


PROBE_SIZE = 1024  # n of the n x n fp32 matmul: 2n^3 FLOPs on 12 MB, compute bound on any CPU
PROBE_REPS = 10  # timed one by one; the fastest is the host's rate (a busy host only ever slows a rep down)
PROBE_WARMUP = 2  # untimed: compilation, then the thread pool's first wake-up


@dataclasses.dataclass
class _Peak:
    flops: float
    how: str  # how it was found
    host: dict | None = None  # a measured peak: the host it holds for (its cache key); None: a spec sheet's
    cache: str | None = None  # the file a measured peak is kept in; None: not kept

    @property
    def source(self) -> str:
        if self.host is None:
            return self.how
        return f"{self.how}, " + (f"cached at {self.cache}" if self.cache else "not cached")


@functools.lru_cache(maxsize=None)
def _peak() -> _Peak:
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return _Peak(flops, f"spec sheet ({kind})")
    return _host_peak(kind)


def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, how it was found). Accelerators: the data sheet; elsewhere the highest rate seen on this host: a
    fp32 matmul measured once and cached, raised by any faster training step (`mfu`)."""
    peak = _peak()
    return peak.flops, peak.source


def mfu(achieved_flops_per_s_per_device: float) -> float:
    """The fraction of the peak achieved. A measured peak is by definition the highest rate seen, so a rate above
    it becomes the peak (and is cached): MFU is then at most 1. A spec sheet's peak is never raised: MFU above 1
    there means the FLOPs counted per token are wrong."""
    peak = _peak()
    if peak.host is not None and achieved_flops_per_s_per_device > peak.flops:
        _raise_peak(peak, achieved_flops_per_s_per_device)
    return achieved_flops_per_s_per_device / peak.flops


def _raise_peak(peak: _Peak, flops: float) -> None:
    """`peak` raised to `flops` and cached; or to the cached one where another run on this host saw more since
    (writing ours would lower it)."""
    path = _cache_file(peak.host)
    stored = _read_cache(path, peak.host)
    if stored is not None and stored.flops >= flops:
        peak.flops, peak.how, peak.cache = stored.flops, stored.how, path
        return
    peak.flops = flops
    peak.how = f"highest rate seen: a training step's, above the fp32 matmul probe ({peak.host['device_kind']})"
    peak.cache = _write_cache(path, peak)


def _host_peak(kind: str) -> _Peak:
    """The cached peak of this host, or a fresh measurement, cached where the cache dir can be written."""
    key = _host_key(kind)
    path = _cache_file(key)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    peak = _Peak(_measured_matmul_flops(), f"measured fp32 matmul, best of {PROBE_REPS} ({kind} "
                 f"x{len(jax.local_devices())}, {os.cpu_count()} cores)", host=key)
    peak.cache = _write_cache(path, peak)
    return peak


def _host_key(kind: str) -> dict:
    """What the measured rate depends on: another CPU, core count, device split or XLA is another host."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "device_kind": kind, "devices": len(jax.local_devices()),
            "jax": jax.__version__}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor()


def _cache_file(key: dict) -> str:
    root = os.environ.get("OMNI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "omni")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, f"peak_flops_{digest}.json")


def _read_cache(path: str, key: dict) -> _Peak | None:
    """The peak kept at `path` for this host; None if absent, unreadable, corrupt or another host's."""
    try:
        with open(path) as f:
            entry = json.load(f)
        flops, how = float(entry["flops"]), str(entry["how"])
        if entry["host"] != key or not (math.isfinite(flops) and flops > 0):
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None  # measured again and rewritten
    return _Peak(flops, how, host=key, cache=path)


def _write_cache(path: str, peak: _Peak) -> str | None:
    """Keeps `peak` at `path` (a whole file or none: other processes may read it meanwhile); the path, or None
    where it cannot be written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps({"host": peak.host, "flops": peak.flops, "how": peak.how}).encode())
    except OSError:
        return None
    return path


def _measured_matmul_flops(n: int = PROBE_SIZE, reps: int = PROBE_REPS) -> float:
    """This host's fp32 matmul rate with every local device multiplying at once, shared out per device: a host
    split into several CPU devices (config.cpu_devices) shares the same cores."""
    devices = jax.local_devices()
    mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(AxisType.Auto,), devices=devices)
    a = jax.device_put(np.ones((len(devices), n, n), np.float32), NamedSharding(mesh, P("d")))
    f = jax.jit(jax.shard_map(lambda x: (x[0] @ x[0])[None], mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    with jax.set_mesh(mesh):  # callers may be inside another mesh's context
        for _ in range(PROBE_WARMUP):
            f(a).block_until_ready()
        fastest = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            f(a).block_until_ready()
            fastest = min(fastest, time.perf_counter() - start)
    return 2 * n ** 3 / fastest


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
