"""GPT-1 (Radford et al. 2018): post-LN, 12 layers, d_model 768, 12 heads, FFN 3072, context 512, BPE vocab
40,478, dropout 0.1, Adam with lr 2.5e-4 (2,000 warmup updates, cosine to 0), batch 64 x 512, L2 0.01 on
weights; 117M parameters."""
from omni.config import base_config


def get_config():
    c = base_config()
    c.model.update(variant="gpt1", num_layers=12, num_heads=12, d_model=768, d_ff=3072, vocab_size=40478,
                   max_len=512, dropout=0.1)
    c.train.update(batch_size=64, seq_len=512, log_every=10, eval_every=1000, checkpoint_every=1000)
    # The paper trains 100 epochs of BooksCorpus and gives no step count; set train.steps for your corpus.
    c.train.steps = 100_000
    c.optim.update(lr=2.5e-4, warmup_steps=2000, min_lr_ratio=0.0, b1=0.9, b2=0.999, weight_decay=0.01)
    c.data.name = "c4/en"
    c.mesh.update(data=4, fsdp=1, tensor=1)
    c.topology = "v4:2x2x1"  # TPU v4-8: 4 chips, the slice this mesh and batch are sized for
    return c
