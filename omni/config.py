"""Configs are data: the defaults every run shares, the GPT-3 recipe, and validation.

A config file in configs/ calls one of the builders here and states only what differs. `validate` runs
before anything is compiled, so a bad value stops the run with one message naming the key.
"""
from __future__ import annotations

import math
import os

import ml_collections

GPT2_VOCAB = 50257


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every stage and size (a tiny GPT-2 on the offline corpus)."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.stage = "pretrain"  # one of omni/stages/registry.py's STAGES
    c.init_from = ""  # workdir of an earlier stage
    c.dry_run = False  # build abstractly, print parameter count and memory per device, exit
    c.force = False  # try a run whose compiled step needs more memory than the devices have
    # The TPU slice a config is sized for, as libtpu names it (e.g. "v4:2x2x4", a v4-32: 16 chips; omni/aot.py).
    # With dry_run the stage's step is compiled for it ahead of time on any host (needs libtpu); "": none.
    c.topology = ""
    c.model = model_defaults()
    # Devices per slice along each axis (one may be -1: fill). `sequence` splits the length of activations
    # (context parallelism); dcn_* multiply data/fsdp across slices joined by the data-center network.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1, dcn_data=1, dcn_fsdp=1))
    # Many hosts: an empty coordinator auto-detects a cluster (TPU VM slice, SLURM) or runs one process.
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    # A CPU-only host as this many data-parallel XLA devices (0: one). One per core trained small models 17-18%
    # faster than one device with intra-op threads (benchmarks/RESULTS.md); ignored by GPUs and TPUs.
    c.cpu_devices = 0
    c.train = ml_collections.ConfigDict(dict(
        steps=100, batch_size=8,  # global, in sequences
        grad_accum=1, seq_len=128, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=50,
        keep_checkpoints=3, seed=0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=10,
        decay_steps=-1,  # cosine decay length; -1: train.steps
        min_lr_ratio=0.1,  # cosine ends at this fraction of lr, then stays
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        keep_zeros=True))  # kernel weights at exactly 0 (a pruned model's) get no update; dense kernels have none
    c.data = data_defaults()
    _stage_defaults(c)
    return c


def model_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.variant = "gpt2"  # gpt1 (post-LN) | gpt2 (pre-LN) | gpt3 (gpt2 + alternating banded attention)
    m.num_layers = 2
    m.num_heads = 4
    m.d_model = 128
    m.d_ff = 512
    m.vocab_size = 1024
    m.max_len = 256
    m.head = "lm"  # lm (logits over the vocabulary) | scalar (a score per position: reward model, value)
    m.sparse_window = 256  # gpt3: tokens each banded-attention layer looks back over (self included)
    m.dropout = 0.0  # residual, embedding and attention dropout
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    m.param_dtype = "float32"
    m.scan_layers = True  # nn.scan over blocks: compile time independent of depth
    m.remat = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    m.attention = "auto"  # auto (cudnn on GPU, splash on TPU, else xla) | xla | cudnn | splash
    m.attention_chunk = 64  # query chunk of the XLA path (skips the masked triangle, memory linear in length)
    # INT8 weights (written by the compress stage, inference only): none | int8 (weight-only, per-channel
    # scales) | w8a8 (the same weights; activations quantised per token, int8 x int8 -> int32 products).
    m.quant = "none"
    m.transposed_kernels = False  # kernels stored [out, in]: decoding's layout, set by omni.generate on its copy
    return m


def data_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "stdlib"  # stdlib (offline corpus) | text (local .txt/.jsonl files in data.path) | a TFDS name
    d.path = ""
    d.text_key = "text"  # field of a JSONL line or TFDS example holding the text
    d.data_dir = os.path.join(os.path.expanduser("~"), ".cache", "omni")
    d.max_corpus_mb = 0.0  # stdlib: cap on corpus size; 0 = everything
    d.tokenizer_sample_mb = 8.0  # text used to train the sentencepiece model
    # Rows buffered across the global batch for shuffling: each row's stream shuffles in windows of
    # shuffle_rows / batch_size packed rows (<= 1: off).
    d.shuffle_rows = 1024
    d.eval_tokens_per_doc = 512  # held-out set: the first tokens of every validation document (0: all)
    # Packed documents attend only within themselves (segment ids). GPT-2/3 did not do this: False keeps
    # their plain EOS-separated packing.
    d.separate_documents = False
    # Fine-tuning data (stages sft, rm): name 'instructions' (the offline suite, omni/data/instructions.py),
    # 'jsonl' (files at path, held-out set at eval_path or hashed out of path) or a prepared TFDS name.
    d.eval_path = ""
    # A bad JSONL line or text file (any data kind): stop (error naming file:line) | skip (one warning, the count)
    d.on_malformed = "stop"
    d.suite_seed = 0  # which instance of the offline suite
    d.labeler_noise = -1.0  # the suite labeler's noise (std of its score); -1: calibrated to 73% agreement
    return d


