"""Compression of a trained model into a new workdir that every stage, generation and chat accept: magnitude
pruning (unstructured, N:M, whole heads or MLP channels) or SparseGPT (unstructured or N:M) on calibration rows
of the model's own training data. Not a training stage: it writes one checkpoint (step 0) and a summary with
the held-out perplexity before and after, the sparsity and the seconds it took.

    python -m omni.main --config=configs/compress.py --config.init_from=runs/tiny --config.method=sparsegpt
"""
from __future__ import annotations

import math
import os
import time

import jax
import ml_collections
import numpy as np

import omni
from omni.compress import prune, sparsegpt
from omni.config import ConfigError
from omni.data import pipelines
from omni.models import GPT
from omni.stages.pretrain import token_nll
from omni.train import checkpoint, metrics

METHODS = ("magnitude", "sparsegpt", "heads", "mlp_channels")


def _n_m(text: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); '' -> None."""
    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"config.compress.n_m={text!r}: expected 'N:M', e.g. '2:4'") from None
    if not 0 < n < m:
        raise ConfigError(f"config.compress.n_m={text!r}: needs 0 < N < M")
    return n, m


def _check(config: ml_collections.ConfigDict, workdir: str) -> tuple[int, int] | None:
    c = config.compress
    if not config.init_from:
        raise ConfigError("config.init_from is empty: give the workdir of the model to compress")
    if config.method not in METHODS:
        raise ConfigError(f"config.method={config.method!r}: expected one of {METHODS}")
    if not 0.0 <= c.sparsity < 1.0:
        raise ConfigError(f"config.compress.sparsity={c.sparsity}: must be in [0, 1)")
    if c.scope not in ("layer", "global"):
        raise ConfigError(f"config.compress.scope={c.scope!r}: expected 'layer' or 'global'")
    if not isinstance(c.calibration_rows, int) or c.calibration_rows < 1:
        raise ConfigError(f"config.compress.calibration_rows={c.calibration_rows!r}: must be a positive int")
    if checkpoint.latest_step(workdir) is not None:
        raise ConfigError(f"{workdir} already holds a checkpoint: compress into a new --workdir")
    return _n_m(c.n_m)


def perplexity(model: GPT, params, batches: list[dict]) -> float:
    """exp(mean next-token loss) over the held-out batches' weighted tokens."""
    @jax.jit
    def nll(params, batch):
        extra = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
        logits = model.apply({"params": params}, batch["inputs"], **extra)
        return (token_nll(logits, batch["targets"]) * batch["weights"]).sum(), batch["weights"].sum()

    total = np.sum([jax.device_get(nll(params, b)) for b in batches], axis=0)
    return float(math.exp(total[0] / max(total[1], 1.0)))


def calibration_rows(config: ml_collections.ConfigDict, tokenizer, rows: int) -> np.ndarray:
    """The first `rows` token rows of the model's training stream (the paper: 128 segments of C4)."""
    stream = pipelines.train_iterator(config, tokenizer)
    batches = [next(stream)["inputs"] for _ in range(-(-rows // config.train.batch_size))]
    return np.concatenate(batches)[:rows]


def compress(source: ml_collections.ConfigDict, params, tokenizer, method: str, c: ml_collections.ConfigDict,
             n_m: tuple[int, int] | None):
    """The compressed parameters (same tree) and, for SparseGPT, its per-kernel report."""
    if method == "magnitude":
        masks = prune.n_m(params, *n_m) if n_m else prune.magnitude(params, c.sparsity, c.scope)
        return prune.apply(params, masks), []
    if method == "heads":
        return prune.apply(params, prune.heads(params, c.sparsity)), []
    if method == "mlp_channels":
        return prune.apply(params, prune.mlp_channels(params, c.sparsity)), []
    rows = calibration_rows(source, tokenizer, c.calibration_rows)
    return sparsegpt.prune_model(source.model, params, rows, c.sparsity, n_m, c.block_size, c.damp)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    n_m = _check(config, workdir)
    source, params, tokenizer = omni.load(config.init_from)
    if source.model.get("head", "lm") != "lm":
        raise ConfigError(f"config.init_from={config.init_from} holds a scalar-head model; compress a language model")
    if config.method == "sparsegpt" and source.data.name == "instructions":
        raise ConfigError(f"config.method=sparsegpt calibrates on init_from's training text, but {config.init_from} "
                          "was trained on the instruction suite (data.name='instructions'); use "
                          "config.method=magnitude for it, or SparseGPT on its pretrained model")
    held_out = pipelines.eval_batches(source, tokenizer) if source.data.name != "instructions" else []
    model = GPT(source.model)
    start = time.time()
    compressed, report = compress(source, params, tokenizer, config.method, config.compress, n_m)
    compressed = jax.block_until_ready(compressed)
    seconds = time.time() - start
    out = ml_collections.ConfigDict(source.to_dict())
    out.stage, out.init_from, out.name = "compress", config.init_from, os.path.basename(os.path.normpath(workdir))
    out.method, out.compress = config.method, config.compress
    checkpoint.write_model(workdir, out, compressed, tokenizer.model_path)
    summary = {"method": config.method, "n_m": config.compress.n_m, "sparsity": prune.sparsity(compressed),
               "seconds": seconds, "params": int(sum(x.size for x in jax.tree.leaves(compressed)))}
    if held_out:
        summary.update(dense_perplexity=perplexity(model, params, held_out),
                       eval_perplexity=perplexity(model, compressed, held_out))
    if report:
        summary["damp_raised"] = [r for r in report if r["damp"] != config.compress.damp]
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                    if k != "damp_raised"), f"; workdir {workdir}", flush=True)
    return summary
