"""DPO (Rafailov et al. 2023): the policy learns from the reward model's own data, K-way rankings, with no reward
model and no sampling. Its implicit reward of a response is beta x (log pi - log pi_ref), summed over the
response's tokens, against the frozen reference (the SFT model, init_from), whose log-probabilities are computed
once before training. dpo.loss='ipo' regresses the margin to 1 / (2 beta) instead (Azar et al. 2023).

Batch: elements of whole ranked prompts (omni/data/finetune.py preference_groups, packed by pack_prompts): each
prompt once, left-padded, in one of dpo.prompts prompt rows ('prompt', 'prompt_start'), and its responses side by
side in dpo.rows response rows of dpo.row_len tokens ('inputs', 'segments', 'positions', 'row_prompt'), so that
a prompt runs through the model once for all its responses (a prompt is about 30 tokens here, a response 6).
Per response slot [elements, dpo.slots]: row, first and last (where the response lies), ranks (0 = best, equal =
tie), exists, group (which prompt of the element; -1 empty) and ref_logps. Every untied pair of responses to the
same prompt is a (chosen, rejected) pair; all of a prompt's pairs share its element.
Loss: per prompt, the mean over its untied pairs of dpo_loss (below), plus dpo.nll_coef x the mean per-token
negative log-likelihood of its best responses (Pang et al. 2024's iterative RPO: DPO alone lowers the chosen
responses' likelihood too); summed over prompts, and the trainer divides by the number of prompts with a pair.
Metrics: that NLL ('best_nll', logged whatever its coefficient), the implicit
reward's accuracy and margin over pairs, and the chosen and rejected responses' log-probabilities.
Evaluation: the same loss and metrics on held-out rankings, and PPO's held-out measures of the policy
(omni/stages/evaluation.py HeldOut: labeler score greedy and sampled, win rate and KL against the SFT model).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni import parallel
from omni.config import ConfigError, require
from omni.data import finetune
from omni.losses import dpo_loss, ipo_loss, ranked_pairs, token_logprobs  # noqa: F401 (dpo_loss: the contract)
from omni.models import GPT, flops_per_token, gpt
from omni.models.gpt import KVCache
from omni.stages.evaluation import policy_evaluation
from omni.stages.rollout import frozen_params
from omni.train.trainer import Task
from omni.workdir import Workdir, fingerprint, starting_point

LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss}


def check(c: ml_collections.ConfigDict) -> None:
    d = c.dpo
    require(d.loss in LOSSES, "dpo.loss", d.loss, f"expected one of {tuple(LOSSES)}")
    require(d.beta > 0, "dpo.beta", d.beta, "must be > 0")
    require(d.nll_coef >= 0, "dpo.nll_coef", d.nll_coef, "must be >= 0 (0: DPO alone)")
    require(c.model.head == "lm", "model.head", c.model.head, "the DPO policy needs 'lm'")
    require(c.model.dropout == 0.0, "model.dropout", c.model.dropout,
            "DPO compares the policy's log-probabilities with the reference's: run it without dropout")
    require(c.mesh.sequence == 1, "mesh.sequence", c.mesh.sequence, "DPO does not split length")
    for key in ("prompts", "rows", "slots"):
        require(isinstance(d[key], int) and d[key] > 0, f"dpo.{key}", d[key], "must be a positive int")
    require(isinstance(d.row_len, int) and (d.row_len == 0 or d.row_len >= 2), "dpo.row_len", d.row_len,
            "must hold a response's first token after the prompt's last (>= 2; 0: train.seq_len)")
    require(isinstance(d.prompt_len, int) and (d.prompt_len == 0 or 2 <= d.prompt_len < c.train.seq_len),
            "dpo.prompt_len", d.prompt_len, f"must be 2..train.seq_len - 1 = {c.train.seq_len - 1} (0: that)")


def response_logps(model: GPT, params, batch: dict) -> jax.Array:
    """Each response's log-probability under `model`, summed over its tokens (EOS included): [elements, slots].
    The prompts run once, filling a KV cache; each response row continues its prompt's cache, its responses
    side by side as segments that see the prompt and themselves (finetune.pack_prompts' layout)."""
    prompt, inputs = batch["prompt"], batch["inputs"]
    (elements, prompts, width), rows = prompt.shape, inputs.shape[1]
    cache = KVCache.zeros(model.config, batch["prompt_start"].reshape(-1), width + inputs.shape[2])
    _, cache = model.apply({"params": params}, prompt.reshape(-1, width), cache=cache)
    pick = jax.nn.one_hot(batch["row_prompt"], prompts, dtype=cache.k[0].dtype)  # [elements, rows, prompts]

    def per_row(c):  # [elements * prompts, ...] -> the prompt of each response row, [elements * rows, ...]
        c = c.reshape(elements, prompts, -1)
        return jnp.einsum("erp,epx->erx", pick, c).reshape(elements * rows, *cache.k[0].shape[1:])

    start = jnp.take_along_axis(batch["prompt_start"], batch["row_prompt"], axis=1).reshape(-1)
    cache = cache.replace(k=tuple(map(per_row, cache.k)), v=tuple(map(per_row, cache.v)), start=start)
    flat = inputs.reshape(elements * rows, -1)
    logits, _ = model.apply({"params": params}, flat, segment_ids=batch["segments"].reshape(flat.shape),
                            positions=batch["positions"].reshape(flat.shape), cache=cache)
    targets = jnp.concatenate([flat[:, 1:], flat[:, -1:]], axis=1)  # the last position is never a response's
    logp = token_logprobs(logits, targets).reshape(inputs.shape)
    logp = jnp.take_along_axis(logp, batch["row"][..., None], axis=1)  # [elements, slots, row_len]
    position = jnp.arange(inputs.shape[-1])
    # The target at position t is token t + 1: the response's tokens first..last are targets first-1..last-1.
    mask = (position >= batch["first"][..., None] - 1) & (position < batch["last"][..., None])
    return (logp * mask).sum(-1)


def prompt_pairs(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(weights, prompts): weights [elements, i better, j worse] float32, nonzero on the untied pairs of responses
    to the same prompt, each 1 / its prompt's pair count, so that summing weighted pair losses sums each prompt's
    mean (finetune.pack_prompts' layout); prompts [elements]: how many prompts of each element have a pair."""
    group = batch["group"]
    same = group[:, :, None] == group[:, None, :]
    pairs = (ranked_pairs(batch["ranks"], batch["exists"]) & same).astype(jnp.float32)
    per_prompt = jnp.einsum("eia,ea->ei", same.astype(jnp.float32), pairs.sum(2))  # the pairs of i's prompt
    slot = jnp.arange(group.shape[1])
    first_of_prompt = ~jnp.any(same & (slot[None, None, :] < slot[None, :, None]), axis=2)
    groups = (first_of_prompt & (per_prompt > 0)).sum(1).astype(jnp.float32)
    return pairs / jnp.maximum(per_prompt, 1.0)[:, :, None], groups


def best_weights(batch: dict, weights: jax.Array) -> jax.Array:
    """[elements, slots]: on each prompt's best responses (its lowest rank), 1 / how many share that rank, where
    the prompt has a pair (`weights` of prompt_pairs); 0 elsewhere: summing weighted values sums each prompt's
    mean over its best responses."""
    group, exists = batch["group"], batch["exists"] > 0
    same = group[:, :, None] == group[:, None, :]
    lowest = jnp.min(jnp.where(same & exists[:, None, :], batch["ranks"][:, None, :], jnp.iinfo(jnp.int32).max), 2)
    best = exists & (batch["ranks"] == lowest)
    has_pair = jnp.any(same & jnp.any(weights > 0, 2)[:, None, :], 2)
    count = jnp.einsum("eia,ea->ei", same.astype(jnp.float32), best.astype(jnp.float32))
    return jnp.where(best & has_pair, 1.0 / jnp.maximum(count, 1.0), 0.0)


def dpo_objective(model: GPT, d: ml_collections.ConfigDict):
    """loss_fn for the trainer from config.dpo `d` (this module's docstring): summed over prompts with a pair."""
    pair_loss = LOSSES[d.loss]

    def loss_fn(params, batch: dict, rng):
        del rng  # no dropout (check)
        logps, ref = response_logps(model, params, batch), batch["ref_logps"]
        weights, prompts = prompt_pairs(batch)
        pairs = (weights > 0).astype(jnp.float32)
        chosen, rejected = logps[:, :, None], logps[:, None, :]
        losses = pair_loss(chosen, rejected, ref[:, :, None], ref[:, None, :], d.beta)
        tokens = jnp.maximum(batch["last"] - batch["first"] + 1, 1)  # the response's tokens, EOS included
        best_nll = -(logps / tokens * best_weights(batch, weights)).sum()
        loss = (losses * weights).sum() + d.nll_coef * best_nll
        margin = d.beta * ((chosen - ref[:, :, None]) - (rejected - ref[:, None, :]))
        n = pairs.sum()
        sums = {"loss": loss, "weight": prompts.sum(), "best_nll": best_nll, "best_nll_weight": prompts.sum(),
                "reward_accuracy": ((margin > 0) * pairs).sum(), "reward_accuracy_weight": n,
                "reward_margin": (margin * pairs).sum(), "reward_margin_weight": n,
                "chosen_logps": (chosen * pairs).sum(), "chosen_logps_weight": n,
                "rejected_logps": (jnp.broadcast_to(rejected, pairs.shape) * pairs).sum(), "rejected_logps_weight": n}
        return loss, sums

    return loss_fn


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
    d, elements = config.dpo, config.train.batch_size
    rows, slot = (elements, d.rows, row_len(config)), ((elements, d.slots), np.int32)
    return {"prompt": ((elements, d.prompts, prompt_len(config) - 1), np.int32),
            "prompt_start": ((elements, d.prompts), np.int32), "row_prompt": ((elements, d.rows), np.int32),
            **{k: (rows, np.int32) for k in ("inputs", "segments", "positions")},
            **{k: slot for k in ("row", "first", "last", "ranks", "group")},
            "exists": ((elements, d.slots), np.float32), "ref_logps": ((elements, d.slots), np.float32)}


def prompt_len(config: ml_collections.ConfigDict) -> int:
    """dpo.prompt_len, or any prompt that leaves room for a response in train.seq_len (0)."""
    return config.dpo.prompt_len or config.train.seq_len - 1


def row_len(config: ml_collections.ConfigDict) -> int:
    """dpo.row_len, or train.seq_len (0)."""
    return config.dpo.row_len or config.train.seq_len


def step(config: ml_collections.ConfigDict):
    """(model, loss_fn, global batch shapes): what omni/aot.py compiles."""
    model = GPT(config.model)
    return model, dpo_objective(model, config.dpo), batch_shapes(config)


def with_reference(groups: dict[str, np.ndarray], model: GPT, ref_params, reference_dir: str = "",
                   rows: int = 48) -> dict[str, np.ndarray]:
    """`groups` with 'ref_logps': the reference's summed log-probability of every response, computed once and kept
    in the reference's workdir `reference_dir` (cache/), where the next run on the same rankings reads them."""
    keys = ("prompt", "prompt_start", "inputs", "segments", "positions", "row_prompt", "row", "first", "last")

    def compute() -> dict[str, np.ndarray]:
        logps = jax.jit(lambda params, b: response_logps(model, params, b))
        # About `rows` response rows a call: a call's logits are allocated afresh, and past glibc's mmap threshold
        # (32 MB) every allocation faults its pages in again (a third of the time in system calls at 384 rows).
        n, batch = len(groups["inputs"]), max(1, rows // groups["inputs"].shape[1])
        out = [np.asarray(logps(ref_params, {k: groups[k][i:i + batch] for k in keys})) for i in range(0, n, batch)]
        return {"ref_logps": np.concatenate(out).astype(np.float32)}

    if reference_dir:
        settings = {"model": model.config.to_dict(), "files": [__file__, gpt.__file__]}
        key = fingerprint(settings, ref_params, [groups[k] for k in keys])
        cached = Workdir(reference_dir).cached(f"dpo-reference-{key}.npz", compute)
    else:
        cached = compute()
    return {**groups, "ref_logps": cached["ref_logps"]}


def _preferences(config: ml_collections.ConfigDict, split: str) -> list:
    """The rankings of `split`: dpo.path / dpo.eval_path's JSONL, or the data section's own."""
    source = config.data
    if config.dpo.path:
        source = ml_collections.ConfigDict(config.data.to_dict())
        source.update(name="jsonl", path=config.dpo.path, eval_path=config.dpo.eval_path)
    return list(finetune.preferences(source, split))


def task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    d = config.dpo
    starting_point(config, "DPO starts from an SFT workdir (e.g. --config.init_from=runs/sft_tiny)")
    tokenizer = Workdir(workdir).stage_tokenizer(config)
    train, held_out = (_preferences(config, split) for split in ("train", "validation"))
    k = max(len(r) for _, r, _ in train + held_out)
    require(d.slots >= k, "dpo.slots", d.slots, f"a ranked prompt has {k} responses: an element must hold them all")
    seq_len = config.train.seq_len
    mesh = parallel.make_mesh(config.mesh)
    rows = parallel.process_rows(mesh, config.train.batch_size)
    reference_from, key = (d.reference_from, "dpo.reference_from") if d.reference_from else (config.init_from, "init_from")
    ref_params = frozen_params(config, reference_from, "lm", key, mesh)
    model = GPT(config.model)
    train_groups, eval_groups = (finetune.preference_groups(tokenizer, rankings, seq_len, k)
                                 for rankings in (train, held_out))
    prompts = len(train_groups["inputs"])
    try:  # in a random order, the same for every train.seed: the reference's log-probabilities are computed once
        packed = [finetune.pack_prompts(g, tokenizer.pad_id, d.prompts, d.rows, row_len(config), d.slots,
                                        prompt_len(config), shuffle=0) for g in (train_groups, eval_groups)]
    except ValueError as e:  # a prompt with more responses than an element holds
        raise ConfigError(str(e)) from None
    train_groups, eval_groups = (with_reference(g, model, ref_params, reference_from) for g in packed)
    eval_batches = finetune.fixed_batches(eval_groups, config.train.batch_size, config.train.eval_batches, rows,
                                          ("exists",))
    pairs = int(np.asarray(prompt_pairs(train_groups)[0] > 0).sum())
    elements = len(train_groups["inputs"])
    epochs = config.train.steps * config.train.batch_size / elements
    print(f"DPO ({d.loss}, beta {d.beta}): {prompts:,} ranked prompts ({pairs:,} pairs, up to {k} responses "
          f"each) in {elements:,} elements of {d.prompts} prompts and {d.rows} rows of {row_len(config)} tokens "
          f"({(train_groups['segments'] > 0).mean():.0%} filled), "
          f"{epochs:.2g} epochs; {len(held_out):,} held out; reference {reference_from}", flush=True)
    return Task(model=model, loss_fn=dpo_objective(model, d),
                train_iter=finetune.train_iterator(train_groups, config, rows), eval_batches=eval_batches,
                tokenizer_path=tokenizer.model_path, example_batch=eval_batches[0],
                flops_per_token=flops_per_token(config.model, seq_len), language_model=False,
                tokens_per_example=sum(math.prod(eval_batches[0][k].shape[1:]) for k in ("prompt", "inputs")),
                eval_extra=policy_evaluation(config, tokenizer, mesh, ref_params, reference_from),
                summary_extras={"ranked_prompts": prompts, "pairs": pairs, "epochs": math.floor(epochs * 100) / 100})
