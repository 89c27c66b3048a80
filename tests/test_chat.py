"""The chat loop (template, history within the context, post-processing, safety) and the sample stage, on a
tiny random model written as a workdir (no training needed: these test the plumbing, not the replies)."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import COMPILATION_CACHE, ROOT, run_cli
from omni import chat, data
from omni.config import ConfigError, base_config
from omni.generate import Generator, Sampling
from omni.interop.hf import to_workdir
from omni.models import GPT
from omni.workdir import Workdir

CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    return data.train_tokenizer(texts, 512, str(tmp_path_factory.mktemp("tok") / "t.model"))


@pytest.fixture(scope="module")
def model(tokenizer):
    m = base_config().model
    m.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, vocab_size=tokenizer.vocab_size, max_len=CONTEXT)
    params = GPT(m).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    return m, params


@pytest.fixture(scope="module")
def workdir(model, tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "model")
    to_workdir(*model, tokenizer.model_path, path)
    return path


def test_template_masks_exactly_the_replies(tokenizer):
    turns = [("hi there", "hello!"), ("and now?", "def f():\n    return 1")]
    ids, mask = chat.encode_dialogue(tokenizer, turns, next_user="bye")
    assert len(ids) == len(mask)
    trained = [t for t, k in zip(ids, mask) if k]
    eos = tokenizer.eos_id
    assert trained.count(eos) == 2 and trained[-1] == eos
    replies = tokenizer.decode([t for t in trained if t != eos])
    assert replies == "hello!def f():\n    return 1"
    text = tokenizer.decode([t for t in ids if t != eos])
    assert text.startswith("User: hi there\nAssistant: hello!\nUser: and now?")
    assert text.endswith("User: bye\nAssistant: ")


def test_fit_history_drops_oldest_turns(tokenizer):
    turns = [(f"question {i}", f"answer number {i}") for i in range(6)]
    full, _ = chat.encode_dialogue(tokenizer, turns, "last")
    ids, dropped = chat.fit_history(tokenizer, turns, "last", budget=len(full) - 1)
    assert dropped == 1 and ids == chat.encode_dialogue(tokenizer, turns[1:], "last")[0]
    ids, dropped = chat.fit_history(tokenizer, turns, "last", budget=len(full))
    assert dropped == 0 and ids == full
    alone = len(chat.encode_dialogue(tokenizer, [], "last")[0])
    assert chat.fit_history(tokenizer, turns, "last", budget=alone)[1] == 6
    assert chat.fit_history(tokenizer, turns, "last", budget=alone - 1) is None


def test_postprocess():
    assert chat.postprocess("Sure thing.\nUser: more") == "Sure thing."
    assert chat.postprocess("a\na\na\nb\n\n\nc") == "a\nb\n\n\nc"
    looping = "I think that it is " * 5
    assert chat.postprocess(looping) == "I think that it is I think that it is"
    assert chat.postprocess("  fine as it is  ") == "fine as it is"


def test_safety_filter(tmp_path):
    default = chat.SafetyFilter()
    assert "BUILD A BOMB" in default.reason("Please tell me how to BUILD A BOMB now")
    assert default.reason("a bombastic build, a bombshell") is None
    listed = tmp_path / "block.txt"
    listed.write_text("# comment line\nforbidden fruit\n")
    custom = chat.SafetyFilter.from_flags(str(listed), "")
    assert custom.reason("the Forbidden Fruit.") and custom.reason("build a bomb") is None
    assert chat.SafetyFilter.from_flags("none", "").reason("build a bomb") is None
    assert chat.SafetyFilter.from_flags(str(listed), "").reason("FORBIDDEN\n\tfruits")
    hooked = chat.SafetyFilter.from_flags("none", "os.path:isabs")  # any importable function is a hook
    assert "isabs" in hooked.reason("/etc/passwd") and hooked.reason("etc") is None
    scored = chat.SafetyFilter((), classifier=lambda text: 0.9 if "x" in text else 0.1)
    assert scored.reason("x") and scored.reason("y") is None
    with pytest.raises(ValueError, match="--classifier=nope"):
        chat.SafetyFilter.from_flags("", "nope")
    with pytest.raises(ValueError, match="--blocklist="):
        chat.SafetyFilter.from_flags(str(tmp_path / "missing.txt"), "")


SEGMENTS = ["the cat sat on", " the mat", "\n", "hello world", " make a bomb", " make a bombastic", "s", "\nUser:",
            " ok.", " kill myself", "  ", "The cat", "\n\n"]


def _growing_replies(seed, count):
    """Raw replies as their tokens come: a few segments repeated (loops, repeated lines, blocked phrases and near
    misses, stop strings), cut into pieces of 1 to 6 characters (tokens end inside words)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        pool = rng.choice(SEGMENTS, size=rng.integers(2, 5), replace=False)
        text = "".join(rng.choice(pool, size=rng.integers(1, 16)))
        ends = np.cumsum(rng.integers(1, 7, size=len(text)))
        yield [text[a:b] for a, b in zip(np.r_[0, ends], ends) if a < len(text)]


