"""Rankings of the SFT policy's samples by the offline suite's noisy labeler, for the tiny reward model:

    python -m omni.main --config=configs/label_tiny.py [--config.init_from=runs/sft_tiny]

Writes runs/label_tiny/{train,eval}/*.jsonl; train the reward model on them with
--config.data.name=jsonl --config.data.path=runs/label_tiny/train --config.data.eval_path=runs/label_tiny/eval.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "label"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.label.update(responses=4, prompts=1500, eval_prompts=200, max_new_tokens=16)
    return c
