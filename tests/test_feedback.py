"""Feedback data: demonstration and preference formats, JSONL reading, and their TFDS array_record builders."""
import json
import os

import ml_collections
import pytest
import tensorflow_datasets as tfds

from omni.data import feedback
from omni.data.builders import DataError


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _data(tmp_path, path, eval_path="", on_malformed="stop", name="jsonl"):
    return ml_collections.ConfigDict(dict(name=name, path=path, eval_path=eval_path, on_malformed=on_malformed,
                                          data_dir=str(tmp_path / "data")))


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


# --- formats ------------------------------------------------------------------------------------------------


def test_demonstration_forms_agree():
    pair = feedback.parse_demonstration({"prompt": "Hi", "response": "Hello"})
    chat = feedback.parse_demonstration({"messages": [_user("Hi"), _assistant("Hello")]})
    assert pair == chat == [("Hi", "Hello")]


def test_multi_turn_messages():
    messages = [_user("a"), _assistant("b"), _user("c"), _assistant("d")]
    assert feedback.parse_demonstration({"messages": messages}) == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize("obj, reason", [
    ({"prompt": "p"}, "no 'response'"),
    ({"prompt": 1, "response": "r"}, "'prompt' is int"),
    ({"messages": [_user("a")]}, "pairs"),
    ({"messages": [_assistant("a"), _user("b")]}, "role 'assistant'"),
    ({"messages": [_user("a"), _assistant(3)]}, "message 1"),
    ({"messages": "hi"}, "not a list"),
    (["prompt"], "JSON object"),
])
def test_bad_demonstrations(obj, reason):
    with pytest.raises(ValueError, match=reason):
        feedback.parse_demonstration(obj)


def test_preference_forms_agree():
    pair = feedback.parse_preference({"prompt": "p", "chosen": "good", "rejected": "bad"})
    ranked = feedback.parse_preference({"prompt": "p", "responses": ["good", "bad"], "ranking": [0, 1]})
    assert pair == ranked == ("p", ["good", "bad"], [0, 1])


def test_ties_kept_in_ranks():
    obj = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [1, 0, 1, 3]}
    assert feedback.parse_preference(obj) == ("p", ["a", "b", "c", "d"], [1, 0, 1, 3])


@pytest.mark.parametrize("k, ok", [(1, False), (2, True), (9, True), (10, False)])
def test_number_of_responses_bounds(k, ok):
    obj = {"prompt": "p", "responses": [f"r{i}" for i in range(k)], "ranking": list(range(k))}
    if ok:
        assert len(feedback.parse_preference(obj)[1]) == k
    else:
        with pytest.raises(ValueError, match="2..9"):
            feedback.parse_preference(obj)


@pytest.mark.parametrize("obj, reason", [
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0]}, "one per response"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, -1]}, "ints in"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1.0]}, "ints in"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, True]}, "ints in"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}, "ints in"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 1, 1]}, "tied"),
    ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "string"),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "'prompt' is list"),
    ({"prompt": "p", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, "list of 2..9"),
])
def test_bad_preferences(obj, reason):
    with pytest.raises(ValueError, match=reason):
        feedback.parse_preference(obj)


# --- reading JSONL ------------------------------------------------------------------------------------------


_GOOD = {"prompt": "p", "response": "r"}
_MALFORMED = [  # (line, what the error says)
    ("{not json", "Expecting"),
    ('{"prompt": "p"}', "no 'response'"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}', "role"),
    ('[1, 2]', "JSON object"),
]


@pytest.mark.parametrize("line, reason", _MALFORMED)
def test_malformed_line_stops_naming_file_and_line(tmp_path, line, reason):
    path = _write(tmp_path / "sub" / "d.jsonl", [_GOOD, "", _GOOD, line, _GOOD])
    with pytest.raises(DataError, match=f"{path}:4: .*{reason}"):
        feedback.read_jsonl(str(tmp_path), feedback.parse_demonstration)


def test_not_utf8_line_is_one_malformed_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_GOOD).encode() + b'\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=f"{path}:2: "):
        feedback.read_jsonl(str(path), feedback.parse_demonstration)
    assert len(feedback.read_jsonl(str(path), feedback.parse_demonstration, "skip")) == 1


def test_malformed_lines_skipped_with_one_warning(tmp_path, capsys):
    lines = [_GOOD] + [line for line, _ in _MALFORMED] + ["", _GOOD]
    path = _write(tmp_path / "d.jsonl", lines)
    records = feedback.read_jsonl(path, feedback.parse_demonstration, on_malformed="skip")
    assert records == [("d.jsonl:1", [("p", "r")]), ("d.jsonl:7", [("p", "r")])]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 4 malformed" in err[0]
    assert all(f"{path}:{n}: " in err[0] for n in (2, 3, 4, 5))


def test_directory_keys_sorted_and_relative(tmp_path):
    _write(tmp_path / "b.jsonl", [_GOOD])
    _write(tmp_path / "a" / "x.jsonl", [_GOOD, _GOOD])
    (tmp_path / "notes.txt").write_text("not read")
    keys = [k for k, _ in feedback.read_jsonl(str(tmp_path), feedback.parse_demonstration)]
    assert keys == ["a/x.jsonl:1", "a/x.jsonl:2", "b.jsonl:1"]


