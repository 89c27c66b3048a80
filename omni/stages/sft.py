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
import numpy as np

from omni import parallel
from omni.config import ConfigError
from omni.data import feedback, finetune
from omni.data.template import encode_dialogue
from omni.generate import Generator, Sampling, stop_sequences, trim_at_stop
from omni.models import GPT, flops_per_token
from omni.stages.pretrain import lm_batch_shapes, lm_loss, stage_tokenizer
from omni.train.trainer import Task

STOP = ("\nUser:",)


def answer_greedily(generator: Generator, tokenizer, dialogues: list[list[tuple[str, str]]], max_new: int
                    ) -> list[str]:
    """The model's greedy reply to the last user message of each dialogue (earlier turns as context)."""
    prompts = [encode_dialogue(tokenizer, turns[:-1], turns[-1][0])[0] for turns in dialogues]
    out = generator.generate(prompts, max_new, Sampling(temperature=0.0),
                             stop=stop_sequences(tokenizer, STOP))
    return [trim_at_stop(tokenizer.decode([t for t in out.row(i) if t != tokenizer.eos_id]), STOP).strip()
            for i in range(len(prompts))]


def sample_metrics(config: ml_collections.ConfigDict, tokenizer, dialogues: list[list[tuple[str, str]]], mesh):
    """eval_extra for the trainer: greedy answers to held-out prompts, scored."""
    suite = config.data.name == "instructions"
    if suite:
        from omni.data.instructions import labeler_score
    generator = None

    def metrics(params, evals: dict) -> dict:
        nonlocal generator
        if generator is None:
            generator = Generator(config.model, params, mesh, pad_id=tokenizer.pad_id)
        else:
            generator.set_params(params)
        answers = answer_greedily(generator, tokenizer, dialogues, config.sft.eval_max_new_tokens)
        if not suite:
            return {"exact_match": float(np.mean([a == turns[-1][1].strip() for a, turns in zip(answers, dialogues)]))}
        # The labeler's full marks: the reference, or any right answer of a task that has several.
        scores = np.array([labeler_score(turns[-1][0], a) for a, turns in zip(answers, dialogues)])
        return {"exact_match": float((scores == 1.0).mean()), "labeler_score": float(scores.mean())}

    return metrics


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes) from the config alone: what omni/aot.py compiles."""
    model = GPT(config.model)
    return model, lm_loss(model), lm_batch_shapes(config, segments=True)


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    if not config.init_from:
        raise ConfigError("config.init_from is empty: SFT starts from a pretrained workdir "
                          "(e.g. --config.init_from=runs/tiny)")
    tokenizer = stage_tokenizer(config, workdir)
    source = finetune.suite_data(config.data, "sft")
    train = list(feedback.demonstrations(source, "train"))
    held_out = list(feedback.demonstrations(source, "validation"))
    seq_len = config.train.seq_len
    mesh = parallel.make_mesh(config.mesh)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    train_rows = finetune.pack_demonstrations(tokenizer, train, seq_len)
    eval_batches = finetune.fixed_batches(finetune.pack_demonstrations(tokenizer, held_out, seq_len),
                                          config.train.batch_size, config.train.eval_batches, rows)
    print(f"SFT: {len(train):,} demonstrations in {len(train_rows['inputs']):,} packed rows of {seq_len} "
          f"({train_rows['weights'].sum() / train_rows['inputs'].size:.0%} trained tokens); "
          f"{len(held_out):,} held out", flush=True)
    model = GPT(config.model)
    return Task(model=model, loss_fn=lm_loss(model), train_iter=finetune.train_iterator(train_rows, config, rows),
                eval_batches=eval_batches, tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, seq_len),
                eval_extra=sample_metrics(config, tokenizer, held_out[:config.sft.eval_prompts], mesh),
                summary_extras={"demonstrations": len(train)})
