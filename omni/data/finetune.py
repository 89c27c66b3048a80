"""Batches of the fine-tuning stages: packed demonstrations (SFT) and groups of ranked responses (reward model).

Fine-tuning sets are small, so they are tokenised in memory once, laid out as fixed-shape arrays, and served by
grain in a seeded order that changes every epoch. The iterator's state is one index: a run resumes exactly.
As in pretraining, the global batch does not depend on how many processes load it; each process builds only
its own rows of it.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import grain
import ml_collections
import numpy as np

from omni.data.builders import DataError, validation_keys
from omni.data import feedback
from omni.data.feedback import parse_prompt, read_jsonl
from omni.data.template import encode_dialogue, prompt_ids, response_ids

_SYNCHRONOUS = grain.ReadOptions(num_threads=0)


def labeler_noise(data: ml_collections.ConfigDict) -> float:
    """The suite labeler's noise: data.labeler_noise, or the calibrated NOISE for -1."""
    from omni.data import instructions

    return instructions.NOISE if data.labeler_noise < 0 else float(data.labeler_noise)


def suite_directory(data: ml_collections.ConfigDict) -> str:
    """Where the offline suite of data.suite_seed and data.labeler_noise lives, under data.data_dir."""
    name = f"seed{data.suite_seed}_noise{labeler_noise(data):g}"
    return os.path.join(os.path.expanduser(data.data_dir), "instructions", name)


