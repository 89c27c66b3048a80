"""The InstructGPT pipeline: its plan of stage commands, the report's arithmetic, and (slow) the whole pipeline
end to end on a tiny budget."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli
from omni import pipeline


def _config(experiment="instructgpt", **changes):
    import importlib.util

    spec = importlib.util.spec_from_file_location(experiment, os.path.join(ROOT, "experiments", f"{experiment}.py"))
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
    np.testing.assert_allclose([ppo["margin_vs_sft"]["mean"], ppo["margin_vs_sft"]["std"]], [0.15, 0.0707107], rtol=1e-5)  # sample std
    assert report["policies"]["sft"]["labeler_score"] == 0.5
    assert (tmp_path / "report.json").exists() and (tmp_path / "reward_kl.png").stat().st_size > 1000
    assert "| ppo | 0.65 | +0.1500 ± 0.0707 |" in (tmp_path / "report.md").read_text()


def test_post_training_dry_run_prints_each_method_and_seed_from_one_sft_and_rm(monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(ROOT)
    c = _config("post_training", pretrained="P", seeds=2, seed=5, dry_run=True)
    c.overrides.grpo = "ppo.iterations=2"
    c.overrides.every_method = "cpu_devices=2"
    assert pipeline.run(c, "W") == 0
    commands = {}
    for line in capsys.readouterr().out.strip().splitlines():
        args = shlex.split(line)
        flags = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
        commands[args[-1].removeprefix("--workdir=W/")] = ([a for a in args if a.startswith("--config=")][0], flags)
    methods = ["dpo", "grpo", "grpo_verifier", "ppo", "best_of_n"]
    assert list(commands) == ["sft", "label", "rm"] + [f"{m}-seed{s}" for m in methods for s in (0, 1)]
    assert commands["sft"][1]["init_from"] == "P" and commands["rm"][1]["train.steps"] == "555"  # one epoch
    for m in methods:
        for s in (0, 1):
            config, flags = commands[f"{m}-seed{s}"]
            assert config == f"--config=configs/{m.replace('_verifier', '')}_tiny.py"
            assert flags["init_from"] == "W/sft" and flags["ppo.reward_from"] == "W/rm", m
            assert flags["train.seed"] == str(5 + s) and flags["data.suite_seed"] == "0"
            assert flags["cpu_devices"] == "2", m  # overrides.every_method
    dpo = commands["dpo-seed1"][1]
    assert (dpo["dpo.path"], dpo["dpo.eval_path"]) == ("W/label/train", "W/label/eval")
    assert dpo["dpo.reference_from"] == "W/sft"
    assert commands["ppo-seed0"][1]["ppo.reference_from"] == "W/sft" == commands["grpo-seed1"][1]["ppo.reference_from"]
    grpo, verifier = commands["grpo-seed0"][1], commands["grpo_verifier-seed0"][1]
    assert verifier["grpo.reward"] == "labeler" and "grpo.reward" not in grpo
    assert grpo["ppo.iterations"] == "2" and verifier["ppo.iterations"] == "24"  # each method's own overrides
    c.update(methods="dpo", pretrained="")  # one method; its own pretraining
    assert [s.name for s in pipeline.post_training_plan(c, "W")] == ["pretrain", "sft", "label", "rm", "dpo-seed0",
                                                                     "dpo-seed1"]


def test_stages_share_one_compilation_cache_in_the_workdir(tmp_path, monkeypatch):
    """Every stage subprocess gets W/xla_cache as JAX's persistent compilation cache (the seeds of a method and
    the programs methods share compile once), unless the caller chose a cache of its own."""
    seen = []

    def call(cmd, env):
        seen.append({k: env.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")})
        return 1  # the first stage fails: the pipeline stops there

    monkeypatch.setattr(pipeline.subprocess, "call", call)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    work = str(tmp_path / "W")
    assert pipeline.run(_config("post_training", pretrained=str(tmp_path / "P")), work) == 1
    assert seen == [{"JAX_COMPILATION_CACHE_DIR": os.path.join(work, "xla_cache"),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}]
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    pipeline.run(_config("post_training", pretrained=str(tmp_path / "P")), work)
    assert seen[-1]["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


def test_unknown_post_training_method_is_named():
    out = run_cli(["--config=experiments/post_training.py", "--config.methods=dpo,rlhf", "--config.dry_run=True"])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "config.methods='dpo,rlhf': unknown method 'rlhf'" in out.stderr


def test_post_training_report_gives_margins_over_sft_in_standard_deviations(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = _config("post_training", pretrained="P")
    steps = pipeline.post_training_plan(c, str(tmp_path))
    greedy = {"grpo": [0.6, 0.7, 0.8], "dpo": [0.55, 0.55, 0.55]}  # SFT: 0.5
    for step in steps:
        os.makedirs(tmp_path / step.name)
        summary = {"wall_s": 60.0}
        method, _, seed = step.name.partition("-seed")
        if seed:
            s = int(seed)
            summary.update(labeler_score=greedy.get(method, [0.5, 0.6, 0.7])[s], sft_labeler_score=0.5,
                           sampled_labeler_score=0.4 + 0.1 * s, sft_sampled_labeler_score=0.3, exact_match=0.2,
                           sft_exact_match=0.1, win_rate_vs_sft=0.6, kl_to_sft=1.0 + s, pretrain_perplexity=9.0,
                           sft_pretrain_perplexity=8.0)
            if step.kind in ("ppo", "grpo"):
                summary["episodes"] = 1024
            if step.kind == "dpo":
                summary["ranked_prompts"] = 300
            if step.kind == "best_of_n":
                summary["kept_answers"] = 100
                with open(tmp_path / step.name / "config.json", "w") as f:
                    json.dump({"best_of_n": {"n": 8, "prompts": 128}}, f)
        with open(tmp_path / step.name / "summary.json", "w") as f:
            json.dump(summary, f)
    report = pipeline.write_post_training_report(c, str(tmp_path), steps)
    grpo, dpo, sft = report["policies"]["grpo"], report["policies"]["dpo"], report["policies"]["sft"]
    np.testing.assert_allclose([grpo["labeler_score"]["mean"], grpo["labeler_score"]["std"]], [0.7, 0.1], atol=1e-5)
    margin = grpo["labeler_score_margin"]
    np.testing.assert_allclose([margin["mean"], margin["std"], margin["n_std"]], [0.2, 0.1, 2.0], atol=1e-4)
    np.testing.assert_allclose(grpo["sampled_labeler_score_margin"]["mean"], 0.2)
    assert dpo["labeler_score_margin"]["n_std"] is None and dpo["exact_match_margin"]["n_std"] is None  # no spread
    assert sft["labeler_score"]["mean"] == 0.5 and sft["pretrain_perplexity"]["mean"] == 8.0
    assert not report["sft_spread"]
    episodes = [report["policies"][m]["episodes"] for m in ("best_of_n", "dpo", "ppo", "grpo_verifier")]
    assert episodes == [8 * 100, 0, 1024, 1024]
    assert report["wall_s"] == 18 * 60.0 and report["methods_wall_s"] == 15 * 60.0 and grpo["wall_s"] == 180.0
    md = (tmp_path / "post_training.md").read_text()
    assert "| grpo | 0.7000 ± 0.1000 | +0.2000 ± 0.1000 | 2.0 | 0.5000 ± 0.1000 | +0.2000 ± 0.1000 | 2.0 |" in md
    assert "| SFT | 0.5000 ± 0.0000 |  |  | 0.3000 ± 0.0000 |" in md
    assert "| dpo | 0.5500 ± 0.0000 | +0.0500 ± 0.0000 | ∞ |" in md  # equal margins: no spread
    assert "0 (300 ranked prompts)" in md
    assert "| 800 | 3.0 |" in md and "18.0 min in all" in md and "methods alone 15.0 min" in md

    with open(tmp_path / "dpo-seed2" / "summary.json") as f:  # a run whose SFT numbers differ is flagged
        summary = json.load(f)
    summary["sft_exact_match"] = 0.12
    with open(tmp_path / "dpo-seed2" / "summary.json", "w") as f:
        json.dump(summary, f)
    report = pipeline.write_post_training_report(c, str(tmp_path), steps)
    assert list(report["sft_spread"]) == ["exact_match"] and "Warning" in (tmp_path / "post_training.md").read_text()


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
             "ppo": common + ("ppo.iterations=2 ppo.rollout_batch=8 ppo.samples_per_prompt=4 ppo.max_new_tokens=8 ppo.eval_prompts=8 "
                              "ppo.ptx_eval_rows=0 train.batch_size=4 train.eval_every=100"),
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
