"""Hugging Face GPT-2 interop: logits equal to transformers' both ways, exact round trips, omni workdirs, HF
tokenizers, and one clear error per kind of bad input."""
import base64
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

import omni
from conftest import ROOT
from omni.data import Tokenizer
from omni.interop import hf
from omni.models import GPT
from omni.train import checkpoint
from omni.workdir import Workdir

TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.\n",
         "  tabs\tand\r\nunicode \u00fc\u4e2d\U0001f600 <|endoftext|> end"] * 20


def _bpe(path, vocab_size: int) -> str:
    """A tiny byte-level BPE (GPT-2's kind) with <|endoftext|>, saved as a tokenizer.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory, tokens, logits) of a random GPT-2 saved as GPT2LMHeadModel.save_pretrained does, with its
    tokenizer.json beside it."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(_bpe(root / "tok" / "tokenizer.json", 300))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # large, distinct values everywhere: a swapped or transposed tensor shows in the logits
        for name, p in model.named_parameters():
            is_ln_scale = ".ln_" in f".{name}" and name.endswith("weight")
            p.copy_((1.0 if is_ln_scale else 0.0) + torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.3))
    path = str(root / "model")
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tokenizer.model_path, path)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits.numpy()
    return path, tokens, logits


def _omni_logits(m, params, tokens):
    with jax.default_matmul_precision("highest"):  # no TF32/bf16 passes on accelerators: compare fp32 with fp32
        return np.asarray(GPT(m).apply({"params": params}, tokens))


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_gives_transformers_logits(hf_model, scan_layers):
    path, tokens, want = hf_model
    m, params = hf.from_hf(path, scan_layers=scan_layers)
    assert (m.variant, m.num_layers, m.d_model, m.num_heads, m.d_ff, m.max_len, m.dropout) == (
        "gpt2", 2, 64, 4, 256, 64, 0.0)
    assert ("blocks" in params) == scan_layers and ("blocks_1" in params) != scan_layers
    got = _omni_logits(m, params, tokens)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_loads_in_transformers_and_round_trips(hf_model, tmp_path, scan_layers):
    path, tokens, want = hf_model
    m, params = hf.from_hf(path, scan_layers=scan_layers)
    out = str(tmp_path / "out")
    hf.to_hf(m, params, out)
    model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        got = model.eval()(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
    m2, params2 = hf.from_hf(out, scan_layers=scan_layers)
    assert m2 == m
    _assert_same_params(params2, params)


def test_sharded_and_unprefixed_bf16_checkpoints(hf_model, tmp_path):
    """GPT2Model's key names (no `transformer.`), an index of shards, old mask buffers and bfloat16 tensors."""
    path, tokens, want = hf_model
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(os.path.join(path, hf.WEIGHTS)).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # a pre-4.x causal-mask buffer
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / hf.INDEX).write_text(json.dumps(index))
    shutil.copy(os.path.join(path, hf.CONFIG), tmp_path)
    m, params = hf.from_hf(str(tmp_path))
    assert np.abs(_omni_logits(m, params, tokens) - want).max() < 1e-4

    bf16 = torch.from_numpy(tensors["wpe.weight"]).to(torch.bfloat16)
    import safetensors.torch
    safetensors.torch.save_file({"wpe.weight": bf16}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    index["weight_map"] = {k: "a.safetensors" if k == "wpe.weight" else "b.safetensors" for k in names}
    save_file({k: tensors[k] for k in names if k != "wpe.weight"}, str(tmp_path / "b.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / hf.INDEX).write_text(json.dumps(index))
    _, params = hf.from_hf(str(tmp_path))
    assert np.array_equal(params["wpe"], bf16.float().numpy())


def _broken(hf_model, tmp_path, config=None, tensors=None):
    """A copy of the test model's directory with config.json entries and tensors replaced (None: deleted)."""
    path = hf_model[0]
    with open(os.path.join(path, hf.CONFIG)) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(path, hf.WEIGHTS))
    for key, value in (config or {}).items():
        cfg.pop(key) if value is None else cfg.update({key: value})
    for key, value in (tensors or {}).items():
        weights.pop(key) if value is None else weights.update({key: value})
    (tmp_path / hf.CONFIG).write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
    return str(tmp_path)


@pytest.mark.parametrize("config,tensors,message", [
    ({"model_type": "llama"}, {}, "is a llama model, only GPT-2"),
    ({"n_positions": 32}, {}, "'wpe.weight' has shape (64, 64), but config.json implies (32, 64)"),
    ({}, {"transformer.h.1.mlp.c_fc.bias": None}, "missing tensor 'h.1.mlp.c_fc.bias'"),
    ({}, {"transformer.h.0.crossattention.c_attn.weight": np.zeros(3)}, "unexpected tensors"),
    ({"activation_function": "gelu"}, {}, "activation_function='gelu'"),
    ({"layer_norm_epsilon": 1e-6}, {}, "layer_norm_epsilon=1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, {}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, {}, "scale_attn_weights=false"),
    ({"tie_word_embeddings": False}, {"lm_head.weight": np.zeros((300, 64), np.float32)},
     "lm_head.weight differs from wte.weight"),
])
def test_bad_hf_directory_is_one_clear_error(hf_model, tmp_path, config, tensors, message):
    with pytest.raises(hf.HFError) as e:
        hf.from_hf(_broken(hf_model, tmp_path, config, tensors))
    assert message in str(e.value)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(hf.HFError, match="no such directory"):
        hf.from_hf(str(tmp_path / "nope"))
    with pytest.raises(hf.HFError, match="has no config.json"):
        hf.from_hf(str(tmp_path))
    (tmp_path / hf.CONFIG).write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 1,
                                                  "vocab_size": 8, "n_positions": 8}))
    with pytest.raises(hf.HFError, match="has no model.safetensors"):
        hf.from_hf(str(tmp_path))


