"""GPT-3 Medium (Brown et al. 2020, Table 2.1): 350M parameters, d_head 64, batch 0.5M tokens."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=24, d_model=1024, num_heads=16, batch_tokens=524288, lr=3.0e-4)
    c.mesh.update(data=1, fsdp=4, tensor=1)
    c.topology = "v4:2x2x1"  # TPU v4-8: 4 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 4  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
