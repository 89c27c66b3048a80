"""Sampling: completions of config.prompt by the model of config.init_from, printed and kept in
<workdir>/samples.jsonl. Not a training stage: no batch, no loss, nothing to resume."""
from __future__ import annotations

import json
import os
import time

import ml_collections

from omni.config import ConfigError
from omni.generate import Sampling, complete, from_workdir


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    s = config.sample
    if not config.init_from:
        raise ConfigError("config.init_from is empty: give the workdir of a trained model "
                          "(e.g. --config.init_from=runs/tiny)")
    if not config.prompt:
        raise ConfigError("config.prompt is empty: give the text to continue (--config.prompt=\"...\")")
    if not isinstance(s.num_samples, int) or s.num_samples < 1:
        raise ConfigError(f"config.sample.num_samples={s.num_samples!r}: must be a positive int")
    _, generator, tokenizer = from_workdir(config.init_from)
    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty)
    start = time.time()
    texts = complete(generator, tokenizer, [config.prompt] * s.num_samples, s.max_new_tokens, sampling,
                     stop=[s.stop] if s.stop else [], seed=s.seed)
    seconds = time.time() - start
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{config.prompt}{text}", flush=True)
            f.write(json.dumps({"init_from": config.init_from, "prompt": config.prompt, "completion": text,
                                "sample": i, **s.to_dict()}) + "\n")
    return {"samples": len(texts), "seconds": seconds}
