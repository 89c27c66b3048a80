"""GPT-2 large (Radford et al. 2019) as released: 36 layers, d_model 1280, 20 heads, 774M parameters."""
from omni.config import gpt2_config


def get_config():
    c = gpt2_config(num_layers=36, d_model=1280, num_heads=20)
    c.optim.lr = 2.5e-4  # GPT-2's learning rates were tuned and not published; GPT-3's for the same width
    c.mesh.update(data=1, fsdp=8, tensor=1)
    c.topology = "v4:2x2x2"  # TPU v4-16: 8 chips, the slice this mesh and batch are sized for
    c.train.grad_accum = 2  # micro-batches that fit 32 GiB of HBM per chip (see --config.dry_run)
    return c
