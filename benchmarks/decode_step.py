"""Where a few-row decode step's time goes (issue 23: serving 16 clients): the serving benchmark's model (6 layers,
d_model 384, vocab 8,192, fp32, kernels stored transposed as Generator keeps them) called on one new token per row
against a KV cache of `capacity` slots, beside the bare chain of the same 25 weight products at the same rows as
XLA's dot. The chain at 1 row streams every weight once (the memory floor); at more rows it shows how far XLA:CPU's
few-row products are from that floor; the steps at two capacities show what attention over the cache adds.
One JSON line (median ms over --repeats calls):

    python benchmarks/decode_step.py [--rows=1,4,16] [--capacity=64,256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS, HEADS, D_MODEL, VOCAB, MAX_LEN = 6, 6, 384, 8192, 1024


def median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def model_step(rows: int, capacity: int, repeats: int) -> float:
    """One cached call of the model: `rows` new tokens at slot capacity / 2 of a `capacity`-slot cache."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from omni.config import base_config
    from omni.generate import transposed, unrolled
    from omni.models.gpt import GPT, KVCache

    m = base_config().model
    m.update(num_layers=LAYERS, num_heads=HEADS, d_model=D_MODEL, d_ff=4 * D_MODEL, vocab_size=VOCAB,
             max_len=MAX_LEN, scan_layers=False)
    params = nn.unbox(GPT(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    config, params = transposed(*unrolled(m, params))
    model = GPT(config)
    cache = KVCache.zeros(config, jnp.zeros(rows, jnp.int32), capacity).replace(index=jnp.asarray(capacity // 2))
    step = jax.jit(lambda p, tokens, c: model.apply({"params": p}, tokens, cache=c)[0])
    return median_ms(step, params, jnp.ones((rows, 1), jnp.int32), cache, repeats=repeats)


def matmul_chain(rows: int, repeats: int) -> float:
    """The model's weight products alone (per layer qkv, out, mlp up and down; then the unembedding) as XLA's dot,
    chained. (Decoding's own few-row product, a fused multiply-and-sum, only fuses well inside the model: alone in
    such a chain XLA materialises it, 10x slower, so the model step is its measure.)"""
    import jax
    import jax.numpy as jnp

    shapes = [(D_MODEL, 3 * D_MODEL), (D_MODEL, D_MODEL), (D_MODEL, 4 * D_MODEL), (4 * D_MODEL, D_MODEL)] * LAYERS
    weights = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes + [(D_MODEL, VOCAB)])]

    def chain(x, weights):
        total, h = 0.0, x
        for w in weights:
            y = (h if w.shape[0] == D_MODEL else jnp.tile(h, (1, 4))) @ w
            h = y[:, :D_MODEL] * 0.01 + x  # each product depends on the last: no overlap between them
            total = total + y.sum()
        return total

    return median_ms(jax.jit(chain), jnp.ones((rows, D_MODEL)), weights, repeats=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--capacity", default="64,256")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    out = {"benchmark": "decode_step", "host": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "ms": {}}
    for rows in map(int, args.rows.split(",")):
        out["ms"][f"matmuls_{rows}_rows"] = round(matmul_chain(rows, args.repeats), 2)
        for capacity in map(int, args.capacity.split(",")):
            out["ms"][f"step_{rows}_rows_{capacity}_slots"] = round(model_step(rows, capacity, args.repeats), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
