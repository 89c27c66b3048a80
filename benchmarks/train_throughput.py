"""Training throughput of omni's train step against Hugging Face transformers' GPT2LMHeadModel (PyTorch),
same shapes, measured side by side in one run. Prints one JSON line.

    pip install -e ".[bench]" && python benchmarks/train_throughput.py

Shapes (the issue's): 6 layers, 6 heads, d_model 384, vocab 8192, seq_len 256, batch 8, fp32, dropout 0.
Both take real optimizer steps (AdamW) on random tokens; each side is timed over the same number of steps
after warm-up, alternating rounds (each after a short idle gap) so that machine noise hits both alike;
the best round counts. omni runs as it is meant to on a CPU host: one data-parallel XLA device per core
(config.cpu_devices); the process (both frameworks) runs with glibc's large allocations on huge pages.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import allocator

LAYERS, HEADS, D_MODEL, VOCAB, SEQ, BATCH = 6, 6, 384, 8192, 256, 8


def omni_stepper(scan_layers: bool):
    import flax.linen as nn
    import jax

    from omni import parallel
    from omni.config import base_config, validate
    from omni.losses import lm_loss
    from omni.models import GPT, flops_per_token
    from omni.train.trainer import abstract_state, make_train_step

    c = base_config()
    c.model.update(num_layers=LAYERS, num_heads=HEADS, d_model=D_MODEL, d_ff=4 * D_MODEL, vocab_size=VOCAB,
                   max_len=SEQ, scan_layers=scan_layers)
    c.train.update(batch_size=BATCH, seq_len=SEQ)
    c = validate(c, jax.device_count())
    mesh = parallel.make_mesh(c.mesh)
    model = GPT(c.model)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        _, shardings, init_fn = abstract_state(c, model, (BATCH, SEQ), mesh)
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
        step = jax.jit(make_train_step(c, lm_loss(model)), donate_argnums=0)

    def run(steps: int) -> None:
        nonlocal state
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
            for _ in range(steps):
                t = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
                batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": np.ones((BATCH, SEQ), np.float32)}
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)

    return run, flops_per_token(c.model, SEQ)


def hf_stepper():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run(steps: int) -> None:
        for _ in range(steps):
            x = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
            loss = model(x[:, :-1], labels=x[:, :-1]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def timed(run, steps: int) -> float:
    # Let the other framework's worker threads (torch's OpenMP pool, XLA's Eigen pool) stop spin-waiting
    # before the clock starts, so neither side is timed while the other still holds the cores.
    time.sleep(0.5)
    start = time.perf_counter()
    run(steps)
    return BATCH * SEQ * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="omni only (no torch installed)")
    parser.add_argument("--scan", action="store_true", help="nn.scan over layers (default: unrolled)")
    parser.add_argument("--cpu-devices", type=int, default=os.cpu_count(),
                        help="XLA devices on this CPU host, data parallel (config.cpu_devices; 0: one device)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help=f"do not rerun this process with GLIBC_TUNABLES={allocator.HUGE_PAGES}")
    args = parser.parse_args()
    allocator.with_huge_pages(off=args.no_huge_pages)  # both frameworks under the same allocator

    from omni import parallel

    parallel.split_cpu_host(args.cpu_devices)

    import jax

    from omni.train.metrics import peak_flops_per_device

    peak, source = peak_flops_per_device()  # before torch's threads exist
    omni_run, fpt = omni_stepper(args.scan)
    runners = {"omni": omni_run}
    if not args.no_hf:
        runners["hf"] = hf_stepper()
    for run in runners.values():
        run(2)  # compile / warm up
    best = {name: 0.0 for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            best[name] = max(best[name], timed(run, args.steps))
    out = {"benchmark": "train_throughput", "tokens_per_s": best["omni"],
           "mfu": best["omni"] * fpt / (peak * jax.device_count()),
           "flops_per_token": fpt, "peak_flops": peak, "peak_source": source, "scan_layers": args.scan,
           "cpu_devices": args.cpu_devices, "glibc_tunables": allocator.tunables(),
           "shape": {"layers": LAYERS, "heads": HEADS, "d_model": D_MODEL, "vocab": VOCAB, "seq": SEQ,
                     "batch": BATCH, "dtype": "float32"},
           "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    if "hf" in best:
        out.update(hf_tokens_per_s=best["hf"], speedup_vs_hf=best["omni"] / best["hf"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
