"""GPT-2 medium (Radford et al. 2019) as released: 24 layers, d_model 1024, 16 heads, 355M parameters."""
from omni.config import gpt2_config


def get_config():
    c = gpt2_config(num_layers=24, d_model=1024, num_heads=16)
    c.optim.lr = 3.0e-4  # GPT-2's learning rates were tuned and not published; GPT-3's for the same width
    c.mesh.update(data=1, fsdp=4, tensor=1)
    c.topology = "v4:2x2x1"  # TPU v4-8: 4 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 4  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