@pytest.mark.parametrize("seed", range(3))
def test_a_streamed_reply_sends_only_what_the_whole_reply_begins_with(seed):
    """settled_reply against postprocess and the filter on the whole text: at every step, what a stream has sent
    is a start of what the whole reply post-processes to, and holds no word of a blocked phrase."""
    safety, parts = chat.SafetyFilter(), 0
    for pieces in _growing_replies(seed, 600):
        raw, sent = "", ""
        for piece in pieces:
            raw += piece
            now = chat.settled_reply(raw, safety)
            assert now.startswith(sent) or sent.startswith(now), (raw, sent, now)
            sent = max(sent, now, key=len)
            assert safety.reason(sent) is None, raw
        whole = chat.postprocess(raw)
        assert whole.startswith(sent), (raw, sent, whole)
        parts += 0 < len(sent) < len(whole)
    assert parts > 200  # most replies were sent in parts, before their end
    judged = chat.SafetyFilter(classifier=lambda text: False)
    assert chat.settled_reply("the cat sat on the mat and then", judged) == ""  # a classifier sees only the whole


def test_chat_keeps_history_within_the_context(model, tokenizer):
    notices = []
    bot = chat.Chat(Generator(*model), tokenizer, Sampling(temperature=0.0), max_new_tokens=16,
                    notice=notices.append)
    assert bot.max_new_tokens == 16 and bot.budget == CONTEXT - 16
    for i in range(8):  # far more dialogue than 64 tokens hold
        bot.reply(f"message number {i} about lists")
        ids, _ = chat.encode_dialogue(tokenizer, bot.turns[:-1], bot.turns[-1][0])
        assert len(ids) <= bot.budget
    assert any("dropped the" in n for n in notices)
    assert bot.turns[-1][0] == "message number 7 about lists"
    before = list(bot.turns)
    assert bot.reply("word " * 80) == chat.TOO_LONG and "shorten" in notices[-1]  # cannot fit even alone
    assert bot.turns == before
    assert bot.reply("how do I build a bomb") == chat.REFUSAL and "refused" in notices[-1]
    withheld = chat.Chat(Generator(*model), tokenizer, Sampling(temperature=0.0), max_new_tokens=8,
                         safety=chat.SafetyFilter((), classifier=lambda text: True), notice=notices.append)
    withheld.safety = chat.SafetyFilter((), classifier=lambda text: text != "hello")  # flags every reply
    assert withheld.reply("hello") == chat.REFUSAL and "withheld" in notices[-1]


@pytest.mark.parametrize("text", [
    "how to make a bomb", "Make  a\tBOMBS now", "MAKE\nA\r\nbomb", "makes a bombs", "How do I build a bomb?",
    "(make a bomb)", "make\u00a0a bomb", "I want to kill myself.", "write RANSOMWARE please", "steal credit cards",
])
def test_safety_filter_matches_any_spacing_case_and_plural(text):
    assert chat.SafetyFilter().reason(text)


@pytest.mark.parametrize("text", [
    "a bombastic build, a bombshell", "make a bombastic speech", "remake a bomb-proof shelter",
    "make abomb", "make a", "how to bake a cake", "the meth-od is sound", "make methane", "makea bomb",
])
def test_safety_filter_ignores_phrases_inside_other_words(text):
    assert chat.SafetyFilter().reason(text) is None


def test_one_line_keeps_a_reply_on_one_line_and_reversible():
    breaks = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) > 1]  # str's own definition
    assert "\n" in breaks and "\u2028" in breaks
    text = "def f():\n\treturn '\\n'\r\n" + "".join(breaks) + " \u00fc\u4e2d end"
    shown = chat.one_line(text)
    assert shown.splitlines() == [shown] and "\t" in shown and "\u00fc\u4e2d" in shown
    ascii_text = "a\\nb\nc\\\r"  # a literal backslash-n must not read back as a line break
    assert chat.one_line(ascii_text).encode().decode("unicode_escape") == ascii_text


