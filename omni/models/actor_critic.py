"""The model pair PPO trains: a policy (the GPT with its language-model head) and its value function (the same
architecture with a scalar head, as the reward model has). GRPO and RLOO train the policy alone (critic=False):
their baseline is the other samples of a prompt."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from omni.models.gpt import GPT, continue_prefixes


def value_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The policy's architecture with a scalar head: the value function's and the reward model's."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    config.head = "scalar"
    return config


class ActorCritic(nn.Module):
    """The trained pair: params {'policy': GPT with the LM head, 'value': GPT with a scalar head}; with
    critic=False {'policy'} alone."""
    config: ml_collections.ConfigDict  # the policy's model config
    critic: bool = True

    def setup(self):
        self.policy = GPT(self.config)
        if self.critic:
            self.value = GPT(value_config(self.config))

    def __call__(self, tokens: jax.Array, prefix: jax.Array | None = None, prefix_start: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """(logits [batch, length, vocab], values [batch, length], zeros without a critic); no dropout (RL
        runs without it). With `prefix` [n, width] (left-padded from slot `prefix_start` [n]), the rows of
        `tokens` continue it in groups of batch / n (gpt.continue_prefixes)."""
        def run(module):
            if prefix is None:
                return module(tokens)
            return continue_prefixes(lambda t, cache: module(t, cache=cache), self.config, prefix, prefix_start,
                                     tokens)

        return run(self.policy), run(self.value) if self.critic else jnp.zeros(tokens.shape, jnp.float32)

    def logits(self, tokens: jax.Array) -> jax.Array:
        return self.policy(tokens)
