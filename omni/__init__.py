"""omni: a JAX-native framework for the whole life of a GPT model."""
from __future__ import annotations


def load(workdir: str, step: int | None = None):
    """(config, params, tokenizer) of a workdir's latest (or given) checkpoint, params on the default device."""
    import flax.linen as nn
    import jax

    from omni.data import Tokenizer
    from omni.estimate import abstract_params
    from omni.train import checkpoint

    config, tokenizer_path, step = checkpoint.read_meta(workdir, step)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nn.unbox(abstract_params(config.model)))
    params = checkpoint.restore_params(workdir, step, target)
    return config, params, Tokenizer(tokenizer_path)
