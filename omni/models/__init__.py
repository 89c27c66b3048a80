"""The GPT decoder family."""
from omni.models.gpt import GPT, count_params, flops_per_token

__all__ = ["GPT", "count_params", "flops_per_token"]
