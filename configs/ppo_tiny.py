"""PPO of the tiny pipeline: the SFT policy (runs/sft_tiny) against the reward model (runs/rm_tiny), on the
offline suite's prompts:

    python -m omni.main --config=configs/ppo_tiny.py [--config.init_from=runs/sft_tiny]
                        [--config.ppo.reward_from=runs/rm_tiny] [--config.ppo.ptx_coef=...]

InstructGPT's recipe scaled down: per-token KL penalty to the SFT policy, rewards normalised on the SFT policy's
samples, value function from the reward model's network with its head at zero, no discount, clip 0.2, pure
sampling at temperature 1, constant learning rate after a short warmup; 64 prompts x 8 samples per iteration
in minibatches of 128 (smaller batches let the updates' noise outrun their signal: held-out scores fell even
with the true score as the reward), so the share of prompts whose samples all score the same can be read off.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "ppo"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.ppo.update(reward_from="runs/rm_tiny", iterations=16, rollout_batch=512, samples_per_prompt=8, epochs=1,
                 max_new_tokens=16, kl_coef=0.05, eval_prompts=128, ptx_batch=32)
    c.train.update(batch_size=128, seq_len=56, log_every=4, eval_every=32, checkpoint_every=32)
    c.optim.update(lr=1e-4, warmup_steps=4, min_lr_ratio=1.0, weight_decay=0.0)
    return c