def _stage_defaults(c: ml_collections.ConfigDict) -> None:
    """Each stage's own section (its checks are in its file under omni/stages/)."""
    # stage=sample (configs/sample.py): completions of `prompt` by the model in init_from.
    c.prompt = ""
    c.sample = ml_collections.ConfigDict(dict(
        num_samples=1, max_new_tokens=128, temperature=0.8, top_k=0, top_p=0.95, repetition_penalty=1.0,
        frequency_penalty=0.0, stop="", seed=0))
    c.sft = ml_collections.ConfigDict(dict(
        eval_prompts=128,  # held-out prompts answered greedily at each evaluation
        eval_max_new_tokens=32))
    c.rm = ml_collections.ConfigDict(dict(
        bias_demonstrations=512))  # SFT demonstrations whose mean reward is set to 0 after training

    # stage=label (configs/label_tiny.py): rankings of init_from's samples by the offline suite's labeler.
    c.label = ml_collections.ConfigDict(dict(
        responses=4, prompts=1500, eval_prompts=200, temperature=1.0, max_new_tokens=24, batch=64,
        include_suite=True))  # also copy the suite's own rankings beside the samples'

    c.ppo = ppo_defaults()
    # The methods after PPO. GRPO/RLOO and best-of-n sample with ppo's rollout keys (rollout_batch,
    # samples_per_prompt = the group size G, epochs, max_new_tokens, temperature), and every post-training stage
    # is judged by ppo's held-out evaluation (eval_prompts, eval_samples, reward_from for the reward model's
    # measures, ptx_eval_rows for pretraining perplexity).
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # strength of the implicit KL to the reference: the inverse temperature of the implicit reward
        loss="sigmoid",  # sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023)
        nll_coef=0.0,  # + this x the per-token NLL of each prompt's best responses (Pang et al. 2024; trl's rpo_alpha)
        reference_from="",  # the frozen reference policy; empty: init_from (the SFT model)
        # A batch element: whole ranked prompts, each read once (omni/data/finetune.py pack_prompts): up to
        # `prompts` prompts of at most prompt_len tokens (0: train.seq_len - 1; longer ones dropped), their
        # responses side by side in `rows` rows of row_len tokens (0: train.seq_len), `slots` responses in all.
        prompts=4, rows=6, row_len=0, slots=24, prompt_len=0,
        # Rankings to learn from (JSONL, e.g. a label stage's workdir/train and /eval); empty: the data section's
        # own (the offline suite's). The data section still gives the held-out prompts and labeler.
        path="", eval_path=""))
    c.grpo = ml_collections.ConfigDict(dict(
        advantage="grpo",  # grpo: (r - group mean) / (group std + eps) | rloo: r - mean of the other G - 1
        beta=0.04,  # coefficient of the k3 KL to the reference in the loss (0: none)
        eps=1e-4,
        # model: the reward model of ppo.reward_from | labeler: the offline suite's true score (RL with verifiable
        # rewards) | MODULE:FUNCTION: a Python function(prompt, response) -> float, e.g. mypkg.rewards:exact
        reward="model",
        skip_zero_spread=False))  # drop groups whose samples all score the same from the update (DAPO)
    c.best_of_n = ml_collections.ConfigDict(dict(
        n=8,  # samples per prompt; the reward model's best is kept
        prompts=1024))  # training prompts sampled (the SFT then runs train.steps over the kept answers)


