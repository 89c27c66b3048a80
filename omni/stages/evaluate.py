"""Evaluation of a workdir's model, on one device: held-out perplexity on its own data (pretraining text, or
the held-out demonstrations' answers), and for an instruction-tuned model the exact match and, on the offline
suite, the labeler score of its greedy answers to held-out prompts. Any workdir: a trained, imported,
pruned or INT8 one. Not a training stage: it writes <workdir>/summary.json.

    python -m omni.main --config=configs/eval.py --config.init_from=runs/tiny_int8
"""
from __future__ import annotations

import json

import ml_collections

from omni.config import ConfigError
from omni.stages.heldout import model_quality
from omni.workdir import Workdir, starting_point


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    source_dir = starting_point(config, "give the workdir of the model to evaluate (e.g. --config.init_from=runs/tiny)")
    source, params, tokenizer = source_dir.load()
    if source.model.get("head", "lm") != "lm":
        raise ConfigError(f"config.init_from={config.init_from} holds a scalar-head model; evaluate a language model")
    summary = {"init_from": config.init_from, **model_quality(source, params, tokenizer)}
    Workdir(workdir).write_summary(summary)
    print(json.dumps(summary), flush=True)
    return summary
