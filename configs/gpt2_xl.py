"""GPT-2 XL (Radford et al. 2019) as released: 48 layers, d_model 1600, 25 heads, 1558M parameters."""
from omni.config import gpt2_config


def get_config():
    c = gpt2_config(num_layers=48, d_model=1600, num_heads=25)
    c.optim.lr = 2.0e-4  # GPT-2's learning rates were tuned and not published; GPT-3's for the same width
    c.mesh.update(data=1, fsdp=16, tensor=1)
    c.topology = "v4:2x2x4"  # TPU v4-32: 16 chips, the slice this mesh and batch are sized for
    return c
