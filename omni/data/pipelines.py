"""grain pipelines: documents -> tokens -> packed [batch, seq_len] rows, checkpointable and deterministic.

Packing is GPT-3 style: every document is followed by EOS, the documents are concatenated into one token
stream, and row i of the stream is tokens[i*L : i*L + L + 1] (inputs = row[:-1], targets = row[1:]).
Consecutive rows share one token, so every token of the stream is a target exactly once and the inputs of
consecutive rows concatenate back to the stream.

Many hosts. The global batch depends on the data, train.seed, train.batch_size and train.seq_len only, never
on how many processes load it, so a run gives the same losses on one host or many. Each of the B rows of the
global batch is a stream of its own: the training documents are shuffled by the seed (a new order every
epoch, endlessly), document i of that order goes to row i mod B, and row r packs its documents r, r + B,
r + 2B, ... into the successive rows it contributes to successive batches. A process builds only the rows its
devices hold (`rows`, found from the mesh), so it reads only those rows' documents, and builds them exactly
as any other process would. To keep one step's neighbours from continuing the same documents, each row's
stream is shuffled within windows of data.shuffle_rows / B of its rows (so about data.shuffle_rows rows are
buffered across the global batch). The iterator's state is the position of each of its rows' streams; a
checkpoint holds one per process, so a run resumes on the same mesh and number of processes.

data.separate_documents adds `segment_ids` and `positions` [B, L] for attention within documents only: a
document's segment starts at the EOS before it (which serves as its BOS), or at the row's start, and
positions count from 0 there. Every target is then predicted from its own document: a document's last token
predicts EOS, and that EOS predicts the next document's first token from itself alone.
"""
from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from omni.data.builders import DataError, dataset_id, documents, file_lock
from omni.data.tokenizer import Tokenizer, train_tokenizer

# Batches are read and tokenized in the training loop's thread, while the device runs the previous step
# (dispatch is asynchronous); sentencepiece does ~1M tokens/s/core, far more than a step consumes.
_SYNCHRONOUS = grain.ReadOptions(num_threads=0)


def _text_sample(data: ml_collections.ConfigDict, megabytes: float) -> Iterator[str]:
    """The first `megabytes` of training text, in the split's stored (deterministic) order."""
    source, seen = documents(data, "train"), 0
    for i in range(len(source)):
        if seen >= megabytes * 1e6:
            return
        text = source[i]["text"]
        seen += len(text.encode("utf-8"))
        yield text


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """Where the tokenizer of this corpus and vocabulary size lives, under data.data_dir."""
    name = f"{dataset_id(config.data)}_bpe{config.model.vocab_size}.model"
    return os.path.join(os.path.expanduser(config.data.data_dir), "tokenizers", name)


def _check_vocab(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
    if config.model.vocab_size != tokenizer.vocab_size:
        raise DataError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer "
                        f"{tokenizer.model_path} has vocab_size={tokenizer.vocab_size}")


def _train_tokenizer(config: ml_collections.ConfigDict, path: str) -> None:
    try:
        train_tokenizer(_text_sample(config.data, config.data.tokenizer_sample_mb), config.model.vocab_size, path)
    except RuntimeError as e:  # sentencepiece's own errors, e.g. a vocabulary too small for the text
        raise DataError(f"config.model.vocab_size={config.model.vocab_size}: cannot train a tokenizer on "
                        f"config.data.name={config.data.name!r}: {e}") from None


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The corpus' tokenizer: trained on the first data.tokenizer_sample_mb MB of train text on first use."""
    path = tokenizer_path(config)
    if not os.path.exists(path):
        with file_lock(path + ".lock"):  # processes sharing data_dir: the first trains, the others wait
            if not os.path.exists(path):
                _train_tokenizer(config, path)
    tokenizer = Tokenizer(path)
    _check_vocab(config, tokenizer)
    return tokenizer