def ppo_defaults() -> ml_collections.ConfigDict:
    # stage=ppo: the policy starts from init_from (SFT); train.batch_size is the minibatch in episodes and
    # train.steps is derived: iterations * epochs * rollout_batch / batch_size.
    return ml_collections.ConfigDict(dict(
        reward_from="",  # the reward model's workdir (frozen); the value function starts from it
        reference_from="",  # the frozen policy of the KL penalty; empty: init_from (the SFT model)
        iterations=100,
        rollout_batch=64,  # episodes sampled per iteration
        samples_per_prompt=1,  # responses sampled per prompt (a group); rollout_batch / this prompts per iteration
        epochs=1,  # passes over each rollout batch
        max_new_tokens=32,
        temperature=1.0,  # pure sampling at this temperature; log-probs are recomputed at it
        kl_coef=0.02,  # beta of the per-token penalty -beta * (log pi - log pi_ref)
        target_kl=0.0,  # > 0: the adaptive controller steers beta to this KL per episode (nats)
        kl_horizon=10000,  # ... with this horizon (episodes)
        gamma=1.0,
        lam=0.95,
        clip=0.2,  # policy ratio clip
        value_clip=0.2,  # value change clip around the rollout's values
        value_coef=0.1,
        entropy_coef=0.0,
        # Rewards in units of the starting policy's: mean 0, std 1 over the first rollout batch, that map kept
        # (OpenAI normalised its reward model so on the initial policy's samples).
        reward_norm=True,
        # The value function is the reward model's network; its head starts at zero (OpenAI's choice: with
        # normalised rewards 0 is the right first guess) or, with value_head='reward', as the reward model's.
        value_head="zero",
        whiten_rewards=False,  # divide scores by their batch std (no mean shift)
        reward_clip=0.0,  # > 0: clip scores to [-reward_clip, reward_clip]
        missing_eos_penalty=1.0,  # subtracted from the score of a response that never emits EOS
        gold_reward=False,  # diagnostic, instruction suite only: the reward is the labeler's true score instead
        # of the reward model's (Gao et al. 2022's gold reward). It tells how far PPO can climb the truth itself,
        # apart from the reward model's errors.
        ptx_coef=0.0,  # PPO-ptx: gamma of the pretraining loss mixed into every update (InstructGPT 27.8)
        ptx_data="stdlib",  # pretraining data of PPO-ptx and of the reported pretraining perplexity (data.name)
        ptx_path="",
        ptx_batch=16,  # pretraining rows per update
        ptx_eval_rows=128,  # held-out pretraining rows of the reported pretrain_perplexity, in batches of ptx_batch
                            # (0: off): the same text whatever ptx_batch, so that methods compare
        eval_prompts=128,  # held-out prompts of each evaluation
        eval_samples=8,  # samples per held-out prompt at each evaluation: sampled score, pass@1 and pass@k
        sample_every=5))  # iterations between sample responses printed to the log


