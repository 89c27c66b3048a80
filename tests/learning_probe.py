"""Shared by the learning probes (tests/test_ppo_learning.py, tests/test_post_training.py): one prompt whose
answers "a", "b" and "c" a tiny policy is first fine-tuned to give with probabilities 0.2, 0.3 and 0.5, and the
exact probability of each answer, computed from the model's logits; and `unpacked` (also tests/test_ppo.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from omni.data.template import prompt_ids, response_ids
from omni.models import GPT

PROMPT = "pick"
ANSWERS = {"a": 0.2, "b": 0.3, "c": 0.5}  # what supervised fine-tuning teaches


class CharTokenizer:
    """One id per character (independent of sentencepiece): ids 0-3 are unk, bos, eos and pad."""
    eos_id, pad_id, vocab_size = 2, 3, 64
    alphabet = " \n:ASUabcdefghijklmnopqrstuvwxyz"

    def encode(self, text):
        return [4 + self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 4] if i - 4 < len(self.alphabet) else "#" for i in ids if i >= 4)


def answer_logprobs(model, params, tok):
    """log p(answer + EOS | prompt) of each answer, exactly, from one forward pass."""
    head = prompt_ids(tok, PROMPT)
    rows = [head + response_ids(tok, a) for a in ANSWERS]
    width = max(map(len, rows))
    tokens = np.array([r + [tok.pad_id] * (width - len(r)) for r in rows], np.int32)
    answer = np.array([[len(head) - 1 <= t < len(r) - 1 for t in range(width - 1)] for r in rows], np.float32)
    logp = jax.nn.log_softmax(model.apply({"params": params}, tokens[:, :-1]))
    return (jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * answer).sum(1)


def fine_tuned(model_config, tok, lr: float, steps: int):
    """The policy after "SFT": a fresh GPT trained on the answers in proportion until their probabilities
    match ANSWERS (checked to 0.03)."""
    model = GPT(model_config)
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    target = np.array(list(ANSWERS.values()))
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda q: -(target * answer_logprobs(model, q, tok)).sum())(params)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, _ = step(params, state)
    probs = np.exp(np.asarray(answer_logprobs(model, params, tok)))
    np.testing.assert_allclose(probs, target, atol=0.03)
    return params


def unpacked(rows: dict) -> dict:
    """`rollout.episodes`' rows as a row per episode holding its whole prompt: 'inputs', 'targets', 'mask' with
    the response's targets where the prompt's last token predicts them, and 'last' where `rows` has it (a
    minibatch has not)."""
    group = len(rows["inputs"]) // len(rows["prefix"])
    width, length = rows["prefix"].shape[1], rows["inputs"].shape[1]
    out = {k: np.zeros((len(rows["inputs"]), width + length), np.int32) for k in ("inputs", "targets")}
    out["mask"] = np.zeros(out["inputs"].shape, np.float32)
    out["last"] = np.zeros(len(rows["inputs"]), np.int32)
    for e in range(len(rows["inputs"])):
        prefix = rows["prefix"][e // group, rows["prefix_start"][e // group, 0]:]
        n = len(prefix)
        out["inputs"][e, :n + length] = np.concatenate([prefix, rows["inputs"][e]])
        out["targets"][e, n:n + length] = rows["targets"][e]
        if n:
            out["targets"][e, :n] = out["inputs"][e, 1:n + 1]
        out["mask"][e, n:n + length] = rows["mask"][e]
        if "last" in rows:
            out["last"][e] = n + rows["last"][e]
    return out
