"""Serving under concurrent clients: omni serve (over HTTP, a separate process) against transformers' own continuous
batching (in process, no HTTP: the peer's best case), on the same weights, side by side in one run. One JSON line.

    pip install -e ".[bench,serve]" && python benchmarks/serve_throughput.py [--clients=1,4,16,64] [--new=64]

Model: benchmarks/generate_throughput.py's shapes (6 layers, 6 heads, d_model 384, vocab 8,192, fp32), random
weights, written as an omni workdir and exported through omni's HF exporter for transformers. Tokenizer: a
sentencepiece model of 8,192 pieces trained on standard-library sources (cached in the work folder). Each of N
clients streams its requests one after another: a prompt of about 32 tokens, `--new` new tokens, greedy; every
client together sends max(N, 32) requests. omni: `python -m omni.serve --slots=16`, clients on the official
`openai` async client streaming /v1/completions (logprobs=0, so that every token is a server-sent event);
transformers: `init_continuous_batching()`'s manager (sized as omni's engine: at most 16 requests together), one
streaming request per client at a time.

Reported per side and N: output tokens/s (all clients' tokens over the wall time), time to first token p50/p99
and inter-token latency p50/p99 (s); and omni's 16-client throughput over its 1-client throughput and over
transformers' at 16 (the goals: 4x and 2x, TTFT p99 under 1 s at 16).
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import allocator

LAYERS, HEADS, D_MODEL, VOCAB, MAX_LEN = 6, 6, 384, 8192, 1024
PROMPT, SLOTS = 32, 16


def build(folder: str) -> tuple[str, str, list[str]]:
    """(omni workdir, HF directory, prompt texts) of one random model and its tokenizer."""
    import jax

    from omni import data
    from omni.config import base_config
    from omni.interop.hf import to_hf, to_workdir
    from omni.models import GPT

    tokenizer_path = os.path.join(folder, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
        data.train_tokenizer((open(f, encoding="utf-8").read() for f in files), VOCAB, tokenizer_path)
    tokenizer = data.Tokenizer(tokenizer_path)
    m = base_config().model
    m.update(num_layers=LAYERS, num_heads=HEADS, d_model=D_MODEL, d_ff=4 * D_MODEL, vocab_size=VOCAB, max_len=MAX_LEN)
    params = GPT(m).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    workdir, hf_dir = os.path.join(folder, "omni"), os.path.join(folder, "hf")
    if not os.path.isdir(workdir):
        to_workdir(m, params, tokenizer_path, workdir)
        to_hf(m, params, hf_dir, tokenizer)
    rng = np.random.default_rng(0)
    words = open(os.path.join(os.path.dirname(os.__file__), "this.py"), encoding="utf-8").read().split()
    prompts = []
    while len(prompts) < 64:
        text = " ".join(rng.choice(words, size=20))
        ids = tokenizer.encode(text)[:PROMPT]
        prompts.append(tokenizer.decode(ids))
    return workdir, hf_dir, prompts


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def summary(tokens: int, wall: float, ttft: list[float], gaps: list[float]) -> dict:
    return {"tokens_per_s": tokens / wall, "ttft_s": percentiles(ttft), "itl_s": percentiles(gaps),
            "tokens": tokens}


async def clients(n: int, requests: int, one) -> dict:
    """`n` clients, each running its share of `requests` calls of one(prompt index) -> (token times from the
    request, tokens) in turn."""
    ttft, gaps, total = [], [], 0
    start = time.perf_counter()

    async def client(c: int) -> None:
        nonlocal total
        for r in range(c, requests, n):
            times, count = await one(r)
            ttft.append(times[0])
            gaps.extend(np.diff(times).tolist())
            total += count

    await asyncio.gather(*(client(c) for c in range(n)))
    return summary(total, time.perf_counter() - start, ttft, gaps)


def omni_side(workdir: str, prompts: list[str], counts: list[int], new: int) -> dict:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "omni.serve", f"--workdir={workdir}", f"--port={port}",
                               f"--slots={SLOTS}", "--queue=256"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    async def one(r: int) -> tuple[list[float], int]:
        sent, times = time.perf_counter(), []
        stream = await client.completions.create(model="omni", prompt=prompts[r % len(prompts)], max_tokens=new,
                                                 temperature=0, logprobs=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                times.append(time.perf_counter() - sent)
        return times, len(times)

    async def run() -> dict:
        for _ in range(600):
            try:
                await client.models.list()
                break
            except openai.APIConnectionError:
                await asyncio.sleep(0.5)
        await clients(1, 1, one)  # warm-up: a lone request's and a burst's programs compiled
        await clients(SLOTS, SLOTS, one)
        return {str(n): await clients(n, max(n, 32), one) for n in counts}

    try:
        return asyncio.run(run())
    finally:
        server.terminate()
        server.wait(timeout=60)


def hf_side(hf_dir: str, prompts: list[str], counts: list[int], new: int, tokenizer_path: str) -> dict:
    import torch
    from transformers import GenerationConfig, GPT2LMHeadModel
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from omni import data

    torch.manual_seed(0)
    tokenizer = data.Tokenizer(tokenizer_path)
    ids = [tokenizer.encode(p) for p in prompts]
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id)
    # Sized for this workload, as omni's engine is (its defaults size the cache from a GPU's free memory): pages of
    # 32 tokens, room for 256 of them, at most SLOTS requests decoded together.
    cb = ContinuousBatchingConfig(page_size=32, num_blocks=256, max_batch_tokens=512, max_requests_per_batch=SLOTS)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    manager.start()

    async def one(r: int) -> tuple[list[float], int]:
        sent, times, done, seen = time.perf_counter(), [], asyncio.Event(), 0

        def on_result(result) -> None:
            nonlocal seen
            now = time.perf_counter() - sent
            times.extend([now] * (len(result.generated_tokens) - seen))
            seen = len(result.generated_tokens)
            if result.is_finished():
                done.set()

        request = f"client-request-{r}-{time.perf_counter_ns()}"
        manager.register_result_handler(request, on_result)  # before the request: its first tokens may come at once
        manager.add_request(ids[r % len(ids)], request_id=request, max_new_tokens=new, streaming=True)
        await done.wait()
        return times, len(times)

    async def run() -> dict:
        await clients(1, 1, one)
        await clients(SLOTS, SLOTS, one)
        return {str(n): await clients(n, max(n, 32), one) for n in counts}

    try:
        return asyncio.run(run())
    finally:
        manager.stop(block=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--new", type=int, default=64, help="new tokens per request")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "omni_serve_bench"))
    parser.add_argument("--no-hf", action="store_true", help="omni only")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help=f"do not rerun this process with GLIBC_TUNABLES={allocator.HUGE_PAGES}")
    args = parser.parse_args()
    allocator.with_huge_pages(off=args.no_huge_pages)  # this process (transformers) and omni serve's alike
    import omni  # noqa: F401 - before JAX starts its backends (omni/__init__.py)

    os.makedirs(args.folder, exist_ok=True)
    workdir, hf_dir, prompts = build(args.folder)
    counts = [int(n) for n in args.clients.split(",")]
    out = {"benchmark": "serve_throughput", "new_tokens": args.new, "prompt_tokens": PROMPT, "slots": SLOTS,
           "shape": {"layers": LAYERS, "heads": HEADS, "d_model": D_MODEL, "vocab": VOCAB, "dtype": "float32"},
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "glibc_tunables": allocator.tunables(),
           "omni": omni_side(workdir, prompts, counts, args.new)}
    if not args.no_hf:
        out["hf"] = hf_side(hf_dir, prompts, counts, args.new, os.path.join(args.folder, "tokenizer.model"))
    one, many = out["omni"].get("1"), out["omni"].get("16")
    if one and many:
        out["omni_16_over_1"] = many["tokens_per_s"] / one["tokens_per_s"]
    if many and "hf" in out and "16" in out["hf"]:
        out["omni_over_hf_16"] = many["tokens_per_s"] / out["hf"]["16"]["tokens_per_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
