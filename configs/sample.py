"""Completions from a trained model:

    python -m omni.main --config=configs/sample.py --config.init_from=runs/tiny --config.prompt="def main("

The model and tokenizer come from init_from's latest checkpoint (any stage's workdir); config.model here is
ignored. Completions are printed and appended to <workdir>/samples.jsonl (default workdir runs/sample).
Sampling keys: config.sample.{num_samples, max_new_tokens, temperature (0: greedy), top_k, top_p,
repetition_penalty, frequency_penalty, stop (a string that ends a completion), seed}.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "sample"
    return c
