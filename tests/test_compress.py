"""The compress stage end to end on a tiny random model over a small local corpus: the written workdir loads,
generates, evaluates (the eval stage) and has the requested sparsity pattern or INT8 weights; an
instruction-tuned model calibrates on its demonstrations; bad settings are named."""
import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import omni
from omni import data
from omni.compress import prune
from omni.config import ConfigError, base_config
from omni.interop.hf import to_workdir
from omni.models import GPT
from omni.stages import compress, evaluate
from omni.workdir import Workdir


def _compress_config(source: str, **settings) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("compress_config", os.path.join(
        os.path.dirname(__file__), "..", "configs", "compress.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.init_from = source
    for key, value in settings.items():
        if key == "method":
            c.method = value
        else:
            c.compress[key] = value
    return c


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random GPT as a workdir whose data config is a few local text files."""
    root = tmp_path_factory.mktemp("compress")
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text)
    tokenizer = data.train_tokenizer(texts, 512, str(root / "t.model"))
    m = base_config().model
    m.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=tokenizer.vocab_size, max_len=32)
    params = jax.jit(GPT(m).init)(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    path = str(root / "model")
    to_workdir(m, params, tokenizer.model_path, path)
    return path, str(corpus), str(root / "data")


def _load_with_local_data(monkeypatch, source):
    path, corpus, data_dir = source
    load = Workdir.load

    def local(self, step=None):
        config, params, tokenizer = load(self, step)
        config.data.update(name="text", path=corpus, data_dir=data_dir)
        config.train.update(seq_len=32, batch_size=4, eval_batches=2)
        return config, params, tokenizer

    monkeypatch.setattr(Workdir, "load", local)


def test_sparsegpt_writes_a_workdir_that_generates(source, monkeypatch, tmp_path):
    _load_with_local_data(monkeypatch, source)
    out = str(tmp_path / "pruned")
    summary = compress.run(_compress_config(source[0], method="sparsegpt", calibration_rows=16, block_size=16), out)
    assert summary["sparsity"] == 0.5 and np.isfinite(summary["eval_perplexity"])
    config, params, _ = omni.load(out)
    dense = omni.load(source[0])[1]
    assert config.stage == "compress" and config.method == "sparsegpt"
    assert jax.tree.structure(params) == jax.tree.structure(dense)  # scanned layers in, scanned layers out
    for _, _, w in prune.linear_layers(params):
        assert (w == 0).mean() == 0.5
    np.testing.assert_array_equal(params["wte"]["embedding"], dense["wte"]["embedding"])  # embeddings stay dense
    # SparseGPT reconstructs each layer's outputs: the model's logits stay closer to dense than magnitude's
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 32))
    model = GPT(config.model)
    logits = model.apply({"params": dense}, tokens)
    error = lambda p: float(np.mean((np.asarray(model.apply({"params": p}, tokens)) - logits) ** 2))  # noqa: E731
    assert error(params) < 0.8 * error(prune.apply(dense, prune.magnitude(dense, 0.5)))
    _, generator, tokenizer = Workdir(out).generator()
    assert generator.generate([tokenizer.encode("import")], 4).tokens.shape == (1, 4)
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["method"] == "sparsegpt"


@pytest.mark.parametrize("settings,named", [
    ({"method": "random"}, "config.method="),
    ({"n_m": "4:2"}, "config.compress.n_m="),
    ({"n_m": "two:four"}, "config.compress.n_m="),
    ({"sparsity": 1.0}, "config.compress.sparsity="),
    ({"scope": "model"}, "config.compress.scope="),
])
def test_bad_settings_are_named(source, tmp_path, settings, named):
    with pytest.raises(ConfigError, match=named):
        compress.run(_compress_config(source[0], **settings), str(tmp_path / "out"))


def test_an_existing_workdir_is_refused_before_any_work(source, tmp_path):
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        compress.run(_compress_config(source[0], method="magnitude"), source[0])


@pytest.mark.slow  # CI: tests/test_quant.py checks the INT8 model, the SparseGPT test above the stage's workdir
def test_int8_writes_a_quarter_size_workdir_that_generates(source, monkeypatch, tmp_path):
    _load_with_local_data(monkeypatch, source)
    out = str(tmp_path / "int8")
    summary = compress.run(_compress_config(source[0], method="int8"), out)
    assert summary["weights_mb"] < 0.35 * summary["before_weights_mb"]  # float positions, biases, scales: 32%
    assert summary["disk_mb"] < 0.5 * summary["before_weights_mb"]  # 40% here: per-array metadata weighs on 35K params
    assert abs(summary["eval_perplexity"] / summary["before_perplexity"] - 1) < 0.01
    config, params, _ = omni.load(out)  # restored as int8 values and float32 scales
    assert config.model.quant == "int8" and params["blocks"]["mlp"]["fc"]["kernel"].dtype == np.int8
    assert params["wte"]["embedding"].dtype == np.int8 and params["wte"]["scale"].dtype == np.float32
    _, generator, tokenizer = Workdir(out).generator()
    assert generator.generate([tokenizer.encode("import")], 4).tokens.shape == (1, 4)
    # the eval stage reads it too, and measures what the compress stage reported
    c = base_config()
    c.stage, c.init_from = "eval", out
    assert evaluate.run(c, str(tmp_path / "eval"))["perplexity"] == pytest.approx(summary["eval_perplexity"])
    with open(tmp_path / "eval" / "summary.json") as f:
        assert json.load(f)["init_from"] == out
    c.init_from = ""
    with pytest.raises(ConfigError, match="config.init_from is empty"):
        evaluate.run(c, str(tmp_path / "eval"))
    with pytest.raises(ConfigError, match="already holds INT8 weights"):
        compress.run(_compress_config(out, method="magnitude"), str(tmp_path / "twice"))


def test_an_instruction_tuned_model_calibrates_on_its_demonstrations(source):
    from omni.data import feedback, finetune
    from omni.data.template import encode_dialogue

    config, _, tokenizer = omni.load(source[0])
    config.data.name = "instructions"
    config.train.seq_len = 32
    rows = compress.calibration_rows(config, tokenizer, 4)
    assert rows.shape == (4, 32)
    first = feedback.demonstrations(finetune.suite_data(config.data, "sft"), "train")[0]
    encoded = encode_dialogue(tokenizer, first)[0][:-1]  # a row holds the inputs: all tokens but the last
    np.testing.assert_array_equal(rows[0][:min(32, len(encoded))], encoded[:32])
