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
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

VALIDATION_PERCENT = 3
_ONE_DOCUMENT_PIECES = 100  # a corpus of one document is cut into this many (fewer where it has fewer lines)
ON_MALFORMED = ("stop", "skip")
_WARN_FIRST = 5  # malformed lines or files quoted in the skip warning
_STDLIB_SUFFIXES = (".py", ".rst", ".txt")
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the config key."""


def _hash(key: str) -> int:
    # md5, not hash(): Python salts str hashes per process, and the split must be the same everywhere.
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16)


def validation_keys(keys: Iterable[str]) -> set[str]:
    """The keys that belong to validation: ~VALIDATION_PERCENT% chosen by a stable hash of the key.

    A small corpus might hash nothing, or everything, into validation; then its smallest-hash key alone is
    held out, so that any corpus of two or more documents has both splits.
    """
    keys = list(keys)
    held = {k for k in keys if _hash(k) % 100 < VALIDATION_PERCENT}
    if len(keys) >= 2 and len(held) in (0, len(keys)):
        held = {min(keys, key=_hash)}
    return held


def check_on_malformed(on_malformed: str) -> None:
    if on_malformed not in ON_MALFORMED:
        raise DataError(f"config.data.on_malformed={on_malformed!r}: expected one of {ON_MALFORMED}")


class Malformed:
    """What config.data.on_malformed does with each malformed line or file (a `unit`): 'stop' raises DataError
    naming it, 'skip' drops it; `warn` then says once how many were dropped, quoting the first few, so that
    a file with many bad lines stays readable."""

    def __init__(self, on_malformed: str, unit: str):
        check_on_malformed(on_malformed)
        self._stop, self._unit, self._found = on_malformed == "stop", unit, []

    def __call__(self, where: str, why: Any) -> None:
        if self._stop:
            raise DataError(f"{where}: {why} (config.data.on_malformed='stop'; 'skip' drops malformed "
                            f"{self._unit}s)")
        self._found.append(f"{where}: {why}")

    def warn(self, path: str) -> None:
        found = self._found
        if found:
            more = f"; and {len(found) - _WARN_FIRST} more" if len(found) > _WARN_FIRST else ""
            print(f"warning: skipped {len(found)} malformed {self._unit}(s) in {path} (config.data.on_malformed="
                  "'skip'): " + "; ".join(found[:_WARN_FIRST]) + more, file=sys.stderr, flush=True)


def jsonl_records(full: str, parse: Callable[[Any], Any], malformed: Malformed) -> Iterator[tuple[int, Any]]:
    """(line number, parse(object)) of each non-blank line of the .jsonl file `full`; a line that is not
    UTF-8 JSON, or that `parse` refuses (ValueError, TypeError, KeyError), goes to `malformed`."""
    with open(full, "rb") as f:  # bytes: a line that is not UTF-8 is one malformed line, not a bad file
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = parse(json.loads(line))
            except (ValueError, TypeError, KeyError) as e:  # JSON and UTF-8 errors are ValueErrors
                malformed(f"{full}:{number}", e)
                continue
            yield number, record


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


def _read_utf8(path: str) -> str:
    """The file's text; UnicodeDecodeError or OSError if it is not readable UTF-8."""
    # newline="": keep '\r\n' as written; the corpus is the exact bytes of each file.
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _pieces(key: str, text: str) -> dict[str, str]:
    """A one-document corpus as up to _ONE_DOCUMENT_PIECES documents 'KEY[start:end]', cut at the line starts
    nearest before equal shares of its characters (a document of one line: at those characters)."""
    points = [len(text) * i // _ONE_DOCUMENT_PIECES for i in range(1, _ONE_DOCUMENT_PIECES)]
    line_starts = {text.rfind("\n", 0, p) + 1 for p in points} - {0}
    starts = [0] + sorted(line_starts or set(points) - {0})
    return {f"{key}[{a}:{b}]": text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])}


def _split(docs: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(train, validation) documents by `validation_keys`. A one-document corpus is cut into pieces first: TFDS
    cannot write an empty split, and the rows of a batch, which read different documents, would all read it."""
    if len(docs) == 1:
        ((key, text),) = docs.items()
        docs = _pieces(key, text)
        if len(docs) == 1:
            raise DataError(f"the corpus is one document ({key}) of {len(text)} character(s): too short to hold "
                            "any of it out for validation")
    held = validation_keys(docs)
    return {k: v for k, v in docs.items() if k not in held}, {k: v for k, v in docs.items() if k in held}


@contextlib.contextmanager
def tfds_quiet() -> Iterator[None]:
    """Silences what TFDS says about our own builders: its warning that their config is a custom one (ours
    all are) and its banner on stdout about downloading (ours download nothing). Errors still show."""
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(level)


def prepare(b: tfds.core.DatasetBuilder) -> None:
    """Writes our builder's dataset as array_record unless it exists (another process may have written it
    while this one waited for the lock), saying so in one line instead of TFDS's banner and progress bars."""
    if b.data_path.exists():  # download_and_prepare's own test (is_prepared warns where it does not exist)
        return
    print(f"preparing {b.name}/{b.builder_config.name} under {b.data_dir_root} (once; later runs reuse it)",
          flush=True)
    tfds.display_progress_bar(False)  # for good: ours build in seconds, and bars garble the run's output
    with tfds_quiet():
        b.download_and_prepare(file_format="array_record")


