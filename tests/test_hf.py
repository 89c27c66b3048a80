"""Hugging Face GPT-2 interop: logits equal to transformers' both ways, exact round trips, omni workdirs, HF
tokenizers, and one clear error per kind of bad input."""
import base64
import glob
import json
import os
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import omni
from conftest import ROOT
from omni.config import base_config
from omni.data import Tokenizer, train_tokenizer
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
    ({"n_head": None}, {}, "config.json: no 'n_head'"),
    ({"n_embd": "64"}, {}, 'config.json: n_embd="64" must be a positive integer'),
    ({"n_layer": 2.0}, {}, "config.json: n_layer=2.0 must be a positive integer"),
    ({"n_positions": None, "n_ctx": True}, {}, "config.json: n_ctx=true must be a positive integer"),
    ({"n_inner": -1}, {}, "config.json: n_inner=-1 must be a positive integer"),
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
    for text, message in [("{'model_type': 'gpt2'}", "config.json: not valid JSON (Expecting property name"),
                          ('["gpt2"]', "config.json: expected a JSON object, found a list")]:
        (tmp_path / hf.CONFIG).write_text(text)
        with pytest.raises(hf.HFError, match=message.replace("(", r"\(")):
            hf.from_hf(str(tmp_path))
    (tmp_path / hf.CONFIG).write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 1,
                                                  "vocab_size": 8, "n_positions": 8}))
    with pytest.raises(hf.HFError, match="has no model.safetensors"):
        hf.from_hf(str(tmp_path))


def test_tensor_of_a_dtype_numpy_lacks_is_one_error(hf_model, tmp_path):
    import safetensors.torch

    tensors = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(hf_model[0], hf.WEIGHTS)).items()}
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].to(torch.float8_e5m2)
    safetensors.torch.save_file(tensors, str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
    shutil.copy(os.path.join(hf_model[0], hf.CONFIG), tmp_path)
    with pytest.raises(hf.HFError, match=f"{tmp_path / hf.WEIGHTS}: cannot read tensor 'transformer.wpe.weight'"):
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
    original = Tokenizer(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(out, hf.CONFIG)) as f:
        assert json.load(f)["eos_token_id"] == original.eos_id
    loaded = AutoTokenizer.from_pretrained(out)
    assert [loaded.encode(t, add_special_tokens=False) for t in TEXTS[:3]] == [original.encode(t) for t in TEXTS[:3]]

    other = _bpe(tmp_path / "small" / "tokenizer.json", 280)
    with pytest.raises(SystemExit) as e:
        hf.main(["import", path, str(tmp_path / "w2"), f"--tokenizer={other}"])
    assert e.value.code == 2
    assert f"error: tokenizer {other} has 280 pieces but model vocab_size 300" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["weights cut in their data", "weights cut in their header", "config not JSON"])
