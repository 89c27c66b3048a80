"""omni: a JAX-native framework for the whole life of a GPT model."""
from __future__ import annotations


def load(workdir: str, step: int | None = None):
    """(config, params, tokenizer) of a workdir's latest (or given) checkpoint, params on the default device
    (of a PPO workdir: the policy's)."""
    import flax.linen as nn
    import jax

    from omni.data import Tokenizer
    from omni.train import checkpoint

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config, params, tokenizer_path, _ = checkpoint.model_params(
        workdir, lambda boxed: jax.tree.map(lambda _: sharding, boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned)), step)
    return config, params, Tokenizer(tokenizer_path)