def suite_data(data: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """data.name 'instructions' (the offline instruction suite, written under data.data_dir on first use) as the
    JSONL files of `kind` ('sft' or 'prefs'); any other data config is returned as it is."""
    if data.name != "instructions":
        return data
    from omni.data import instructions
    from omni.data.builders import file_lock

    directory = suite_directory(data)
    with file_lock(directory + ".lock"):
        paths = instructions.write_suite(directory, seed=data.suite_seed, noise=labeler_noise(data))
    out = ml_collections.ConfigDict(data.to_dict())
    out.update(name="jsonl", path=paths[f"{kind}_train.jsonl"], eval_path=paths[f"{kind}_eval.jsonl"])
    return out


def demonstrations(data: ml_collections.ConfigDict, split: str) -> Sequence[list[tuple[str, str]]]:
    """The SFT demonstrations (dialogues) of `split` ('train' or 'validation'), the offline suite's included."""
    return feedback.demonstrations(suite_data(data, "sft"), split)


def preferences(data: ml_collections.ConfigDict, split: str) -> Sequence[tuple[str, list[str], list[int]]]:
    """The K-way rankings (prompt, responses, ranks) of `split`, the offline suite's included."""
    return feedback.preferences(suite_data(data, "prefs"), split)


def prompts(data: ml_collections.ConfigDict, split: str) -> list[str]:
    """PPO's prompts of one split ('train' or 'validation'): the offline suite's prompt files (data.name
    'instructions'), or the "prompt" field of every line of data.path's JSONL files ('jsonl'; demonstration and
    preference files serve too), validation being data.eval_path's or a stable hash of ~3% of data.path's."""
    if data.name == "instructions":
        data = suite_data(data, "prompts")
    elif data.name != "jsonl":
        raise DataError(f"config.data.name={data.name!r}: PPO reads prompts from 'instructions' or 'jsonl'")
    if split == "validation" and data.eval_path:
        return [r for _, r in read_jsonl(data.eval_path, parse_prompt, data.on_malformed, "config.data.eval_path")]
    records = read_jsonl(data.path, parse_prompt, data.on_malformed)
    if data.eval_path:
        return [r for _, r in records]
    held = validation_keys(key for key, _ in records)
    return [r for key, r in records if (key in held) == (split == "validation")]


def _warn(what: str, count: int, total: int, why: str) -> None:
    if count:
        print(f"warning: {count} of {total} {what} {why}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# SFT: demonstrations packed into rows, never attending across each other.

def fitted_demonstrations(tokenizer, dialogues: Sequence[list[tuple[str, str]]], seq_len: int, where: str
                          ) -> list[tuple[list[int], list[int]]]:
    """The (ids, mask) of each demonstration (encode_dialogue's) made to fit a row of seq_len positions: cut to
    seq_len + 1 tokens, or dropped where no assistant token is left to train on (its prompt fills the row).
    One warning counts each kind, naming `where` (the demonstrations' files); none left is a DataError."""
    fitted, cut = [], 0
    for turns in dialogues:
        ids, mask = encode_dialogue(tokenizer, turns)
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            cut += any(mask[1:])
        if any(mask[1:]):  # a target the assistant says
            fitted.append((ids, mask))
    context = f"train.seq_len + 1 = {seq_len + 1} tokens"
    _warn("demonstrations", cut, len(dialogues), f"of {where} are longer than {context} and were cut")
    _warn("demonstrations", len(dialogues) - len(fitted), len(dialogues),
          f"of {where} have no assistant token within {context} and were dropped")
    if not fitted:
        raise DataError(f"{where}: every demonstration's prompt fills the context ({context}): none has an "
                        "assistant token to train on")
    return fitted


def pack_demonstrations(tokenizer, dialogues: Sequence[list[tuple[str, str]]], seq_len: int,
                        where: str = "the demonstrations") -> dict[str, np.ndarray]:
    """Rows of seq_len positions ('inputs', 'targets', 'weights', 'segment_ids', 'positions') holding whole
    demonstrations one after another (first fit, in the given order), each made to fit a row by
    `fitted_demonstrations`. A demonstration of n tokens fills n - 1 positions (input t predicts t + 1) and is
    its own segment; weights are 1 where the target is the assistant's (its replies and their EOS)."""
    rows, row, used = [], [], 0
    fields = ("inputs", "targets", "weights", "segment_ids", "positions")
    for ids, mask in fitted_demonstrations(tokenizer, dialogues, seq_len, where):
        n = len(ids) - 1
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        used += n
        segment = len(row) + 1
        row.append((ids[:-1], ids[1:], mask[1:], [segment] * n, list(range(n))))
    rows.append(row)
    out = {f: np.zeros((len(rows), seq_len), np.float32 if f == "weights" else np.int32) for f in fields}
    out["inputs"][:] = out["targets"][:] = tokenizer.pad_id
    for r, pieces in enumerate(rows):
        for i, f in enumerate(fields):
            flat = [x for piece in pieces for x in piece[i]]
            out[f][r, :len(flat)] = flat
    return out


# ---------------------------------------------------------------------------------------------------------
# Reward model: each prompt's K responses side by side, one batch element per prompt.

def preference_groups(tokenizer, records: Sequence[tuple[str, list[str], list[int]]], seq_len: int,
                      num_responses: int) -> dict[str, np.ndarray]:
    """Per prompt: 'inputs' [K, seq_len] (prompt + response + EOS, right-padded), 'first' and 'last' [K] (index
    of the response's first and last token: its score is read at the last), 'ranks' [K] and 'exists' [K] (0 for
    the padding responses up to `num_responses`). A response cut at seq_len is read at its last kept token (warned); a prompt that
    alone fills seq_len is dropped (warned)."""
    n = len(records)
    out = {"inputs": np.full((n, num_responses, seq_len), tokenizer.pad_id, np.int32),
           "first": np.zeros((n, num_responses), np.int32),
           "last": np.zeros((n, num_responses), np.int32), "ranks": np.zeros((n, num_responses), np.int32),
           "exists": np.zeros((n, num_responses), np.float32)}
    keep, cut = [], 0
    for i, (prompt, responses, ranks) in enumerate(records):
        head = prompt_ids(tokenizer, prompt)
        if len(head) >= seq_len:
            continue
        keep.append(i)
        for k, response in enumerate(responses):
            ids = (head + response_ids(tokenizer, response))[:seq_len]
            cut += len(head) + len(response_ids(tokenizer, response)) > seq_len
            out["inputs"][i, k, :len(ids)] = ids
            out["first"][i, k] = len(head)
            out["last"][i, k] = len(ids) - 1
            out["ranks"][i, k] = ranks[k]
            out["exists"][i, k] = 1.0
    _warn("prompts", n - len(keep), n, f"fill train.seq_len={seq_len} tokens alone and were dropped")
    _warn("responses", cut, int(out["exists"].sum()), f"were cut at train.seq_len={seq_len} tokens")
    if not keep:
        raise DataError(f"no preference example fits train.seq_len={seq_len}")
    return {k: v[keep] for k, v in out.items()}


def pack_prompts(groups: dict[str, np.ndarray], pad_id: int, prompts: int, rows: int, row_len: int, slots: int,
                 prompt_len: int, shuffle: int | None = None) -> dict[str, np.ndarray]:
    """preference_groups' prompts (every key [prompts, K, ...]) packed whole into elements of `prompts` prompt
    rows, `rows` response rows of `row_len` tokens and `slots` responses, each prompt written once. Its row
    ('prompt' [E, prompts, prompt_len - 1]) holds all its tokens but the last, left-padded ('prompt_start': the
    first real one). Each response is a segment [the prompt's last token, the response, EOS] of a response row
    ('inputs' [E, rows, row_len]; 'segments' numbered from 1 within the row, 0 padding; 'positions' continuing
    the prompt's), and 'row_prompt' [E, rows] says which prompt a row continues: the model reads a prompt once
    for all its responses (omni/stages/dpo.py response_logps), where a row per response repeated it. Per slot
    [E, slots]: 'row', 'first' and 'last' (the response's first and last token in its row), 'exists', 'group'
    (which prompt of the element; -1 empty), and the groups' other values per response ('ranks', ...). Prompts
    longer than prompt_len are dropped and responses longer than row_len - 1 tokens cut (both warned). Next fit
    in the stored order, or with `shuffle` in the order of a permutation drawn from that seed, so that each
    element is a random mix of prompts as a shuffled batch would be (a label stage's files hold its samples'
    rankings, then the suite's: in the stored order an element holds one kind)."""
    sizes = groups["exists"].sum(1).astype(int)
    keep = groups["first"][:, 0] <= prompt_len
    _warn("ranked prompts", int((~keep).sum()), len(keep),
          f"are longer than dpo.prompt_len={prompt_len} tokens and were dropped")
    lengths = (groups["last"] - groups["first"] + 2) * (groups["exists"] > 0)  # segment tokens; 0: no response
    _warn("responses", int((lengths[keep] > row_len).sum()), int(sizes[keep].sum()),
          f"were cut at dpo.row_len={row_len} tokens (with the prompt's last)")
    lengths = np.minimum(lengths, row_len)
    order = np.flatnonzero(keep)
    if shuffle is not None:
        order = np.random.default_rng(shuffle).permutation(order)
    plan = _plan_elements(order, sizes, lengths, (prompts, rows, slots), row_len)
    return _lay_out(groups, plan, lengths, pad_id, (prompts, rows, slots), row_len, prompt_len - 1)


def _response_rows(lengths: np.ndarray, size: int, row_len: int) -> list[list[int]]:
    """One prompt's responses (segment `lengths`) in rows of row_len tokens, longest first, first fit."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for k in sorted(range(size), key=lambda k: -lengths[k]):
        for r, used in enumerate(fill):
            if used + lengths[k] <= row_len:
                rows[r].append(k)
                fill[r] += lengths[k]
                break
        else:
            rows.append([k])
            fill.append(lengths[k])
    return rows


def _plan_elements(order: np.ndarray, sizes: np.ndarray, lengths: np.ndarray, capacity: tuple[int, int, int],
                   row_len: int) -> list[list[tuple[int, list[list[int]]]]]:
    """Per element, its prompts with their response rows [(prompt, [[response, ...] per row])]: the prompts in
    `order`, each into the current element while its prompt rows, response rows and slots (`capacity`) last. Not
    sorted by size: that packed no tighter here, and made each element prompts of one kind (similar lengths, often
    one task), so that a batch of a few elements mixed few kinds."""
    elements: list = []
    used = np.array(capacity)
    for p in order:
        rows = _response_rows(lengths[p], sizes[p], row_len)
        need = np.array([1, len(rows), sizes[p]])
        if np.any(need > capacity):
            raise ValueError(f"a ranked prompt needs {need[1]} response rows and {need[2]} slots: more than an "
                             f"element's dpo.rows={capacity[1]} or dpo.slots={capacity[2]}")
        if np.any(used + need > capacity):
            elements.append([])
            used[:] = 0
        elements[-1].append((p, rows))
        used += need
    return elements


def _lay_out(groups: dict[str, np.ndarray], plan: list, lengths: np.ndarray, pad_id: int,
             capacity: tuple[int, int, int], row_len: int, prompt_width: int) -> dict[str, np.ndarray]:
    """pack_prompts' arrays from the `plan` of _plan_elements."""
    n, (prompts, rows, slots) = len(plan), capacity
    per_response = [k for k, v in groups.items()  # 'ranks', and any other value per response (e.g. 'ref_logps')
                    if k not in ("inputs", "first", "last", "exists") and v.shape == groups["exists"].shape]
    out = {"prompt": np.full((n, prompts, prompt_width), pad_id, np.int32),
           "prompt_start": np.full((n, prompts), prompt_width, np.int32),
           "inputs": np.full((n, rows, row_len), pad_id, np.int32),
           "segments": np.zeros((n, rows, row_len), np.int32), "positions": np.zeros((n, rows, row_len), np.int32),
           "row_prompt": np.zeros((n, rows), np.int32), "group": np.full((n, slots), -1, np.int32),
           **{k: np.zeros((n, slots), np.int32) for k in ("row", "first", "last")},
           **{k: np.zeros((n, slots), groups[k].dtype) for k in per_response},
           "exists": np.zeros((n, slots), np.float32)}
    for e, element in enumerate(plan):
        r = s = 0
        for g, (p, response_rows) in enumerate(element):
            head = groups["first"][p, 0]  # the prompt's tokens
            out["prompt"][e, g, prompt_width - head + 1:] = groups["inputs"][p, 0, :head - 1]
            out["prompt_start"][e, g] = prompt_width - head + 1
            for row in response_rows:
                out["row_prompt"][e, r] = g
                at = 0
                for segment, k in enumerate(row, 1):
                    size = lengths[p, k]
                    span = slice(at, at + size)
                    out["inputs"][e, r, span] = groups["inputs"][p, k, head - 1:head - 1 + size]
                    out["segments"][e, r, span] = segment
                    out["positions"][e, r, span] = np.arange(head - 1, head - 1 + size)
                    out["row"][e, s], out["first"][e, s], out["last"][e, s] = r, at + 1, at + size - 1
                    out["exists"][e, s], out["group"][e, s] = 1.0, g
                    for key in per_response:
                        out[key][e, s] = groups[key][p, k]
                    s, at = s + 1, at + size
                r += 1
    return out


# ---------------------------------------------------------------------------------------------------------
# Serving

class _Rows(grain.transforms.Map):
    """Global batch b -> this process's rows of it: elements b * batch_size + r of the epoch-shuffled set."""

    def __init__(self, elements: grain.MapDataset, batch_size: int, rows: Sequence[int]):
        self._elements, self._batch_size, self._rows = elements, batch_size, list(rows)

    def map(self, b: int) -> dict[str, np.ndarray]:
        picked = [self._elements[b * self._batch_size + r] for r in self._rows]
        return {k: np.stack([p[k] for p in picked]) for k in picked[0]}


class _ArraySource:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._arrays.items()}


def train_iterator(arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                   rows: Sequence[int] | None = None) -> grain.DatasetIterator:
    """Endless global batches of train.batch_size elements (this process's `rows` of each), the elements in a
    new order every epoch drawn from train.seed; checkpointable (its state is the next batch's index)."""
    batch = config.train.batch_size
    rows = list(range(batch)) if rows is None else list(rows)
    elements = grain.MapDataset.source(_ArraySource(arrays)).shuffle(seed=config.train.seed).repeat()
    batches = grain.MapDataset.range(len(elements) // batch).map(_Rows(elements, batch, rows))
    return iter(batches.to_iter_dataset(_SYNCHRONOUS))


def fixed_batches(arrays: dict[str, np.ndarray], batch_size: int, max_batches: int,
                  rows: Sequence[int] | None = None, weight_keys: Sequence[str] = ("weights",)
                  ) -> list[dict[str, np.ndarray]]:
    """The held-out set in stored order as at most `max_batches` global batches (this process's `rows`); the
    last is filled with copies of element 0 whose `weight_keys` are zeroed, so they count for nothing."""
    rows = list(range(batch_size)) if rows is None else list(rows)
    count = min(len(next(iter(arrays.values()))), batch_size * max_batches)
    num_batches = -(-count // batch_size)
    out = []
    for b in range(num_batches):
        index = np.arange(b * batch_size, (b + 1) * batch_size)[rows]
        real = index < count
        batch = {k: v[np.where(real, index, 0)] for k, v in arrays.items()}
        for k in weight_keys:
            batch[k] = batch[k] * real.reshape((-1,) + (1,) * (batch[k].ndim - 1))
        out.append(batch)
    return out
