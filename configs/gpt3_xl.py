"""GPT-3 XL (Brown et al. 2020, Table 2.1): 1.3B parameters, batch 1M tokens.

The table prints 24 heads of d_head 128, but 24 x 128 = 3072 != d_model 2048, and 2048 is not divisible by 24.
We keep d_model 2048 and d_head 128, so 16 heads: the parameter count (1.315B) then matches the published 1.3B
(24 heads of 128 would give 1.52B)."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=24, d_model=2048, num_heads=16, batch_tokens=1048576, lr=2.0e-4)
    c.mesh.update(data=1, fsdp=16, tensor=1)
    c.topology = "v4:2x2x4"  # TPU v4-32: 16 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
