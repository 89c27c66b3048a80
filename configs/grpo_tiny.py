"""GRPO of the tiny pipeline (RLOO with --config.grpo.advantage=rloo): the SFT policy (runs/sft_tiny), no value
model, groups of 8 samples per prompt:

    python -m omni.main --config=configs/grpo_tiny.py [--config.init_from=runs/sft_tiny]
                        [--config.ppo.reward_from=runs/rm_tiny] [--config.grpo.reward=labeler]

Rewards from the reward model (grpo.reward='model'), the suite's labeler ('labeler': verifiable rewards) or a
function MODULE:FUNCTION. PPO's rollout shape (configs/ppo_tiny.py): 64 prompts x 8 samples per iteration in
minibatches of 128, one epoch, 16 new tokens, T = 1; the k3 KL to the SFT policy in the loss with beta 0.04.
"""
from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "grpo"
    c.init_from = "runs/sft_tiny"
    c.data.name = "instructions"
    c.grpo.update(advantage="grpo", beta=0.04, reward="model")
    c.ppo.update(reward_from="runs/rm_tiny", iterations=16, rollout_batch=512, samples_per_prompt=8, epochs=1,
                 max_new_tokens=16, eval_prompts=128, ptx_batch=32)
    c.train.update(batch_size=128, seq_len=56, log_every=4, eval_every=64, checkpoint_every=32)
    c.optim.update(lr=1e-4, warmup_steps=4, min_lr_ratio=1.0, weight_decay=0.0)
    return c
