"""Sampling: completions of config.prompt by the model of config.init_from, printed and kept in
<workdir>/samples.jsonl. Not a training stage: no batch, no loss, nothing to resume."""
from __future__ import annotations

import json
import time

import ml_collections

from omni.config import ConfigError
from omni.generate import Sampling, complete
from omni.workdir import SAMPLES, Workdir, starting_point


def check(config: ml_collections.ConfigDict) -> None:
    s = config.sample
    if not config.prompt:
        raise ConfigError("config.prompt is empty: give the text to continue (--config.prompt=\"...\")")
    if not isinstance(s.num_samples, int) or s.num_samples < 1:
        raise ConfigError(f"config.sample.num_samples={s.num_samples!r}: must be a positive int")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    s = config.sample
    source = starting_point(config, "give the workdir of a trained model (e.g. --config.init_from=runs/tiny)")
    check(config)
    _, generator, tokenizer = source.generator()
    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty)
    start = time.time()
    texts = complete(generator, tokenizer, [config.prompt] * s.num_samples, s.max_new_tokens, sampling,
                     stop=[s.stop] if s.stop else [], seed=s.seed)
    seconds = time.time() - start
    with open(Workdir(workdir).create().file(SAMPLES), "a") as f:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{config.prompt}{text}", flush=True)
            f.write(json.dumps({"init_from": config.init_from, "prompt": config.prompt, "completion": text,
                                "sample": i, **s.to_dict()}) + "\n")
    return {"samples": len(texts), "seconds": seconds}
