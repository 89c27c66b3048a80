"""The default CPU run: a small GPT-2 pretrained on the Python standard library's own sources (present on
every machine, no download), with a sentencepiece tokenizer trained on them at first use."""
from omni.config import base_config


def get_config():
    c = base_config()
    c.model.update(variant="gpt2", num_layers=4, num_heads=4, d_model=256, d_ff=1024, vocab_size=4096,
                   max_len=256)
    c.train.update(steps=600, batch_size=16, seq_len=256, log_every=20, eval_every=200, eval_batches=16,
                   checkpoint_every=200)
    c.optim.update(lr=2e-3, warmup_steps=50, weight_decay=0.1)
    c.data.update(name="stdlib", tokenizer_sample_mb=8.0)
    return c
