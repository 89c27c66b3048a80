"""Decode throughput of omni's KV-cache generation against Hugging Face transformers' `generate` (PyTorch,
with its KV cache), same model shapes and the same work, measured side by side in one run. One JSON line.

    pip install -e ".[bench]" && python benchmarks/generate_throughput.py

Shapes (the issue's): 6 layers, 6 heads, d_model 384, vocab 8192; prompts of 32 random tokens; 128 new
tokens, greedy, no early stop (both sides generate exactly 128); batch 1 and batch 8; fp32 on CPU. Each side
runs alternately in rounds after a warm-up (which includes omni's compilation), the best round counts.
Tokens/s = batch x 128 / wall time of the whole call (prefill included, as a user sees it).
--quant=int8 or w8a8 runs omni on the same weights quantized (omni/compress/quant.py); HF stays fp32.
Both run under glibc huge pages (benchmarks/allocator.py; --no-huge-pages: neither).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import allocator

LAYERS, HEADS, D_MODEL, VOCAB, MAX_LEN = 6, 6, 384, 8192, 1024
PROMPT, NEW = 32, 128


def omni_runner(batch: int, quant: str = "none"):
    import jax

    from omni.compress.quant import quantize_model
    from omni.config import base_config
    from omni.generate import Generator, Sampling
    from omni.models import GPT

    m = base_config().model
    m.update(num_layers=LAYERS, num_heads=HEADS, d_model=D_MODEL, d_ff=4 * D_MODEL, vocab_size=VOCAB,
             max_len=MAX_LEN)
    params = GPT(m).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    if quant != "none":
        params = quantize_model(jax.tree.map(lambda a: a, __import__("flax").linen.unbox(params)))
        m.quant = quant
    generator = Generator(m, params)
    prompts = np.random.default_rng(0).integers(0, VOCAB, (batch, PROMPT)).tolist()

    def run() -> None:
        out = generator.generate(prompts, NEW, Sampling(temperature=0.0))
        assert out.lengths.min() == NEW

    return run


def hf_runner(batch: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    prompts = torch.randint(0, VOCAB, (batch, PROMPT))
    mask = torch.ones_like(prompts)

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, use_cache=True)
        assert out.shape[1] == PROMPT + NEW

    return run


def best_rate(runners: dict, batch: int, rounds: int) -> dict:
    for run in runners.values():
        run()  # compile / warm up
    best = {name: 0.0 for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(0.5)  # let the other framework's worker threads go idle first
            start = time.perf_counter()
            run()
            best[name] = max(best[name], batch * NEW / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="omni only (no torch installed)")
    parser.add_argument("--quant", default="none", choices=("none", "int8", "w8a8"), help="omni's weights")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help=f"do not rerun this process with GLIBC_TUNABLES={allocator.HUGE_PAGES}")
    args = parser.parse_args()
    allocator.with_huge_pages(off=args.no_huge_pages)
    import omni  # noqa: F401 - before JAX starts its backends (omni/__init__.py)

    out = {"benchmark": "generate_throughput", "prompt_tokens": PROMPT, "new_tokens": NEW,
           "shape": {"layers": LAYERS, "heads": HEADS, "d_model": D_MODEL, "vocab": VOCAB, "dtype": "float32"},
           "omni_quant": args.quant, "glibc_tunables": allocator.tunables(),
           "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "device": __import__("jax").devices()[0].device_kind}
    for batch in map(int, args.batches.split(",")):
        runners = {"omni": omni_runner(batch, args.quant)}
        if not args.no_hf:
            runners["hf"] = hf_runner(batch)
        best = best_rate(runners, batch, args.rounds)
        out[f"decode_tokens_per_s_b{batch}"] = best["omni"]
        if "hf" in best:
            out[f"hf_decode_tokens_per_s_b{batch}"] = best["hf"]
            out[f"speedup_vs_hf_b{batch}"] = best["omni"] / best["hf"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
