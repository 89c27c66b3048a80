"""SFT batches: packed demonstrations train on the assistant's tokens only and never see each other."""
import jax
import ml_collections
import numpy as np
import pytest

from omni.config import base_config
from omni.data import DataError, finetune
from omni.data.template import encode_dialogue
from omni.losses import token_nll
from omni.models import GPT
from omni.stages import heldout


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


def _assistant_targets(tok, turns, limit):
    """The assistant's tokens among the first `limit` tokens of a demonstration: what a row can train on."""
    ids, mask = encode_dialogue(tok, turns)
    return sum(mask[1:limit])


def test_overlong_demonstrations_are_cut_or_dropped_with_one_warning_each(capsys):
    tok, seq_len = ToyTokenizer(), 48
    fits, long_reply, long_prompt = [("add 1 2", "3")], [("hi", "y" * 80)], [("x" * 80, "z")]
    packed = finetune.pack_demonstrations(tok, [fits, long_reply, long_prompt], seq_len, "eval.jsonl")
    expected = _assistant_targets(tok, fits, 99) + _assistant_targets(tok, long_reply, seq_len + 1)
    assert packed["weights"].sum() == expected and packed["segment_ids"].max() == 1  # one demonstration a row
    assert len(packed["inputs"]) == 2  # the long prompt's row is gone
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: 1 of 3 demonstrations of eval.jsonl are longer than train.seq_len + 1 = 49 tokens "
                   "and were cut",
                   "warning: 1 of 3 demonstrations of eval.jsonl have no assistant token within train.seq_len + 1 "
                   "= 49 tokens and were dropped"]


def test_no_demonstration_within_the_context_is_an_error():
    fills = "^train.jsonl: every demonstration's prompt fills the context \\(train.seq_len \\+ 1 = 49 tokens\\)"
    with pytest.raises(DataError, match=fills):
        finetune.pack_demonstrations(ToyTokenizer(), [[("x" * 80, "z")]] * 3, 48, "train.jsonl")


def _sft_config(seq_len, max_new, prompts):
    c = base_config()
    c.train.seq_len = seq_len
    c.sft.update(eval_max_new_tokens=max_new, eval_prompts=prompts)
    return c


def test_held_out_prompts_leave_room_to_answer(capsys):
    tok = ToyTokenizer()
    short, long = [("a", "b")], [("x" * 40, "y")]
    assert [len(encode_dialogue(tok, [], t[-1][0])[0]) for t in (short, long)] == [19, 58]  # the cue included
    # 64 - 8 = 56 tokens of room: 19 fit, 58 do not
    picked = heldout.answerable(_sft_config(64, 8, 2), tok, [long, short, long, short, short], "eval.jsonl")
    assert picked == [short, short]  # the first eval_prompts that fit
    assert "2 of 5 held-out prompts of eval.jsonl leave no room" in capsys.readouterr().err


def test_no_answerable_prompt_stops_at_start_up():
    """sample_metrics chooses its prompts when it is made, before the trainer compiles anything."""
    with pytest.raises(DataError, match="^eval.jsonl: no held-out prompt leaves room for sft.eval_max_new_tokens=8 "
                                        "within train.seq_len=48"):
        heldout.sample_metrics(_sft_config(48, 8, 4), ToyTokenizer(), [[("x" * 40, "y")]], "eval.jsonl", mesh=None)
