"""Feedback data: demonstrations for supervised fine-tuning and human-preference rankings for the reward
model, from local JSONL files (config.data.name = "jsonl") or a prepared TFDS dataset (any other name).

Demonstrations, one JSON object per line, in either form:

    {"prompt": "Name a prime.", "response": "7"}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, ...]}

Messages alternate user/assistant, from a user message to an assistant one. Both forms become a list of
(user, assistant) turns, laid out by the chat template (omni/data/template.py).

Preferences, one JSON object per line, in either form:

    {"prompt": "...", "responses": ["a", "b", "c"], "ranking": [1, 0, 1]}
    {"prompt": "...", "chosen": "a", "rejected": "b"}      # = responses ["a", "b"], ranking [0, 1]

ranking[i] is the rank of responses[i]: 0 is best and equal ranks are ties; each is an int in [0, K), for
K = 2..9 responses. At least two ranks must differ: a ranking of ties has nothing to learn from. Both forms
become (prompt, responses, ranks).

config.data.path is a .jsonl file, or a directory whose .jsonl files (recursively, sorted) are all read;
blank lines are ignored. Validation is config.data.eval_path's records (a file or directory) when set,
else ~3% of the path's records, chosen by a stable hash of "file:line". A malformed line (bad JSON, or
neither form) stops preparation naming its file:line and why (config.data.on_malformed = "stop"), or is
dropped, with one warning listing the first few ("skip"). The records are stored as a TFDS array_record
dataset under config.data.data_dir, prepared on first use and named after the files' paths, sizes and
mtimes: editing a file prepares a new one. A TFDS dataset must already be prepared there (array_record),
its examples holding the JSON forms' fields; a malformed example raises DataError when it is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from omni.data import builders
from omni.data.builders import DataError, Malformed, check_on_malformed, jsonl_records, validation_keys
from omni.data.template import messages_to_turns

MAX_RESPONSES = 9

Turns = list[tuple[str, str]]
Ranked = tuple[str, list[str], list[int]]


def _str(obj: Any, field: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get(field), str):
        raise ValueError(f"{field!r} is {type(obj[field]).__name__}, not a string" if field in obj else
                         f"no {field!r} field")
    return obj[field]


def parse_demonstration(obj: Any) -> Turns:
    """{"prompt", "response"} or {"messages": [...]} -> (user, assistant) turns; ValueError says why not."""
    if isinstance(obj, dict) and "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise ValueError("'messages' is not a list")
        return messages_to_turns(obj["messages"])
    return [(_str(obj, "prompt"), _str(obj, "response"))]


def parse_prompt(obj: Any) -> str:
    """Any object with a "prompt" string (a PPO prompt line, a demonstration, a preference) -> the prompt."""
    return _str(obj, "prompt")


def parse_preference(obj: Any) -> Ranked:
    """{"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"} -> (prompt, responses, ranks);
    ValueError says why not."""
    prompt = _str(obj, "prompt")
    if "chosen" in obj or "rejected" in obj:
        return prompt, [_str(obj, "chosen"), _str(obj, "rejected")], [0, 1]
    responses, ranks = obj.get("responses"), obj.get("ranking")
    if not (isinstance(responses, list) and 2 <= len(responses) <= MAX_RESPONSES
            and all(isinstance(r, str) for r in responses)):
        raise ValueError(f"'responses' must be a list of 2..{MAX_RESPONSES} strings (or give 'chosen' and "
                         f"'rejected'), got {responses!r:.200}")
    k = len(responses)
    if not isinstance(ranks, list) or len(ranks) != k:
        raise ValueError(f"'ranking' must be a list of {k} ranks, one per response, got {ranks!r}")
    if not all(type(r) is int and 0 <= r < k for r in ranks):  # type(): bools are not ranks
        raise ValueError(f"ranks must be ints in [0, {k}), got {ranks!r}")
    if len(set(ranks)) < 2:
        raise ValueError(f"all {k} responses are tied: no comparison to learn from")
    return prompt, list(responses), list(ranks)


def _jsonl_files(path: str, config_key: str) -> tuple[str, list[str]]:
    """(root, relative paths) of the .jsonl files at `path`: the file itself, or those under a directory."""
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    if not os.path.isdir(path):
        raise DataError(f"{config_key}={path!r}: no such file or directory")
    rels = builders._walk(path, (".jsonl",))
    if not rels:
        raise DataError(f"{config_key}={path!r}: no .jsonl files in it")
    return path, rels


def read_jsonl(path: str, parse: Callable[[Any], Any], on_malformed: str = "stop",
               config_key: str = "config.data.path") -> list[tuple[str, Any]]:
    """("relative/path:line", parse(object)) for each non-blank line of the .jsonl file(s) at `path`. A
    malformed line raises DataError naming file:line ("stop"), or is skipped ("skip") with one warning for
    the whole read, not one per line, so that a file with many bad lines stays readable."""
    malformed = Malformed(on_malformed, "line")
    root, rels = _jsonl_files(path, config_key)
    records = []
    for rel in rels:
        records.extend((f"{rel}:{n}", r) for n, r in jsonl_records(os.path.join(root, rel), parse, malformed))
    malformed.warn(path)
    return records


# ---------------------------------------------------------------------------------------------------------
# TFDS builders over JSONL files.


@dataclasses.dataclass(eq=False)
class FeedbackConfig(tfds.core.BuilderConfig):
    path: str = ""
    eval_path: str = ""
    on_malformed: str = "stop"


class _FeedbackBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Records parsed from JSONL files; validation is eval_path's records, or a stable hash of the keys."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing to download, so no checksums file; TFDS's lookup of it fails on 3.11
    FEATURES: dict[str, tfds.features.FeatureConnector]
    parse: Callable[[Any], Any]  # JSON object -> record
    columns: Callable[[Any], tuple]  # record -> FEATURES' values, in order
    decode: Callable[[dict], Any]  # stored example, as _python gives it -> record

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self.FEATURES),
                                     description=self.__doc__)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        cfg, parse = self.builder_config, type(self).parse
        train = read_jsonl(cfg.path, parse, cfg.on_malformed)
        if cfg.eval_path:
            validation = read_jsonl(cfg.eval_path, parse, cfg.on_malformed, "config.data.eval_path")
        else:
            held = validation_keys(key for key, _ in train)
            train, validation = [r for r in train if r[0] not in held], [r for r in train if r[0] in held]
        # TFDS cannot write an empty split: leave it out, and reading it says it is empty.
        splits = {name: records for name, records in (("train", train), ("validation", validation)) if records}
        if not splits:
            raise DataError(f"config.data.path={cfg.path!r}: no records")
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, records: list[tuple[str, Any]]) -> Iterator[tuple[str, dict]]:
        for key, record in records:
            yield key, dict(zip(self.FEATURES, self.columns(record)))


class Demonstrations(_FeedbackBuilder):
    """Supervised fine-tuning demonstrations: one example per dialogue, its users' and assistant's turns."""

    FEATURES = {"users": tfds.features.Sequence(tfds.features.Text()),
                "assistants": tfds.features.Sequence(tfds.features.Text())}
    parse = staticmethod(parse_demonstration)
    columns = staticmethod(lambda turns: ([u for u, _ in turns], [a for _, a in turns]))
    decode = staticmethod(lambda example: list(zip(example["users"], example["assistants"])))


class Preferences(_FeedbackBuilder):
    """Human-preference rankings: one example per prompt, its responses and their ranks (0 = best)."""

    FEATURES = {"prompt": tfds.features.Text(), "responses": tfds.features.Sequence(tfds.features.Text()),
                "ranks": tfds.features.Sequence(np.int32)}
    parse = staticmethod(parse_preference)
    columns = staticmethod(tuple)
    decode = staticmethod(lambda example: (example["prompt"], example["responses"], example["ranks"]))


def _config_name(path: str, eval_path: str, on_malformed: str) -> str:
    """Unique to both paths' files (builders._local_config_name of each) and the malformed-line policy."""
    names = [builders._local_config_name(p, "") for p in (path, eval_path) if p]
    digest = hashlib.md5("\n".join(names + [on_malformed]).encode()).hexdigest()[:12]
    return f"{names[0].rsplit('_', 1)[0]}_{digest}"


