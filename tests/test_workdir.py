"""The Workdir owns a run's directory, and the stage registry owns the list of stages."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from omni import data
from omni.config import ConfigError, base_config
from omni.models import GPT
from omni.models.actor_critic import ActorCritic
from omni.stages import registry
from omni.train import checkpoint
from omni.workdir import Workdir, fingerprint, starting_point, write_json


def test_json_files_summary_and_metrics(tmp_path):
    run = Workdir(str(tmp_path / "run"))
    assert not run.finished and run.summary() is None and run.metrics() == [] and run.saved_config() is None
    run.write_config(base_config())
    os.makedirs(run.path, exist_ok=True)
    with open(run.file("metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 2.5}\n\n{"step": 2, "eval_loss": 2.0}\n')
    run.write_summary({"eval_loss": np.float32(2.0), "steps": 2})
    assert run.finished and run.summary() == {"eval_loss": 2.0, "steps": 2}
    assert [r["step"] for r in run.metrics()] == [1, 2]
    assert run.saved_config()["model"] == base_config().model.to_dict()
    assert sorted(os.listdir(run.path)) == ["config.json", "metrics.jsonl", "summary.json"]  # no temporaries left


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "summary.json")
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object.__new__(type("Opaque", (), {"__str__": None}))})
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["summary.json"]


def test_cached_values_are_computed_once_and_read_back_exactly(tmp_path, capsys):
    run, calls = Workdir(str(tmp_path / "ref")), []

    def compute(value):
        def f():
            calls.append(1)
            return value
        return f

    measures = {"score": 1 / 3, "texts": ["a", "é\n"], "scores": [0.1, 2.0 ** -30]}
    assert run.cached("m.json", compute(measures)) == measures and len(calls) == 1
    assert run.cached("m.json", compute({"other": 1})) == measures and len(calls) == 1  # read, not computed
    arrays = {"logps": np.float32([-1.5, np.pi, -1e-8])}
    np.testing.assert_array_equal(run.cached("a.npz", compute(arrays))["logps"], arrays["logps"])
    got = run.cached("a.npz", compute({"logps": np.zeros(3)}))
    assert got["logps"].dtype == np.float32 and np.array_equal(got["logps"], arrays["logps"]) and len(calls) == 2
    # a damaged file is computed again, with a warning that names it; one that cannot be written is only computed
    with open(run.file("cache/a.npz"), "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    assert run.cached("a.npz", compute({"logps": np.ones(2)}))["logps"].tolist() == [1.0, 1.0]
    assert "cache/a.npz is unreadable" in capsys.readouterr().err
    os.chmod(run.file("cache"), 0o500)
    try:
        if not os.access(run.file("cache"), os.W_OK):  # (root writes anyway)
            assert run.cached("new.json", compute({"x": 1})) == {"x": 1}
            assert "could not keep" in capsys.readouterr().err and not os.path.exists(run.file("cache/new.json"))
    finally:
        os.chmod(run.file("cache"), 0o700)


def test_a_fingerprint_changes_with_every_input_and_nothing_else(tmp_path):
    code, copy = tmp_path / "code.py", tmp_path / "elsewhere" / "code.py"
    code.write_text("x = 1\n")
    copy.parent.mkdir()
    copy.write_text("x = 1\n")
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    base = fingerprint({"n": 8, "files": [str(code)]}, params, None)
    assert fingerprint({"n": 8, "files": [str(copy)]}, params, None) == base  # files by content, not by place
    assert fingerprint({"files": [str(code)], "n": 8}, {"b": params["b"], "w": params["w"]}, None) == base
    changed = [fingerprint({"n": 9, "files": [str(code)]}, params, None),
               fingerprint({"n": 8, "files": [str(code)]}, {**params, "b": np.float32([0, 0, 1e-30])}, None),
               fingerprint({"n": 8, "files": [str(code)]}, {**params, "w": params["w"].reshape(3, 2)}, None),
               fingerprint({"n": 8, "files": [str(code)]}, {**params, "b": params["b"].astype(np.float64)}, None),
               fingerprint({"n": 8, "files": [str(code)]}, params, params)]
    code.write_text("x = 2\n")
    changed.append(fingerprint({"n": 8, "files": [str(code)]}, params, None))
    assert base not in changed and len(set(changed)) == len(changed)


def test_starting_point_names_what_the_stage_needs():
    c = base_config()
    with pytest.raises(ConfigError, match="config.init_from is empty: an SFT workdir"):
        starting_point(c, "an SFT workdir")
    c.init_from = "runs/x"
    assert starting_point(c, "an SFT workdir").path == "runs/x"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    folder = os.path.dirname(json.__file__)
    texts = [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    return data.train_tokenizer(texts, 512, str(tmp_path_factory.mktemp("tok") / "t.model")).model_path


def _tiny():
    c = base_config()
    c.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, vocab_size=512, max_len=16)
    return c


def test_a_checkpoint_of_several_models_loads_the_one_it_is_for(tmp_path, tokenizer_path):
    """PPO's checkpoints hold {'policy', 'value'}; their meta names both, and omni.load gives the policy."""
    c = _tiny()
    c.stage = "ppo"
    shapes = jax.eval_shape(ActorCritic(c.model).init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    rng = np.random.default_rng(0)  # values, not an init: nothing to compile
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), nn.unbox(shapes))
    run = Workdir(str(tmp_path / "ppo"))
    mngr = run.create().writer(keep=1)
    meta = checkpoint.meta(c, tokenizer_path, registry.get("ppo").models(c))
    assert list(meta["models"]) == ["policy", "value"] and meta["models"]["value"]["head"] == "scalar"
    mngr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    config, loaded, tokenizer = run.load()
    assert config.stage == "ppo" and tokenizer.vocab_size == 512
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params["policy"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.tree.structure(loaded) == jax.tree.structure(params["policy"])


def test_a_model_only_workdir_round_trips(tmp_path, tokenizer_path):
    c = _tiny()
    shapes = jax.eval_shape(GPT(c.model).init, jax.random.key(1), np.zeros((1, 4), np.int32))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), nn.unbox(shapes))
    run = Workdir(str(tmp_path / "model"))
    run.write_model(c, params, tokenizer_path)
    assert run.latest_step() == 0 and run.meta()[0].model.d_model == 16
    _, loaded, _ = run.load()
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)
    config, generator, tokenizer = run.generator()
    assert generator.config.d_model == 16 and tokenizer.vocab_size == config.model.vocab_size
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        run.write_model(c, params, tokenizer_path)


