"""The default CPU run: a small GPT-2 pretrained on the Python standard library's own sources (present on
every machine, no download), with a sentencepiece tokenizer trained on them at first use. Sized to finish in
under 10 minutes on 2 CPU cores."""
from omni.config import base_config


def get_config():
    c = base_config()
    c.model.update(variant="gpt2", num_layers=4, num_heads=4, d_model=256, d_ff=1024, vocab_size=2048,
                   max_len=128, scan_layers=False)  # unrolled layers run ~1.5x faster on CPU than nn.scan
    c.train.update(steps=500, batch_size=16, seq_len=128, log_every=25, eval_every=250, eval_batches=16,
                   checkpoint_every=250)
    c.optim.update(lr=3e-3, warmup_steps=30, weight_decay=0.1)
    c.data.update(name="stdlib", tokenizer_sample_mb=8.0)
    return c
