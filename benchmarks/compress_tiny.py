"""Compression of a trained model, measured: held-out perplexity of the dense model against INT8 weight-only
(per-channel scales), magnitude pruning and SparseGPT at 50% and 2:4, with the seconds each takes. One JSON line.

    python benchmarks/compress_tiny.py [--workdir=runs/tiny] [--calibration_rows=128]

The workdir's own data config gives the calibration rows (the first training batches, as the paper takes C4
segments) and the held-out batches (its eval set). Pruning leaves embeddings, LayerNorms, biases and the head
dense. INT8 is evaluated on the dequantised kernels, which is what the weight-only product computes.
"""
from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import platform
import time

import jax
import jax.numpy as jnp

import omni
from omni.compress import prune, quant, sparsegpt
from omni.data import pipelines
from omni.models import GPT
from omni.stages import compress


def int8_weights(params):
    """Every linear kernel replaced by its dequantised per-channel INT8 version (scales per layer)."""
    def dequantized(kernel, n_in: int, stacked: bool):
        if stacked:  # a scanned stack: each layer its own scales
            return jnp.stack([dequantized(k, n_in, False) for k in kernel])
        return quant.dequantize(quant.quantize_kernel(kernel, n_in))

    params = jax.tree.map(lambda a: a, params)
    for block, stacked in prune.blocks(params):
        for path, n_in in prune.LINEAR.items():
            parent = functools.reduce(operator.getitem, path[:-1], params[block])
            parent[path[-1]] = dequantized(parent[path[-1]], n_in, stacked)
    return params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/tiny")
    p.add_argument("--calibration_rows", type=int, default=128)
    args = p.parse_args()
    config, params, tokenizer = omni.load(args.workdir)
    model = GPT(config.model)
    held_out = pipelines.eval_batches(config, tokenizer)
    calibration = compress.calibration_rows(config, tokenizer, args.calibration_rows)
    methods = {
        "int8": lambda: int8_weights(params),
        "magnitude_50": lambda: prune.apply(params, prune.magnitude(params, 0.5)),
        "sparsegpt_50": lambda: sparsegpt.prune_model(config.model, params, calibration, 0.5)[0],
        "magnitude_2:4": lambda: prune.apply(params, prune.n_m(params, 2, 4)),
        "sparsegpt_2:4": lambda: sparsegpt.prune_model(config.model, params, calibration, n_m=(2, 4))[0],
    }
    out = {"benchmark": "compress_tiny", "workdir": args.workdir, "params": int(sum(x.size for x in
                                                                                    jax.tree.leaves(params))),
           "calibration_rows": len(calibration), "seq_len": int(calibration.shape[1]),
           "dense_perplexity": compress.perplexity(model, params, held_out)}
    for name, method in methods.items():
        start = time.perf_counter()
        compressed = jax.block_until_ready(method())
        seconds = time.perf_counter() - start
        out[name] = {"perplexity": compress.perplexity(model, compressed, held_out), "seconds": round(seconds, 2),
                     "sparsity": round(prune.sparsity(compressed), 4)}
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
