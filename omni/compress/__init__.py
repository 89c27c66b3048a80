"""Model compression: one-shot pruning (SparseGPT, magnitude) and quantization of trained kernels."""
