"""Pretraining: next-token prediction on packed documents.

Batch: inputs, targets int32 [batch, seq_len] (targets = inputs shifted by one), weights float32 [batch,
seq_len] (0 on padding); with data.separate_documents also segment_ids and positions int32 [batch, seq_len]
(see omni/data/pipelines.py). Loss: mean cross-entropy over weighted target tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import data, parallel
from omni.models import GPT, flops_per_token
from omni.train import checkpoint
from omni.train.trainer import Task


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position. The target logit is picked with a one-hot product rather than a gather,
    so the backward pass is elementwise instead of a scatter over [batch, length, vocab]."""
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def lm_loss(model: GPT):
    def loss_fn(params, batch: dict, rng: jax.Array | None):
        train = rng is not None
        logits = model.apply({"params": params}, batch["inputs"], deterministic=not train,
                             segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                             rngs={"dropout": rng} if train else None)
        w = batch["weights"]
        nll = token_nll(logits, batch["targets"]) * w
        sums = {"loss": nll.sum(), "weight": w.sum()}
        if not train:  # accuracy costs an argmax over the vocabulary: evaluation only
            sums["accuracy"] = ((jnp.argmax(logits, -1) == batch["targets"]) * w).sum()
        return nll.sum(), sums

    return loss_fn


def lm_batch_shapes(config: ml_collections.ConfigDict, segments: bool) -> dict[str, tuple]:
    """Global shapes and dtypes of a next-token batch (this module's docstring)."""
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {"inputs": (shape, np.int32), "targets": (shape, np.int32), "weights": (shape, np.float32)}
    if segments:
        batch.update(segment_ids=(shape, np.int32), positions=(shape, np.int32))
    return batch


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) from the config alone: what omni/aot.py compiles."""
    model = GPT(config.model)
    return model, lm_loss(model), lm_batch_shapes(config, config.data.separate_documents)


def stage_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> data.Tokenizer:
    """The tokenizer of an earlier stage (init_from) or of this run's corpus, copied into the workdir."""
    if config.init_from:
        _, path, _ = checkpoint.read_meta(config.init_from)
        tokenizer = data.Tokenizer(path)
        if tokenizer.vocab_size != config.model.vocab_size:
            raise data.DataError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer of "
                                 f"config.init_from={config.init_from} has {tokenizer.vocab_size} pieces")
    else:
        tokenizer = data.get_tokenizer(config)
    return data.Tokenizer(tokenizer.save(workdir))  # atomic: every process of a run writes the same file


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    tokenizer = stage_tokenizer(config, workdir)
    # Each process loads only the rows of every global batch that its devices hold.
    rows = parallel.process_rows(parallel.make_mesh(config.mesh), config.train.batch_size)
    train_iter = data.train_iterator(config, tokenizer, rows)
    eval_batches = data.eval_batches(config, tokenizer, rows)
    unigram = data.unigram_perplexity(config, tokenizer)
    print(f"unigram baseline perplexity on the held-out set: {unigram:.2f}", flush=True)
    model = GPT(config.model)
    return Task(model=model, loss_fn=lm_loss(model), train_iter=train_iter, eval_batches=eval_batches,
                tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, config.train.seq_len),
                summary_extras={"unigram_perplexity": unigram})