class _Tokenize(grain.transforms.Map):
    """{'text': str} -> int32 token ids of the text followed by EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, element: dict[str, str]) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(element["text"]) + [self._tokenizer.eos_id], np.int32)


class _PackIterator(grain.DatasetIterator):
    """Cuts the concatenated token arrays of its parent into rows of L + 1 tokens, one shared between rows.

    The state is the parent's state before the first document still buffered plus the offset of the next
    row in that document: small, JSON-able, and restored by re-reading only the buffered documents.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._reset(0)

    def _reset(self, offset: int) -> None:
        self._tokens = np.zeros(0, np.int32)  # the buffered documents, concatenated
        self._docs = collections.deque()  # (parent state before the document, its length), oldest first
        self._offset = offset  # start of the next row in self._tokens

    def __next__(self) -> dict[str, np.ndarray]:
        need = self._offset + self._seq_len + 1
        new = []
        while len(self._tokens) + sum(map(len, new)) < need:
            state = self._parent.get_state()
            doc = next(self._parent)
            self._docs.append((state, len(doc)))
            new.append(doc)
        if new:
            self._tokens = np.concatenate([self._tokens, *new])
        row = self._tokens[self._offset:need]
        self._offset += self._seq_len
        # Forget documents the next row starts after; the row's last token is the next row's first.
        while self._docs and self._docs[0][1] <= self._offset:
            _, length = self._docs.popleft()
            self._tokens = self._tokens[length:]
            self._offset -= length
        return {"inputs": row[:-1], "targets": row[1:], "weights": np.ones(self._seq_len, np.float32)}

    def get_state(self) -> dict[str, Any]:
        parent_state = self._docs[0][0] if self._docs else self._parent.get_state()
        return {"parent": parent_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._reset(state["offset"])


class _Pack(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len)


def _rows(config: ml_collections.ConfigDict, rows: Sequence[int] | None) -> list[int]:
    batch = config.train.batch_size
    rows = list(range(batch) if rows is None else rows)
    if not rows or sorted(set(rows)) != rows or not 0 <= rows[0] <= rows[-1] < batch:
        raise ValueError(f"rows {rows} are not increasing rows of a batch of {batch}")
    return rows


class _WindowShuffleIterator(grain.DatasetIterator):
    """Its parent's elements, shuffled within consecutive windows of `size`: window w in the order of a
    permutation drawn from (*seed, w). The state is the parent's state where the window starts, the window's
    number and how many of its elements were taken; restoring re-reads that one window."""

    def __init__(self, parent: grain.DatasetIterator, size: int, seed: tuple[int, ...]):
        super().__init__(parent)
        self._size, self._seed = size, seed
        self._start, self._index, self._taken, self._window = parent.get_state(), 0, 0, []

    def __next__(self) -> Any:
        if not self._window:  # the parent is at self._start
            elements = [next(self._parent) for _ in range(self._size)]
            order = np.random.default_rng((*self._seed, self._index)).permutation(self._size)
            self._window = [elements[i] for i in order]
        element = self._window[self._taken]
        self._taken += 1
        if self._taken == self._size:  # the next window starts where the parent is now
            self._start, self._index, self._taken, self._window = self._parent.get_state(), self._index + 1, 0, []
        return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start, "window": self._index, "taken": self._taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start, self._index, self._taken, self._window = state["parent"], state["window"], state["taken"], []


class _WindowShuffle(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, size: int, seed: tuple[int, ...]):
        super().__init__(parent)
        self._size, self._seed = size, seed

    def __iter__(self) -> _WindowShuffleIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self._size, self._seed)


def _row_stream(config: ml_collections.ConfigDict, tokenizer: Tokenizer, docs: grain.MapDataset,
                row: int) -> grain.IterDataset:
    """Row `row` of successive global batches: documents row, row + B, ... of `docs`, packed."""
    batch = config.train.batch_size
    tokens = docs[row::batch].map(_Tokenize(tokenizer)).to_iter_dataset(_SYNCHRONOUS)
    stream = _Pack(tokens, config.train.seq_len)
    window = config.data.shuffle_rows // batch
    if window > 1:  # consecutive rows of a stream come from one document: mix them across steps
        stream = _WindowShuffle(stream, window, (config.train.seed, row))
    return stream


