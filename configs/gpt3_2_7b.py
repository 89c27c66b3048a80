"""GPT-3 2.7B (Brown et al. 2020, Table 2.1): 2.7B parameters, d_head 80, batch 1M tokens."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=32, d_model=2560, num_heads=32, batch_tokens=1048576, lr=1.6e-4)
    c.mesh.update(data=1, fsdp=32, tensor=1)
    c.topology = "v4:2x4x4"  # TPU v4-64: 32 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
