"""The reward model of the tiny pipeline, from the SFT model (runs/sft_tiny), on the offline suite's rankings:

    python -m omni.main --config=configs/rm_tiny.py [--config.init_from=runs/sft_tiny]

InstructGPT's recipe scaled down: one epoch over the ranked prompts (more overfits), all comparisons of a prompt
in one batch element, cosine decay to 10%.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "rm"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.model.head = "scalar"
    c.train.update(steps=190, batch_size=16, seq_len=64, log_every=10, eval_every=50, eval_batches=20,
                   checkpoint_every=100)
    c.optim.update(lr=3e-4, warmup_steps=10, weight_decay=0.0)
    return c
