"""The memory-bandwidth floor of batch-1 decoding on this machine: chained fp32 matrix-vector products through
weights of a given total size (GPT MLP shapes, d_model 384), one jit'd XLA program. One JSON line.

    python benchmarks/matvec_bandwidth.py --mb 57

Below the last-level cache size the weights stay cached; above it every pass streams them from memory, which
is what a decoding step does with every weight of the model (benchmarks/generate_throughput.py's model: 55 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

D, F = 384, 1536


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=57.0, help="total weight size in MB")
    args = parser.parse_args()
    pairs = max(1, round(args.mb * 1e6 / (2 * D * F * 4)))
    rng = np.random.default_rng(0)
    ups = [jnp.asarray(rng.random((D, F), np.float32)) for _ in range(pairs)]
    downs = [jnp.asarray(rng.random((F, D), np.float32)) for _ in range(pairs)]

    @jax.jit
    def chain(ups, downs, x):
        for up, down in zip(ups, downs):
            x = x + jnp.tanh(x @ up) @ down
        return x

    x = jnp.ones((1, D), jnp.float32)
    jax.block_until_ready(chain(ups, downs, x))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            y = chain(ups, downs, x)
        jax.block_until_ready(y)
        best = min(best, (time.perf_counter() - start) / 20)
    weight_bytes = 2 * pairs * D * F * 4
    print(json.dumps({"benchmark": "matvec_bandwidth", "weight_mb": weight_bytes / 1e6, "ms_per_pass": best * 1e3,
                      "gb_per_s": weight_bytes / best / 1e9, "machine": f"{platform.machine()} {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