def test_unknown_on_malformed_value(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_GOOD])
    with pytest.raises(DataError, match="config.data.on_malformed='ignore'"):
        feedback.read_jsonl(path, feedback.parse_demonstration, on_malformed="ignore")
    with pytest.raises(DataError, match="config.data.on_malformed='ignore'"):
        feedback.demonstrations(_data(tmp_path, path, on_malformed="ignore"), "train")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="config.data.path=.*nowhere"):
        feedback.demonstrations(_data(tmp_path, str(tmp_path / "nowhere")), "train")
    path = _write(tmp_path / "d.jsonl", [_GOOD])
    with pytest.raises(DataError, match="config.data.eval_path=.*nowhere"):
        feedback.preferences(_data(tmp_path, path, eval_path=str(tmp_path / "nowhere")), "train")


# --- TFDS builders ------------------------------------------------------------------------------------------


def _demos(n):
    return [{"messages": [_user(f"q{i}"), _assistant(f"a{i} ü"), _user("more"), _assistant(f"b{i}")]}
            if i % 2 else {"prompt": f"q{i}", "response": f"a{i} ü"} for i in range(n)]


def _prefs(n):
    return [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} if i % 2 else
            {"prompt": f"p{i}", "responses": ["x", "y", f"z{i}"], "ranking": [1, 0, 1]} for i in range(n)]


def _sorted(records):
    return sorted(records, key=repr)


def test_builders_round_trip_with_eval_path(tmp_path):
    path = _write(tmp_path / "train.jsonl", _demos(6))
    eval_path = _write(tmp_path / "eval" / "e.jsonl", _demos(3)[1:])
    data = _data(tmp_path, path, eval_path)
    train = feedback.demonstrations(data, "train")
    assert _sorted(train) == _sorted(feedback.parse_demonstration(d) for d in _demos(6))
    assert _sorted(feedback.demonstrations(data, "validation")) == _sorted(
        feedback.parse_demonstration(d) for d in _demos(3)[1:])
    assert os.path.exists(os.path.join(data.data_dir, "demonstrations"))
    assert any(f.endswith(".array_record-00000-of-00001") for _, _, files in os.walk(data.data_dir) for f in files)

    # Messages about a split's examples name the file that holds it.
    assert train.where == f"config.data.path={path!r}: split 'train'"
    validation = feedback.demonstrations(data, "validation")
    assert validation.where == f"config.data.eval_path={eval_path!r}: split 'validation'"

    path = _write(tmp_path / "prefs.jsonl", _prefs(5))
    eval_path = _write(tmp_path / "prefs_eval.jsonl", _prefs(2))
    train = feedback.preferences(_data(tmp_path, path, eval_path), "train")
    assert len(train) == 5 and _sorted(train) == _sorted(feedback.parse_preference(p) for p in _prefs(5))
    assert all(type(k) is int for _, _, ranks in train for k in ranks)
    assert ("p0", ["x", "y", "z0"], [1, 0, 1]) in list(train)


def test_hash_split_without_eval_path(tmp_path):
    lines = _prefs(60)
    path = _write(tmp_path / "p.jsonl", lines)
    data = _data(tmp_path, path)
    train, validation = list(feedback.preferences(data, "train")), list(feedback.preferences(data, "validation"))
    held = feedback.validation_keys(f"p.jsonl:{n}" for n in range(1, 61))
    expected = [feedback.parse_preference(p) for n, p in enumerate(lines, 1) if f"p.jsonl:{n}" in held]
    assert held and _sorted(validation) == _sorted(expected)
    assert len(train) + len(validation) == 60 and not set(map(repr, train)) & set(map(repr, validation))


def test_editing_file_rebuilds(tmp_path):
    path = tmp_path / "d.jsonl"
    data = _data(tmp_path, _write(path, _demos(3)))
    first = feedback.demonstrations(data, "train")
    name = feedback._prepared(data, feedback.Demonstrations).builder_config.name
    _write(path, _demos(4))
    os.utime(path, ns=(1, 1))  # a new mtime even where the filesystem clock is coarse
    second = feedback.demonstrations(data, "train")
    assert feedback._prepared(data, feedback.Demonstrations).builder_config.name != name
    assert len(first) + 1 == len(second)


def test_skip_policy_in_builder_and_empty_split(tmp_path, capsys):
    path = _write(tmp_path / "d.jsonl", [_GOOD, "{oops"])
    data = _data(tmp_path, path, on_malformed="skip")
    assert list(feedback.demonstrations(data, "train")) == [[("p", "r")]]
    assert "skipped 1 malformed" in capsys.readouterr().err
    with pytest.raises(DataError, match="'validation' is empty"):
        feedback.demonstrations(data, "validation")
    with pytest.raises(DataError, match=f"{path}:2: "):
        feedback.demonstrations(_data(tmp_path, path), "train")


class MixedFields(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS dataset of someone else's: both forms' fields, stored the TFDS way (messages by column)."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "prompt": text, "chosen": text, "rejected": text,
            "messages": tfds.features.Sequence({"role": text, "content": text})}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield "good", {"prompt": "p", "chosen": "c", "rejected": "r", "messages": [_user("u"), _assistant("a")]}
        yield "bad", {"prompt": "q", "chosen": "c", "rejected": "r", "messages": [_assistant("a"), _user("u")]}


def test_prepared_tfds_dataset(tmp_path):
    MixedFields(data_dir=str(tmp_path / "data")).download_and_prepare(file_format="array_record")
    data = _data(tmp_path, "", name="mixed_fields")
    assert _sorted(feedback.preferences(data, "train")) == [("p", ["c", "r"], [0, 1]), ("q", ["c", "r"], [0, 1])]
    demos = feedback.demonstrations(data, "train")
    good = [i for i in range(len(demos)) if feedback._python(demos._source[i])["prompt"] == "p"][0]
    assert demos[good] == [("u", "a")]
    with pytest.raises(DataError, match=f"'mixed_fields'.*example {1 - good}.*role"):
        demos[1 - good]
