"""The peak FLOP/s that MFU is measured against on a host without a spec sheet: measured once per host and cached,
raised to any faster training step so that MFU stays at most 1, and never an error over its cache file."""
import json
import math
import os

import pytest

from omni.train import metrics

PROBED = 100e9  # what the fake probe measures


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A fresh process's view (nothing remembered in memory) with its cache in tmp_path; counts the probe's
    runs."""
    runs = []

    def fake_probe():
        runs.append(1)
        return PROBED

    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_measured_matmul_flops", fake_probe)
    metrics._peak.cache_clear()
    yield runs
    metrics._peak.cache_clear()


def new_process():
    metrics._peak.cache_clear()


def cache_files(tmp_path):
    return [p for p in os.listdir(tmp_path) if p.startswith("peak_flops_")]


def test_the_measurement_is_cached_for_the_next_process(probe, tmp_path):
    flops, source = metrics.peak_flops_per_device()
    [name] = cache_files(tmp_path)
    assert flops == PROBED and len(probe) == 1
    assert f"best of {metrics.PROBE_REPS}" in source and source.endswith(f"cached at {tmp_path / name}")
    new_process()
    assert metrics.peak_flops_per_device() == (flops, source)
    assert len(probe) == 1


def test_another_host_measures_again(probe, tmp_path, monkeypatch):
    metrics.peak_flops_per_device()
    new_process()
    monkeypatch.setattr(metrics, "_cpu_model", lambda: "another CPU")
    metrics.peak_flops_per_device()
    assert len(probe) == 2 and len(cache_files(tmp_path)) == 2


@pytest.mark.parametrize("content", ["{not json", "[]", '{"host": 1}', "null"])
def test_a_corrupt_cache_file_is_measured_again_and_rewritten(probe, tmp_path, content):
    metrics.peak_flops_per_device()
    [name] = cache_files(tmp_path)
    (tmp_path / name).write_text(content)
    new_process()
    assert metrics.peak_flops_per_device()[0] == PROBED and len(probe) == 2
    assert json.loads((tmp_path / name).read_text())["flops"] == PROBED


def test_an_unwritable_cache_dir_only_means_no_cache(probe, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path / "a_file" / "omni"))  # no directory can be made there
    flops, source = metrics.peak_flops_per_device()
    assert flops == PROBED and source.endswith("not cached")
    assert metrics.mfu(2 * PROBED) == 1.0


def test_a_faster_training_step_raises_the_cached_peak(probe, tmp_path):
    assert metrics.mfu(PROBED / 2) == 0.5
    assert metrics.mfu(3 * PROBED) == 1.0
    flops, source = metrics.peak_flops_per_device()
    assert flops == 3 * PROBED and source.startswith("highest rate seen")
    new_process()
    assert metrics.peak_flops_per_device() == (flops, source) and len(probe) == 1
    assert metrics.mfu(1.5 * PROBED) == 0.5


def test_a_higher_peak_cached_by_another_run_is_not_lowered(probe, tmp_path):
    metrics.peak_flops_per_device()
    [name] = cache_files(tmp_path)
    entry = json.loads((tmp_path / name).read_text())
    (tmp_path / name).write_text(json.dumps({**entry, "flops": 4 * PROBED}))  # a run beside this one saw more
    assert metrics.mfu(2 * PROBED) == 0.5
    assert json.loads((tmp_path / name).read_text())["flops"] == 4 * PROBED


def test_a_spec_sheet_peak_is_never_raised(probe, tmp_path, monkeypatch):
    monkeypatch.setitem(metrics.PEAK_FLOPS, "cpu", PROBED)
    assert metrics.mfu(2 * PROBED) == 2.0
    assert metrics.peak_flops_per_device() == (PROBED, "spec sheet (cpu)")
    assert not probe and not cache_files(tmp_path)


def test_the_probe_measures_a_positive_rate():
    assert math.isfinite(rate := metrics._measured_matmul_flops(n=128, reps=2)) and rate > 0
