"""The InstructGPT pipeline: its plan of stage commands, the report's arithmetic, and (slow) the whole pipeline
end to end on a tiny budget."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli
from omni import pipeline


def _config(**changes):
    import importlib.util

    spec = importlib.util.spec_from_file_location("instructgpt", os.path.join(ROOT, "experiments", "instructgpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.update(changes)
    return c


def test_plan_chains_each_stage_to_the_one_before(monkeypatch):
    monkeypatch.chdir(ROOT)  # the stage config paths are relative to the repository
    steps = {s.name: dict(s.overrides) for s in pipeline.plan(_config(rounds=2, ppo_seeds=2), "W")}
    assert list(steps) == ["pretrain", "sft", "label", "rm", "ppo", "ppo-seed1", "ppo_ptx", "ppo_ptx-seed1",
                           "label2", "rm2", "ppo2", "ppo2-seed1", "ppo_ptx2", "ppo_ptx2-seed1"]
    assert steps["sft"]["init_from"] == "W/pretrain"
    assert steps["rm"]["data.path"] == "W/label/train" and steps["rm"]["init_from"] == "W/sft"
    assert steps["ppo-seed1"]["train.seed"] == "1" and steps["ppo-seed1"]["ppo.reward_from"] == "W/rm"
    assert "ppo.ptx_coef" in steps["ppo_ptx"] and "ppo.ptx_coef" not in steps["ppo"]
    # round 2: the latest policy's samples, the previous reward model, each seed's own policy, the SFT reference
    assert steps["label2"]["init_from"] == "W/ppo" and steps["rm2"]["init_from"] == "W/rm"
    assert steps["ppo2-seed1"]["init_from"] == "W/ppo-seed1" and steps["ppo2-seed1"]["ppo.reference_from"] == "W/sft"
    assert steps["ppo_ptx2"]["init_from"] == "W/ppo_ptx" and steps["ppo_ptx2"]["ppo.reward_from"] == "W/rm2"


def test_bad_pipeline_keys_are_named():
    out = run_cli(["--config=experiments/instructgpt.py", "--config.rounds=0", "--config.dry_run=True"])
    assert out.returncode == 2 and "config.rounds=0" in out.stderr
    out = run_cli(["--config=experiments/instructgpt.py", "--config.overrides.ppo=steps", "--config.dry_run=True"])
    assert out.returncode == 2 and "config.overrides.ppo='steps'" in out.stderr


def test_report_averages_seeds_against_sft(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = _config(ppo_seeds=2, pretrained="P", ptx=False)
    steps = pipeline.plan(c, str(tmp_path))
    scores = {"ppo": 0.70, "ppo-seed1": 0.60}
    for step in steps:
        os.makedirs(tmp_path / step.name)
        summary = {"wall_s": 10.0}
        if step.kind == "ppo":
            summary.update(labeler_score=scores[step.name], sft_labeler_score=0.5, win_rate_vs_sft=0.6,
                           kl_to_sft=1.0, sampled_labeler_score=0.4, sft_sampled_labeler_score=0.3,
                           reward=0.1, kl=1.0)
            with open(tmp_path / step.name / "metrics.jsonl", "w") as f:
                f.write(json.dumps({"step": 4, "iteration": 1, "reward": 0.1, "kl": 0.5}) + "\n")
        with open(tmp_path / step.name / "summary.json", "w") as f:
            json.dump(summary, f)
    report = pipeline.write_report(c, str(tmp_path), steps)
    ppo = report["policies"]["ppo"]
    np.testing.assert_allclose(ppo["labeler_score"], 0.65)
    np.testing.assert_allclose([ppo["margin_vs_sft"]["mean"], ppo["margin_vs_sft"]["std"]], [0.15, 0.05])
    assert report["policies"]["sft"]["labeler_score"] == 0.5
    assert (tmp_path / "report.json").exists() and (tmp_path / "reward_kl.png").stat().st_size > 1000
    assert "| ppo | 0.65 | +0.1500 ± 0.0500 |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_whole_pipeline_with_two_rounds(tmp_path):
    """pretrain (a random small model stands in) -> SFT -> label -> RM -> PPO and PPO-ptx, twice, on a tiny budget:
    every stage finishes, the report has every policy, and a rerun skips everything."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from omni.config import base_config
    from omni.data import finetune, instructions, train_tokenizer
    from omni.interop.hf import to_workdir
    from omni.models import GPT

    data_dir, base = str(tmp_path / "data"), str(tmp_path / "base")
    data = base_config().data
    data.update(name="instructions", data_dir=data_dir)
    paths = instructions.write_suite(finetune.suite_directory(data))
    with open(paths["sft_train.jsonl"]) as f:
        text = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"] for line in f]
    train_tokenizer(text + ["User: Assistant: "] * 10, 512, str(tmp_path / "tok.model"))
    m = base_config().model
    m.update(num_layers=2, num_heads=2, d_model=64, d_ff=128, vocab_size=512, max_len=64, scan_layers=False)
    to_workdir(m, nn.unbox(GPT(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]),
               str(tmp_path / "tok.model"), base)
    (tmp_path / "text").mkdir()
    for i in range(3):
        (tmp_path / "text" / f"doc{i}.txt").write_text("def add(a, b):\n    return a + b\n" * 30)
    common = f"data.data_dir={data_dir} optim.warmup_steps=1 train.log_every=2 "
    flags = {"sft": common + "train.steps=4 train.batch_size=8 train.seq_len=64 sft.eval_prompts=8",
             "label": common + "label.prompts=24 label.eval_prompts=8 label.max_new_tokens=8",
             "rm": common + "train.steps=4 train.batch_size=8 train.eval_batches=2 rm.bias_demonstrations=16",
             "ppo": common + ("ppo.iterations=2 ppo.rollout_batch=8 ppo.max_new_tokens=8 ppo.eval_prompts=8 "
                              "ppo.ptx_eval_batches=0 train.batch_size=4 train.eval_every=100"),
             "ppo_ptx": f"ppo.ptx_data=text ppo.ptx_path={tmp_path / 'text'} ppo.ptx_batch=4"}
    args = ["--config=experiments/instructgpt.py", f"--workdir={tmp_path / 'run'}", f"--config.pretrained={base}",
            "--config.rounds=2"] + [f"--config.overrides.{k}={v}" for k, v in flags.items()]
    out = run_cli(args, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "run" / "report.json") as f:
        report = json.load(f)
    assert set(report["policies"]) == {"sft", "ppo", "ppo_ptx", "ppo2", "ppo_ptx2"}
    assert "rm2" in report["stages"] and (tmp_path / "run" / "reward_kl.png").exists()
    again = run_cli(args, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 9, again.stdout[-2000:]