def gpt2_config(num_layers: int, d_model: int, num_heads: int) -> ml_collections.ConfigDict:
    """A GPT-2 size as released (Radford et al. 2019): pre-LN, 1,024 context, tied embeddings, batch 512."""
    c = base_config()
    c.model.update(variant="gpt2", num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_ff=4 * d_model,
                   vocab_size=GPT2_VOCAB, max_len=1024, dropout=0.1, dtype="bfloat16", remat="full")
    c.train.update(seq_len=1024, batch_size=512, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.data.name = "c4/en"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


def gpt3_config(num_layers: int, d_model: int, num_heads: int, batch_tokens: int, lr: float) -> ml_collections.ConfigDict:
    """A GPT-3 size from Brown et al. 2020, Table 2.1: GPT-2 with alternating banded attention, 2,048 context,
    and the paper's training recipe."""
    c = gpt2_config(num_layers, d_model, num_heads)
    c.model.update(variant="gpt3", max_len=2048, sparse_window=256, dropout=0.0)
    t = c.train
    t.seq_len = 2048
    t.batch_size = batch_tokens // t.seq_len
    tokens_per_step = t.batch_size * t.seq_len
    t.steps = math.ceil(300e9 / tokens_per_step)  # 300B training tokens
    c.optim.update(
        lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, min_lr_ratio=0.1,
        warmup_steps=math.ceil(375e6 / tokens_per_step),  # linear warmup over 375M tokens
        decay_steps=math.ceil(260e9 / tokens_per_step))  # cosine to 10% of lr over 260B tokens, then flat
    return c


# ---------------------------------------------------------------------------------------------------------
# Validation: everything that can be checked before compiling.

VARIANTS = ("gpt1", "gpt2", "gpt3")
REMAT = ("none", "full", "dots")
HEADS = ("lm", "scalar")
DTYPES = ("float32", "bfloat16", "float16")
QUANT = ("none", "int8", "w8a8")  # see omni/compress/quant.py
# A model's shape and parameter layout. With init_from these come from the earlier stage's workdir; the rest
# of config.model (head, dropout, dtype, remat, attention kernel) is this stage's own.
ARCHITECTURE = ("variant", "num_layers", "num_heads", "d_model", "d_ff", "vocab_size", "max_len", "sparse_window",
                "scan_layers")


def require(ok: bool, key: str, value, why: str) -> None:
    """The one way a check fails: ConfigError naming config.KEY, its value and why it cannot work."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: {why}")


def cpu_devices(c: ml_collections.ConfigDict) -> int:
    """config.cpu_devices, checked: needed before JAX starts (and so before validate, which sees the devices)."""
    require(isinstance(c.cpu_devices, int) and c.cpu_devices >= 0, "cpu_devices", c.cpu_devices,
             "must be an int >= 0")
    return c.cpu_devices


ICI_AXES = ("data", "fsdp", "tensor", "sequence")
DCN_AXES = ("dcn_data", "dcn_fsdp")
ATTENTION = ("auto", "xla", "cudnn", "splash")


def resolve_mesh(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with one in-slice -1 filled so that the product of all axes is the device count."""
    sizes = dict(mesh)
    require(set(sizes) == set(ICI_AXES + DCN_AXES), "mesh", sizes, f"expected exactly the keys {ICI_AXES + DCN_AXES}")
    for k, v in sizes.items():
        ok = (isinstance(v, int) and v >= 1) or (v == -1 and k in ICI_AXES)
        require(ok, f"mesh.{k}", v, "must be a positive int" + (" or -1" if k in ICI_AXES else ""))
    free = [k for k in ICI_AXES if sizes[k] == -1]
    require(len(free) <= 1, "mesh", sizes, "at most one axis may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        require(num_devices % fixed == 0, "mesh", sizes, f"fixed axes ({fixed}) do not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    require(math.prod(sizes.values()) == num_devices, "mesh", sizes,
             f"product {math.prod(sizes.values())} != {num_devices} devices here "
             "(set one axis to -1 to fill the devices, e.g. --config.mesh.fsdp=-1)")
    return sizes


def validate(c: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """Checks what every run shares (the stage's own keys: omni/stages/registry.py's validate, which calls
    this) and returns a copy with derived values resolved (mesh -1, decay_steps -1)."""
    c = ml_collections.ConfigDict(c.to_dict())
    _check_model(c.model)
    _check_train(c.train, c.model)
    filled = next((k for k in ICI_AXES if c.mesh.get(k) == -1), None)  # before resolve_mesh replaces the -1
    c.mesh.update(resolve_mesh(c.mesh, num_devices))
    _check_sharding(c, filled)
    d = c.distributed
    require(d.num_processes >= 1, "distributed.num_processes", d.num_processes, "must be >= 1")
    require(0 <= d.process_id < d.num_processes, "distributed.process_id", d.process_id,
             f"must be in [0, distributed.num_processes={d.num_processes})")
    require(c.data.labeler_noise == -1 or c.data.labeler_noise >= 0, "data.labeler_noise", c.data.labeler_noise,
             "must be >= 0, or -1 (calibrated to 73% agreement)")
    _check_optim(c.optim, c.train)
    return c


def _check_model(m: ml_collections.ConfigDict) -> None:
    require(m.variant in VARIANTS, "model.variant", m.variant, f"expected one of {VARIANTS}")
    require(m.remat in REMAT, "model.remat", m.remat, f"expected one of {REMAT}")
    require(m.head in HEADS, "model.head", m.head, f"expected one of {HEADS}")
    for key in ("dtype", "param_dtype"):
        require(m[key] in DTYPES, f"model.{key}", m[key], f"expected one of {DTYPES}")
    for key in ("num_layers", "num_heads", "d_model", "d_ff", "vocab_size", "max_len"):
        require(isinstance(m[key], int) and m[key] > 0, f"model.{key}", m[key], "must be a positive int")
    require(m.d_model % m.num_heads == 0, "model.d_model", m.d_model,
             f"not divisible by model.num_heads={m.num_heads}")
    require(m.sparse_window > 0, "model.sparse_window", m.sparse_window, "must be positive")
    require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    require(m.attention in ATTENTION, "model.attention", m.attention, f"expected one of {ATTENTION}")
    require(m.attention in ("auto", "xla") or m.dropout == 0.0, "model.attention", m.attention,
             f"the {m.attention} kernel has no attention dropout but model.dropout={m.dropout} "
             "(use 'auto' or 'xla', or dropout 0)")
    require(m.attention_chunk >= 0, "model.attention_chunk", m.attention_chunk, "must be >= 0")
    require(m.quant in QUANT, "model.quant", m.quant, f"expected one of {QUANT}")


def _check_train(t: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "keep_checkpoints"):
        require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key], "must be a positive int")
    require(t.seq_len <= m.max_len, "train.seq_len", t.seq_len, f"exceeds model.max_len={m.max_len}")
    require(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
             f"not divisible by train.grad_accum={t.grad_accum}")
    require(m.attention != "splash" or t.seq_len % 128 == 0, "model.attention", m.attention,
             f"the splash kernel takes rows in blocks of 128 tokens but train.seq_len={t.seq_len} (use 'auto')")


def _check_sharding(c: ml_collections.ConfigDict, filled: str | None) -> None:
    """Whole shards only: batch rows, sequence positions, heads and the parameters the rules table splits.
    `filled`: the mesh axis the user set to -1, now resolved."""
    m, t = c.model, c.train

    def note(*axes: str) -> str:  # a size the user never wrote: say where it came from
        return f" (mesh.{filled}=-1 filled to {c.mesh[filled]})" if filled in axes else ""

    batch_shards = c.mesh.data * c.mesh.fsdp * c.mesh.dcn_data * c.mesh.dcn_fsdp
    micro = t.batch_size // t.grad_accum
    require(micro % batch_shards == 0, "train.batch_size", t.batch_size,
             f"micro-batch {micro} (batch_size / grad_accum) not divisible by the mesh's batch shards "
             f"(data*fsdp*dcn_data*dcn_fsdp={batch_shards})" + note("data", "fsdp"))
    require(t.seq_len % c.mesh.sequence == 0, "train.seq_len", t.seq_len,
             f"not divisible by mesh.sequence={c.mesh.sequence}" + note("sequence"))
    require(m.num_heads % c.mesh.tensor == 0, "model.num_heads", m.num_heads,
             f"not divisible by mesh.tensor={c.mesh.tensor} (attention is sharded by heads)" + note("tensor"))
    for key in ("d_ff", "vocab_size"):
        require(m[key] % c.mesh.tensor == 0, f"model.{key}", m[key],
                 f"not divisible by mesh.tensor={c.mesh.tensor}" + note("tensor"))
    param_shards = c.mesh.fsdp * c.mesh.dcn_fsdp
    require(m.d_model % param_shards == 0, "model.d_model", m.d_model,
             f"not divisible by mesh.fsdp*mesh.dcn_fsdp={param_shards} (parameters are sharded along it)"
             + note("fsdp"))


def _check_optim(o: ml_collections.ConfigDict, t: ml_collections.ConfigDict) -> None:
    require(o.lr > 0, "optim.lr", o.lr, "must be positive")
    require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.decay_steps == -1:  # the decay follows train.steps, so a run too short for the warmup is what to name
        require(t.steps > o.warmup_steps, "train.steps", t.steps,
                 f"must exceed optim.warmup_steps={o.warmup_steps} (the cosine decay runs over train.steps)")
        o.decay_steps = t.steps
    require(o.decay_steps > o.warmup_steps, "optim.decay_steps", o.decay_steps,
             f"must exceed optim.warmup_steps={o.warmup_steps}")
    require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")


def inherit_architecture(c: ml_collections.ConfigDict, source: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with the ARCHITECTURE keys of `source` (the resolved config of c.init_from), so that a stage never
    restates the model it continues. A key left at base_config()'s default is taken from the source; one set
    (by the config file or a flag) to a value that contradicts the source is an error naming it."""
    c = ml_collections.ConfigDict(c.to_dict())
    source_head = source.model.get("head", "lm")
    if source_head == "scalar" and c.model.head == "lm":  # checked before anything is built or compiled
        raise ConfigError(f"config.init_from={c.init_from} holds a model with model.head='scalar' (a reward "
                          "model), which a model with model.head='lm' cannot start from")
    if source.model.get("quant", "none") != "none":
        raise ConfigError(f"config.init_from={c.init_from} holds an INT8 model (model.quant="
                          f"{source.model.quant!r}), for inference only; start stage {c.stage!r} from the float "
                          f"model it was quantized from ({source.get('init_from') or 'its init_from'})")
    defaults = base_config().model
    changed = []
    for key in ARCHITECTURE:
        if key not in source.model or c.model[key] == source.model[key]:
            continue
        if c.model[key] != defaults[key] and key != "scan_layers":  # the layout alone always follows the params
            raise ConfigError(f"config.model.{key}={c.model[key]!r} but config.init_from={c.init_from} holds a "
                              f"model with {key}={source.model[key]!r} (a stage continues the model it starts "
                              f"from: leave model.{key} unset)")
        changed.append(f"{key}={source.model[key]!r}")
        c.model[key] = source.model[key]
    if changed:
        print(f"model architecture from config.init_from={c.init_from}: {', '.join(changed)}", flush=True)
    return c


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A config read back from a workdir, with the keys added to base_config() since it was written filled in
    with their defaults (so an older run's workdir still feeds every stage); its own values win."""
    def merge(default: dict, own: dict) -> dict:
        return {**default, **{k: merge(default[k], v) if isinstance(v, dict) and isinstance(default.get(k), dict)
                              else v for k, v in own.items()}}
    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))
