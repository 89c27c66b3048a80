"""bf16 training-step MFU on one GPU: GPT-3 XL shapes (24 layers, d_model 2048, 16 heads of 128, context 2048)
or as many layers as fit, cuDNN flash attention. Prints one JSON line. The goal on one H100: >= 50% MFU.

    python benchmarks/gpu_train.py [--layers 24] [--batch 8] [--remat dots] [--steps 10]

With more layers than the device holds, it takes the most of 24, 16, 12, 8, 4, 2 whose compiled step fits
(the compiler's memory analysis against the device's memory), and says so. --d_model, --heads and --vocab
shrink the shapes for a check of the script on a CPU.

Needs the package's runtime dependencies (the model imports ml-collections; the loss, the data modules'
grain and tensorflow-datasets): on a machine without them, install their wheels first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from omni import parallel
from omni.config import base_config, validate
from omni.losses import lm_loss
from omni.models import GPT, flops_per_token
from omni.train.metrics import peak_flops_per_device
from omni.train.trainer import DoesNotFit, abstract_state, check_fits, compile_train_step, compiled_memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--remat", default="dots", choices=("none", "dots", "full"))
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d_model", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50304)
    args = parser.parse_args()
    for layers in [n for n in (args.layers, 24, 16, 12, 8, 4, 2) if n <= args.layers]:
        try:
            return run(args, layers)
        except DoesNotFit as e:
            print(f"{layers} layers: {e}", file=sys.stderr, flush=True)
    raise SystemExit("no depth fits this device")


def run(args, layers: int) -> None:
    c = base_config()
    c.model.update(variant="gpt3", num_layers=layers, d_model=args.d_model, num_heads=args.heads,
                   d_ff=4 * args.d_model, vocab_size=args.vocab, max_len=args.seq, dtype="bfloat16", remat=args.remat,
                   attention=args.attention, scan_layers=True)
    c.train.update(batch_size=args.batch, seq_len=args.seq)
    c = validate(c, jax.device_count())
    mesh = parallel.make_mesh(c.mesh)
    model = GPT(c.model)
    shape = (args.batch, args.seq)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.model.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones(shape, np.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        abstract, shardings, init_fn = abstract_state(c, model, shape, mesh)
        step = compile_train_step(c, lm_loss(model), abstract, shardings,
                                  {k: (v.shape, v.dtype) for k, v in host.items()}, mesh)
        memory = compiled_memory(step) or {}
        check_fits(memory, jax.devices()[0])
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
        batch = parallel.global_batch(host, mesh)
        for _ in range(2):  # warm-up
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / seconds
    peak, source = peak_flops_per_device()
    fpt = flops_per_token(c.model, args.seq)
    print(json.dumps({"benchmark": "gpu_train", "device": jax.devices()[0].device_kind,
                      "devices": jax.device_count(), "layers": layers, "d_model": args.d_model, "batch": args.batch, "seq": args.seq,
                      "remat": args.remat, "attention": args.attention, "step_s": seconds, "tokens_per_s": tps,
                      "mfu": tps * fpt / (peak * jax.device_count()), "peak_flops": peak, "peak_source": source,
                      "loss": float(metrics["loss"]), "peak_memory_gib": memory.get("peak", 0) / 2 ** 30}))


if __name__ == "__main__":
    main()
