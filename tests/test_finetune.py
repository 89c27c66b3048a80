"""pretrain -> SFT -> reward model through init_from workdirs, on the offline instruction suite, with a small
model: each stage's summary, the reward model's normalisation, and one clear error per bad handoff."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from omni.config import base_config
from omni.data import feedback, finetune, instructions, train_tokenizer
from omni.interop.hf import to_workdir
from omni.models import GPT

SMALL = {"model.dropout": 0.0, "train.batch_size": 8, "train.log_every": 2, "train.eval_every": 4,
         "train.eval_batches": 2, "train.checkpoint_every": 4, "optim.warmup_steps": 1, "optim.decay_steps": 50}


def _flags(config, workdir, init_from, data_dir, steps, **extra):
    flags = {**SMALL, "init_from": init_from, "data.data_dir": data_dir, "train.steps": steps, **extra}
    return [f"--config=configs/{config}.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A randomly initialised small model with a tokenizer trained on the suite's text stands in for pretraining;
    then SFT and the reward model run through the CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    data_dir, base = str(root / "data"), str(root / "base")
    data = base_config().data
    data.update(name="instructions", data_dir=data_dir)
    paths = instructions.write_suite(finetune.suite_directory(data))  # what the stages find and reuse
    with open(paths["sft_train.jsonl"]) as f:
        text = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"] for line in f]
    train_tokenizer(text + ["User: Assistant: "] * 10, 512, str(root / "tok.model"))
    m = base_config().model
    m.update(num_layers=2, num_heads=2, d_model=64, d_ff=128, vocab_size=512, max_len=64, scan_layers=False)
    params = nn.unbox(GPT(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    to_workdir(m, params, str(root / "tok.model"), base)
    sft, rm = str(root / "sft"), str(root / "rm")
    out = run_cli(_flags("sft_tiny", sft, base, data_dir, 4, **{"train.seq_len": 64, "sft.eval_prompts": 16,
                                                                  "sft.eval_max_new_tokens": 8}))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli(_flags("rm_tiny", rm, sft, data_dir, 4, **{"train.seq_len": 64, "rm.bias_demonstrations": 64}))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"data_dir": data_dir, "base": base, "sft": sft, "rm": rm, "root": root}


def test_sft_summary_has_its_headline_metrics(pipeline):
    s = _summary(pipeline["sft"])
    assert s["step"] == 4 and np.isfinite(s["eval_loss"])
    assert 0.0 <= s["labeler_score"] <= 1.0 and 0.0 <= s["exact_match"] <= 1.0


def test_reward_model_summary_and_zero_mean_on_demonstrations(pipeline):
    import omni
    from omni.losses import response_scores

    s = _summary(pipeline["rm"])
    assert 0.0 <= s["heldout_pairwise_accuracy"] <= 1.0 and np.isfinite(s["reward_bias"])
    config, params, tokenizer = omni.load(pipeline["rm"])
    assert config.model.head == "scalar" and "score_head" in params
    # independent of the stage's own bookkeeping: score the same demonstrations again
    data = base_config().data
    data.update(name="instructions", data_dir=pipeline["data_dir"])
    demos = feedback.demonstrations(finetune.suite_data(data, "sft"), "train")
    groups = finetune.preference_groups(tokenizer, [(demos[i][-1][0], [demos[i][-1][1]], [0]) for i in range(64)],
                                        64, 1)
    scores = response_scores(GPT(config.model), params, jnp.asarray(groups["inputs"]), jnp.asarray(groups["last"]))
    assert abs(float(scores.mean())) < 1e-3 * max(1.0, float(jnp.abs(scores).max()))


def test_reward_model_is_refused_by_generation_and_export(pipeline, tmp_path):
    import omni
    from omni.generate import GenerationError
    from omni.workdir import Workdir
    from omni.interop.hf import HFError, to_hf

    with pytest.raises(GenerationError, match="scalar head"):
        Workdir(pipeline["rm"]).generator()
    config, params, _ = omni.load(pipeline["rm"])
    with pytest.raises(HFError, match="model.head='scalar'"):
        to_hf(config.model, params, str(tmp_path / "hf"))


def test_language_model_cannot_start_from_a_reward_model(pipeline):
    out = run_cli(_flags("sft_tiny", str(pipeline["root"] / "bad"), pipeline["rm"], pipeline["data_dir"], 2,
                         **{"train.seq_len": 64}))
    assert out.returncode == 2 and "model.head='scalar'" in out.stderr, out.stderr[-2000:]


def test_stage_without_init_from_names_the_key(pipeline):
    out = run_cli(_flags("rm_tiny", str(pipeline["root"] / "bad2"), "", pipeline["data_dir"], 2))
    assert out.returncode == 2 and "config.init_from is empty" in out.stderr, out.stderr[-2000:]


def test_stage_inherits_the_architecture_of_init_from(pipeline):
    with open(os.path.join(pipeline["sft"], "config.json")) as f:
        model = json.load(f)["model"]
    assert (model["d_model"], model["num_layers"], model["vocab_size"], model["scan_layers"]) == (64, 2, 512, False)


def _ptx_text(pipeline) -> str:
    """PPO-ptx's pretraining text (and the held-out pretraining perplexity's): a few small local documents."""
    text = pipeline["root"] / "ptx"
    if not text.exists():
        text.mkdir()
        for i in range(4):
            (text / f"doc{i}.txt").write_text("def add(a, b):\n    return a + b\n" * (20 + i))
    return str(text)


def _ppo_flags(pipeline, workdir, **extra):
    text = _ptx_text(pipeline)
    flags = {"init_from": pipeline["sft"], "ppo.reward_from": pipeline["rm"], "data.data_dir": pipeline["data_dir"],
             "ppo.iterations": 2, "ppo.rollout_batch": 8, "ppo.samples_per_prompt": 4, "ppo.max_new_tokens": 8, "ppo.eval_prompts": 8,
             "ppo.sample_every": 1, "ppo.ptx_coef": 1.0, "ppo.ptx_data": "text", "ppo.ptx_path": str(text),
             "ppo.ptx_batch": 2, "ppo.ptx_eval_rows": 2, "train.batch_size": 4, "train.seq_len": 48,
             "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 2, "optim.warmup_steps": 1, **extra}
    return ["--config=configs/ppo_tiny.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def test_pretraining_perplexity_reads_the_same_rows_whatever_the_ptx_batch(pipeline):
    """Methods with different PPO-ptx batches (16 for DPO, 32 for PPO) must report the perplexity of the same text:
    ppo.ptx_eval_rows rows, whatever the batches they are read in."""
    import omni
    from conftest import load_config
    from omni import parallel
    from omni.config import ConfigError
    from omni.stages.rollout import pretraining

    sft_config, params, tokenizer = omni.load(pipeline["sft"])
    c = load_config("ppo_tiny")
    c.model = sft_config.model
    c.data.data_dir, c.train.seq_len = pipeline["data_dir"], 48
    c.ppo.update(ptx_coef=0.0, ptx_data="text", ptx_path=_ptx_text(pipeline), ptx_eval_rows=4)
    c.mesh.data = 1  # what the CLI resolves -1 to on one device
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
    perplexities = []
    for batch in (1, 2, 4):
        c.ppo.ptx_batch = batch
        perplexities.append(pretraining(c, tokenizer, mesh)[1](params))
    np.testing.assert_allclose(perplexities, perplexities[0], rtol=1e-5)
    c.ppo.update(ptx_batch=4, ptx_eval_rows=6)
    with pytest.raises(ConfigError, match="ppo.ptx_eval_rows"):
        pretraining(c, tokenizer, mesh)


@pytest.mark.slow  # ~50 s on 2 cores: over the CI suite's budget; tests/test_ppo.py checks PPO's parts in CI
def test_ppo_ptx_trains_and_reports(pipeline):
    import omni
    from omni.workdir import Workdir

    workdir = str(pipeline["root"] / "ppo")
    out = run_cli(_ppo_flags(pipeline, workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    s = _summary(workdir)
    assert s["step"] == 4  # 2 iterations x 8 episodes / minibatches of 4
    for key in ("labeler_score", "sft_labeler_score", "win_rate_vs_sft", "sampled_labeler_score"):
        assert 0.0 <= s[key] <= 1.0, key
    assert np.isfinite(s["kl_to_sft"]) and np.isfinite(s["pretrain_perplexity"]) and s["ptx_loss"] > 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        iterations = [r for r in map(json.loads, f) if "iteration" in r]
    assert [r["iteration"] for r in iterations] == [1, 2]
    for key in ("reward", "kl", "rollout_labeler_score", "response_length", "rollout_tokens_per_s",
                "explained_variance", "entropy", "clip_fraction", "approx_kl", "value_loss"):
        assert np.isfinite(iterations[-1][key]), key
    assert "sample (iteration 1)" in out.stdout
    # a PPO workdir serves its policy like any other stage's model
    config, params, _ = omni.load(workdir)
    assert config.stage == "ppo" and "wte" in params and "score_head" not in params
    _, generator, tokenizer = Workdir(workdir).generator()
    assert generator.generate([tokenizer.encode("User: hi")], 3).tokens.shape == (1, 3)


@pytest.mark.slow
def test_ppo_resumes_exactly_where_it_stopped(pipeline):
    """One iteration, then a second run to two iterations (rollout state, KL coefficient and the pretraining
    iterator restored from the checkpoint) ends with the parameters of an uninterrupted two-iteration run."""
    import omni

    whole, split = str(pipeline["root"] / "ppo_whole"), str(pipeline["root"] / "ppo_split")
    extra = {"ppo.target_kl": 0.5, "train.eval_every": 100}  # the adaptive KL coefficient must be restored too
    assert run_cli(_ppo_flags(pipeline, whole, **extra)).returncode == 0
    assert run_cli(_ppo_flags(pipeline, split, **extra, **{"ppo.iterations": 1})).returncode == 0
    out = run_cli(_ppo_flags(pipeline, split, **extra))
    assert out.returncode == 0 and "resuming from" in out.stdout, out.stderr[-2000:]
    a, b = omni.load(whole)[1], omni.load(split)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ppo_refuses_a_policy_as_reward_model(pipeline):
    out = run_cli(_ppo_flags(pipeline, str(pipeline["root"] / "bad_ppo"), **{"ppo.reward_from": pipeline["sft"]}))
    assert out.returncode == 2 and "config.ppo.reward_from=" in out.stderr and "model.head='lm'" in out.stderr, \
        out.stderr[-2000:]


@pytest.mark.slow
def test_gold_reward_is_the_labelers_true_score(pipeline):
    workdir = str(pipeline["root"] / "ppo_gold")
    out = run_cli(_ppo_flags(pipeline, workdir, **{"ppo.gold_reward": True, "ppo.iterations": 1, "ppo.ptx_coef": 0.0}))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        (first,) = [r for r in map(json.loads, f) if "iteration" in r]
    assert first["reward"] == pytest.approx(first["rollout_labeler_score"], abs=1e-5)


def _post_flags(pipeline, config, workdir, **extra):
    """A method of experiments/post_training.py at test size, from the fixture's SFT model and reward model."""
    flags = {"init_from": pipeline["sft"], "ppo.reward_from": pipeline["rm"], "data.data_dir": pipeline["data_dir"],
             "ppo.max_new_tokens": 8, "ppo.eval_prompts": 8, "ppo.eval_samples": 2, "ppo.rollout_batch": 16,
             "ppo.ptx_eval_rows": 2, "ppo.ptx_batch": 2, "ppo.ptx_data": "text", "ppo.ptx_path": _ptx_text(pipeline),
             "train.seq_len": 48, "train.log_every": 2,
             "train.eval_every": 100, "train.checkpoint_every": 2, "optim.warmup_steps": 1, **extra}
    return [f"--config=configs/{config}.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def _served_policy(workdir, stage):
    """The workdir's policy through omni.load and its generator, as chat and the HF export read it."""
    import omni
    from omni.workdir import Workdir

    config, params, _ = omni.load(workdir)
    assert config.stage == stage and "wte" in params and "score_head" not in params
    _, generator, tokenizer = Workdir(workdir).generator()
    assert generator.generate([tokenizer.encode("User: hi")], 3).tokens.shape == (1, 3)
    return params


@pytest.mark.slow  # ~40 s: the stages' parts are checked in CI by tests/test_dpo.py and tests/test_post_training.py
def test_grpo_and_rloo_resume_exactly_where_they_stopped(pipeline):
    """Two iterations in one run equal one iteration, a stop, and a rerun to two (the rollout batch and position
    restored from the checkpoint): for GRPO on the reward model and RLOO on the labeler's reward."""
    for advantage, reward in (("grpo", "model"), ("rloo", "labeler")):
        extra = {"grpo.advantage": advantage, "grpo.reward": reward, "ppo.iterations": 2, "ppo.samples_per_prompt": 4,
                 "train.batch_size": 8}
        whole, split = (str(pipeline["root"] / f"{advantage}_{name}") for name in ("whole", "split"))
        out = run_cli(_post_flags(pipeline, "grpo_tiny", whole, **extra))
        assert out.returncode == 0, out.stderr[-3000:]
        assert run_cli(_post_flags(pipeline, "grpo_tiny", split, **{**extra, "ppo.iterations": 1})).returncode == 0
        out = run_cli(_post_flags(pipeline, "grpo_tiny", split, **extra))
        assert out.returncode == 0 and "resuming from" in out.stdout, out.stderr[-2000:]
        for x, y in zip(jax.tree.leaves(_served_policy(whole, "grpo")), jax.tree.leaves(_served_policy(split, "grpo"))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        s = _summary(whole)
        assert s["episodes"] == 32 and 0.0 <= s["sampled_labeler_score"] <= 1.0 and np.isfinite(s["kl_to_sft"])


@pytest.mark.slow  # ~30 s
def test_dpo_and_best_of_n_train_and_report_the_held_out_measures(pipeline):
    dpo, bon = str(pipeline["root"] / "dpo"), str(pipeline["root"] / "bon")
    out = run_cli(_post_flags(pipeline, "dpo_tiny", dpo, **{"train.steps": 4, "train.batch_size": 4}))
    assert out.returncode == 0, out.stderr[-3000:]
    s = _summary(dpo)
    assert 0.0 <= s["eval_reward_accuracy"] <= 1.0 and s["pairs"] > 0 and "chosen_logps" in s
    out = run_cli(_post_flags(pipeline, "best_of_n_tiny", bon, **{"train.steps": 4, "train.batch_size": 4,
                                                                   "train.seq_len": 64, "best_of_n.n": 2,
                                                                   "best_of_n.prompts": 8}))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(bon, "best_of_n.jsonl")) as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == 8 and all(set(r) == {"prompt", "response", "reward"} for r in kept)
    for workdir, stage in ((dpo, "dpo"), (bon, "best_of_n")):
        s = _summary(workdir)
        for key in ("labeler_score", "sampled_labeler_score", "win_rate_vs_sft", "sft_labeler_score", "rm_agreement"):
            assert 0.0 <= s[key] <= 1.0, (stage, key)
        assert np.isfinite(s["kl_to_sft"]) and np.isfinite(s["pretrain_perplexity"])
        _served_policy(workdir, stage)


def test_grpo_names_a_reward_function_it_cannot_import(pipeline):
    out = run_cli(_post_flags(pipeline, "grpo_tiny", str(pipeline["root"] / "bad_grpo"),
                              **{"grpo.reward": "no_such_module:score", "ppo.iterations": 1,
                                 "ppo.samples_per_prompt": 4, "train.batch_size": 8}))
    assert out.returncode == 2 and "config.grpo.reward='no_such_module:score'" in out.stderr, out.stderr[-2000:]
