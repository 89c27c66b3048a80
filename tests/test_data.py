"""omni.data: lossless tokenizer, TFDS builders, grain packing / determinism / resume, eval set."""
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omni import data
from omni.config import base_config

TRICKY = [
    "def f(x):\n\tif x:  \n        return x\t# tab\n\n\n    \n",
    "class A:\r\n    pass\r\n\r\n",
    "  leading spaces, trailing spaces   \n\n",
    "unicode: \u00fc\u00f1\u00e9 \u4e2d\u6587 \U0001f600 \u2028 \x00\x7f\x0c end",
    "\t\t\n \n\t \t",
    "x = '''\n        eight\n    four\n'''  ",
    "",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = base_config()
    c.data.data_dir = str(tmp_path_factory.mktemp("data"))
    c.data.max_corpus_mb = 1.0
    c.model.vocab_size = 512
    c.train.batch_size, c.train.seq_len, c.train.eval_batches, c.train.seed = 4, 32, 2, 0
    c.data.shuffle_rows = 16  # small window: the resume tests cross several window boundaries
    return c


def _in_order(c):
    """The same config with the row shuffle off, so the packed stream can be read back in order."""
    c = c.copy_and_resolve_references()
    c.data.shuffle_rows = 0
    return c


@pytest.fixture(scope="module")
def tokenizer(config):
    return data.get_tokenizer(config)


@pytest.fixture(scope="module")
def jsonl_config(config, tmp_path_factory):
    """A tiny corpus of unique one-line documents, so each document is recognisable in the stream."""
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "word " * (i % 7)}) + "\n" for i in range(40)))
    c = config.copy_and_resolve_references()
    c.data.name, c.data.path = "text", str(path)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _stream(batches, row=None):
    """The token stream one row of successive batches was cut from (row None: the batches' rows one after
    another, as in eval): inputs concatenated, plus the last target."""
    rows = [b["inputs"].reshape(-1) if row is None else b["inputs"][row] for b in batches]
    last = batches[-1]["targets"][-1 if row is None else row, -1]
    return np.append(np.concatenate(rows), last)