def test_untied_head_equal_to_wte_is_accepted(hf_model, tmp_path):
    wte = load_file(os.path.join(hf_model[0], hf.WEIGHTS))["transformer.wte.weight"]
    _, params = hf.from_hf(_broken(hf_model, tmp_path, {"tie_word_embeddings": False}, {"lm_head.weight": wte}))
    assert np.array_equal(params["wte"]["embedding"], wte)


def test_only_gpt2_variant_exports(hf_model, tmp_path):
    m, params = hf.from_hf(hf_model[0])
    m.variant = "gpt3"
    with pytest.raises(hf.HFError, match="model.variant='gpt3' cannot be exported"):
        hf.to_hf(m, params, str(tmp_path))
    m.variant = "gpt2"
    params["wpe"] = params["wpe"][:32]
    with pytest.raises(hf.HFError, match="do not match omni's parameters"):
        hf.to_hf(m, params, str(tmp_path))


# --- tokenizers and workdirs ------------------------------------------------------------------------------

def test_hf_tokenizer_round_trips_text(tmp_path):
    tok = Tokenizer(_bpe(tmp_path / "tokenizer.json", 300))
    assert tok.kind == "hf" and tok.vocab_size == 300
    assert tok.eos_id == tok.bos_id == tok.pad_id == tok._hf.token_to_id("<|endoftext|>")
    for text in TEXTS[:3] + ["", "\n\n \t", "fresh w\u00f6rds n\u00f6t s\u00e9en \U0001f680"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text.replace("<|endoftext|>", "")  # special tokens decode to nothing
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    saved = Tokenizer(tok.save(str(tmp_path / "copy")))
    assert saved.model_path == str(tmp_path / "copy" / "tokenizer.json") and saved.encode(TEXTS[0]) == tok.encode(
        TEXTS[0])


def test_workdir_holds_params_and_tokenizer(hf_model, tmp_path):
    path = hf_model[0]
    m, params = hf.from_hf(path)
    workdir = str(tmp_path / "w")
    n = hf.to_workdir(m, params, os.path.join(path, "tokenizer.json"), workdir)
    assert n == sum(x.size for x in jax.tree.leaves(params))
    config, loaded, tokenizer = omni.load(workdir)
    assert config.model == m and tokenizer.kind == "hf" and tokenizer.vocab_size == m.vocab_size
    assert tokenizer.model_path == os.path.join(workdir, "tokenizer.json")
    _assert_same_params(jax.device_get(loaded), params)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"] == m.to_dict()
    with pytest.raises(hf.HFError, match="already holds checkpoints"):
        hf.to_workdir(m, params, os.path.join(path, "tokenizer.json"), workdir)


def test_old_meta_with_only_a_sentencepiece_model_is_read(tmp_path):
    import orbax.checkpoint as ocp

    mngr = checkpoint.manager(str(tmp_path), keep=1)
    mngr.save(0, args=ocp.args.Composite(meta=ocp.args.JsonSave(
        {"config": {"name": "old"}, "tokenizer_model_b64": base64.b64encode(b"spm bytes").decode()})))
    mngr.wait_until_finished()
    config, path, step = Workdir(str(tmp_path)).meta()
    assert (config.name, step, path) == ("old", 0, os.path.join(str(tmp_path), "tokenizer.model"))
    assert open(path, "rb").read() == b"spm bytes"


def test_cli_import_export_round_trip(hf_model, tmp_path, capsys):
    path = hf_model[0]
    workdir, out = str(tmp_path / "w"), str(tmp_path / "out")
    cmd = (f"{sys.executable} -m omni.interop.hf import {path} {workdir} --scan_layers=false && "
           f"{sys.executable} -m omni.interop.hf export {workdir} {out} --step=0")
    run = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {workdir}:") and lines[1].startswith(f"wrote {out}: config.json"), lines
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["scan_layers"] is False  # stored unrolled, as asked
    assert open(os.path.join(out, "tokenizer.json")).read() == open(os.path.join(path, "tokenizer.json")).read()
    m, params = hf.from_hf(out)
    _, original = hf.from_hf(path)
    _assert_same_params(params, original)
    with open(os.path.join(out, hf.CONFIG)) as f:
        assert json.load(f)["eos_token_id"] == Tokenizer(os.path.join(path, "tokenizer.json")).eos_id

    other = _bpe(tmp_path / "small" / "tokenizer.json", 280)
    with pytest.raises(SystemExit) as e:
        hf.main(["import", path, str(tmp_path / "w2"), f"--tokenizer={other}"])
    assert e.value.code == 2
    assert f"error: tokenizer {other} has 280 pieces but model vocab_size 300" in capsys.readouterr().err
