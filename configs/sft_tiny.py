"""Supervised fine-tuning of the tiny pretrained model (runs/tiny) on the offline instruction suite:

    python -m omni.main --config=configs/sft_tiny.py [--config.init_from=runs/tiny]

The model's architecture comes from init_from. InstructGPT's recipe scaled down: cosine decay to 10% without
warmup, residual dropout; about seven epochs over the suite's 2,400 demonstrations at the learning rate that
reached the best held-out labeler score in 1,000 steps (3e-4 was still far from it).
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.init_from = "runs/tiny"
    c.data.name = "instructions"
    c.model.dropout = 0.1
    c.train.update(steps=1000, batch_size=16, seq_len=128, log_every=25, eval_every=200, eval_batches=8,
                   checkpoint_every=200)
    c.optim.update(lr=1e-3, warmup_steps=0, weight_decay=0.0)
    return c
