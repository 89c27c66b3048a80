"""Compile time of the train step with nn.scan over layers: 2 layers against 24 of the same width. Prints
one JSON line. The goal: 24 layers compile within 1.5x of 2 (scan compiles one layer body whatever the depth).

    python benchmarks/compile_time.py [--unrolled]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from omni import parallel
from omni.config import base_config, validate
from omni.losses import lm_loss
from omni.models import GPT
from omni.train.trainer import abstract_state, compile_train_step


def compile_seconds(layers: int, scan: bool) -> float:
    c = base_config()
    c.model.update(num_layers=layers, num_heads=8, d_model=512, d_ff=2048, vocab_size=8192, max_len=256,
                   scan_layers=scan, remat="full")
    c.train.update(batch_size=8, seq_len=256)
    c = validate(c, jax.device_count())
    mesh = parallel.make_mesh(c.mesh)
    model = GPT(c.model)
    shape = (8, 256)
    batch = {"inputs": (shape, np.int32), "targets": (shape, np.int32), "weights": (shape, np.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        abstract, shardings, _ = abstract_state(c, model, shape, mesh)
        start = time.perf_counter()  # tracing + lowering + XLA compilation
        compile_train_step(c, lm_loss(model), abstract, shardings, batch, mesh)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unrolled", action="store_true", help="compare against unrolled layers instead")
    args = parser.parse_args()
    scan = not args.unrolled
    compile_seconds(2, scan)  # warm up jax's own tracing caches so both sizes are timed alike
    small, large = compile_seconds(2, scan), compile_seconds(24, scan)
    print(json.dumps({"benchmark": "compile_time", "scan_layers": scan, "compile_s_2_layers": small,
                      "compile_s_24_layers": large, "ratio": large / small,
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()}"}))


if __name__ == "__main__":
    main()
