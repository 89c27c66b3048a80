"""What the serve tests share: a tiny random model's workdir, the truth it must equal (omni.generate's Generator
and omni.chat's Chat), and the API served by uvicorn in a thread over it, with hooks that slow or hold the engine's
steps. Its fixtures reach tests/test_serve.py and tests/test_serve_page.py as a plugin (tests/conftest.py)."""
import glob
import json
import os
import socket
import threading
import time

import openai
import pytest
import uvicorn

from decoding_reference import GREEDY, spread_params, tiny
from omni import chat, data, serve
from omni.generate import stop_sequences
from omni.interop.hf import to_workdir
from omni.workdir import Workdir

CONTEXT = 64
NEW = 12  # greedy completions' max_tokens
KEY = "test-key"
SLOTS, QUEUE = 3, 6
WITHHELD = "tell me about the dict"  # the test server's classifier flags the greedy reply to this message
STORY = "tell me a story"  # the tiny model's greedy reply to it has 8 words (most of its replies have 2 to 5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    tokenizer = data.train_tokenizer(texts, 512, str(tmp_path_factory.mktemp("tok") / "t.model"))
    m = tiny("gpt2", vocab_size=tokenizer.vocab_size, max_len=CONTEXT)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    to_workdir(m, spread_params(m, seed=5), tokenizer.model_path, path)
    return path


class Truth:
    """What omni.generate and omni.chat answer, from the workdir's own Generator."""

    def __init__(self, workdir):
        _, self.generator, self.tokenizer = Workdir(workdir).generator()

    def completions(self, prompts, max_tokens=NEW):
        """(text, logprobs, finish_reason, token count) per prompt, greedy, ending at EOS as the server does."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        out = self.generator.generate(ids, max_tokens, GREEDY, stop=stop_sequences(self.tokenizer, []))
        eos = self.tokenizer.eos_id
        return [(self.tokenizer.decode([t for t in out.row(i) if t != eos]), out.logprobs[i, :out.lengths[i]].tolist(),
                 "stop" if out.stopped[i] else "length", int(out.lengths[i])) for i in range(len(prompts))]

    def reply(self, turns, message, max_tokens=10):
        bot = chat.Chat(self.generator, self.tokenizer, GREEDY, max_new_tokens=max_tokens, notice=lambda _: None)
        bot.turns = list(turns)
        return bot.reply(message)


@pytest.fixture(scope="module")
def truth(workdir):
    return Truth(workdir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The API with an API key over the workdir (or over `models` already loaded), served by uvicorn in a thread."""

    def __init__(self, workdir, review_log, safety, models=None):
        self.models = models or serve.load_models([workdir], slots=SLOTS, queue=QUEUE)
        self.engine = self.models[workdir].engine
        self.name, self.review_log = workdir, review_log
        self.api = serve.Api(self.models, review_log, api_key=KEY, safety=safety)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.api.app(), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.uvicorn.started)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, timeout=120, **kw)

    def close(self, engine=True):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        if engine:
            self.engine.close()


@pytest.fixture(scope="module")
def server(workdir, truth, tmp_path_factory):
    """Its safety filter: the built-in blocklist and a classifier that flags the greedy reply to WITHHELD (so chat
    replies stream whole)."""
    withheld = truth.reply([], WITHHELD)
    running = Server(workdir, str(tmp_path_factory.mktemp("review") / "review.jsonl"),
                     chat.SafetyFilter(classifier=lambda text: text == withheld))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


class Slow:
    """Makes the engine's thread take at least `seconds` per step, so that a reply's tokens arrive spaced out."""

    def __init__(self, engine, seconds):
        self.engine, self.seconds, self._step = engine, seconds, engine._step

    def _slow_step(self):
        time.sleep(self.seconds)
        self._step()

    def __enter__(self):
        self.engine._step = self._slow_step
        return self

    def __exit__(self, *exc):
        del self.engine._step


class Gate:
    """Holds the engine's thread before each step until opened: the admitted requests stay in their rows, and those
    submitted meanwhile wait in the queue."""

    def __init__(self, engine):
        self.engine, self.opened, self.steps = engine, threading.Event(), 0
        self._step = engine._step

    def _held_step(self):
        self.opened.wait()
        self.steps += 1
        self._step()

    def __enter__(self):
        self.engine._step = self._held_step
        return self

    def __exit__(self, *exc):
        self.opened.set()
        del self.engine._step  # the class's method again


def streaming_server(server, tmp_path, *phrases):
    """The same models behind an API whose filter is a blocklist alone (so chat replies stream as they settle): the
    built-in phrases and `phrases`."""
    return Server(server.name, str(tmp_path / "review.jsonl"), chat.SafetyFilter(chat.DEFAULT_BLOCKLIST + phrases),
                  models=server.models)
