"""GPT-3 175B (Brown et al. 2020, Table 2.1): 175B parameters, d_head 128, batch 3.2M tokens
(1,536 sequences of 2,048 = 3,145,728 tokens)."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=96, d_model=12288, num_heads=96, batch_tokens=3145728, lr=0.6e-4)
    c.mesh.update(data=4, fsdp=64, tensor=4)  # TPU v4-2048 (1,024 chips)
    c.train.grad_accum = 3  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
