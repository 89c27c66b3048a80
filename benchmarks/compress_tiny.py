"""Compression of a trained model, measured: held-out perplexity of the dense model against INT8 (weight-only and
W8A8, computed by the model on its int8 weights), magnitude pruning and SparseGPT at 50% and 2:4, with the
seconds each takes and the weights' size in memory. One JSON line.

    python benchmarks/compress_tiny.py [--workdir=runs/tiny] [--calibration_rows=128]

The workdir's own data config gives the calibration rows (the first training batches, as the paper takes C4
segments; an SFT or PPO workdir's training demonstrations) and the held-out set (omni/stages/evaluate.py: for
a model tuned on the instruction suite also the labeler score of its greedy answers). Pruning leaves
embeddings, LayerNorms, biases and the head dense. The compress stage (omni/stages/compress.py) writes any of these as a workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import ml_collections

import omni
from omni.compress import prune, quant, sparsegpt
from omni.stages import compress
from omni.stages.heldout import model_quality


QUALITY = ("perplexity", "labeler_score")  # the labeler's score for a model tuned on the instruction suite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/tiny")
    p.add_argument("--calibration_rows", type=int, default=128)
    args = p.parse_args()
    config, params, tokenizer = omni.load(args.workdir)
    calibration = compress.calibration_rows(config, tokenizer, args.calibration_rows)
    methods = {  # name: (compressed params, model.quant)
        "int8": lambda: (quant.quantize_model(params), "int8"),
        "w8a8": lambda: (quant.quantize_model(params), "w8a8"),
        "magnitude_50": lambda: (prune.apply(params, prune.magnitude(params, 0.5)), "none"),
        "sparsegpt_50": lambda: (sparsegpt.prune_model(config.model, params, calibration, 0.5)[0], "none"),
        "magnitude_2:4": lambda: (prune.apply(params, prune.n_m(params, 2, 4)), "none"),
        "sparsegpt_2:4": lambda: (sparsegpt.prune_model(config.model, params, calibration, n_m=(2, 4))[0], "none"),
    }
    size = lambda tree: round(sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e6, 2)  # noqa: E731
    out = {"benchmark": "compress_tiny", "workdir": args.workdir, "params": int(sum(x.size for x in
                                                                                    jax.tree.leaves(params))),
           "calibration_rows": len(calibration), "seq_len": int(calibration.shape[1]),
           "dense_mb": size(params)}
    dense = model_quality(config, params, tokenizer)
    out.update({f"dense_{k}": dense[k] for k in QUALITY if k in dense})
    for name, method in methods.items():
        start = time.perf_counter()
        compressed, mode = jax.block_until_ready(method())
        seconds = time.perf_counter() - start
        as_compressed = ml_collections.ConfigDict(config.to_dict())
        as_compressed.model.quant = mode
        quality = model_quality(as_compressed, compressed, tokenizer)
        out[name] = {**{k: quality[k] for k in QUALITY if k in quality}, "seconds": round(seconds, 2),
                     "mb": size(compressed)}
        if mode == "none":
            out[name]["sparsity"] = round(prune.sparsity(compressed), 4)
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
