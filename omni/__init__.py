"""omni: a JAX-native framework for the whole life of a GPT model."""
from __future__ import annotations

import importlib.util
import os


def _start_without_absent_tpu() -> None:
    """With libtpu installed (the tpu extra, for ahead-of-time compilation) on a host without TPU chips, JAX would
    try a TPU backend at start, print a screen of libtpu warnings and take libtpu's one-process lock. Where no TPU
    or NVIDIA device is on this host's bus and JAX_PLATFORMS is unset, JAX starts on the CPU alone (what it
    would end up with anyway); omni/aot.py still describes TPU topologies through libtpu."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    import jax
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu():
        return
    jax.config.update("jax_platforms", "cpu")


_start_without_absent_tpu()


def load(workdir: str, step: int | None = None):
    """(config, params, tokenizer) of a workdir's latest (or given) checkpoint (of a PPO workdir: the policy's),
    params as uncommitted arrays on the default device: see omni.workdir.Workdir.load."""
    from omni.workdir import Workdir  # here: `import omni` stays light, and JAX starts only once it is used

    return Workdir(workdir).load(step)
