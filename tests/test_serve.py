"""omni.serve over a tiny random model's workdir, in process (uvicorn in a thread) and as a program.

Through the official openai client: completions and chat, streamed or not, n, stop, logprobs, usage and seeds;
greedy results equal omni.generate's Generator and omni.chat's Chat for the same prompts while other requests share
the batch. Raw HTTP: every malformed request gets its status and JSON error and the server serves on; the API key;
a client hanging up mid-stream frees its slot; a full queue answers 429; bad command lines exit 2 in one line.
The page in a real browser: tests/test_serve_page.py; the shared fixtures: tests/serve_harness.py."""
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from conftest import COMPILATION_CACHE, ROOT
from omni import chat, serve
from serve_harness import CONTEXT, KEY, NEW, QUEUE, SLOTS, STORY, WITHHELD, Gate, free_port, streaming_server, wait_for


def _http(server, method, path, body=None, headers=None, key=KEY):
    """(status, headers, JSON body) of one raw request; `body` a dict (sent as JSON) or bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def _streamed_text(stream):
    """(text, finish_reason, usage) of a one-choice completions stream."""
    text, finish, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


# --- models and completions --------------------------------------------------------------------------------------

def test_model_names():
    assert serve.model_names(["runs/a", "x/b/"]) == {"runs/a": "runs/a", "x/b/": "x/b/", "a": "runs/a", "b": "x/b/"}
    assert serve.model_names(["one/tiny", "two/tiny"]) == {"one/tiny": "one/tiny", "two/tiny": "two/tiny"}
    assert serve.model_names(["tiny"]) == {"tiny": "tiny"}


def test_models_are_listed_by_path_and_basename(server, client):
    assert [m.id for m in client.models.list().data] == [server.name, "tiny"]


def test_greedy_completions_equal_generator_while_others_share_the_batch(server, client, truth):
    """Nine requests for three slots, held until all are in: greedy ones (streamed and not, two prompts with n=2)
    and sampled ones; rows free at different steps and the queued requests join the running batch."""
    prompts = ["import json", "def f(", "class JSONDecoder(object):\n    ", "x"]
    want = truth.completions(prompts)
    greedy = dict(model=server.name, max_tokens=NEW, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(6) as pool, Gate(server.engine) as gate:
        pair = pool.submit(client.completions.create, prompt=[prompts[3], prompts[0]], n=2, **greedy)
        wait_for(lambda: server.engine.load() == (SLOTS, 1))  # three of its four choices hold the rows
        plain = [pool.submit(client.completions.create, prompt=p, logprobs=2, **greedy) for p in prompts[:2]]
        streamed = pool.submit(lambda: _streamed_text(client.completions.create(
            prompt=prompts[2], stream=True, stream_options={"include_usage": True}, **greedy)))
        sampled = [pool.submit(client.completions.create, model=server.name, prompt=prompts[1], max_tokens=20,
                               temperature=1.0, top_p=0.9, seed=s, extra_body={"top_k": 50}) for s in (1, 2)]
        wait_for(lambda: server.engine.load() == (SLOTS, QUEUE))  # the other five wait
        gate.opened.set()
        for future, p, (text, logprobs, finish, count) in zip(plain, prompts, want):
            r = future.result()
            (c,) = r.choices
            assert (c.text, c.finish_reason, c.index) == (text, finish, 0)
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(truth.tokenizer.encode(p)), count)
            assert r.usage.total_tokens == r.usage.prompt_tokens + count
            assert c.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
            assert [max(top.values()) for top in c.logprobs.top_logprobs] == pytest.approx(logprobs, abs=1e-4)
            assert len(c.logprobs.tokens) == count and c.logprobs.text_offset[0] == len(p)
        text, finish, usage = streamed.result()
        assert (text, finish, usage.completion_tokens) == (want[2][0], want[2][2], want[2][3])
        r = pair.result()
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [want[3][0]] * 2 + [want[0][0]] * 2
        assert r.usage.completion_tokens == 2 * (want[3][3] + want[0][3])
        texts = [f.result().choices[0].text for f in sampled]
        assert texts[0] != texts[1] and all(t != want[1][0] for t in texts)
    wait_for(lambda: server.engine.load() == (0, 0))


def test_seeds_and_n(server, client):
    kw = dict(model=server.name, prompt="import json", max_tokens=10, temperature=1.0, n=3)
    a, b = client.completions.create(seed=7, **kw), client.completions.create(seed=7, **kw)
    other = client.completions.create(seed=8, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed repeats a call...
    assert len({c.text for c in a.choices}) == 3  # ...while its choices differ
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings_cut_the_text(server, client, truth):
    prompt = "def f("
    text = truth.completions([prompt])[0][0]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()
                and text.find(text[i:i + 2]) == i)
    kw = dict(model=server.name, prompt=prompt, max_tokens=NEW, temperature=0, stop=["\x00never", stop])
    (c,) = client.completions.create(**kw).choices
    assert (c.text, c.finish_reason) == (text[:text.find(stop)], "stop")
    assert _streamed_text(client.completions.create(stream=True, **kw))[:2] == (c.text, "stop")


# --- chat ---------------------------------------------------------------------------------------------------------

def test_chat_equals_omni_chat(server, client, truth):
    turns = [("what is a list?", "a list is a sequence"), ("and a dict?", "a dict maps keys to values")] * 2
    messages = [{"role": r, "content": c} for turn in turns for r, c in zip(("user", "assistant"), turn)]
    for history, system in ((turns, None), ([], "be brief")):
        given = messages[: 2 * len(history)] + [{"role": "user", "content": "how do I sort it?"}]
        if system:
            given.insert(0, {"role": "system", "content": system})
        want = truth.reply(history, "how do I sort it?" if system is None else f"{system}\n\nhow do I sort it?")
        r = client.chat.completions.create(model="tiny", messages=given, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens <= CONTEXT - 10 and 0 < r.usage.completion_tokens <= 10
        stream = client.chat.completions.create(model="tiny", messages=given, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chat.fit_history(truth.tokenizer, turns, "how do I sort it?", CONTEXT - 10)[1] > 0  # turns dropped


def test_chat_logprobs_and_n(server, client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, n=2, logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens / 2 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the likeliest


def test_chat_refusals_are_replies_and_reviewed(server, client, truth):
    kw = dict(model="tiny", max_tokens=10, temperature=0)
    for message, kind in (("how do I build a bomb?", "message refused"), (WITHHELD, "reply withheld")):
        r = client.chat.completions.create(messages=[{"role": "user", "content": message}], **kw)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (chat.REFUSAL, "stop")
        record = json.loads(open(server.review_log).read().splitlines()[-1])
        assert record["kind"] == kind and record["messages"][-1]["content"] == message and record["model"] == "tiny"
    assert record["reply"] == truth.reply([], WITHHELD) != chat.REFUSAL  # what a reviewer needs to see
    fine = client.chat.completions.create(messages=[{"role": "user", "content": "hello"}], **kw)
    assert fine.choices[0].message.content != chat.REFUSAL
    assert len(open(server.review_log).read().splitlines()) == 2


def _chat_stream(client, message, **kw):
    """(the content deltas, finish_reason, usage) of a one-choice chat stream."""
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": message}], stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    return deltas, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage


def test_chat_streams_as_the_reply_settles(server, truth, tmp_path):
    """Without a classifier, a streamed chat reply comes in several parts, a few words behind the tokens, and adds
    up to omni.chat's whole reply; from the server with a classifier it comes in one."""
    kw = dict(model="tiny", max_tokens=24, temperature=0)
    want = truth.reply([], STORY, max_tokens=24)
    streaming = streaming_server(server, tmp_path)
    try:
        client = streaming.client()
        deltas, finish, usage = _chat_stream(client, STORY, **kw)
        whole = client.chat.completions.create(messages=[{"role": "user", "content": STORY}], **kw)
    finally:
        streaming.close(engine=False)
    assert "".join(deltas) == want == whole.choices[0].message.content and len(want.split()) == 8
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    assert len(deltas) >= 3, deltas
    assert _chat_stream(server.client(), STORY, **kw)[0] == [want]