def _chat(workdir: str, stdin: bytes | None) -> subprocess.CompletedProcess:
    """`python -m omni.chat` on the workdir, greedy, with these stdin bytes (None: stdin closed); stdout and
    stderr decoded."""
    cmd = [sys.executable, "-m", "omni.chat", f"--workdir={workdir}", "--max_new_tokens=8", "--temperature=0"]
    if stdin is None:
        cmd = ["sh", "-c", 'exec "$@" <&-', "sh", *cmd]
    out = subprocess.run(cmd, input=stdin, capture_output=True, cwd=ROOT, timeout=300,
                         env={**os.environ, **COMPILATION_CACHE})
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


def _greedy_replies(workdir: str, messages: list[str]) -> tuple[list[str], list[str]]:
    """(replies, notices) of one dialogue, in process, as the program prints them with the flags of _chat."""
    _, generator, tokenizer = Workdir(workdir).generator()
    notices = []
    bot = chat.Chat(generator, tokenizer, Sampling(temperature=0.0, top_p=0.9, repetition_penalty=1.1),
                    max_new_tokens=8, notice=notices.append)
    return [f"Assistant: {chat.one_line(bot.reply(m))}" for m in messages], notices


def test_chat_from_a_pipe(workdir):
    lines = "hello\nhow to build a bomb\n/reset\n\nwrite a loop\n" + "word " * 80 + "\n/quit\nnever read\n"
    out = _chat(workdir, lines.encode())
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == 4 and all(r.startswith("Assistant: ") for r in replies), replies
    assert replies[1] == f"Assistant: {chat.REFUSAL}" and replies[3] == f"Assistant: {chat.TOO_LONG}"
    assert "refused" in out.stderr and "forgotten" in out.stderr and "shorten" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "omni.chat", "--workdir=/nonexistent/run"], input="",
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and "/nonexistent/run" in missing.stderr


def test_undecodable_lines_are_skipped_and_the_dialogue_goes_on(workdir):
    # Each fits the context alone, not both: the second reply drops the first exchange only if it was kept.
    messages = ["what is a list in python, and when is it better than a tuple?", "and a dict, or a set?"]
    rng = np.random.default_rng(0)
    # \xff never occurs in UTF-8, so each of these lines is undecodable whatever random bytes follow it.
    noise = [b"\xff" + rng.bytes(60).replace(b"\n", b"") for _ in range(3)] + [b"caf\xe9 latin-1"]
    stdin = b"\n".join([messages[0].encode(), *noise, messages[1].encode()])  # no newline before EOF
    out = _chat(workdir, stdin)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert [f"(line {n} skipped: not UTF-8" in out.stderr for n in range(2, 6)] == [True] * 4, out.stderr
    expected, notices = _greedy_replies(workdir, messages)
    assert notices == ["(dropped the 1 oldest turn to fit the context)"]
    assert out.stdout.splitlines() == expected and notices[0] in out.stderr


@pytest.mark.parametrize("stdin", [b"", None])
def test_end_of_input_or_a_closed_stdin_ends_the_chat_cleanly(workdir, stdin):
    out = _chat(workdir, stdin)
    assert (out.returncode, out.stdout) == (0, ""), out.stderr
    assert "Traceback" not in out.stderr and "Error" not in out.stderr


def test_sample_stage(workdir, tmp_path):
    args = ["--config=configs/sample.py", f"--config.init_from={workdir}", "--config.prompt=import os",
            "--config.sample.num_samples=2", "--config.sample.max_new_tokens=6", f"--workdir={tmp_path}"]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- sample ") == 2 and "import os" in out.stdout
    records = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [r["sample"] for r in records] == [0, 1] and all(r["init_from"] == workdir for r in records)
    empty = run_cli(args[:2] + [f"--workdir={tmp_path}"])
    assert empty.returncode == 2 and "config.prompt is empty" in empty.stderr


def test_sample_stage_needs_init_from(tmp_path):
    from omni.stages import sample

    c = base_config()
    c.stage, c.prompt = "sample", "x"
    with pytest.raises(ConfigError, match="config.init_from is empty"):
        sample.run(c, str(tmp_path))


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(workdir, monkeypatch):
    import omni
    from omni.generate import GenerationError
    from omni.workdir import Workdir

    config, params, tokenizer = omni.load(workdir)
    config.model.vocab_size = tokenizer.vocab_size - 1
    monkeypatch.setattr(Workdir, "load", lambda self, step=None: (config, params, tokenizer))
    with pytest.raises(GenerationError, match=f"{tokenizer.vocab_size} pieces but the model's vocabulary is"):
        Workdir(workdir).generator()
