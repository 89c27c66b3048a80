"""Library functions that replaced hand-written code give the values the hand-written code gave: optax's
warmup-cosine schedule (omni/train/optim.py) and safetensors' own reader for bf16/fp16/fp32 weights, one file
or an index of shards (omni/interop/hf.py)."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from omni.config import base_config
from omni.interop import hf
from omni.train import optim


def reference_lr(step: int, lr: float, warmup: int, decay: int, min_ratio: float) -> float:
    """omni's schedule as first written: lr*step/warmup during the warmup, then a cosine from lr to
    min_ratio*lr over the steps warmup..decay, then min_ratio*lr for good."""
    if step < warmup:
        return lr * step / warmup
    progress = (min(step, decay) - warmup) / (decay - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))


@pytest.mark.parametrize("lr,warmup,decay,min_ratio", [
    (3e-3, 30, 1000, 0.1), (1.0, 10, 110, 0.1), (1e-3, 0, 10, 0.1), (2.5e-4, 2000, 60_000, 0.0),
    (1e-4, 4, 1000, 1.0), (6e-4, 375, 254_000, 0.1)])
def test_lr_schedule_matches_the_warmup_cosine_formula(lr, warmup, decay, min_ratio):
    o = base_config().optim
    o.update(lr=lr, warmup_steps=warmup, decay_steps=decay, min_lr_ratio=min_ratio)
    edges = [0, 1, warmup - 1, warmup, warmup + 1, decay - 1, decay, decay + 1, 10 * decay]
    steps = np.unique(np.concatenate([np.clip(edges, 0, None), np.linspace(0, 2 * decay, 401).astype(int)]))
    got = np.asarray(jax.vmap(optim.lr_schedule(o))(jnp.asarray(steps)), np.float64)
    want = np.array([reference_lr(s, lr, warmup, decay, min_ratio) for s in steps])
    # optax computes in float32: a few of its ulps (1.2e-7 each) off the float64 formula, relative to lr down
    # the cosine's last steps to a zero floor.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=lr * 3e-7)


WEIGHTS = {"wte.weight": np.linspace(-3, 3, 24, dtype=np.float32).reshape(6, 4),
           "h.0.ln_1.bias": np.array([1e-3, -7.5, 65504.0, 1.0 / 3], np.float32)}


def _write(tmp_path, dtype, sharded: bool) -> dict[str, np.ndarray]:
    """WEIGHTS cast to `dtype`, written by the safetensors package as one file or one shard per tensor."""
    tensors = {f"transformer.{k}": v.astype(dtype) for k, v in WEIGHTS.items()}
    if not sharded:
        save_file(tensors, str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
        return tensors
    weight_map = {name: f"model-{i:05d}.safetensors" for i, name in enumerate(tensors)}
    for name, shard in weight_map.items():
        save_file({name: tensors[name]}, str(tmp_path / shard), metadata={"format": "pt"})
    (tmp_path / hf.INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return tensors


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_safetensors_weights_load_as_written(tmp_path, dtype, sharded):
    written = _write(tmp_path, dtype, sharded)
    tensors = hf._SafeTensors(str(tmp_path))
    assert tensors.names() == set(WEIGHTS)
    for name in WEIGHTS:
        got = tensors.get(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, written[f"transformer.{name}"].astype(np.float32))
