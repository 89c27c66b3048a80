"""Every model config compiled ahead of time for the TPU slice it names (config.topology), on this host.

    pip install -e ".[tpu]"; python benchmarks/aot_slices.py [--configs=gpt3_xl,gpt3_175b] [--stage=ppo]

For each config: the analytic estimate and the compiler's per-chip memory of the stage's real step (what
`python -m omni.main --config=configs/NAME.py --config.dry_run=True` prints, without its FLOPs count), one JSON
line each, then a Markdown table for benchmarks/RESULTS.md. Exit status 1 if any config fails to compile or
does not fit its chips' HBM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omni import aot  # noqa: E402
from omni.config import ConfigError  # noqa: E402
from omni.stages import registry  # noqa: E402

CONFIGS = ("gpt1", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "gpt3_small", "gpt3_medium", "gpt3_large",
           "gpt3_xl", "gpt3_2_7b", "gpt3_6_7b", "gpt3_13b", "gpt3_175b")


def load(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.name = name
    return config


def compile_config(name: str, stage: str) -> dict:
    config = load(name)
    config.stage = stage
    slice_ = aot.parse_topology(config.topology)
    num_slices = config.mesh.dcn_data * config.mesh.dcn_fsdp
    try:
        config = registry.validate(config, slice_.chips * num_slices)
        est = registry.estimate(config)
        est["compiled"] = aot.compiled_report(config, aot.topology_devices(slice_, num_slices), est, slice_,
                                              flops=False)
    except (ConfigError, RuntimeError, ValueError) as e:  # a config that cannot compile is a row of the table
        return {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return est


def table(results: list[dict]) -> str:
    lines = ["| config | params | slice (topology) | mesh data/fsdp/tensor, grad accum | per chip: compiled | analytic "
             "| HBM | fits | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | {r['error']} | | | no | |")
            continue
        c, m = r["compiled"], r["mesh"]
        lines.append(f"| {r['name']} | {r['params'] / 1e9:.3g}B | {c['slice']} ({c['topology']}) | "
                     f"{m['data']}/{m['fsdp']}/{m['tensor']}, {r['grad_accum']} | {c['peak_gib']:.2f} GiB | "
                     f"{r['total_gib_per_device']:.2f} GiB | {c['hbm_gib']:g} GiB | {'yes' if c['fits'] else 'NO'} "
                     f"| {c['compile_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--stage", default="pretrain")
    args = parser.parse_args()
    results = []
    for name in args.configs.split(","):
        result = compile_config(name, args.stage)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results))
    return 0 if all("error" not in r and r["compiled"].get("fits") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
