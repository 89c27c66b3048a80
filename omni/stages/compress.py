"""Compression of a trained model into a new workdir that generation, chat and evaluation read: magnitude
pruning (unstructured, N:M, whole heads or MLP channels), SparseGPT (unstructured or N:M) on calibration rows
of the model's own training data, or INT8 weights (int8: weight-only; w8a8: activations too), which the model
then computes with (config.model.quant). A pruned workdir is also a float model that any stage can start from;
an INT8 one is for inference. Not a training stage: it writes one checkpoint (step 0) and a summary
with the model's held-out quality before and after (omni/stages/heldout.py), its size in memory and on disk,
and the seconds it took.

    python -m omni.main --config=configs/compress.py --config.init_from=runs/tiny --config.method=sparsegpt
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from omni.compress import prune, quant, sparsegpt
from omni.config import ConfigError
from omni.data import finetune, pipelines
from omni.models import count_params
from omni.stages.heldout import instruction_tuned, model_quality
from omni.workdir import CHECKPOINTS, Workdir, starting_point

QUANTIZE = ("int8", "w8a8")  # methods that write INT8 weights (config.model.quant)
METHODS = ("magnitude", "sparsegpt", "heads", "mlp_channels") + QUANTIZE


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


def check(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """The method and its keys; returns compress.n_m parsed."""
    c = config.compress
    if config.method not in METHODS:
        raise ConfigError(f"config.method={config.method!r}: expected one of {METHODS}")
    if not 0.0 <= c.sparsity < 1.0:
        raise ConfigError(f"config.compress.sparsity={c.sparsity}: must be in [0, 1)")
    if c.scope not in ("layer", "global"):
        raise ConfigError(f"config.compress.scope={c.scope!r}: expected 'layer' or 'global'")
    if not isinstance(c.calibration_rows, int) or c.calibration_rows < 1:
        raise ConfigError(f"config.compress.calibration_rows={c.calibration_rows!r}: must be a positive int")
    return _n_m(c.n_m)


def calibration_rows(config: ml_collections.ConfigDict, tokenizer, rows: int) -> np.ndarray:
    """The first `rows` token rows of the model's own training data: its packed pretraining stream (the paper:
    128 segments of C4) or, for an instruction-tuned model, its packed training demonstrations."""
    if instruction_tuned(config):
        train = finetune.demonstrations(config.data, "train")
        demos = [train[i] for i in range(len(train))]  # packed in order: the first rows are the first demos
        return finetune.pack_demonstrations(tokenizer, demos, config.train.seq_len)["inputs"][:rows]
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
    if method in QUANTIZE:
        return quant.quantize_model(params), []
    rows = calibration_rows(source, tokenizer, c.calibration_rows)
    return sparsegpt.prune_model(source.model, params, rows, c.sparsity, n_m, c.block_size, c.damp)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    source_dir = starting_point(config, "give the workdir of the model to compress")
    n_m = check(config)
    if Workdir(workdir).latest_step() is not None:
        raise ConfigError(f"{workdir} already holds a checkpoint: compress into a new --workdir")
    source, params, tokenizer = source_dir.load()
    if source.model.get("head", "lm") != "lm":
        raise ConfigError(f"config.init_from={config.init_from} holds a scalar-head model; compress a language model")
    if source.model.quant != "none":
        raise ConfigError(f"config.init_from={config.init_from} already holds INT8 weights (model.quant="
                          f"{source.model.quant!r}); compress the float model it came from")
    start = time.time()
    compressed, report = compress(source, params, tokenizer, config.method, config.compress, n_m)
    compressed = jax.block_until_ready(compressed)
    seconds = time.time() - start
    out = ml_collections.ConfigDict(source.to_dict())
    out.stage, out.init_from, out.name = "compress", config.init_from, os.path.basename(os.path.normpath(workdir))
    out.method, out.compress = config.method, config.compress
    if config.method in QUANTIZE:
        out.model.quant = config.method
    Workdir(workdir).write_model(out, compressed, tokenizer.model_path)
    summary = {"method": config.method, "n_m": config.compress.n_m, "seconds": seconds,
               "sparsity": prune.sparsity(compressed), "params": count_params(params),
               "before_weights_mb": _megabytes(params), "weights_mb": _megabytes(compressed),
               "disk_mb": _params_on_disk(workdir)}
    summary.update({f"before_{k}": v for k, v in model_quality(source, params, tokenizer).items()})
    summary.update({f"eval_{k}": v for k, v in model_quality(out, compressed, tokenizer).items()})
    if report:
        summary["damp_raised"] = [r for r in report if r["damp"] != config.compress.damp]
    Workdir(workdir).write_summary(summary)
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                    if k != "damp_raised"), f"; workdir {workdir}", flush=True)
    return summary


def _megabytes(params) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6


def _params_on_disk(workdir: str) -> float:
    """Megabytes of the params as Orbax stored them (compressed; tokenizer and config apart)."""
    path = os.path.join(Workdir(workdir).file(CHECKPOINTS), "0", "params")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e6
