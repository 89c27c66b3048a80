"""Corpora as TFDS datasets stored in array_record, read by random access without TensorFlow.

Two builders of our own: `StdlibCorpus` (this interpreter's standard library sources, the offline corpus
every machine has) and `LocalText` (.txt / .jsonl files). Any other `config.data.name` is a TFDS dataset
that must already be prepared under `config.data.data_dir`: there is no network to download it.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

VALIDATION_PERCENT = 3
_STDLIB_SUFFIXES = (".py", ".rst", ".txt")
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the config key."""


def _hash(key: str) -> int:
    # md5, not hash(): Python salts str hashes per process, and the split must be the same everywhere.
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16)


def validation_keys(keys: Iterable[str]) -> set[str]:
    """The keys that belong to validation: ~VALIDATION_PERCENT% chosen by a stable hash of the key.

    A small corpus might hash nothing into validation; then its smallest-hash key is held out, so that
    any corpus of two or more documents can be evaluated.
    """
    keys = list(keys)
    held = {k for k in keys if _hash(k) % 100 < VALIDATION_PERCENT}
    if not held and len(keys) >= 2:
        held = {min(keys, key=_hash)}
    return held


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})


def _walk(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Paths under `root` (relative, sorted) with one of `suffixes`; never follows links or site-packages."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in files:
            if name.endswith(suffixes):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def _read_utf8(path: str) -> str | None:
    try:
        # newline="": keep '\r\n' as written; the corpus is the exact bytes of each file.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


class _DocumentsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A corpus of {key: text} documents, split into train/validation by `validation_keys`."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing to download, so no checksums file; TFDS's lookup of it fails on 3.11

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(), description=self.__doc__)

    @abc.abstractmethod
    def _documents(self) -> dict[str, str]:
        """Key -> text, the whole corpus."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        docs = self._documents()
        held = validation_keys(docs)
        return {"train": self._generate_examples({k: v for k, v in docs.items() if k not in held}),
                "validation": self._generate_examples({k: v for k, v in docs.items() if k in held})}

    def _generate_examples(self, docs: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
        for key, text in docs.items():
            yield key, {"text": text, "path": key}


# ---------------------------------------------------------------------------------------------------------
# The standard library.


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
    max_corpus_mb: float = 0.0


def _stdlib_config_name(max_corpus_mb: float) -> str:
    # The interpreter version and the cap name the cache: a different stdlib or cap is a different corpus.
    version = "py{}_{}_{}".format(*sys.version_info[:3])
    cap = "all" if max_corpus_mb <= 0 else f"{max_corpus_mb:g}mb".replace(".", "p")
    return f"{version}_{cap}"


class StdlibCorpus(_DocumentsBuilder):
    """The running interpreter's standard library: one example per .py/.rst/.txt file."""

    def _documents(self) -> dict[str, str]:
        """Relative path -> text, in sorted order until the size cap."""
        root = sysconfig.get_paths()["stdlib"]
        cap = self.builder_config.max_corpus_mb * 1e6
        files, size = {}, 0
        for rel in _walk(root, _STDLIB_SUFFIXES):
            if cap > 0 and size >= cap:
                break
            text = _read_utf8(os.path.join(root, rel))
            if text is not None:
                files[rel] = text
                size += len(text.encode("utf-8"))
        return files


# ---------------------------------------------------------------------------------------------------------
# Local .txt / .jsonl files.


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    path: str = ""
    text_key: str = "text"


def _local_files(path: str) -> tuple[str, list[str]]:
    """(root, relative paths) of the .txt/.jsonl files at `path`, a file or a directory."""
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    return path, _walk(path, (".txt", ".jsonl"))


def _local_config_name(path: str, text_key: str) -> str:
    """A name unique to the files' paths, sizes and mtimes: editing a file rebuilds the dataset."""
    root, rels = _local_files(path)
    stamp = [text_key] + [f"{r}:{os.stat(os.path.join(root, r)).st_size}:"
                          f"{os.stat(os.path.join(root, r)).st_mtime_ns}" for r in rels]
    digest = hashlib.md5("\n".join([os.path.abspath(path)] + stamp).encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(os.path.normpath(path)).lower()).strip("_")
    return f"{stem or 'text'}_{digest}"


class LocalText(_DocumentsBuilder):
    """Local files: each *.txt is one document, each line of a *.jsonl one document (text at text_key)."""

    def _documents(self) -> dict[str, str]:
        """Key (path, or path:line for JSONL) -> text."""
        cfg = self.builder_config
        root, rels = _local_files(cfg.path)
        docs = {}
        for rel in rels:
            full = os.path.join(root, rel)
            if rel.endswith(".jsonl"):
                docs.update(_jsonl_documents(full, rel, cfg.text_key))
            else:
                text = _read_utf8(full)
                if text is None:
                    raise DataError(f"config.data.path: {full} is not UTF-8 text")
                docs[rel] = text
        return docs


