"""Rankings of a policy's own samples, for the next reward model (InstructGPT's comparisons were of model
outputs, collected again after each round of PPO):

    python -m omni.main --config=configs/label_tiny.py --config.init_from=runs/sft_tiny [--workdir=DIR]

For each training prompt the policy in init_from (any stage's workdir, a PPO one's policy included) samples
label.responses responses at label.temperature; the offline suite's noisy labeler (the stand-in for the human
labelers, omni/data/instructions.py) ranks them. Written as preference JSONL (omni/data/feedback.py) under
<workdir>/train and <workdir>/eval (held-out prompts), with the suite's own rankings beside them when
label.include_suite, ready for `--config.data.name=jsonl --config.data.path=<workdir>/train
--config.data.eval_path=<workdir>/eval` of the reward model. Not a training stage: it writes summary.json.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import ml_collections
import numpy as np

from omni.config import ConfigError
from omni.data import finetune, instructions
from omni.data.template import prompt_ids
from omni.generate import Sampling
from omni.workdir import SAMPLES, Workdir, starting_point, write_atomic


def _ranked(generator, tokenizer, config: ml_collections.ConfigDict, prompts: list[str], seed: int
            ) -> tuple[list[dict], list[float]]:
    """Preference records (K samples per prompt, noisy ranks) and every sample's true score."""
    s, k = config.label, config.label.responses
    rng = np.random.default_rng(seed)
    noise = finetune.labeler_noise(config.data)
    records, scores = [], []
    per_batch = max(1, s.batch // k)
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        out = generator.generate([prompt_ids(tokenizer, p) for p in chunk], s.max_new_tokens,
                                 Sampling(temperature=s.temperature), stop=[[tokenizer.eos_id]],
                                 seed=seed * 1_000_003 + start, samples=k)
        texts = [tokenizer.decode([t for t in out.row(i) if t != tokenizer.eos_id]).strip()
                 for i in range(len(chunk) * k)]
        for j, prompt in enumerate(chunk):
            responses = texts[j * k:(j + 1) * k]
            scores += [instructions.labeler_score(prompt, r) for r in responses]
            ranking = instructions.noisy_ranks(prompt, responses, noise, rng)
            if len(set(ranking)) > 1:  # all tied (e.g. k identical answers): nothing to compare
                records.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    return records, scores


def check(config: ml_collections.ConfigDict) -> None:
    s = config.label
    if config.data.name != "instructions":
        raise ConfigError(f"config.data.name={config.data.name!r}: ranking samples needs the offline suite's "
                          "labeler ('instructions'); rank your own model's samples with your labelers instead")
    for key in ("responses", "prompts", "eval_prompts", "max_new_tokens", "batch"):
        if not isinstance(s[key], int) or s[key] < (2 if key == "responses" else 1):
            raise ConfigError(f"config.label.{key}={s[key]!r}: must be an int >= {2 if key == 'responses' else 1}")
    if s.temperature <= 0:
        raise ConfigError(f"config.label.temperature={s.temperature!r}: must be > 0 (the samples must differ)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Samples, ranks and writes <workdir>/train and <workdir>/eval; returns the summary."""
    s = config.label
    source = starting_point(config, "give the workdir of the policy to sample (e.g. --config.init_from=runs/sft_tiny)")
    check(config)
    start = time.time()
    _, generator, tokenizer = source.generator()
    summary = {"init_from": config.init_from}
    for split, name, count in (("train", "train", s.prompts), ("validation", "eval", s.eval_prompts)):
        prompts = finetune.prompts(config.data, split)[:count]
        records, scores = _ranked(generator, tokenizer, config, prompts, config.train.seed + (split == "validation"))
        directory = Workdir(workdir).file(name)
        os.makedirs(directory, exist_ok=True)
        write_atomic(os.path.join(directory, SAMPLES),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        if s.include_suite:
            suite = finetune.suite_data(config.data, "prefs")
            shutil.copyfile(suite.path if name == "train" else suite.eval_path, os.path.join(directory, "suite.jsonl"))
        summary.update({f"{name}_ranked_prompts": len(records), f"{name}_sample_labeler_score": float(np.mean(scores))})
    summary["wall_s"] = time.time() - start
    Workdir(workdir).write_summary(summary)
    print(json.dumps(summary), flush=True)
    return summary
