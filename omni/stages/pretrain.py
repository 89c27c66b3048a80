"""Pretraining: next-token prediction on packed documents.

Batch: inputs, targets int32 [batch, seq_len] (targets = inputs shifted by one), weights float32 [batch,
seq_len] (0 on padding); with data.separate_documents also segment_ids and positions int32 [batch, seq_len]
(see omni/data/pipelines.py). Loss: mean cross-entropy over weighted target tokens.
"""
from __future__ import annotations

import ml_collections

from omni import data, parallel
from omni.losses import lm_batch_shapes, lm_loss
from omni.models import GPT, flops_per_token
from omni.train.trainer import Task
from omni.workdir import Workdir


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) from the config alone: what omni/aot.py compiles."""
    model = GPT(config.model)
    return model, lm_loss(model), lm_batch_shapes(config, config.data.separate_documents)


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    tokenizer = Workdir(workdir).stage_tokenizer(config)
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