def test_a_streamed_reply_withheld_midway_ends_with_content_filter(server, truth, tmp_path):
    """Two words from the middle of a reply blocked: the stream stops before them with finish_reason
    'content_filter' and never sends them, the reviewer gets the whole reply, and without streaming the reply is
    the refusal; a message refused outright streams the refusal."""
    kw = dict(model="tiny", max_tokens=24, temperature=0)
    whole = truth.reply([], STORY, max_tokens=24)
    phrase = " ".join(whole.split()[5:7])
    streaming = streaming_server(server, tmp_path, phrase)
    try:
        client = streaming.client()
        deltas, finish, _ = _chat_stream(client, STORY, **kw)
        record = json.loads(open(streaming.review_log).read().splitlines()[-1])
        r = client.chat.completions.create(messages=[{"role": "user", "content": STORY}], **kw)
        refused = _chat_stream(client, "how do I build a bomb?", **kw)
    finally:
        streaming.close(engine=False)
    sent = "".join(deltas)
    assert finish == "content_filter" and sent and whole.startswith(sent) and phrase not in sent
    assert (record["kind"], record["reply"]) == ("reply withheld", whole)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (chat.REFUSAL, "stop")
    assert refused[:2] == ([chat.REFUSAL], "stop")


# --- bad requests -------------------------------------------------------------------------------------------------

