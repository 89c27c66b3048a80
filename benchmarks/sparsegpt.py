"""SparseGPT on single layers: seconds to prune a kernel given its Hessian (after compilation, best of a few runs)
and the relative output error ||X (W - W_hat)|| / ||X W|| on heavy-tailed calibration inputs, against magnitude
pruning. One JSON line.

    python benchmarks/sparsegpt.py                  # 768->3072 and 1536->384 at 50% unstructured
    python benchmarks/sparsegpt.py --reference      # plus a PyTorch float32 version of the same algorithm,
                                                    # timed alternately in the same process (pip install torch)
    python benchmarks/sparsegpt.py --workdir=runs/tiny   # plus the whole model of a workdir, block by block

The whole model: SparseGPT 50% of every block's four linear layers in order (prune_model) on 128 calibration
rows of the workdir's training data, first call (compilation included) and the best of two more.

The inputs (rows = samples) are correlated and heavy-tailed (half of each feature's variance from a quarter as
many latent Student-t factors as features, half its own Student-t noise), and 1/128 of the features are 10-100x
larger than the rest, as in transformer activations: weights' magnitudes then say little about their effect
on the output. `rel_sq_err_*` are the squared
ratios ||X (W - W_hat)||^2 / ||X W||^2, the fraction of output energy lost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from omni.compress.sparsegpt import prune_kernel

LAYERS = [(768, 3072), (1536, 384)]


def heavy_tailed_inputs(rng: np.random.Generator, samples: int, n_in: int) -> np.ndarray:
    factors = n_in // 4
    shared = rng.standard_t(3, size=(samples, factors)) @ rng.normal(size=(factors, n_in)) / np.sqrt(3 * factors)
    x = shared + rng.standard_t(3, size=(samples, n_in)) / np.sqrt(3)  # unit variance each, half shared
    outliers = rng.choice(n_in, max(1, n_in // 128), replace=False)
    x[:, outliers] *= rng.uniform(10, 100, len(outliers))
    return x.astype(np.float32)


def magnitude_prune(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    pruned = kernel.copy()
    pruned.ravel()[np.argsort(np.abs(kernel).ravel())[:round(sparsity * kernel.size)]] = 0.0
    return pruned


def torch_sparsegpt(kernel, hessian, sparsity=0.5, block_size=128, damp=0.01):
    """The same algorithm in PyTorch, written the straightforward way (paper layout W = kernel^T, a Python loop
    over columns, a sort per block), as a same-machine, same-moment timing reference."""
    import torch

    w, h = kernel.T.clone(), hessian.clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block, ub = w[:, start:end].clone(), u[start:end, start:end]
        score = (block / torch.diag(ub)) ** 2
        count = round(sparsity * score.numel())
        prune = torch.zeros(score.numel(), dtype=torch.bool)
        prune[torch.argsort(score.flatten())[:count]] = True
        prune = prune.reshape(score.shape)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            errors[:, j] = torch.where(prune[:, j], block[:, j], 0.0) / ub[j, j]
            block[:, j:] -= torch.outer(errors[:, j], ub[j, j:])
        w[:, start:end] = torch.where(prune, 0.0, block)
        w[:, end:] -= errors @ u[start:end, end:]
    return w.T


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4096, help="calibration rows per layer")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the PyTorch version")
    parser.add_argument("--workdir", default="", help="also time pruning this workdir's whole model")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for n_in, n_out in LAYERS:
        x = heavy_tailed_inputs(rng, args.samples, n_in)
        hessian = (2 * x.T.astype(np.float64) @ x / len(x)).astype(np.float32)
        kernel = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

        def run():
            return jax.block_until_ready(prune_kernel(kernel, hessian, sparsity=args.sparsity))

        start = time.perf_counter()
        pruned = np.asarray(run())
        first = time.perf_counter() - start
        dense = np.linalg.norm(x @ kernel)
        ours = np.linalg.norm(x @ (kernel - pruned)) / dense
        magnitude = np.linalg.norm(x @ (kernel - magnitude_prune(kernel, args.sparsity))) / dense
        row = {"layer": f"{n_in}->{n_out}", "kernel": [n_in, n_out], "sparsity": args.sparsity,
               "seconds": round(best_seconds(run, args.repeats), 4), "first_call_s": round(first, 2),
               "rel_err_sparsegpt": round(float(ours), 5), "rel_err_magnitude": round(float(magnitude), 5),
               "rel_sq_err_sparsegpt": round(float(ours) ** 2, 6),
               "rel_sq_err_magnitude": round(float(magnitude) ** 2, 6),
               "zeros": round(float(np.mean(pruned == 0)), 6)}
        if args.reference:
            import torch

            k, h = torch.from_numpy(kernel), torch.from_numpy(hessian)
            theirs = torch_sparsegpt(k, h, args.sparsity).numpy()
            row["torch_seconds"] = round(best_seconds(lambda: torch_sparsegpt(k, h, args.sparsity), args.repeats), 4)
            row["torch_threads"] = torch.get_num_threads()
            row["rel_err_torch"] = round(float(np.linalg.norm(x @ (kernel - theirs)) / dense), 5)
        results.append(row)
    out = {"benchmark": "sparsegpt", "calibration_rows": args.samples, "layers": results}
    if args.workdir:
        out["whole_model"] = whole_model(args.workdir, args.sparsity)
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()}"
    print(json.dumps(out))


def whole_model(workdir: str, sparsity: float) -> dict:
    import omni
    from omni.compress.sparsegpt import prune_model
    from omni.stages.compress import calibration_rows

    config, params, tokenizer = omni.load(workdir)
    rows = calibration_rows(config, tokenizer, 128)

    def run():
        return jax.block_until_ready(prune_model(config.model, params, rows, sparsity)[0])

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    return {"workdir": workdir, "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "layers": config.model.num_layers, "calibration_rows": int(rows.shape[0]), "seq_len": int(rows.shape[1]),
            "first_call_s": round(first, 2), "seconds": round(best_seconds(run, 2), 2)}


if __name__ == "__main__":
    main()
