"""SFT batches: packed demonstrations train on the assistant's tokens only and never see each other."""
import jax
import ml_collections
import numpy as np

from omni.config import base_config
from omni.data import finetune
from omni.data.template import encode_dialogue
from omni.losses import token_nll
from omni.models import GPT


class ToyTokenizer:
    eos_id, pad_id = 1, 0

    def encode(self, text):
        return [2 + ord(c) % 60 for c in text]


DIALOGUES = [[("add 1 2", "3")], [("hi", "hello there")], [("a", "b"), ("c", "dd")], [("long " * 3, "x")]]


def test_packing_masks_prompts_and_separates_demonstrations():
    tok = ToyTokenizer()
    packed = finetune.pack_demonstrations(tok, DIALOGUES, seq_len=48)
    trained = int(packed["weights"].sum())
    # every assistant token and its EOS is a target exactly once; nothing else is
    expected = sum(sum(encode_dialogue(tok, d)[1]) for d in DIALOGUES)
    assert trained == expected
    for r in range(len(packed["inputs"])):
        segs = packed["segment_ids"][r]
        for s in set(segs[segs > 0].tolist()):
            where = np.flatnonzero(segs == s)
            np.testing.assert_array_equal(packed["positions"][r, where], np.arange(len(where)))
    assert (packed["weights"][packed["segment_ids"] == 0] == 0).all()


def test_packed_loss_equals_each_demonstration_alone():
    """Independent truth: the model run on each demonstration by itself."""
    tok = ToyTokenizer()
    m = ml_collections.ConfigDict(base_config().model.to_dict())
    m.update(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=64, max_len=64)
    model = GPT(m)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    apply = jax.jit(model.apply)
    packed = finetune.pack_demonstrations(tok, DIALOGUES, seq_len=64)
    assert len(packed["inputs"]) < len(DIALOGUES)  # several demonstrations share a row
    logits = apply({"params": params}, packed["inputs"], segment_ids=packed["segment_ids"],
                         positions=packed["positions"])
    packed_loss = float((token_nll(logits, packed["targets"]) * packed["weights"]).sum())
    alone = 0.0
    for d in DIALOGUES:
        ids, mask = encode_dialogue(tok, d)
        # right-padded to one shape (one compilation): causal attention keeps padding out of earlier positions
        ids, mask = np.pad(ids, (0, 65 - len(ids)))[None], np.pad(mask, (0, 65 - len(mask)))[None]
        nll = token_nll(apply({"params": params}, ids[:, :-1]), ids[:, 1:])
        alone += float((nll * mask[:, 1:]).sum())
    np.testing.assert_allclose(packed_loss, alone, rtol=1e-4)


def test_train_iterator_is_resumable_and_epochs_reshuffle():
    config = base_config()
    config.train.update(batch_size=4, seed=3)
    arrays = {"x": np.arange(10)[:, None]}
    it = finetune.train_iterator(arrays, config)
    first = [next(it)["x"][:, 0].tolist() for _ in range(5)]
    seen = sorted([x for b in first[:2] for x in b] + first[2][:2])
    assert seen == list(range(10))  # the first epoch is a permutation of the set
    state = it.get_state()
    after = [next(it)["x"].tolist() for _ in range(3)]
    again = finetune.train_iterator(arrays, config)
    again.set_state(state)
    assert [next(again)["x"].tolist() for _ in range(3)] == after
    rows = finetune.train_iterator(arrays, config, rows=[1, 3])
    np.testing.assert_array_equal(next(rows)["x"][:, 0], first[0][1::2])  # a process's rows of the same batch
