"""The GPT's parameter trees beyond what `init` makes: their shapes without allocating them, and the layouts
that generation and compression work on (layers unrolled, kernels transposed), each with the model config
that reads it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from omni.models.gpt import GPT


def abstract_params(model_config: ml_collections.ConfigDict, seq_len: int = 8):
    """Boxed (logically annotated) parameter shapes; nothing is allocated, nothing runs (not even a key)."""
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.attention = "xla"  # the shapes do not depend on the kernel, and the kernels need long rows
    model = GPT(model_config)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    rng = jax.eval_shape(jax.random.key, 0)
    return jax.eval_shape(lambda r, t: model.init(r, t)["params"], rng, tokens)


def unrolled(model_config: ml_collections.ConfigDict, params) -> tuple[ml_collections.ConfigDict, dict]:
    """The same model with layers unrolled: params['blocks'] (stacked over layers by nn.scan) becomes
    params['blocks_0'], params['blocks_1'], ... Sharded leaves keep their sharding on the other axes."""
    if not model_config.scan_layers:
        return model_config, params
    config = ml_collections.ConfigDict(model_config.to_dict())
    config.scan_layers = False
    params = dict(params)
    stacked = params.pop("blocks")
    for i in range(model_config.num_layers):
        params[f"blocks_{i}"] = _take_layer(stacked, i)
    return config, params


_take_layer = jax.jit(lambda tree, i: jax.tree.map(lambda a: a[i], tree), static_argnums=1)


def scanned(params: dict, num_layers: int) -> dict:
    """The inverse of `unrolled`'s params: params['blocks_0'], ... stacked into params['blocks']."""
    params = dict(params)
    layers = [params.pop(f"blocks_{i}") for i in range(num_layers)]
    params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return params


def transposed(model_config: ml_collections.ConfigDict, params: dict) -> tuple[ml_collections.ConfigDict, dict]:
    """Unrolled layers' kernels stored with their input axis last (model.transposed_kernels: decoding's fast
    layout, see omni/models/linear.py). A copy of the weights, made once per Generator or set_params."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    config.transposed_kernels = True
    return config, _transpose_layers(params)


@jax.jit
def _transpose_layers(params: dict) -> dict:
    return {k: _transpose_layer(v) if k.startswith("blocks_") else v for k, v in params.items()}


def _transpose_layer(layer: dict) -> dict:
    attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
    attn["qkv_kernel"] = attn["qkv_kernel"].transpose(1, 2, 3, 0)  # (embed, 3, heads, kv) -> (3, heads, kv, embed)
    attn["out_kernel"] = attn["out_kernel"].transpose(2, 0, 1)  # (heads, kv, embed) -> (embed, heads, kv)
    mlp["fc"] = {**mlp["fc"], "kernel": mlp["fc"]["kernel"].T}
    mlp["proj"] = {**mlp["proj"], "kernel": mlp["proj"]["kernel"].T}
    return {**layer, "attn": attn, "mlp": mlp}