def _jsonl_documents(full: str, rel: str, text_key: str) -> dict[str, str]:
    docs = {}
    with open(full, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{full}:{number}"
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"config.data.text_key={text_key!r}: no text at {where} ({e!r})") from None
            if not isinstance(text, str):
                raise DataError(f"config.data.text_key={text_key!r}: {where} holds {type(text).__name__}, not str")
            docs[f"{rel}:{number}"] = text
    return docs


# ---------------------------------------------------------------------------------------------------------
# One entry point for every corpus.


class TextSource:
    """Random access to a split: item i is {'text': str}, whatever the underlying dataset stores."""

    def __init__(self, source: Any, text_key: str):
        self._source = source
        self._key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, str]:
        text = self._source[index][self._key]
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)}

    def __repr__(self) -> str:
        return f"TextSource({self._source!r}, text_key={self._key!r})"


def _data_dir(data: ml_collections.ConfigDict) -> str:
    return os.path.expanduser(data.data_dir)


# One builder per corpus and process: TFDS logs a warning at each construction with a custom config.
_BUILDERS: dict[tuple, tfds.core.DatasetBuilder] = {}


def _builder_key(data: ml_collections.ConfigDict) -> tuple[type, type, str, tuple]:
    """(builder class, its config class, data_dir, config fields) of our corpus data.name."""
    if data.name == "stdlib":
        fields = (("name", _stdlib_config_name(data.max_corpus_mb)), ("max_corpus_mb", data.max_corpus_mb))
        return StdlibCorpus, StdlibConfig, _data_dir(data), fields
    if data.name == "text":
        path = os.path.abspath(os.path.expanduser(data.path)) if data.path else ""
        if not path or not os.path.exists(path):
            raise DataError(f"config.data.path={data.path!r}: no such file or directory")
        if not _local_files(path)[1]:
            raise DataError(f"config.data.path={data.path!r}: no .txt or .jsonl files in {path}")
        fields = (("name", _local_config_name(path, data.text_key)), ("path", path), ("text_key", data.text_key))
        return LocalText, LocalTextConfig, _data_dir(data), fields
    raise DataError(f"config.data.name={data.name!r}: not one of our builders ('stdlib', 'text')")


def builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Our builder for data.name 'stdlib' or 'text' (not necessarily prepared)."""
    key = _builder_key(data)
    if key not in _BUILDERS:
        cls, config_cls, data_dir, fields = key
        _BUILDERS[key] = cls(config=config_cls(**dict(fields)), data_dir=data_dir)
    return _BUILDERS[key]


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if missing): processes that share a directory, several on
    one host or many on a shared filesystem, take turns at building what they all need."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepared(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Our builder, its dataset prepared under data.data_dir. The first process to take the lock builds it;
    the others then read what it built."""
    b = builder(data)
    if b.info.splits:  # made after the dataset was: its description names the files
        return b
    with file_lock(os.path.join(_data_dir(data), f".{b.name}-{b.builder_config.name}.lock")):
        # A builder made before the dataset existed describes no files, even once another process has
        # written them: make it again now that nobody else is building.
        del _BUILDERS[_builder_key(data)]
        b = builder(data)
        b.download_and_prepare(file_format="array_record")  # returns at once if another process built it
    return b


def dataset_id(data: ml_collections.ConfigDict) -> str:
    """A filesystem-safe name for the corpus data.name refers to, for caches keyed by it."""
    if data.name in ("stdlib", "text"):
        b = builder(data)
        return f"{b.name}_{b.builder_config.name}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", data.name)


def _tfds_split(b: tfds.core.DatasetBuilder, split: str) -> str:
    splits = set(b.info.splits.keys())
    if split == "validation" and split not in splits and "test" in splits:
        return "test"  # datasets such as lm1b hold out a test split only
    if split not in splits:
        raise DataError(f"config.data.name={b.name!r}: no split {split!r}; it has {sorted(splits)}")
    return split


def _tfds_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    not_here = (f"config.data.name={data.name!r}: TFDS dataset is not prepared under config.data.data_dir="
                f"{_data_dir(data)!r}, and this machine cannot download it; prepare it (array_record format) "
                f"where there is network and copy it there")
    try:
        b = tfds.builder(data.name, data_dir=_data_dir(data))
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(not_here) from None
    except ValueError as e:  # e.g. a config name the dataset does not have
        raise DataError(f"config.data.name={data.name!r}: {e}") from None
    if not b.is_prepared():
        raise DataError(not_here)
    return b


def documents(data: ml_collections.ConfigDict, split: str) -> TextSource:
    """Random access to the documents of one split ('train' or 'validation') of the corpus in `data`.

    Our builders are prepared under data.data_dir on first use (once, whichever process comes first); later
    calls reuse the files.
    """
    if data.name in ("stdlib", "text"):
        return TextSource(_prepared(data).as_data_source(split), "text")
    b = _tfds_builder(data)
    try:
        source = b.as_data_source(_tfds_split(b, split))
    except NotImplementedError as e:  # prepared as tfrecord: reading it needs TensorFlow
        raise DataError(f"config.data.name={data.name!r}: not stored as array_record, which random access "
                        f"without TensorFlow needs: {e}") from None
    return TextSource(source, data.text_key)
