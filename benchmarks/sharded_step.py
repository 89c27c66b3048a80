"""Train-step throughput on 8 simulated CPU devices for each parallelism layout (data, fsdp, tensor,
sequence), against 1 device. Prints one JSON line. On a 2-core machine the 8 "devices" share 2 cores, so this
measures the cost of each layout's collectives and resharding, not a speed-up.

    python benchmarks/sharded_step.py
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from omni import parallel  # noqa: E402
from omni.config import base_config, validate  # noqa: E402
from omni.losses import lm_loss  # noqa: E402
from omni.models import GPT  # noqa: E402
from omni.train.trainer import abstract_state, compile_train_step  # noqa: E402

AXES = ("data", "fsdp", "tensor", "sequence")
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 1, 2, 4), (2, 1, 1, 4)]
BATCH, SEQ, STEPS = 16, 256, 5


def tokens_per_s(sizes: tuple[int, ...]) -> float:
    c = base_config()
    c.model.update(num_layers=4, num_heads=8, d_model=256, d_ff=1024, vocab_size=8192, max_len=SEQ)
    c.train.update(batch_size=BATCH, seq_len=SEQ)
    c.mesh.update(dict(zip(AXES, sizes)))
    devices = jax.devices()[: int(np.prod(sizes))]
    c = validate(c, len(devices))
    mesh = parallel.make_mesh(c.mesh, devices)
    model = GPT(c.model)
    t = np.random.default_rng(0).integers(0, 8192, (BATCH, SEQ + 1)).astype(np.int32)
    host = {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": np.ones((BATCH, SEQ), np.float32)}
    shapes = {k: (v.shape, v.dtype) for k, v in host.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        abstract, shardings, init_fn = abstract_state(c, model, (BATCH, SEQ), mesh)
        step = compile_train_step(c, lm_loss(model), abstract, shardings, shapes, mesh)
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
        batch = parallel.global_batch(host, mesh)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(STEPS):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    return BATCH * SEQ * STEPS / (time.perf_counter() - start)


def main() -> None:
    results = {str(dict(zip(AXES, m))): tokens_per_s(m) for m in MESHES}
    print(json.dumps({"benchmark": "sharded_step", "tokens_per_s": results,
                      "model": "gpt2 4 layers, d_model 256, 8 heads, vocab 8192", "batch": BATCH, "seq": SEQ,
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, 8 simulated CPU devices"}))


if __name__ == "__main__":
    main()