class _DocumentsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A corpus of {key: text} documents, split into train/validation by `_split`."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing to download, so no checksums file; TFDS's lookup of it fails on 3.11

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(), description=self.__doc__)

    @abc.abstractmethod
    def _documents(self) -> dict[str, str]:
        """Key -> text, the whole corpus."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        train, validation = _split(self._documents())
        return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

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
            try:
                files[rel] = _read_utf8(os.path.join(root, rel))
            except (UnicodeDecodeError, OSError):  # a test fixture in another encoding: not part of the corpus
                continue
            size += len(files[rel].encode("utf-8"))
        return files


# ---------------------------------------------------------------------------------------------------------
# Local .txt / .jsonl files.


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    path: str = ""
    text_key: str = "text"
    on_malformed: str = "stop"


def _local_files(path: str) -> tuple[str, list[str]]:
    """(root, relative paths) of the .txt/.jsonl files at `path`, a file or a directory."""
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    return path, _walk(path, (".txt", ".jsonl"))


def _local_config_name(path: str, *options: str) -> str:
    """A name unique to the files' paths, sizes and mtimes and to `options` (what else decides the dataset's
    contents): editing a file rebuilds the dataset."""
    root, rels = _local_files(path)
    stamp = list(options) + [f"{r}:{os.stat(os.path.join(root, r)).st_size}:"
                             f"{os.stat(os.path.join(root, r)).st_mtime_ns}" for r in rels]
    digest = hashlib.md5("\n".join([os.path.abspath(path)] + stamp).encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(os.path.normpath(path)).lower()).strip("_")
    return f"{stem or 'text'}_{digest}"


class LocalText(_DocumentsBuilder):
    """Local files: each *.txt is one document, each line of a *.jsonl one document (text at text_key). A
    malformed document (a .txt file that is not readable UTF-8, a .jsonl line without text) is dealt with as
    config.data.on_malformed says."""

    def _documents(self) -> dict[str, str]:
        """Key (path, or path:line for JSONL) -> text."""
        cfg = self.builder_config
        root, rels = _local_files(cfg.path)
        malformed, docs = Malformed(cfg.on_malformed, "document"), {}
        for rel in rels:
            full = os.path.join(root, rel)
            if rel.endswith(".jsonl"):
                docs.update((f"{rel}:{n}", text) for n, text in jsonl_records(full, _text_at(cfg.text_key), malformed))
                continue
            try:
                docs[rel] = _read_utf8(full)
            except (UnicodeDecodeError, OSError) as e:
                malformed(full, f"not readable UTF-8 text ({e})")
        malformed.warn(cfg.path)
        if not docs:
            raise DataError(f"config.data.path={cfg.path!r}: no documents in its {len(rels)} file(s)")
        return docs


def _text_at(text_key: str) -> Callable[[Any], str]:
    """A JSONL object -> its text at text_key; ValueError says why not."""
    def text(obj: Any) -> str:
        if not isinstance(obj, dict) or text_key not in obj:
            raise ValueError(f"no {text_key!r} field (config.data.text_key)")
        if not isinstance(obj[text_key], str):
            raise ValueError(f"{text_key!r} holds {type(obj[text_key]).__name__}, not str (config.data.text_key)")
        return obj[text_key]
    return text


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


# One builder per corpus and process, made once: it reads the dataset's description from disk.
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
        check_on_malformed(data.on_malformed)
        fields = (("name", _local_config_name(path, data.text_key, data.on_malformed)), ("path", path),
                  ("text_key", data.text_key), ("on_malformed", data.on_malformed))
        return LocalText, LocalTextConfig, _data_dir(data), fields
    raise DataError(f"config.data.name={data.name!r}: not one of our builders ('stdlib', 'text')")


def builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Our builder for data.name 'stdlib' or 'text' (not necessarily prepared)."""
    key = _builder_key(data)
    if key not in _BUILDERS:
        cls, config_cls, data_dir, fields = key
        with tfds_quiet():
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
        prepare(b)
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
