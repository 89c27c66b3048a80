"""GPT-3 Large (Brown et al. 2020, Table 2.1): 760M parameters, d_head 96, batch 0.5M tokens."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=24, d_model=1536, num_heads=16, batch_tokens=524288, lr=2.5e-4)
    c.mesh.update(data=1, fsdp=8, tensor=1)
    c.topology = "v4:2x2x2"  # TPU v4-16: 8 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
