"""Held-out quality of a workdir's model (omni/stages/evaluate.py):

    python -m omni.main --config=configs/eval.py --config.init_from=runs/tiny_int8 [--workdir=runs/eval_tiny_int8]

Perplexity, loss and accuracy on the model's own held-out data; for an SFT or PPO model also the exact match and
labeler score of its greedy answers to held-out prompts. The model, tokenizer and data config come from
init_from (any workdir: trained, imported, pruned or INT8); config.model here is ignored. Printed and written
to <workdir>/summary.json.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "eval"
    return c
