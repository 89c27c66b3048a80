"""GPT-3 6.7B (Brown et al. 2020, Table 2.1): 6.7B parameters, d_head 128, batch 2M tokens."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=32, d_model=4096, num_heads=32, batch_tokens=2097152, lr=1.2e-4)
    c.mesh.update(data=2, fsdp=32, tensor=1)
    c.topology = "v4:4x4x4"  # TPU v4-128: 64 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
