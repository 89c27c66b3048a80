"""PPO of the tiny pipeline: the SFT policy (runs/sft_tiny) against the reward model (runs/rm_tiny), on the
offline suite's prompts:

    python -m omni.main --config=configs/ppo_tiny.py [--config.init_from=runs/sft_tiny]
                        [--config.ppo.reward_from=runs/rm_tiny] [--config.ppo.ptx_coef=...]

InstructGPT's recipe scaled down: per-token KL penalty to the SFT policy, value function from the reward model,
no discount, clip 0.2, pure sampling at temperature 1, constant learning rate after a short warmup.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "ppo"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.ppo.update(reward_from="runs/rm_tiny", iterations=40, rollout_batch=64, epochs=1, max_new_tokens=24,
                 kl_coef=0.05, eval_prompts=128, ptx_batch=8)
    c.train.update(batch_size=16, seq_len=48, log_every=4, eval_every=80, checkpoint_every=80)
    c.optim.update(lr=1e-5, warmup_steps=10, min_lr_ratio=1.0, weight_decay=0.0)
    return c