def test_the_registry_is_the_one_list_of_stages():
    assert set(registry.STAGES) == {"pretrain", "sft", "rm", "ppo", "dpo", "grpo", "best_of_n", "sample", "label",
                                    "compress", "eval"}
    for stage in registry.STAGES.values():
        assert (stage.step is not None) == stage.trains  # every training stage can be compiled by a dry run
    c = base_config()
    c.stage = "dpo-someday"
    with pytest.raises(ConfigError, match="config.stage='dpo-someday': expected one of \\('pretrain'"):
        registry.validate(c, 1)
    c.stage = "ppo"
    c.model.dropout = 0.0
    c.ppo.update(iterations=3, epochs=2, rollout_batch=16)
    c.train.batch_size = 8
    assert registry.validate(c, 1).train.steps == 3 * 2 * 16 // 8  # PPO's own check derives train.steps


@pytest.mark.parametrize("name, key, value, message", [
    ("dpo_tiny", "dpo.loss", "hinge", "config.dpo.loss='hinge': expected one of ('sigmoid', 'ipo')"),
    ("dpo_tiny", "model.dropout", 0.1, "config.model.dropout=0.1: DPO compares"),
    ("grpo_tiny", "grpo.advantage", "ppo", "config.grpo.advantage='ppo': expected 'grpo' or 'rloo'"),
    ("grpo_tiny", "ppo.samples_per_prompt", 1, "config.ppo.samples_per_prompt=1: is GRPO's group size G"),
    ("grpo_tiny", "train.batch_size", 4, "config.train.batch_size=4: not divisible by ppo.samples_per_prompt=8"),
    ("grpo_tiny", "grpo.reward", "gold", "config.grpo.reward='gold': expected 'model', 'labeler' or MODULE:FUNCTION"),
    ("grpo_tiny", "ppo.ptx_coef", 1.0, "config.ppo.ptx_coef=1.0: GRPO/RLOO have no pretraining term"),
    ("best_of_n_tiny", "best_of_n.n", 0, "config.best_of_n.n=0: must be a positive int"),
])
def test_post_training_stages_name_a_bad_key(name, key, value, message):
    c = load_config(name)
    assert registry.validate(c, 1).stage == c.stage  # the shipped config is valid
    section, _, leaf = key.partition(".")
    c[section][leaf] = value
    with pytest.raises(ConfigError) as e:
        registry.validate(c, 1)
    assert message in str(e.value)
