"""Best-of-n (rejection-sampling fine-tuning) of the tiny pipeline: the SFT policy (runs/sft_tiny) samples 8
answers to each of 1,024 training prompts, the reward model (runs/rm_tiny) keeps its favourite, and the policy is
fine-tuned on those:

    python -m omni.main --config=configs/best_of_n_tiny.py [--config.init_from=runs/sft_tiny]
                        [--config.ppo.reward_from=runs/rm_tiny]

Sampling as PPO's rollouts (T = 1, 16 new tokens); the fine-tuning as SFT's at a tenth of its learning rate, in
rows of 56 tokens as PPO's, so that the held-out prompts that fit are the same.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "best_of_n"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.best_of_n.update(n=8, prompts=1024)
    c.ppo.update(reward_from="runs/rm_tiny", max_new_tokens=16, rollout_batch=512, eval_prompts=128)
    c.train.update(steps=100, batch_size=16, seq_len=56, log_every=10, eval_every=100, eval_batches=8,
                   checkpoint_every=100)
    c.optim.update(lr=1e-4, warmup_steps=0, weight_decay=0.0)
    return c
