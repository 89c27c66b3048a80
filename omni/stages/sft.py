"""Supervised fine-tuning (InstructGPT's first stage): a pretrained model learns to answer in the chat template.

Batch: pretraining's keys, always with segment_ids and positions (omni/data/finetune.py packs whole
demonstrations into rows, each its own segment, so they never attend to each other), weights 1 on the
assistant's tokens only. Loss: pretraining's next-token cross-entropy over those weighted tokens.
Each evaluation also answers held-out prompts greedily: `exact_match` with the reference answer (on the offline
instruction suite: the labeler's full marks, any right answer of an open task) and, on the suite,
`labeler_score` (the suite labeler's mean score, the ground truth of later stages).
"""
from __future__ import annotations

import ml_collections

from omni import parallel
from omni.config import require
from omni.data import finetune
from omni.losses import lm_batch_shapes, lm_loss
from omni.models import GPT, flops_per_token
from omni.stages.heldout import sample_metrics
from omni.train.trainer import Task
from omni.workdir import Workdir, starting_point


def check(c: ml_collections.ConfigDict) -> None:
    """SFT's own keys: every held-out answer needs room after its prompt."""
    require(isinstance(c.sft.eval_max_new_tokens, int) and 0 < c.sft.eval_max_new_tokens < c.train.seq_len,
            "sft.eval_max_new_tokens", c.sft.eval_max_new_tokens,
            f"must be a positive int below train.seq_len={c.train.seq_len} (a prompt needs room too)")


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) from the config alone: what omni/aot.py compiles."""
    model = GPT(config.model)
    return model, lm_loss(model), lm_batch_shapes(config, segments=True)


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    starting_point(config, "SFT starts from a pretrained workdir (e.g. --config.init_from=runs/tiny)")
    tokenizer = Workdir(workdir).stage_tokenizer(config)
    records = {split: finetune.demonstrations(config.data, split) for split in ("train", "validation")}
    train, held_out = list(records["train"]), list(records["validation"])
    seq_len = config.train.seq_len
    mesh = parallel.make_mesh(config.mesh)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    # Both sets are made to fit the context now, before anything compiles: one long example stops nothing later.
    train_rows = finetune.pack_demonstrations(tokenizer, train, seq_len, records["train"].where)
    eval_batches = finetune.fixed_batches(
        finetune.pack_demonstrations(tokenizer, held_out, seq_len, records["validation"].where),
        config.train.batch_size, config.train.eval_batches, rows)
    print(f"SFT: {len(train):,} demonstrations in {len(train_rows['inputs']):,} packed rows of {seq_len} "
          f"({train_rows['weights'].sum() / train_rows['inputs'].size:.0%} trained tokens); "
          f"{len(held_out):,} held out", flush=True)
    model = GPT(config.model)
    return Task(model=model, loss_fn=lm_loss(model), train_iter=finetune.train_iterator(train_rows, config, rows),
                eval_batches=eval_batches, tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, seq_len),
                eval_extra=sample_metrics(config, tokenizer, held_out, records["validation"].where, mesh),
                summary_extras={"demonstrations": len(train)})
