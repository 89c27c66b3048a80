"""The command a TPU VM user types, checked here abstractly: `--config.dry_run=True` sizes any config."""
import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize("name,published", [("gpt3_xl", 1.3e9), ("gpt3_175b", 175e9)])
def test_dry_run_reports_params_and_memory(name, published):
    # The analytic estimate alone (tests/test_aot.py compiles for TPU slices).
    out = run_cli([f"--config=configs/{name}.py", "--config.dry_run=True", "--config.topology="], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    est = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(est["params"] / published - 1) < 0.03
    assert est["devices"] > 1 and 0 < est["total_gib_per_device"] < 32  # fits a TPU v4 chip's HBM
    assert "parameters" in out.stdout and "per device" in out.stdout