def _abspath(value: str, config_key: str) -> str:
    path = os.path.abspath(os.path.expanduser(value)) if value else ""
    _jsonl_files(path, config_key)  # raises unless it holds .jsonl files
    return path


def _prepared(data: ml_collections.ConfigDict, cls: type[_FeedbackBuilder]) -> _FeedbackBuilder:
    """Our builder for `data`, prepared under data.data_dir under builders.file_lock, as builders._prepared
    does: the first process to take the lock builds it, the others read what it built."""
    path = _abspath(data.path, "config.data.path")
    eval_path = _abspath(data.eval_path, "config.data.eval_path") if data.eval_path else ""
    fields = (("name", _config_name(path, eval_path, data.on_malformed)), ("path", path),
              ("eval_path", eval_path), ("on_malformed", data.on_malformed))
    key = (cls, FeedbackConfig, builders._data_dir(data), fields)

    def make() -> _FeedbackBuilder:
        with builders.tfds_quiet():
            return cls(config=FeedbackConfig(**dict(fields)), data_dir=key[2])

    if key not in builders._BUILDERS:
        builders._BUILDERS[key] = make()
    b = builders._BUILDERS[key]
    if b.info.splits:  # made after the dataset was: its description names the files
        return b
    with builders.file_lock(os.path.join(key[2], f".{b.name}-{b.builder_config.name}.lock")):
        # Made before the dataset existed, it describes no files even once another process wrote them.
        b = builders._BUILDERS[key] = make()
        builders.prepare(b)
    return b