def _documents_in(stream, tokenizer):
    """The complete documents of a stream (between EOS tokens), decoded."""
    cuts = np.flatnonzero(stream == tokenizer.eos_id)
    return [tokenizer.decode(stream[a + 1:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _row_documents(batches, row, tokenizer):
    """The documents packed into one row of the global batch, in order: a row's stream starts at a document
    and every complete one ends with EOS."""
    stream = _stream(batches, row)
    cuts = [-1] + np.flatnonzero(stream == tokenizer.eos_id).tolist()
    return [tokenizer.decode(stream[a + 1:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _texts(config, split):
    source = data.documents(config.data, split)
    return [source[i]["text"] for i in range(len(source))]


# --- tokenizer --------------------------------------------------------------------------------------------


def test_tokenizer_ids_and_vocab(tokenizer):
    assert tokenizer.vocab_size == 512
    assert len({tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id}) == 3


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trip_tricky(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_round_trip_stdlib_files(tokenizer):
    root = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "tabnanny.py", "json/encoder.py", "email/_header_value_parser.py"):
        with open(os.path.join(root, name), encoding="utf-8", newline="") as f:
            text = f.read()
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text)  # it compresses


def test_train_tokenizer_deterministic_and_save(config, tmp_path):
    texts = _texts(config, "train")[:10]
    a = data.train_tokenizer(texts, 512, str(tmp_path / "a" / "t.model"))
    b = data.train_tokenizer(texts, 512, str(tmp_path / "b" / "t.model"))
    assert open(a.model_path, "rb").read() == open(b.model_path, "rb").read()
    saved = data.Tokenizer(a.save(str(tmp_path / "saved")))
    assert saved.model_path == str(tmp_path / "saved" / "tokenizer.model")
    assert saved.encode(TRICKY[0]) == a.encode(TRICKY[0])


def test_get_tokenizer_reloads(config, tokenizer):
    again = data.get_tokenizer(config)
    assert again.model_path == tokenizer.model_path and again.encode(TRICKY[0]) == tokenizer.encode(TRICKY[0])


# --- builders ---------------------------------------------------------------------------------------------


def _paths_and_texts(config, split):
    source = data.builder(config.data).as_data_source(split)
    return [(source[i]["path"].decode(), source[i]["text"].decode()) for i in range(len(source))]


def test_stdlib_splits_are_real_disjoint_and_deterministic(config, tmp_path):
    data.documents(config.data, "train")  # prepares
    train, valid = _paths_and_texts(config, "train"), _paths_and_texts(config, "validation")
    assert train and valid
    assert not {p for p, _ in train} & {p for p, _ in valid}
    root = sysconfig.get_paths()["stdlib"]
    for path, text in train[:5] + valid:
        with open(os.path.join(root, path), encoding="utf-8", newline="") as f:
            assert f.read() == text
    size = sum(len(t.encode()) for _, t in train + valid)
    assert 1e6 <= size < 1.5e6  # the cap, overshot by at most the last file

    other = config.copy_and_resolve_references()
    other.data.data_dir = str(tmp_path)
    data.documents(other.data, "train")
    assert _paths_and_texts(other, "train") == train and _paths_and_texts(other, "validation") == valid


def test_stdlib_cap_is_part_of_identity(config):
    uncapped = config.copy_and_resolve_references()
    uncapped.data.max_corpus_mb = 0.0
    assert data.builder(uncapped.data).data_dir != data.builder(config.data).data_dir


def test_local_text_jsonl_and_txt(config, tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\twith a tab\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"body": "line one"}\n\n{"body": "line two \\u00fc"}\n')
    c = config.copy_and_resolve_references()
    c.data.name, c.data.path, c.data.text_key = "text", str(tmp_path), "body"
    train, valid = _texts(c, "train"), _texts(c, "validation")
    assert sorted(train + valid) == sorted(["first document\n\twith a tab\n", "line one", "line two \u00fc"])
    assert len(valid) >= 1 and len(train) >= 1


def _text_corpus(config, path, on_malformed="stop", data_dir=None):
    c = config.copy_and_resolve_references()
    c.data.name, c.data.path, c.data.on_malformed = "text", str(path), on_malformed
    c.data.data_dir = str(data_dir or path.parent / "data")
    return c


def test_text_corpus_line_not_utf8_stops_or_is_skipped(config, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(20)]
    lines[6] = b'{"text": "caf\xe9"}'  # latin-1, not UTF-8
    lines[9] = b'{"body": "no text field"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(data.DataError, match=f"^{path}:7: .*utf-8.*on_malformed='stop'"):
        data.documents(_text_corpus(config, path).data, "train")
    c = _text_corpus(config, path, "skip")
    texts = _texts(c, "train") + _texts(c, "validation")
    assert sorted(texts) == sorted(f"doc {i}" for i in range(20) if i not in (6, 9))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 malformed document(s)" in err[0]
    assert f"{path}:7: " in err[0] and f"{path}:10: no 'text' field" in err[0]


def test_text_corpus_file_not_utf8_stops_or_is_skipped(config, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = {f"f{i}.txt": f"file {i}\n" * 3 for i in range(6)}
    for name, text in good.items():
        (corpus / name).write_text(text)
    (corpus / "bad.txt").write_bytes(b"caf\xe9\n")
    skip = _text_corpus(config, corpus, "skip")
    assert sorted(_texts(skip, "train") + _texts(skip, "validation")) == sorted(good.values())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 1 malformed document(s)" in err[0] and str(corpus / "bad.txt") in err[0]
    # The policy is part of the dataset's identity: the corpus built by 'skip' is not reused by 'stop'.
    with pytest.raises(data.DataError, match=f"^{corpus / 'bad.txt'}: not readable UTF-8"):
        data.documents(_text_corpus(config, corpus).data, "train")


@pytest.mark.parametrize("text", ["".join(f"line {i} of one file\n" for i in range(300)), "one line, no newline " * 9])
def test_one_file_corpus_is_cut_into_documents(config, tokenizer, tmp_path, text):
    path = tmp_path / "only.txt"
    path.write_text(text)
    c = _text_corpus(config, path)
    train, valid = _texts(c, "train"), _texts(c, "validation")  # prepares
    pieces = sorted(_paths_and_texts(c, "train") + _paths_and_texts(c, "validation"),
                    key=lambda piece: int(piece[0].split("[")[1].split(":")[0]))
    assert "".join(t for _, t in pieces) == text  # the whole file, each character once
    assert 1 <= len(valid) < len(train) and len(pieces) > 50
    assert "\n" not in text or all(t.endswith("\n") for _, t in pieces)  # cut at line starts where it has lines
    (batch,) = _take(data.train_iterator(c, tokenizer), 1)
    assert len({tuple(row) for row in batch["inputs"]}) == len(batch["inputs"])  # rows read different text


def test_one_character_corpus_is_an_error(config, tmp_path):
    path = tmp_path / "only.txt"
    path.write_text("x")
    with pytest.raises(data.DataError, match=r"one document \(only.txt\) of 1 character\(s\): too short"):
        data.documents(_text_corpus(config, path).data, "train")


def test_validation_keys_never_take_every_key():
    def hashes_into_validation(key):  # the documented rule: md5 of the key, mod 100, below 3
        return int(hashlib.md5(key.encode()).hexdigest(), 16) % 100 < 3

    both = [k for k in (f"doc{i}" for i in range(1000)) if hashes_into_validation(k)][:2]
    held = data.validation_keys(both)
    assert len(held) == 1 and held < set(both)


def test_preparing_a_corpus_says_one_line(config, tmp_path):
    """TFDS's own banner speaks of a download, its progress bars and its custom-config warning are noise."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    code = ("import sys; from omni.config import base_config; from omni import data; c = base_config().data; "
            "c.name, c.path, c.data_dir = 'text', sys.argv[1], sys.argv[2]; data.documents(c, 'train')")
    args = [sys.executable, "-c", code, str(tmp_path / "docs.jsonl"), str(tmp_path / "data")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("preparing local_text/") and first.stdout.count("\n") == 1
    assert first.stderr == ""
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.stdout == again.stderr == ""


def test_processes_sharing_data_dir_build_once(config, tmp_path):
    """Processes that start together on one data_dir (many per host, or a shared filesystem) take turns: one
    builds the corpus, the others read it, and a builder made before it existed is made again."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    c = config.copy_and_resolve_references()
    c.data.name, c.data.path, c.data.data_dir = "text", str(tmp_path / "docs.jsonl"), str(tmp_path / "data")
    early = data.builder(c.data)  # made here before anyone built the corpus
    assert not early.is_prepared()
    code = ("import sys; from omni.config import base_config; from omni import data; c = base_config().data; "
            "c.name, c.path, c.data_dir = 'text', sys.argv[1], sys.argv[2]; print(len(data.documents(c, 'train')))")
    procs = [subprocess.Popen([sys.executable, "-c", code, c.data.path, c.data.data_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    sizes = {int(out.split()[-1]) for out, _ in outputs}
    assert sizes == {len(_texts(c, "train"))} and 40 < sizes.pop() < 50


def test_missing_path_raises(config, tmp_path):
    c = config.copy_and_resolve_references()
    c.data.name, c.data.path = "text", str(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="config.data.path.*nowhere"):
        data.documents(c.data, "train")


def test_unprepared_tfds_dataset_raises(config, tmp_path):
    c = config.copy_and_resolve_references()
    c.data.name, c.data.data_dir = "tiny_shakespeare", str(tmp_path)
    with pytest.raises(data.DataError, match="tiny_shakespeare.*not prepared"):
        data.documents(c.data, "train")


def test_prepared_tfds_dataset_by_name(config):
    """Any prepared TFDS dataset is read by name: here our stdlib corpus, through the generic path."""
    expected = _texts(config, "validation")  # prepares it
    b = data.builder(config.data)
    c = config.copy_and_resolve_references()
    c.data.name = f"{b.name}/{b.builder_config.name}"
    assert _texts(c, "validation") == expected


def test_vocab_mismatch_raises(config, tokenizer, jsonl_config):
    c = config.copy_and_resolve_references()
    c.model.vocab_size = 1024
    with pytest.raises(data.DataError, match="vocab_size=1024.*vocab_size=512"):
        data.train_iterator(c, tokenizer)
    with pytest.raises(data.DataError, match="config.model.vocab_size=512"):
        data.get_tokenizer(jsonl_config)  # 40 short lines cannot fill 512 tokens


# --- training batches -------------------------------------------------------------------------------------


def _pieces(stream, eos_id):
    """A row's stream cut after each EOS: whole documents (EOS last), then the start of the next one."""
    cuts = np.flatnonzero(stream == eos_id) + 1
    return [p.tolist() for p in np.split(stream, cuts) if len(p)]


def test_batches_pack_shuffled_documents(config, tokenizer):
    config = _in_order(config)
    batches = _take(data.train_iterator(config, tokenizer), 500)  # long files: a few whole ones per row
    for b in batches:
        assert set(b) == {"inputs", "targets", "weights"}  # data.separate_documents=False: nothing else
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 32)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
        assert np.all(b["weights"] == 1)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for b, after in zip(batches[:-1], batches[1:]):  # a row continues in the next batch, sharing one token
        np.testing.assert_array_equal(b["targets"][:, -1], after["inputs"][:, 0])
    # Reference packing in plain Python: each row is training documents, each followed by EOS, concatenated
    # from the row's first token on.
    encoded = [tokenizer.encode(t) + [tokenizer.eos_id] for t in _texts(config, "train")]
    firsts, whole = [], 0
    for row in range(4):
        pieces = _pieces(_stream(batches, row), tokenizer.eos_id)
        which = [[i for i, e in enumerate(encoded) if e[:len(p)] == p] for p in pieces]
        assert all(len(w) == 1 for w in which), [len(w) for w in which]
        assert all(len(p) == len(encoded[w[0]]) for p, w in zip(pieces[:-1], which))  # whole but the last
        firsts.append(which[0][0])
        whole += len(pieces) - 1
    assert whole >= 4
    assert len(set(firsts)) == 4 and sorted(firsts) != list(range(min(firsts), min(firsts) + 4))  # shuffled


def test_epochs_are_reshuffled_permutations(jsonl_config, tokenizer):
    """Document i of the shuffled order is row i mod B's (i // B)-th: together the rows go through every
    epoch's permutation, and each epoch has its own."""
    jsonl_config = _in_order(jsonl_config)
    train = _texts(jsonl_config, "train")
    batches = _take(data.train_iterator(jsonl_config, tokenizer), 40)
    rows = [_row_documents(batches, row, tokenizer) for row in range(4)]
    n = len(train)
    order = [rows[i % 4][i // 4] for i in range(3 * n)]
    epochs = [order[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(train) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_row_shuffle_permutes_rows_within_windows(config, tokenizer):
    """Each row's stream is shuffled within windows of shuffle_rows / batch_size = 4 of its rows."""
    def rows(c, n):
        return np.stack([b["inputs"] for b in _take(data.train_iterator(c, tokenizer), n)])  # [batch, row, L]

    shuffled, ordered = rows(config, 12), rows(_in_order(config), 12)
    assert not np.array_equal(shuffled, ordered)
    for row in range(4):
        for start in range(0, 12, 4):
            window = slice(start, start + 4)
            assert sorted(map(bytes, shuffled[window, row])) == sorted(map(bytes, ordered[window, row]))


def test_same_seed_same_batches_other_seed_differs(config, tokenizer):
    a = _take(data.train_iterator(config, tokenizer), 5)
    b = _take(data.train_iterator(config, tokenizer), 5)
    c = config.copy_and_resolve_references()
    c.train.seed = 1
    assert _equal(a, b)
    assert not _equal(a, _take(data.train_iterator(c, tokenizer), 5))


def test_resume_from_state_and_orbax(config, tokenizer, tmp_path):
    it = data.train_iterator(config, tokenizer)
    _take(it, 3)
    state = it.get_state()
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 2)

    fresh = data.train_iterator(config, tokenizer)
    fresh.set_state(state)
    assert _equal(_take(fresh, 2), expected)

    fresh = data.train_iterator(config, tokenizer)
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _equal(_take(fresh, 2), expected)


def test_resume_anywhere_across_epochs(jsonl_config, tokenizer):
    """Short documents: states inside and between documents and across epoch boundaries."""
    it = data.train_iterator(jsonl_config, tokenizer)
    states, batches = [], []
    for _ in range(40):
        states.append(it.get_state())
        batches.append(next(it))
    for step in range(0, 38, 3):
        fresh = data.train_iterator(jsonl_config, tokenizer)
        fresh.set_state(json.loads(json.dumps(states[step])))  # as a checkpoint stores it
        assert _equal(_take(fresh, 2), batches[step:step + 2]), step


def test_global_batch_does_not_depend_on_processes(config, tokenizer):
    """Two processes loading rows [0, 1] and [2, 3] get exactly the halves of the one-process batches."""
    full = _take(data.train_iterator(config, tokenizer), 10)
    halves = [data.train_iterator(config, tokenizer, rows) for rows in ([0, 1], [2, 3])]
    for b in full:
        parts = [next(h) for h in halves]
        for k in b:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), b[k])
    with pytest.raises(data.DataError, match=r"rows \[2, 3\].*rows \[0, 1\].*same mesh"):
        halves[0].set_state(halves[1].get_state())  # a checkpoint of other rows is refused


@pytest.fixture(scope="module")
def many_docs_config(config, tmp_path_factory):
    """400 unique one-line documents: enough that the first batches stay within the first epoch."""
    path = tmp_path_factory.mktemp("many") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "word " * (i % 5)}) + "\n" for i in range(400)))
    c = _in_order(config)
    c.data.name, c.data.path = "text", str(path)
    return c


def test_process_reads_only_its_rows_documents(many_docs_config, tokenizer, monkeypatch):
    from omni.data import pipelines

    def rows_documents(rows, n):
        batches = _take(data.train_iterator(many_docs_config, tokenizer), n)
        return {d for row in rows for d in _row_documents(batches, row, tokenizer)}

    read = []

    class Recording(data.TextSource):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            read.append(item["text"])
            return item

    source = data.documents(many_docs_config.data, "train")
    monkeypatch.setattr(pipelines, "documents", lambda *_: Recording(source, "text"))
    _take(data.train_iterator(many_docs_config, tokenizer, [2, 3]), 4)
    monkeypatch.undo()
    assert len(read) >= 4
    assert set(read) <= rows_documents([2, 3], 12)
    assert not set(read) & rows_documents([0, 1], 12)


# --- documents kept apart (data.separate_documents) -------------------------------------------------------


def _separate(c):
    c = c.copy_and_resolve_references()
    c.data.separate_documents = True
    return c


def _check_segments(batch, tokenizer, train=None):
    """Segments start at each EOS input and at the row start, positions count from 0 there, padding is
    segment 0; with `train`, every segment inside a row is EOS + one whole training document."""
    inputs, segments, positions = batch["inputs"], batch["segment_ids"], batch["positions"]
    assert segments.dtype == positions.dtype == np.int32 and segments.shape == positions.shape == inputs.shape
    for row in range(inputs.shape[0]):
        real = segments[row] > 0
        seg, pos, tokens = segments[row][real], positions[row][real], inputs[row][real]
        assert np.all(inputs[row][~real] == tokenizer.pad_id) and np.all(positions[row][~real] == 0)
        if not real.any():
            continue
        new = np.diff(seg) != 0
        assert seg[0] == 1 and np.all(np.diff(seg) <= 1)  # 1, 2, ... per document
        np.testing.assert_array_equal(new, tokens[1:] == tokenizer.eos_id)  # a new segment starts at EOS
        starts = np.concatenate([[True], new])
        assert np.all(pos[starts] == 0) and np.all(pos[1:][~new] == pos[:-1][~new] + 1)
        for s in range(2, seg.max()) if train is not None else ():
            assert tokenizer.decode(tokens[seg == s][1:]) in train


def test_separate_documents_adds_segments_and_positions(jsonl_config, tokenizer):
    plain = _take(data.train_iterator(jsonl_config, tokenizer), 6)
    separate = _take(data.train_iterator(_separate(jsonl_config), tokenizer), 6)
    train = _texts(jsonl_config, "train")
    for p, b in zip(plain, separate):
        assert set(b) == set(p) | {"segment_ids", "positions"}
        assert all(np.array_equal(p[k], b[k]) for k in p)  # the same batches, two more keys
        _check_segments(b, tokenizer, train)
    assert max(b["segment_ids"].max() for b in separate) >= 3  # short documents: whole ones inside rows


def test_separate_documents_eval(jsonl_config, tokenizer):
    (batch,) = data.eval_batches(_separate(jsonl_config), tokenizer)
    (plain,) = data.eval_batches(jsonl_config, tokenizer)
    assert all(np.array_equal(plain[k], batch[k]) for k in plain)
    assert np.any(batch["segment_ids"] == 0)  # the split is short: padding
    _check_segments(batch, tokenizer, _texts(jsonl_config, "validation"))


# --- evaluation -------------------------------------------------------------------------------------------


def test_eval_batches_fixed(config, tokenizer):
    a, b = data.eval_batches(config, tokenizer), data.eval_batches(config, tokenizer)
    assert len(a) == 2 and _equal(a, b)
    assert all(x["inputs"].shape == (4, 32) and np.all(x["weights"] == 1) for x in a)
    valid = _texts(config, "validation")
    expected = tokenizer.encode(valid[0]) + [tokenizer.eos_id]
    assert _stream(a)[:len(expected)].tolist() == expected[:2 * 4 * 32 + 1]
    halves = [data.eval_batches(config, tokenizer, rows) for rows in ([0, 1], [2, 3])]
    for full, p0, p1 in zip(a, *halves):
        np.testing.assert_array_equal(np.concatenate([p0["inputs"], p1["inputs"]]), full["inputs"])


def test_eval_batches_short_split_padded(jsonl_config, tokenizer):
    valid = _texts(jsonl_config, "validation")
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in valid)
    assert tokens < 4 * 32  # one batch, partly padding
    (batch,) = data.eval_batches(jsonl_config, tokenizer)
    assert batch["weights"].sum() == tokens - 1
    assert np.all(batch["targets"][batch["weights"] == 0] == tokenizer.pad_id)


def test_unigram_perplexity(config, tokenizer):
    ppl = data.unigram_perplexity(config, tokenizer)
    assert math.isfinite(ppl) and 1 < ppl < tokenizer.vocab_size
