"""Evaluation of a workdir's model, on one device: held-out perplexity on its own data (pretraining text, or
the held-out demonstrations' answers), and for an instruction-tuned model the exact match and, on the offline
suite, the labeler score of its greedy answers to held-out prompts. Any workdir: a trained, imported,
pruned or INT8 one. Not a training stage: it writes <workdir>/summary.json.

    python -m omni.main --config=configs/eval.py --config.init_from=runs/tiny_int8
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

import omni
from omni import parallel
from omni.config import ConfigError
from omni.data import feedback, finetune, pipelines
from omni.models import GPT
from omni.stages.pretrain import lm_loss
from omni.stages.sft import sample_metrics
from omni.train import metrics, trainer


def instruction_tuned(config: ml_collections.ConfigDict) -> bool:
    return config.data.name in ("instructions", "jsonl")  # the fine-tuning stages' data


def evaluate(config: ml_collections.ConfigDict, params, tokenizer) -> dict[str, float]:
    """perplexity, loss, accuracy and (instruction-tuned) exact_match, labeler_score of the model that `config`
    (a workdir's resolved config) describes, with `params` on the default device."""
    one = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1, dcn_data=1, dcn_fsdp=1))
    mesh = parallel.make_mesh(one, jax.devices()[:1])
    extra = None
    if instruction_tuned(config):
        held_out = feedback.demonstrations(finetune.suite_data(config.data, "sft"), "validation")
        held_out = [held_out[i] for i in range(len(held_out))]
        packed = finetune.pack_demonstrations(tokenizer, held_out, config.train.seq_len)
        batches = finetune.fixed_batches(packed, config.train.batch_size, config.train.eval_batches,
                                         list(range(config.train.batch_size)))
        extra = sample_metrics(config, tokenizer, held_out[:config.sft.eval_prompts], mesh)
    else:
        batches = pipelines.eval_batches(config, tokenizer)
    eval_fn = jax.jit(lambda p, batch: lm_loss(GPT(config.model))(p, batch, None)[1])
    out = trainer.evaluate(eval_fn, params, batches, mesh)
    if extra is not None:
        out.update(extra(params, out))
    return {k.removeprefix("eval_"): v for k, v in out.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not config.init_from:
        raise ConfigError("config.init_from is empty: give the workdir of the model to evaluate "
                          "(e.g. --config.init_from=runs/tiny)")
    source, params, tokenizer = omni.load(config.init_from)
    if source.model.get("head", "lm") != "lm":
        raise ConfigError(f"config.init_from={config.init_from} holds a scalar-head model; evaluate a language model")
    summary = {"init_from": config.init_from, **evaluate(source, params, tokenizer)}
    os.makedirs(workdir, exist_ok=True)
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    print(json.dumps(summary), flush=True)
    return summary
