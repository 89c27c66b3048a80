"""grain pipelines: documents -> tokens -> packed [batch, seq_len] rows, checkpointable and deterministic.

Packing is GPT-3 style: every document is followed by EOS, the documents are concatenated into one token
stream, and row i of the stream is tokens[i*L : i*L + L + 1] (inputs = row[:-1], targets = row[1:]).
Consecutive rows share one token, so every token of the stream is a target exactly once and the inputs of
consecutive rows concatenate back to the stream. Documents see each other; nothing is masked.
"""
from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from omni.data.builders import DataError, dataset_id, documents
from omni.data.tokenizer import Tokenizer, train_tokenizer

# Tokenizing threads: sentencepiece is fast (~1M tokens/s/core); two threads hide array_record reads.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


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


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The corpus' tokenizer: trained on the first data.tokenizer_sample_mb MB of train text on first use."""
    path = tokenizer_path(config)
    if not os.path.exists(path):
        try:
            train_tokenizer(_text_sample(config.data, config.data.tokenizer_sample_mb),
                            config.model.vocab_size, path)
        except RuntimeError as e:  # sentencepiece's own errors, e.g. a vocabulary too small for the text
            raise DataError(f"config.model.vocab_size={config.model.vocab_size}: cannot train a tokenizer on "
                            f"config.data.name={config.data.name!r}: {e}") from None
    tokenizer = Tokenizer(path)
    _check_vocab(config, tokenizer)
    return tokenizer


def _local_batch(config: ml_collections.ConfigDict, process_count: int) -> int:
    if config.train.batch_size % process_count:
        raise DataError(f"config.train.batch_size={config.train.batch_size} is not divisible by the "
                        f"{process_count} processes")
    return config.train.batch_size // process_count


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


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """Endless training batches for one process: {'inputs', 'targets'} int32 and 'weights' float32 [B, L].

    B = train.batch_size / process_count. Each process reads its own documents (every process_count-th),
    shuffled by train.seed with a new order every epoch. `get_state`/`set_state` (or grain's Orbax
    CheckpointSave/CheckpointRestore) resume exactly where the iterator stopped.
    """
    _check_vocab(config, tokenizer)
    batch = _local_batch(config, process_count)
    docs = grain.MapDataset.source(documents(config.data, "train"))[process_index::process_count]
    if len(docs) == 0:
        raise DataError(f"config.data.name={config.data.name!r}: no training documents for process "
                        f"{process_index} of {process_count}")
    # shuffle before repeat: grain folds the epoch into the seed, so each epoch has its own order.
    docs = docs.shuffle(seed=config.train.seed).repeat().map(_Tokenize(tokenizer))
    rows = _Pack(docs.to_iter_dataset(_READ_OPTIONS), config.train.seq_len)
    if config.data.shuffle_rows > 1:  # consecutive rows come from one document: mix rows of many per batch
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=config.data.shuffle_rows,
                                                           seed=config.train.seed)
    return iter(rows.batch(batch, drop_remainder=True))


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


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The fixed held-out set: the first train.eval_batches batches of the packed validation stream.

    Batches are global batches split by rows between processes, so the set does not depend on the process
    count. Positions past the end of the split hold pad tokens with weight 0; fewer batches if it is short.
    """
    _check_vocab(config, tokenizer)
    local, length = _local_batch(config, process_count), config.train.seq_len
    full = config.train.batch_size
    stream = _eval_stream(config, tokenizer, config.train.eval_batches * full * length + 1)
    num_rows = math.ceil((len(stream) - 1) / length) if len(stream) > 1 else 0
    num_batches = math.ceil(num_rows / full)
    size = num_batches * full * length + 1
    padded = np.full(size, tokenizer.pad_id, np.int32)
    padded[:len(stream)] = stream
    weights = (np.arange(1, size) < len(stream)).astype(np.float32)  # target j is stream[j + 1]
    shape = (num_batches, full, length)
    arrays = {"inputs": padded[:-1].reshape(shape), "targets": padded[1:].reshape(shape),
              "weights": weights.reshape(shape)}
    rows = slice(process_index * local, (process_index + 1) * local)
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
