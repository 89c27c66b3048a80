"""GPT-3 13B (Brown et al. 2020, Table 2.1): 13B parameters, batch 2M tokens.

The table prints d_model 5140 with 40 heads of 128, but 40 x 128 = 5120 and 5140 is not divisible by 40.
We use d_model 5120 (= 40 x 128): 12.85B parameters, within 1.2% of the published 13.0B."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=40, d_model=5120, num_heads=40, batch_tokens=2097152, lr=1.0e-4)
    c.mesh.update(data=4, fsdp=32, tensor=1)
    c.topology = "v4:4x4x8"  # TPU v4-256: 128 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