def test_import_of_a_damaged_file_is_one_line_naming_it(hf_model, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(hf_model[0], bad)
    culprit = bad / (hf.CONFIG if damage == "config not JSON" else hf.WEIGHTS)
    data = culprit.read_bytes()
    culprit.write_bytes({"weights cut in their data": data[: len(data) // 2], "weights cut in their header": data[:6],
                         "config not JSON": data[:40]}[damage])
    run = subprocess.run([sys.executable, "-m", "omni.interop.hf", "import", str(bad), str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) <= 5 and lines[0].startswith(f"error: {culprit}: "), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "w").exists()


# --- a sentencepiece tokenizer in a HF directory ----------------------------------------------------------

# Text a tokenizer must get exactly right: newlines, runs of spaces and tabs, leading and trailing spaces,
# digits, characters missing from the vocabulary (byte fallback), and the names of byte and unknown pieces.
SAMPLES = ["def f(x):\n    return x  +  1\n\n\n", "  two  spaces,\ttabs\t\tand\r\nends   ", " lead", "trail ",
           "12345 + 678", "\u00fcn\u00efc\u00f6d\u00e9 \u4e2d\u6587 \U0001f600 \u2581 <unk> <0x41>", "", " ", "\n"]


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory):
    """(workdir, tokenizer) of a random model with a sentencepiece tokenizer trained as omni trains one."""
    root = tmp_path_factory.mktemp("spm")
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    tokenizer = train_tokenizer([open(f, encoding="utf-8").read() for f in files], 512, str(root / "t.model"))
    m = base_config().model
    m.update(num_layers=1, num_heads=2, d_model=32, d_ff=64, vocab_size=tokenizer.vocab_size, max_len=32)
    params = GPT(m).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    hf.to_workdir(m, params, tokenizer.model_path, str(root / "run"))
    return str(root / "run"), tokenizer


def test_export_of_a_sentencepiece_run_is_read_back_by_import_and_transformers(sentencepiece_run, tmp_path):
    run_dir, original = sentencepiece_run
    out, back = str(tmp_path / "hf"), str(tmp_path / "back")
    cmd = (f"umask 022 && {sys.executable} -m omni.interop.hf export {run_dir} {out} && "
           f"{sys.executable} -m omni.interop.hf import {out} {back}")  # no --tokenizer: the README's commands
    run = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no tokenizer.json" not in run.stdout and f"with tokenizer {out}/tokenizer.model" in run.stdout
    assert {name: stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) for name in os.listdir(out)} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
                                 "tokenizer_config.json")}
    imported = omni.load(back)[2]
    transformers_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in SAMPLES + ["</s> <s> <pad>: control pieces' names are text to sentencepiece"]:
        ids = original.encode(text)
        assert imported.encode(text) == ids and transformers_tokenizer.encode(text, add_special_tokens=False) == ids
        # sentencepiece writes a space as "\u2581", so it reads a "\u2581" of the text back as a space.
        assert transformers_tokenizer.decode(ids) == imported.decode(ids) == original.decode(ids) == text.replace(
            "\u2581", " ")
    assert (transformers_tokenizer.bos_token_id, transformers_tokenizer.eos_token_id,
            transformers_tokenizer.pad_token_id) == (original.bos_id, original.eos_id, original.pad_id)
    assert (imported.bos_id, imported.eos_id, imported.pad_id) == (original.bos_id, original.eos_id, original.pad_id)


def test_exported_files_follow_the_umask(sentencepiece_run, tmp_path):
    config, params, tokenizer = omni.load(sentencepiece_run[0])
    previous = os.umask(0o027)
    try:
        hf.to_hf(config.model, params, str(tmp_path), tokenizer)
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in os.listdir(tmp_path)} == {0o640}


def _train_sentencepiece(path, **options) -> spm.SentencePieceProcessor:
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    lines = [line for f in files for line in open(f, encoding="utf-8").read().splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=600,
                                   model_type="bpe", minloglevel=2, **options)
    return spm.SentencePieceProcessor(model_file=f"{path}.model")


def test_sentencepiece_conversion_follows_the_whitespace_settings(tmp_path):
    """A model with sentencepiece's own whitespace defaults (a dummy "▁" prefix, runs of spaces collapsed)."""
    sp = _train_sentencepiece(tmp_path / "m", normalization_rule_name="identity", byte_fallback=True)
    fast = hf._sentencepiece_to_hf(str(tmp_path / "m.model"))
    rng = np.random.default_rng(0)
    noise = ["".join(map(chr, rng.choice([9, 10, 32, *range(33, 127), *range(0xa0, 0x3000)], 200))) for _ in range(50)]
    for text in SAMPLES + noise:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert fast.decode(ids) == sp.decode(ids), repr(text)


def test_sentencepiece_model_without_an_exact_tokenizer_json_is_still_exported(sentencepiece_run, tmp_path):
    _train_sentencepiece(tmp_path / "nfkc")  # sentencepiece's default unicode normalisation, no byte fallback
    config, params, _ = omni.load(sentencepiece_run[0])
    wrote = hf.to_hf(config.model, params, str(tmp_path / "out"), Tokenizer(str(tmp_path / "nfkc.model")))
    assert wrote == ("config.json, model.safetensors, tokenizer.model (no tokenizer.json: its sentencepiece model "
                     "has no exact tokenizer.json form (unicode normalisation 'nmt_nfkc', no byte fallback))")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert hf._tokenizer_in(str(tmp_path / "out")) == str(tmp_path / "out" / "tokenizer.model")