# ---------------------------------------------------------------------------------------------------------
# Reading a split.


class Records(Sequence):
    """Random access to a split: item i is its example decoded to Python types (turns, or ranked responses).
    `where` names the split's files (or dataset) and the split, for messages about its examples."""

    def __init__(self, source: Any, decode: Callable[[dict], Any], where: str):
        self._source, self._decode, self.where = source, decode, where

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):  # IndexError, which ends iteration, where the source raises ValueError
            raise IndexError(f"index {index} out of range for {len(self)} records")
        try:
            return self._decode(_python(self._source[i]))
        except (ValueError, TypeError, KeyError) as e:  # parsed when read: random access reads no more
            raise DataError(f"{self.where}: example {i}: {e}") from None


def _python(value: Any) -> Any:
    """A TFDS value as JSON would hold it: bytes -> str, arrays -> lists, numpy scalars -> Python's."""
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_python(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _parse_tfds(parse: Callable[[Any], Any]) -> Callable[[dict], Any]:
    def decode(example: dict) -> Any:
        messages = example.get("messages")
        if isinstance(messages, dict):  # TFDS stores a Sequence({role, content}) column by column
            example["messages"] = [dict(zip(messages, row)) for row in zip(*messages.values())]
        return parse(example)
    return decode


def _records(data: ml_collections.ConfigDict, split: str, cls: type[_FeedbackBuilder]) -> Records:
    check_on_malformed(data.on_malformed)
    if data.name == "jsonl":
        b, decode = _prepared(data, cls), cls.decode
        key, path = (("config.data.eval_path", data.eval_path) if split == "validation" and data.eval_path
                     else ("config.data.path", data.path))
        where = f"{key}={path!r}: split {split!r}"  # the file(s) that hold the split
        if split not in b.info.splits:  # TFDS cannot write an empty split, so it is left out
            raise DataError(f"{where} is empty")
    else:
        b, decode = builders._tfds_builder(data), _parse_tfds(cls.parse)
        split = builders._tfds_split(b, split)
        where = f"config.data.name={data.name!r}: split {split!r}"
    try:
        source = b.as_data_source(split)
    except NotImplementedError as e:  # prepared as tfrecord: reading it needs TensorFlow
        raise DataError(f"{where}: not stored as array_record, which reading without TensorFlow needs: {e}"
                        ) from None
    if not len(source):
        raise DataError(f"{where} is empty")
    return Records(source, decode, where)


def demonstrations(data: ml_collections.ConfigDict, split: str) -> Records:
    """Random access to one split ('train' or 'validation') of demonstrations: item i is its
    (user, assistant) turns. data.name 'jsonl' reads data.path (and data.eval_path), prepared on first use."""
    return _records(data, split, Demonstrations)


def preferences(data: ml_collections.ConfigDict, split: str) -> Records:
    """Random access to one split of preferences: item i is (prompt, responses, ranks), rank 0 best."""
    return _records(data, split, Preferences)
