"""A lossless sentencepiece tokenizer for source code and prose.

sentencepiece's defaults are built for natural language: they normalise unicode, collapse runs of spaces and
cannot represent '\\n' at all. Code needs the exact text back, so training here turns all of that off and
adds byte fallback: any character missing from the vocabulary is spelled as its UTF-8 bytes.

`Tokenizer` also reads a Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, imported with its model by
omni/interop/hf.py) behind the same interface; the file's name decides which kind it is.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from omni.files import write_atomic

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# sentencepiece trains on "sentences". Chunks of whole lines keep '\n' inside them, so pieces such as
# "\n" + indentation can be learned; a few KB per chunk keeps the trainer's memory and time small.
_CHUNK_BYTES = 4096
# A chunk holding one very long line (minified data, a long string literal) is still kept up to this size.
_MAX_SENTENCE_BYTES = 1 << 20
# Fixed, not os.cpu_count(): the trained model records its thread count, so the file would differ by machine.
_TRAIN_THREADS = 2


# File name of each kind of tokenizer inside a workdir (and HF directory).
SENTENCEPIECE_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
# GPT-2's document separator. GPT-2 has no other special token: it is also its BOS (and, by convention, PAD).
HF_END_OF_TEXT = "<|endoftext|>"


def file_name(path: str) -> str:
    """The workdir file name of the tokenizer at `path`: a `.json` file is a HF tokenizer, anything else a
    sentencepiece model."""
    return HF_FILE if os.fspath(path).endswith(".json") else SENTENCEPIECE_FILE


class Tokenizer:
    """Text <-> token ids with a trained sentencepiece model, or a Hugging Face tokenizer.json.

    For a tokenizer.json, eos_id is <|endoftext|> (or the file's only special token), bos_id is the same token
    (as in GPT-2), and pad_id is the file's padding token if it sets one, else eos_id: omni fills padded
    positions with pad_id at weight 0, so it must be a real id the embedding can look up, never -1.
    """

    def __init__(self, model_path: str):
        self.model_path = os.fspath(model_path)
        self.kind = "hf" if file_name(self.model_path) == HF_FILE else "sentencepiece"
        if self.kind == "hf":
            self._init_hf()
        else:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
            self.vocab_size: int = self._sp.get_piece_size()
            self.eos_id: int = self._sp.eos_id()
            self.bos_id: int = self._sp.bos_id()
            self.pad_id: int = self._sp.pad_id()

    def _init_hf(self) -> None:
        import tokenizers  # only HF tokenizers need it

        self._hf = tokenizers.Tokenizer.from_file(self.model_path)
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.bos_id = self._hf_end_of_text()
        padding = self._hf.padding
        self.pad_id = padding["pad_id"] if padding else self.eos_id

    def _hf_end_of_text(self) -> int:
        eot = self._hf.token_to_id(HF_END_OF_TEXT)
        if eot is not None:
            return eot
        # A tokenizer.json does not say which special token ends a text (HF keeps that in other files); a
        # file with a single one leaves no doubt.
        special = [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]
        if len(special) == 1:
            return self._hf.token_to_id(special[0])
        raise ValueError(f"{self.model_path}: no {HF_END_OF_TEXT} token, and {len(special)} special tokens "
                         f"{special[:8]}: cannot tell which one ends a document")

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            # No BOS/EOS added by the file's post-processor: callers add EOS themselves, as with sentencepiece.
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        # int(): ids often arrive as numpy scalars, which sentencepiece rejects.
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            # Special tokens decode to nothing, as sentencepiece's control tokens do.
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def save(self, directory: str) -> str:
        """Copies the file to `directory/tokenizer.model` or `directory/tokenizer.json` by kind (atomically)
        and returns that path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, file_name(self.model_path))
        if os.path.abspath(path) != os.path.abspath(self.model_path):
            with open(self.model_path, "rb") as f:
                write_atomic(path, f.read())
        return path

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    """Splits each text into runs of whole lines of about _CHUNK_BYTES, line endings kept."""
    for text in texts:
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > _CHUNK_BYTES and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            yield "".join(chunk)


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str) -> Tokenizer:
    """Trains a lossless BPE model on `texts` and writes it to `model_path`.

    BPE rather than unigram: on code it compresses as well and trains >10x faster. The same texts give the
    same model file.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Lossless: no unicode normalisation, whitespace kept as is, unknown characters as bytes.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single tokens
        byte_fallback=True,
        split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=_TRAIN_THREADS,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    write_atomic(model_path, model.getvalue())
    return Tokenizer(model_path)
