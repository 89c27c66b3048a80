"""GPT-3 175B (Brown et al. 2020, Table 2.1): 175B parameters, d_head 128, batch 3.2M tokens
(1,536 sequences of 2,048 = 3,145,728 tokens)."""
from omni.config import gpt3_config


def get_config():
    c = gpt3_config(num_layers=96, d_model=12288, num_heads=96, batch_tokens=3145728, lr=0.6e-4)
    # GPT-2's 50,257 tokens padded to a multiple of 128, so that tensor=4 splits the embedding into whole
    # shards (as Megatron and nanoGPT pad); omni trains its tokenizer with this many pieces.
    c.model.vocab_size = 50304
    c.mesh.update(data=4, fsdp=64, tensor=4)
    c.topology = "v4:8x8x16"  # TPU v4-2048: 1,024 chips, the slice this mesh and batch are sized for
    # Micro-batches that fit 32 GiB of HBM per chip: 3 compiled at 32.75 GiB per chip, 6 at 27.10 GiB
    # (benchmarks/aot_slices.py; benchmarks/RESULTS.md).
    c.train.grad_accum = 6
    return c