def _completion(**fields):
    return {"model": "tiny", "prompt": "import json", "max_tokens": 4, **fields}


def _chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


BAD = {  # name: (path, body, status, error code)
    "not JSON": ("/v1/completions", b'{"model": "tiny",', 400, "invalid_json"),
    "not UTF-8": ("/v1/completions", b"\xff\xfe{}", 400, "invalid_json"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    "no model": ("/v1/completions", {"prompt": "x"}, 400, "missing_field"),
    "model not a string": ("/v1/completions", _completion(model=3), 400, "invalid_value"),
    "unknown model": ("/v1/completions", _completion(model="nope"), 404, "model_not_found"),
    "no prompt": ("/v1/completions", {"model": "tiny"}, 400, "missing_field"),
    "prompt a number": ("/v1/completions", _completion(prompt=5), 400, "invalid_value"),
    "prompt token ids": ("/v1/completions", _completion(prompt=[1, 2]), 400, "invalid_value"),
    "empty prompt": ("/v1/completions", _completion(prompt=""), 400, "invalid_value"),
    "prompt over the context": ("/v1/completions", _completion(prompt="import json\n" * 40), 400,
                                "context_length_exceeded"),
    "max_tokens a string": ("/v1/completions", _completion(max_tokens="4"), 400, "invalid_value"),
    "max_tokens true": ("/v1/completions", _completion(max_tokens=True), 400, "invalid_value"),
    "max_tokens 0": ("/v1/completions", _completion(max_tokens=0), 400, "invalid_value"),
    "max_tokens negative": ("/v1/completions", _completion(max_tokens=-3), 400, "invalid_value"),
    "max_tokens huge": ("/v1/completions", _completion(max_tokens=10 ** 9), 400, "invalid_value"),
    "temperature a word": ("/v1/completions", _completion(temperature="hot"), 400, "invalid_value"),
    "temperature negative": ("/v1/completions", _completion(temperature=-0.5), 400, "invalid_value"),
    "temperature over 2": ("/v1/completions", _completion(temperature=2.5), 400, "invalid_value"),
    "top_p 0": ("/v1/completions", _completion(top_p=0), 400, "invalid_value"),
    "top_k fractional": ("/v1/completions", _completion(top_k=1.5), 400, "invalid_value"),
    "top_k over the vocabulary": ("/v1/completions", _completion(top_k=10 ** 6), 400, "invalid_value"),
    "n 0": ("/v1/completions", _completion(n=0), 400, "invalid_value"),
    "n huge": ("/v1/completions", _completion(n=1000), 400, "invalid_value"),
    "seed a string": ("/v1/completions", _completion(seed="x"), 400, "invalid_value"),
    "stop a number": ("/v1/completions", _completion(stop=5), 400, "invalid_value"),
    "stop list of numbers": ("/v1/completions", _completion(stop=["a", 5]), 400, "invalid_value"),
    "five stops": ("/v1/completions", _completion(stop=list("abcde")), 400, "invalid_value"),
    "stream a string": ("/v1/completions", _completion(stream="yes"), 400, "invalid_value"),
    "logprobs 6": ("/v1/completions", _completion(logprobs=6), 400, "invalid_value"),
    "echo": ("/v1/completions", _completion(echo=True), 400, "unsupported_parameter"),
    "no messages": ("/v1/chat/completions", {"model": "tiny"}, 400, "missing_field"),
    "messages a string": ("/v1/chat/completions", _chat(messages="hi"), 400, "invalid_value"),
    "no message": ("/v1/chat/completions", _chat(messages=[]), 400, "invalid_value"),
    "message without content": ("/v1/chat/completions", _chat(messages=[{"role": "user"}]), 400, "invalid_value"),
    "unknown role": ("/v1/chat/completions", _chat(messages=[{"role": "bot", "content": "x"}]), 400,
                     "invalid_value"),
    "last message the assistant's": ("/v1/chat/completions", _chat(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400, "invalid_value"),
    "two user messages": ("/v1/chat/completions", _chat(messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400, "invalid_value"),
    "message over the context": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a b " * 60}]),
                                 400, "context_length_exceeded"),
    "top_logprobs 21": ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    "chat unknown model": ("/v1/chat/completions", _chat(model="nope"), 404, "model_not_found"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_their_status_and_a_json_error(server, name):
    path, body, status, code = BAD[name]
    got, _, answer = _http(server, "POST", path, body, {"Content-Type": "application/json"})
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert set(answer["error"]) == {"message", "type", "code"} and answer["error"]["message"]
    assert _http(server, "GET", "/v1/models")[0] == 200  # serving on


def test_bodies_over_1_mib_get_413(server):
    """Refused on the declared length before any is read, or once a body without one (chunked) passes 1 MiB."""
    big = json.dumps(_completion(prompt="x" * serve.MAX_BODY)).encode()
    for declared in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.putrequest("POST", "/v1/completions")
            conn.putheader("Authorization", f"Bearer {KEY}")
            if declared:
                conn.putheader("Content-Length", str(len(big)))
                conn.endheaders(big[:100])  # the rest never comes: the length alone is enough
            else:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for i in range(0, len(big), 1 << 16):
                    part = big[i:i + (1 << 16)]
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())["error"]["code"]) == (413, "request_too_large")
        finally:
            conn.close()
    assert _http(server, "GET", "/v1/models")[0] == 200  # serving on


def test_unknown_paths_and_methods(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/v1/models", 405)):
        got, _, answer = _http(server, method, path)
        assert got == status and answer["error"]["message"]


def test_serves_on_after_bad_requests(server, client, truth):
    for name in ("not JSON", "unknown model", "max_tokens huge"):
        _http(server, "POST", BAD[name][0], BAD[name][1])
    r = client.completions.create(model="tiny", prompt="x", max_tokens=NEW, temperature=0)
    assert r.choices[0].text == truth.completions(["x"])[0][0]


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", _completion())):
            status, got_headers, answer = _http(server, method, path, body, headers, key=None)
            assert (status, answer["error"]["code"]) == (401, "invalid_api_key")
            assert got_headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
    assert _http(server, "GET", "/v1/models")[0] == 200


# --- slots and the queue ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_hanging_up_frees_its_slot(server, stream):
    with Gate(server.engine) as gate:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = _completion(max_tokens=40, stream=stream)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        if stream:
            assert conn.getresponse().status == 200  # the stream has begun
        wait_for(lambda: server.engine.load() == (1, 0))  # its row is held, waiting for the next step
        conn.close()
        wait_for(lambda: server.engine.load() == (0, 0), timeout=10)  # freed without another step
        gate.opened.set()
        time.sleep(1.0)
        assert gate.steps <= 1  # at most the step that was held; not the 39 tokens left


def test_a_full_queue_answers_429(server, client, truth):
    greedy = dict(model="tiny", max_tokens=NEW, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool, Gate(server.engine) as gate:
        running = pool.submit(client.completions.create, prompt="import json", n=SLOTS, **greedy)
        wait_for(lambda: server.engine.load() == (SLOTS, 0))
        waiting = pool.submit(client.completions.create, prompt="x", n=QUEUE, **greedy)
        wait_for(lambda: server.engine.load() == (SLOTS, QUEUE))
        status, headers, answer = _http(server, "POST", "/v1/completions", _completion())
        assert (status, answer["error"]["code"], answer["error"]["type"]) == (429, "queue_full", "rate_limit_error")
        assert headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            server.client(max_retries=0).chat.completions.create(**_chat())
        gate.opened.set()
        assert [c.text for c in running.result().choices] == [truth.completions(["import json"])[0][0]] * SLOTS
        assert [c.text for c in waiting.result().choices] == [truth.completions(["x"])[0][0]] * QUEUE


# --- the program --------------------------------------------------------------------------------------------------

def _serve(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "omni.serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **COMPILATION_CACHE, **(env or {})},
                            **kw)


def test_bad_command_lines_exit_2_in_one_line(workdir, tmp_path):
    env = {"OMNI_API_KEY": ""}
    cases = [((), "--workdir"), (("--workdir=/nonexistent/run",), "/nonexistent/run"),
             ((f"--workdir={tmp_path}",), str(tmp_path)),
             ((f"--workdir={workdir}", "--host=0.0.0.0"), "API key"),
             ((f"--workdir={workdir}", "--slots=0"), "--slots"),
             ((f"--workdir={workdir}", "--bogus=1"), "--bogus")]
    procs = [(_serve(*args, env=env), culprit) for args, culprit in cases]
    for proc, culprit in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and culprit in err and "Traceback" not in err, err


def test_the_program_serves_until_interrupted(workdir, truth, tmp_path):
    port = free_port()
    proc = _serve(f"--workdir={workdir}", f"--port={port}", f"--review_log={tmp_path / 'review.jsonl'}",
                  env={"OMNI_API_KEY": "env-key"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)

        def up():
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return client.models.list().data
            except openai.APIConnectionError:
                return None

        wait_for(up, timeout=300)
        r = client.completions.create(model="tiny", prompt="import json", max_tokens=NEW, temperature=0)
        assert r.choices[0].text == truth.completions(["import json"])[0][0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


# --- the page -----------------------------------------------------------------------------------------------------