class _StackIterator(grain.DatasetIterator):
    """One element of each row stream, stacked into a batch. The state names the rows it holds, so a
    checkpoint of other rows (another mesh or process count) is refused rather than silently misread."""

    def __init__(self, parents: list[grain.DatasetIterator], rows: list[int]):
        super().__init__(parents)
        self._rows = rows

    def __next__(self) -> dict[str, np.ndarray]:
        elements = [next(p) for p in self._parents]
        return {k: np.stack([e[k] for e in elements]) for k in elements[0]}

    def get_state(self) -> dict[str, Any]:
        return {"rows": self._rows, "streams": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        if list(state["rows"]) != self._rows:
            raise DataError(f"the data position was saved for global batch rows {state['rows']} but this "
                            f"process loads rows {self._rows}: resume on the same mesh and number of processes")
        for parent, parent_state in zip(self._parents, state["streams"]):
            parent.set_state(parent_state)


class _Stack(grain.IterDataset):
    def __init__(self, parents: list[grain.IterDataset], rows: list[int]):
        super().__init__(parents)
        self._rows = rows

    def __iter__(self) -> _StackIterator:
        return _StackIterator([p.__iter__() for p in self._parents], self._rows)


def document_segments(inputs: np.ndarray, eos_id: int, valid: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """`segment_ids` (1, 2, ... per document within a row; 0 where `valid` is False) and `positions` (0 at
    each segment's start) int32 of [..., L] input tokens: a segment starts at each EOS and at the row start."""
    starts = inputs == eos_id
    starts[..., 0] = True
    index = np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape)
    segment_ids = np.cumsum(starts, axis=-1, dtype=np.int32)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    if valid is not None:
        segment_ids, positions = segment_ids * valid, positions * valid
    return {"segment_ids": segment_ids, "positions": positions}


class _AddSegments(grain.transforms.Map):
    def __init__(self, eos_id: int):
        self._eos_id = eos_id

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, **document_segments(batch["inputs"], self._eos_id)}


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   rows: Sequence[int] | None = None) -> grain.DatasetIterator:
    """Endless training batches: {'inputs', 'targets'} int32 and 'weights' float32 [len(rows), L], plus
    'segment_ids' and 'positions' int32 with data.separate_documents.

    `rows` (increasing; default all) are the rows of each global batch of train.batch_size that this process
    loads; the rows' contents do not depend on which or how many processes load them (module docstring).
    `get_state`/`set_state` (or grain's Orbax CheckpointSave/CheckpointRestore) resume exactly where the
    iterator stopped.
    """
    _check_vocab(config, tokenizer)
    rows = _rows(config, rows)
    source = documents(config.data, "train")
    if len(source) == 0:
        raise DataError(f"config.data.name={config.data.name!r}: no training documents")
    # shuffle before repeat: grain folds the epoch into the seed, so each epoch has its own order.
    docs = grain.MapDataset.source(source).shuffle(seed=config.train.seed).repeat()
    batches = _Stack([_row_stream(config, tokenizer, docs, r) for r in rows], rows)
    if config.data.separate_documents:
        batches = batches.map(_AddSegments(tokenizer.eos_id))
    return iter(batches)


def _eval_stream(config: ml_collections.ConfigDict, tokenizer: Tokenizer, num_tokens: int) -> np.ndarray:
    """At most `num_tokens` held-out tokens: each validation document in stored order, cut to its first
    data.eval_tokens_per_doc tokens (0: whole) so that one long file cannot make up the whole eval set."""
    source, pieces, have = documents(config.data, "validation"), [], 0
    cap = config.data.eval_tokens_per_doc or None
    for i in range(len(source)):
        if have >= num_tokens:
            break
        pieces.append(tokenizer.encode(source[i]["text"])[:cap] + [tokenizer.eos_id])
        have += len(pieces[-1])
    return np.asarray([t for p in pieces for t in p], np.int32)[:num_tokens]


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 rows: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """The fixed held-out set: the first train.eval_batches global batches of the packed validation stream,
    `rows` of each (default all), with the keys of `train_iterator`'s batches.

    The global batches do not depend on the processes that load them. Positions past the end of the split
    hold pad tokens with weight 0 (and segment 0); fewer batches if it is short.
    """
    _check_vocab(config, tokenizer)
    rows, length, full = _rows(config, rows), config.train.seq_len, config.train.batch_size
    stream = _eval_stream(config, tokenizer, config.train.eval_batches * full * length + 1)
    num_rows = math.ceil((len(stream) - 1) / length) if len(stream) > 1 else 0
    num_batches = math.ceil(num_rows / full)
    size = num_batches * full * length + 1
    padded = np.full(size, tokenizer.pad_id, np.int32)
    padded[:len(stream)] = stream
    index = np.arange(size - 1)  # input j is stream[j], its target stream[j + 1]
    shape = (num_batches, full, length)
    arrays = {"inputs": padded[:-1].reshape(shape), "targets": padded[1:].reshape(shape),
              "weights": (index + 1 < len(stream)).astype(np.float32).reshape(shape)}
    if config.data.separate_documents:
        arrays.update(document_segments(arrays["inputs"], tokenizer.eos_id, (index < len(stream)).reshape(shape)))
    return [{k: v[b, rows] for k, v in arrays.items()} for b in range(num_batches)]


def unigram_perplexity(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> float:
    """Perplexity on the eval targets of an add-one-smoothed unigram model of the training tokens.

    A model that learned nothing but token frequencies scores this; a language model must beat it.
    """
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for text in _text_sample(config.data, config.data.tokenizer_sample_mb):
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    log_p = np.log((counts + 1) / (counts.sum() + tokenizer.vocab_size))
    batches = eval_batches(config, tokenizer)
    targets = np.concatenate([b["targets"][b["weights"] == 1] for b in batches]) if batches else []
    if len(targets) == 0:
        raise DataError(f"config.data.name={config.data.name!r}: the validation split is empty")
    return float(np.exp(-log_p[targets].mean()))
