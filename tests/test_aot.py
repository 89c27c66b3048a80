"""The TPU path without a TPU: libtpu (the tpu extra, which CI installs) describes TPU slices on this CPU host, and
the stages' real steps compile for their chips ahead of time. Without libtpu these tests fail, never skip."""
import json

import pytest

from conftest import load_config, run_cli
from omni import aot
from omni.stages import registry
from omni.train import trainer


def tiny_gpt3(stage="pretrain", **mesh):
    """A small GPT-3 (dense and banded layers alternate) with rows of whole splash blocks."""
    c = load_config("tiny")
    c.stage = stage
    c.model.update(variant="gpt3", num_layers=2, sparse_window=128, max_len=256, dtype="bfloat16")
    c.train.update(seq_len=256, batch_size=16)
    c.mesh.update(data=-1, **mesh)
    return c


@pytest.mark.slow  # CI: the PPO test below compiles the RL step for a slice
def test_train_step_compiles_for_two_v5e_slices_with_splash_attention():
    slice_ = aot.parse_topology("v5e:2x2")
    assert (slice_.name, slice_.chips, slice_.chip.hbm_gib) == ("v5e-4", 4, 16)
    devices = aot.topology_devices(slice_, num_slices=2)  # two slices joined by DCN: 8 chips
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
    config = registry.validate(tiny_gpt3(dcn_data=2), len(devices))
    assert config.mesh.data == 4
    est = registry.estimate(config)
    out = aot.compiled_report(config, devices, est, slice_)
    assert out["attention"] == "splash" and out["fits"]
    # The compiler's own peak against the hand count (params, gradients, Adam, Korthikanti's activations): the
    # hand count is meant to be within a factor 2 either way.
    assert 0.5 < out["compiled_vs_analytic"] < 2.0, out
    # Depth and micro-batches extrapolated from shallow unrolled copies: XLA's FLOPs beside 6N + attention
    # (the splash kernel's own FLOPs are invisible to XLA, hence below 1).
    assert 0.8 < out["compiled_flops_per_device"] / out["analytic_flops_per_device"] < 1.1, out


def test_ppo_policy_and_value_step_compiles_for_a_slice():
    slice_ = aot.parse_topology("v4:2x2x1")  # a v4-8: 4 chips (megacore: 8 TensorCores)
    assert slice_.name == "v4-8"
    devices = aot.topology_devices(slice_)
    c = tiny_gpt3("ppo")
    c.ppo.update(rollout_batch=16, max_new_tokens=32)
    config = registry.validate(c, len(devices))
    compiled = aot.compile_step(config, devices)
    # Each prompt is read once into a KV cache that its samples continue (omni/stages/rollout.py): the step's
    # attention is the cached path's, not splash (the first test compiles splash for a slice).
    assert "tpu_custom_call" not in compiled.as_text()
    # The arguments hold both trained models' params and Adam moments: 3/4 of the analytic train state, which
    # counts params, gradients and both moments of the policy and the value function.
    arguments = trainer.compiled_memory(compiled)["argument"] / 2 ** 30
    assert 0.6 < arguments / registry.estimate(config)["train_state_gib_per_device"] < 0.9


def test_bad_topology_and_impossible_mesh_are_refused_by_name():
    out = run_cli(["--config=configs/tiny.py", "--config.dry_run=True", "--config.topology=v5e:3x3x3x3"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "config.topology='v5e:3x3x3x3'" in out.stderr
    out = run_cli(["--config=configs/gpt3_xl.py", "--config.dry_run=True", "--config.topology=v5e:2x2"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "config.mesh" in out.stderr and "4 devices" in out.stderr  # fsdp 16 on 4 chips


def test_sized_config_stops_on_this_host_before_allocating():
    out = run_cli(["--config=configs/gpt3_xl.py", "--workdir=/nonexistent/xl"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    for said in ("needs 16 devices", "TPU v4-32", "GiB each", "this host has", "--config.dry_run=True"):
        assert said in out.stderr, out.stderr


@pytest.mark.slow
def test_gpt3_xl_fits_its_slice():
    out = run_cli(["--config=configs/gpt3_xl.py", "--config.dry_run=True"], timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    compiled = json.loads(out.stdout.strip().splitlines()[-1])["compiled"]
    assert compiled["slice"] == "v4-32" and compiled["fits"] and compiled["attention"] == "splash"
