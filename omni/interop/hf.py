"""Hugging Face GPT-2 checkpoints in and out of omni.

    python -m omni.interop.hf import HF_DIR WORKDIR [--tokenizer=PATH] [--scan_layers=false]
    python -m omni.interop.hf export WORKDIR HF_DIR [--step=N]

`import` turns a directory written by `GPT2LMHeadModel.save_pretrained` (config.json, model.safetensors or its
shards) into an omni workdir holding one checkpoint (params and meta at step 0), config.json and the
tokenizer: HF_DIR/tokenizer.model (a sentencepiece model, as `export` writes one), else HF_DIR/tokenizer.json,
unless --tokenizer names a tokenizer.json or a sentencepiece .model. Every stage can start from it with
`--config.init_from=WORKDIR`, and `omni.load(WORKDIR)` reads it; it holds no optimizer or data state, so it
cannot be resumed as a run. Its layers are stacked for model.scan_layers=True; stages run with
scan_layers=False (as configs/tiny.py is) need an import with --scan_layers=false.

`export` writes a workdir's latest (or --step) checkpoint as config.json + model.safetensors and its tokenizer,
which `GPT2LMHeadModel.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)` load and `import`
reads back. A HF tokenizer is copied as tokenizer.json. A sentencepiece one is copied as tokenizer.model (what
`import` reads: the exact tokenizer) and converted to a tokenizer.json for transformers: a BPE model with its
merges ranked by piece score, sentencepiece's whitespace handling and byte fallback, which gives the same ids
and text (the tokenizers library alone reads the name of a control piece in text, "</s>", as that token;
tokenizer_config.json has transformers read it as characters, as sentencepiece does). Only BPE models with byte
fallback, without a unicode normalisation (omni trains such lossless ones) or user-defined pieces, have that
exact form; for others no tokenizer.json is written, and the command says why. Exported files get the
permissions a plain open() gives (0666 less the umask). Only the pre-LN "gpt2" variant has a HF GPT-2
equivalent.

The mapping is a pure reshape of every tensor: HF's Conv1D weights are already [in, out] like omni's kernels,
and c_attn's 3*D outputs are q|k|v, each split head-major into (heads, head_dim), which is exactly omni's
(3, heads, head_dim). Weights are read with safetensors' numpy API: no torch is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from omni.compress import quant
from omni.config import ConfigError, base_config, validate
from omni.data import Tokenizer
from omni.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE
from omni.files import write_atomic
from omni.models.params import abstract_params
from omni.train.checkpoint import CheckpointError
from omni.workdir import Workdir

# Every HF GPT-2 activation that is GELU's tanh approximation, i.e. omni's nn.gelu(approximate=True); they
# differ only in rounding. Plain "gelu" is the exact erf form: a different function.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
LAYER_NORM_EPS = 1e-5  # omni's LayerNorm epsilon (omni/models/gpt.py)
WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# HF tensor name -> omni parameter path: outside the blocks, and inside block i (h.{i}.NAME).
_TOP = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe",), "ln_f.weight": ("ln_f", "scale"),
        "ln_f.bias": ("ln_f", "bias")}
_BLOCK = {"ln_1.weight": ("ln1", "scale"), "ln_1.bias": ("ln1", "bias"),
          "attn.c_attn.weight": ("attn", "qkv_kernel"), "attn.c_attn.bias": ("attn", "qkv_bias"),
          "attn.c_proj.weight": ("attn", "out_kernel"), "attn.c_proj.bias": ("attn", "out_bias"),
          "ln_2.weight": ("ln2", "scale"), "ln_2.bias": ("ln2", "bias"),
          "mlp.c_fc.weight": ("mlp", "fc", "kernel"), "mlp.c_fc.bias": ("mlp", "fc", "bias"),
          "mlp.c_proj.weight": ("mlp", "proj", "kernel"), "mlp.c_proj.bias": ("mlp", "proj", "bias")}
# Causal-mask buffers that old transformers versions saved with the weights: not parameters.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


class HFError(ValueError):
    """A Hugging Face directory or omni model that cannot be converted; the message names the path or key."""


# --- names and shapes -------------------------------------------------------------------------------------

def _hf_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every HF GPT-2 tensor of an omni model config (keys without the `transformer.` prefix)."""
    d, f = m.d_model, m.d_ff
    shapes = {"wte.weight": (m.vocab_size, d), "wpe.weight": (m.max_len, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
             "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
             "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}
    for i in range(m.num_layers):
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def _pairs(m: ml_collections.ConfigDict) -> Iterator[tuple[str, tuple[str, ...], int | None]]:
    """(HF name, omni path, layer index or None) for every tensor. With scan_layers the blocks are one tree
    with a leading layer axis ("blocks"); without, one tree per layer ("blocks_{i}")."""
    for name, path in _TOP.items():
        yield name, path, None
    for i in range(m.num_layers):
        for name, path in _BLOCK.items():
            yield f"h.{i}.{name}", ("blocks",) + path if m.scan_layers else (f"blocks_{i}",) + path, i


def _target(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """omni's own parameter shapes for `m` (jax.eval_shape: nothing is allocated)."""
    return flatten_dict(nn.unbox(abstract_params(m)))


def _check_tree(params, target: dict[tuple[str, ...], jax.ShapeDtypeStruct], what: str) -> None:
    """Raises unless `params` has exactly omni's parameter paths and shapes."""
    got = {path: tuple(np.shape(leaf)) for path, leaf in flatten_dict(params).items()}
    want = {path: tuple(t.shape) for path, t in target.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise HFError(f"{what} do not match omni's parameters for this model config (first differences, "
                      f"(path, shape): {diff})")


# --- configs ----------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    """A file holding one JSON object; anything else is an HFError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise HFError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError as e:  # JSONDecodeError (it says the line) and UnicodeDecodeError
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HFError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def _read_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise HFError(f"{hf_dir}: no such directory")
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isfile(path):
        raise HFError(f"{hf_dir} has no {CONFIG}: not a Hugging Face model directory")
    cfg = _read_json(path)
    if cfg.get("model_type") != "gpt2":
        kind = cfg.get("model_type", "model_type-less")
        raise HFError(f"{hf_dir} is a {kind} model, only GPT-2 (model_type 'gpt2' in {CONFIG}) is supported")
    return cfg


def _check_options(cfg: dict, path: str) -> None:
    """GPT-2 options that change the math away from omni's, each refused by name. (reorder_and_upcast_attn
    only reorders the scaling and upcasts under mixed precision: in float32 it is the same function.)"""
    act = cfg.get("activation_function", "gelu_new")
    checks = [
        (act in TANH_GELUS, f"activation_function={act!r}: omni uses tanh-approximated GELU, one of {TANH_GELUS}"),
        (cfg.get("layer_norm_epsilon", LAYER_NORM_EPS) == LAYER_NORM_EPS,
         f"layer_norm_epsilon={cfg.get('layer_norm_epsilon')}: omni's LayerNorm uses {LAYER_NORM_EPS}"),
        (not cfg.get("scale_attn_by_inverse_layer_idx", False),
         "scale_attn_by_inverse_layer_idx=true is not supported"),
        (cfg.get("scale_attn_weights", True), "scale_attn_weights=false is not supported (omni scales by "
                                              "1/sqrt(head_dim))"),
        (not cfg.get("add_cross_attention", False), "add_cross_attention=true: omni is a decoder only"),
    ]
    for ok, why in checks:
        if not ok:
            raise HFError(f"{path}: {why}")


def _size(cfg: dict, key: str, path: str) -> int:
    """config.json's `key`, which must be a positive integer."""
    if key not in cfg:
        raise HFError(f"{path}: no {key!r}" + (" (nor 'n_positions')" if key == "n_ctx" else ""))
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HFError(f"{path}: {key}={json.dumps(value)} must be a positive integer")
    return value


def model_config_from_hf(cfg: dict, path: str = CONFIG) -> ml_collections.ConfigDict:
    """omni's model config of a (checked) GPT-2 config.json dict."""
    _check_options(cfg, path)
    d, heads = _size(cfg, "n_embd", path), _size(cfg, "n_head", path)
    sizes = dict(num_layers=_size(cfg, "n_layer", path), num_heads=heads, d_model=d,
                 vocab_size=_size(cfg, "vocab_size", path),
                 max_len=_size(cfg, "n_positions" if "n_positions" in cfg else "n_ctx", path),  # n_ctx: old configs
                 d_ff=4 * d if cfg.get("n_inner") is None else _size(cfg, "n_inner", path))
    if d % heads:
        raise HFError(f"{path}: n_embd={d} is not divisible by n_head={heads}")
    m = base_config().model
    # Dropout off: imported weights are for inference or fine-tuning, where HF's pdrops rarely carry over;
    # a stage that wants dropout sets --config.model.dropout.
    m.update(variant="gpt2", dropout=0.0, **sizes)
    return m


def _hf_config(m: ml_collections.ConfigDict, tokenizer=None) -> dict:
    """The config.json of `m` as transformers' GPT2Config reads it."""
    known = tokenizer is not None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
        "n_positions": m.max_len, "n_ctx": m.max_len, "n_embd": m.d_model, "n_layer": m.num_layers,
        "n_head": m.num_heads, "n_inner": m.d_ff, "activation_function": "gelu_new",
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,  # omni has one dropout
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
        "tie_word_embeddings": True, "dtype": "float32",
        "bos_token_id": tokenizer.bos_id if known else None, "eos_token_id": tokenizer.eos_id if known else None,
    }


# --- weights ----------------------------------------------------------------------------------------------

class _SafeTensors:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read one at a time as
    float32, under their names without the `transformer.` prefix that GPT2LMHeadModel adds."""

    def __init__(self, hf_dir: str):
        self.files = {p: self._open(p) for p in self._paths(hf_dir)}
        self.where = {k.removeprefix("transformer."): (p, k) for p, f in self.files.items() for k in f.keys()}

    @staticmethod
    def _open(path: str):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(path, framework="np")
        except (SafetensorError, OSError) as e:  # a truncated or foreign file
            raise HFError(f"{path}: not a readable safetensors file ({e})") from None

    @staticmethod
    def _paths(hf_dir: str) -> list[str]:
        single, index = os.path.join(hf_dir, WEIGHTS), os.path.join(hf_dir, INDEX)
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
                raise HFError(f"{index}: no 'weight_map' object of tensor name -> shard file")
            shards = sorted(set(weight_map.values()))
            paths = [os.path.join(hf_dir, s) for s in shards]
            for p in paths:
                if not os.path.isfile(p):
                    raise HFError(f"{index} names the shard {p}, which does not exist")
            return paths
        hint = (" (pytorch_model.bin is not read, as that needs torch: re-save it with "
                "save_pretrained(..., safe_serialization=True))") if os.path.exists(
                    os.path.join(hf_dir, "pytorch_model.bin")) else ""
        raise HFError(f"{hf_dir} has no {WEIGHTS} or {INDEX}{hint}")

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise HFError(f"{os.path.dirname(next(iter(self.files)))}: missing tensor {name!r}")
        path, key = self.where[name]
        try:
            # bfloat16 arrives as ml_dtypes' numpy bfloat16, a dtype numpy knows by name once jax is imported.
            return self.files[path].get_tensor(key).astype(np.float32)
        except Exception as e:  # noqa: BLE001 - a damaged file, or a dtype numpy lacks (float8: AttributeError)
            raise HFError(f"{path}: cannot read tensor {key!r} as float32 ({e})") from None


def _check_names(tensors: _SafeTensors, expected: set[str], hf_dir: str) -> None:
    unexpected = sorted(n for n in tensors.names() - expected - {"lm_head.weight"} if not n.endswith(_BUFFERS))
    if unexpected:
        raise HFError(f"{hf_dir}: unexpected tensors {unexpected[:6]}: not a plain GPT-2 language model")


def _check_head(tensors: _SafeTensors, cfg: dict, wte: np.ndarray, hf_dir: str) -> None:
    """omni ties input and output embeddings. A tied HF model ignores any saved lm_head; an untied one must
    hold an lm_head equal to wte, or it is a model omni cannot express."""
    if cfg.get("tie_word_embeddings", True):
        return
    head = tensors.get("lm_head.weight") if "lm_head.weight" in tensors.names() else None
    if head is None or not np.array_equal(head, wte):
        raise HFError(f"{hf_dir}: tie_word_embeddings is false and lm_head.weight "
                      f"{'is missing' if head is None else 'differs from wte.weight'}; omni ties the output "
                      "embedding to the input one, so this model cannot be imported")


def from_hf(hf_dir: str, *, scan_layers: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """(omni model config, params) of a HF GPT-2 directory; params is a nested dict of float32 numpy arrays
    shaped as `GPT(model_config).init(...)['params']` (unboxed): layers stacked under "blocks", or one
    "blocks_{i}" each with scan_layers=False."""
    cfg = _read_config(hf_dir)
    m = model_config_from_hf(cfg, os.path.join(hf_dir, CONFIG))
    m.scan_layers = scan_layers
    tensors = _SafeTensors(hf_dir)
    shapes = _hf_shapes(m)
    _check_names(tensors, set(shapes), hf_dir)
    target = _target(m)
    flat: dict[tuple[str, ...], object] = {}
    for name, path, layer in _pairs(m):
        x = tensors.get(name)
        if x.shape != shapes[name]:
            raise HFError(f"{hf_dir}: tensor {name!r} has shape {x.shape}, but {CONFIG} implies {shapes[name]}")
        leaf_shape = target[path].shape[1:] if layer is not None and m.scan_layers else target[path].shape
        x = x.reshape(leaf_shape)
        if layer is not None and m.scan_layers:
            flat.setdefault(path, []).append(x)
        else:
            flat[path] = x
    flat = {path: np.stack(x) if isinstance(x, list) else x for path, x in flat.items()}
    _check_head(tensors, cfg, flat[("wte", "embedding")], hf_dir)
    params = unflatten_dict(flat)
    _check_tree(params, target, f"the tensors of {hf_dir}")
    return m, params


def to_hf(model_config: ml_collections.ConfigDict, params, hf_dir: str, tokenizer=None) -> str:
    """Writes `params` as a HF GPT-2 directory: config.json and model.safetensors (float32). With an
    omni.data.Tokenizer, config.json gets its bos/eos ids and the tokenizer is written too (_tokenizer_files).
    Returns the names of the files written, and why there is no tokenizer.json when there is none."""
    from safetensors.numpy import save

    m, params = model_config, nn.unbox(params)  # as model.init returns them, or plain arrays
    if m.variant != "gpt2":
        raise HFError(f"model.variant={m.variant!r} cannot be exported: only 'gpt2' has a Hugging Face GPT-2 "
                      "equivalent (gpt1 is post-LN, gpt3 has banded sparse attention)")
    if m.get("head", "lm") != "lm":
        raise HFError(f"model.head={m.head!r} cannot be exported as GPT2LMHeadModel: only language models "
                      "(model.head='lm') can")
    if m.get("quant", "none") != "none":  # HF GPT-2 is float: the INT8 weights (omni.compress.quant) dequantised
        params = quant.dequantize_model(dict(params))
        m = ml_collections.ConfigDict({**m.to_dict(), "quant": "none"})
    _check_tree(params, _target(m), "the params to export")
    flat = {path: np.asarray(leaf, np.float32) for path, leaf in flatten_dict(params).items()}
    shapes = _hf_shapes(m)
    tensors = {}
    for name, path, layer in _pairs(m):
        x = flat[path][layer] if layer is not None and m.scan_layers else flat[path]
        tensors[f"transformer.{name}"] = np.ascontiguousarray(x.reshape(shapes[name]))
    # Serialised in memory (a second copy of the weights) so that it is written like every other file here.
    # "pt": transformers refuses safetensors files without this format tag.
    files = {CONFIG: json.dumps(_hf_config(m, tokenizer), indent=2).encode(),
             WEIGHTS: save(tensors, metadata={"format": "pt"})}
    no_hf_tokenizer = ""
    if tokenizer is not None:
        tokenizer_files, no_hf_tokenizer = _tokenizer_files(tokenizer)
        files.update(tokenizer_files)
    os.makedirs(hf_dir, exist_ok=True)
    for name, data in files.items():
        write_atomic(os.path.join(hf_dir, name), data)  # 0644-like: an export is for others too
    return ", ".join(files) + (f" (no {HF_FILE}: {no_hf_tokenizer})" if no_hf_tokenizer else "")


# --- tokenizers -------------------------------------------------------------------------------------------

# sentencepiece's piece types (sentencepiece_model.proto), and the visible space it writes spaces as.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPACE = "\u2581"


def _tokenizer_files(tokenizer) -> tuple[dict[str, bytes], str]:
    """(file name -> contents, why there is no tokenizer.json or '') of an omni.data.Tokenizer in a HF
    directory: tokenizer.json and tokenizer_config.json for transformers, and a sentencepiece model as it is,
    for import to read back exactly."""
    import tokenizers

    with open(tokenizer.model_path, "rb") as f:
        original = f.read()
    if tokenizer.kind == "hf":
        files, fast = {HF_FILE: original}, tokenizers.Tokenizer.from_str(original.decode())
    else:
        files = {SENTENCEPIECE_FILE: original}
        try:
            fast = _sentencepiece_to_hf(tokenizer.model_path)
        except HFError as e:
            return files, str(e)
        files[HF_FILE] = fast.to_str(pretty=True).encode()
    files[TOKENIZER_CONFIG] = json.dumps(_tokenizer_config(fast, tokenizer), indent=2).encode()
    return files, ""


def _tokenizer_config(fast, tokenizer) -> dict:
    """tokenizer_config.json. Its class makes transformers use tokenizer.json as it is: without it, config.json's
    model_type picks GPT-2's own tokenizer class, which imposes GPT-2's byte-level pre-tokenizer. Special
    tokens are read in text as omni reads them: a tokenizer.json's as tokens, sentencepiece's control pieces
    ("</s>") as plain characters (split_special_tokens)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": tokenizer.kind == "sentencepiece"}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
        if i >= 0:
            config[name] = fast.id_to_token(i)
    if unk := getattr(fast.model, "unk_token", None):
        config["unk_token"] = unk
    return config


def _sentencepiece_to_hf(path: str):
    """A tokenizers.Tokenizer giving the ids and text of the sentencepiece model at `path`; an HFError names
    the settings of the model that have no exact equivalent."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    unsupported = [why for bad, why in (
        (trainer.model_type != trainer.BPE, "not a BPE model"),
        (bool(spec.precompiled_charsmap), f"unicode normalisation {spec.name!r}"),
        (not trainer.byte_fallback, "no byte fallback"),
        (not spec.escape_whitespaces or trainer.treat_whitespace_as_suffix, "unusual whitespace handling"),
        (any(p.type == _USER_DEFINED for p in proto.pieces), "user-defined pieces"),
    ) if bad]
    if unsupported:
        raise HFError(f"its sentencepiece model has no exact {HF_FILE} form ({', '.join(unsupported)})")
    # sentencepiece merges first the adjacent pair that makes the highest-scoring piece; BPE the lowest rank.
    rank = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    merges = sorted((rank[w], w[:k], w[k:]) for w in rank for k in range(1, len(w))
                    if w[:k] in rank and w[k:] in rank)
    fast = Tokenizer(BPE(vocab={p.piece: i for i, p in enumerate(proto.pieces)},
                         merges=[(left, right) for _, left, right in merges],
                         unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=True))
    steps = []
    if spec.remove_extra_whitespaces:  # spaces only: sentencepiece leaves tabs and newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    fast.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    back = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    fast.decoder = decoders.Sequence(back + [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else back)
    fast.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                             for p in proto.pieces if p.type == _CONTROL])
    return fast


# --- omni workdirs ----------------------------------------------------------------------------------------

def to_workdir(model_config: ml_collections.ConfigDict, params, tokenizer_path: str, workdir: str) -> int:
    """Writes an omni workdir that stages can init_from and omni.load reads: a step-0 checkpoint of params and
    meta, config.json (base_config() with this model) and the tokenizer. Returns the parameter count."""
    m, params = model_config, nn.unbox(params)
    tokenizer = _tokenizer(tokenizer_path)
    if tokenizer.vocab_size != m.vocab_size:
        raise HFError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces but model vocab_size "
                      f"{m.vocab_size}")
    if Workdir(workdir).latest_step() is not None:  # before any conversion work
        raise HFError(f"{workdir} already holds checkpoints; import into a new workdir")
    target = _target(m)
    _check_tree(params, target, "the params")
    params = unflatten_dict({path: np.asarray(leaf, target[path].dtype)
                             for path, leaf in flatten_dict(params).items()})
    config = base_config()
    config.name = os.path.basename(os.path.normpath(workdir))
    config.model = ml_collections.ConfigDict(m.to_dict())
    config.train.seq_len = min(config.train.seq_len, m.max_len)
    validate(config, 1)  # a model config no run could use is refused here, not at the next stage
    out = Workdir(workdir).create()
    out.write_model(config, params, Tokenizer(tokenizer.save(out.path)).model_path)
    return sum(int(np.prod(t.shape)) for t in target.values())


def _tokenizer(path: str):
    if not os.path.isfile(path):
        raise HFError(f"tokenizer {path}: no such file")
    try:
        return Tokenizer(path)
    except Exception as e:  # noqa: BLE001 - sentencepiece and tokenizers raise their own kinds
        raise HFError(f"tokenizer {path}: cannot read it: {type(e).__name__}: {e}") from None


# --- command line -----------------------------------------------------------------------------------------

def _import(args: argparse.Namespace) -> str:
    _read_config(args.hf_dir)  # a wrong directory is named before a missing tokenizer
    path = args.tokenizer or _tokenizer_in(args.hf_dir)
    m, params = from_hf(args.hf_dir, scan_layers=args.scan_layers == "true")
    n = to_workdir(m, params, path, args.workdir)
    return (f"wrote {args.workdir}: a step-0 checkpoint of {args.hf_dir} ({n:,} parameters, {m.num_layers} "
            f"layers, d_model {m.d_model}) with tokenizer {path}")


def _tokenizer_in(hf_dir: str) -> str:
    """The tokenizer of a HF directory: a sentencepiece model (the exact one, where export wrote both), else
    tokenizer.json."""
    for name in (SENTENCEPIECE_FILE, HF_FILE):
        if os.path.isfile(path := os.path.join(hf_dir, name)):
            return path
    raise HFError(f"{hf_dir} has no {SENTENCEPIECE_FILE} or {HF_FILE}; pass --tokenizer=PATH (a tokenizer.json "
                  "or a sentencepiece .model)")


def _export(args: argparse.Namespace) -> str:
    source = Workdir(args.workdir)
    _, _, step = source.meta(args.step)  # the newest intact step unless one is named
    config, params, tokenizer = source.load(step)
    wrote = to_hf(config.model, params, args.hf_dir, tokenizer)
    return f"wrote {args.hf_dir}: {wrote} from {args.workdir} step {step}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omni.interop.hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF GPT-2 directory -> omni workdir")
    imp.add_argument("hf_dir")
    imp.add_argument("workdir")
    imp.add_argument("--tokenizer", help="tokenizer.json or sentencepiece .model (default HF_DIR/tokenizer.model, "
                                          "else HF_DIR/tokenizer.json)")
    imp.add_argument("--scan_layers", choices=("true", "false"), default="true",
                     help="parameter layout of the stages that will init_from the workdir (model.scan_layers)")
    exp = sub.add_parser("export", help="omni workdir -> HF GPT-2 directory")
    exp.add_argument("workdir")
    exp.add_argument("hf_dir")
    exp.add_argument("--step", type=int, help="checkpoint step (default the latest)")
    args = parser.parse_args(argv)
    try:
        print(_import(args) if args.command == "import" else _export(args), flush=True)
    except (HFError, ConfigError, CheckpointError, OSError) as e:  # OSError: an unwritable HF_DIR, say
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
