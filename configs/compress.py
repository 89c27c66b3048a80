"""Compression of a trained model into a new workdir (omni/stages/compress.py):

    python -m omni.main --config=configs/compress.py --config.init_from=runs/tiny --config.method=sparsegpt \
        [--config.compress.sparsity=0.5 | --config.compress.n_m=2:4] [--workdir=runs/tiny_sparsegpt]

config.method: magnitude (unstructured per layer or global, or N:M), sparsegpt (unstructured or N:M, on
calibration rows of init_from's training data), heads or mlp_channels (that fraction of whole attention heads
or MLP channels per layer, smallest norm first), int8 (weights stored int8 with per-channel scales, 4x smaller,
dequantised inside each product) or w8a8 (the same weights, activations quantised per token as well).
The model and tokenizer come from init_from; config.model here is ignored. The result is a step-0 checkpoint
that generation, chat and evaluation read; a pruned one is also a float model that any stage's init_from
accepts (fine-tuning keeps its zeros at zero: optim.keep_zeros), an INT8 one is for inference only.
"""
import ml_collections

from omni.config import base_config


def get_config():
    c = base_config()
    c.stage = "compress"
    c.name = "compressed"
    c.method = "sparsegpt"
    c.compress = ml_collections.ConfigDict(dict(
        sparsity=0.5,  # fraction of each linear layer's weights (or of heads / channels) removed
        n_m="",  # "2:4": keep N of every M consecutive inputs instead (magnitude or sparsegpt)
        scope="layer",  # magnitude: "layer" (each to the sparsity) or "global" (one threshold)
        calibration_rows=128,  # sparsegpt: rows of train.seq_len tokens from init_from's training data
        block_size=128,  # sparsegpt: inputs per lazy-update block
        damp=0.01))  # sparsegpt: added to H's diagonal, times its mean
    return c
