"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server.

Every address here is loopback (127.0.0.1): the server binds it and the clients call it.
"""

import json
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from hetero.api import load_offloaded
from hetero.server import bind, create_app, is_loopback

QUESTION = "What is the capital of France?"
MAX_QUEUE = 2  # small, so that 16 clients at once overflow it
CONTEXT = 1024


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """SmolLM2 served in this process on a free loopback port."""
    model = load_offloaded(smollm2_dir, context=CONTEXT, log_fn=lambda *_: None)
    app = create_app(model, "smollm2", max_queue=MAX_QUEUE)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", worker=app.state.worker, model=model)
    srv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    # no retries: a 429 must reach the test, not be retried away
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def paris(client):
    """The whole (non-streamed) answer to QUESTION, shared by the tests that compare with it."""
    return ask(client, QUESTION)


def ask(client, content, **kw):
    kw = {"temperature": 0, "max_tokens": 24} | kw
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}], **kw)


def test_chat_completion(paris):
    r = paris
    assert "Paris" in r.choices[0].message.content
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "smollm2"
    assert abs(r.created - time.time()) < 60
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant" and len(r.choices) == 1
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens < 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_completion_streamed_matches_the_whole_answer(client, paris):
    whole = paris.choices[0].message.content
    chunks = list(ask(client, QUESTION, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # piece by piece, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_max_tokens_stop_and_seed(client):
    r = ask(client, QUESTION, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = ask(client, QUESTION, stop=["Paris", "paris"])
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.strip()  # what came before the stop string is kept
    a, b = (ask(client, "Tell me a word.", temperature=1.0, seed=7, max_tokens=4).choices[0].message.content
            for _ in range(2))
    assert a == b


def test_completions(client):
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 5
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert client.models.retrieve("smollm2").owned_by == "hetero"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "smollm2" and h["max_queue"] == MAX_QUEUE and h["busy"] is False


def _post(server, body, path="/v1/chat/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def _error(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


MSG = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "Hi"}', None),  # cut short
    (b"not json at all", None),
    (b"[1, 2, 3]", None),
    (b"\xff\xfe\x00garbage", None),
    ({"messages": "Hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "temperature": 5}, "temperature"),
    ({"messages": MSG, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": MSG, "max_tokens": True}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "top_p": [1]}, "top_p"),
    ({"messages": MSG, "seed": "7"}, "seed"),
    ({"messages": MSG, "stop": [1, 2]}, "stop"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "n": 2}, "n"),
    ({"messages": MSG, "model": 3}, "model"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_malformed_requests_get_400_with_an_error_object(server, body, param):
    err = _error(_post(server, body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_request_errors_beyond_types(server, client):
    assert _error(_post(server, {"prompt": 7}, "/v1/completions"), 400)["param"] == "prompt"
    assert _error(_post(server, b"x" * ((1 << 20) + 1)), 413)["code"] == "request_too_large"
    long = _error(_post(server, {"messages": [{"role": "user", "content": "word " * (CONTEXT + 50)}]}), 400)
    assert long["code"] == "context_length_exceeded" and f"{CONTEXT} tokens" in long["message"]
    assert _error(httpx.get(server.url + "/v1/nowhere"), 404)["code"] == "not_found"
    assert _error(httpx.get(server.url + "/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError) as e:  # the official client surfaces the message
        ask(client, QUESTION, n=2)
    assert e.value.status_code == 400 and "n" in str(e.value)


def test_sixteen_concurrent_clients_are_answered_or_refused_never_lost_or_mixed(server, client):
    n = 16
    words = ("apple", "river", "castle", "guitar", "planet", "forest", "window", "rocket",
             "garden", "silver", "dragon", "pencil", "ocean", "bridge", "candle", "tiger")
    prompts = [f"Write one sentence about a {word}." for word in words]  # each answer names its word
    results, start = [None] * n, threading.Barrier(n)

    def one(i):
        start.wait()
        try:
            r = ask(client, prompts[i], max_tokens=6)
            results[i] = ("answered", r.choices[0].message.content, r.usage.prompt_tokens)
        except openai.RateLimitError as e:
            results[i] = ("refused", e.response.json()["error"], e.response.headers.get("retry-after"))
        except Exception as e:  # anything else is a failure of the test, reported below
            results[i] = ("failed", repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a request got no answer at all"
    assert not [r for r in results if r[0] == "failed"], results
    answered = [i for i, r in enumerate(results) if r[0] == "answered"]
    refused = [i for i, r in enumerate(results) if r[0] == "refused"]
    assert len(answered) + len(refused) == n
    assert len(answered) >= 2 and refused, results
    for i in refused:
        assert results[i][1]["type"] == "rate_limit_error" and results[i][2] == "1"
    for i in answered:  # each answer is about its own word, and is what the same prompt gets alone
        assert words[i] in results[i][1].lower(), (words[i], results[i][1])
        alone = ask(client, prompts[i], max_tokens=6)
        assert (results[i][1], results[i][2]) == (alone.choices[0].message.content, alone.usage.prompt_tokens), i
    h = httpx.get(server.url + "/health").json()
    assert h["busy"] is False and h["queued"] == 0


def test_a_client_leaving_mid_stream_frees_the_model(server, client):
    cancelled = server.worker.counts["cancelled"]
    stream = ask(client, "Write a very long story about a dragon who learns to fly.", max_tokens=900, stream=True)
    pieces = [c.choices[0].delta.content for c, _ in zip(stream, range(4))]
    assert "".join(p or "" for p in pieces)
    stream.close()  # hang up mid-answer
    t0 = time.monotonic()
    r = ask(client, QUESTION, max_tokens=8)
    elapsed = time.monotonic() - t0
    assert "Paris" in r.choices[0].message.content
    assert server.worker.counts["cancelled"] == cancelled + 1
    assert elapsed < 15  # the 900-token story would have held the model for about a minute


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.1")


def _hetero(*args):
    return subprocess.Popen([sys.executable, "-m", "hetero", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_serve_busy_port_is_one_line_and_exit_2(smollm2_dir):
    taken = bind("127.0.0.1", 0)
    proc = _hetero("serve", smollm2_dir, "--port", taken.getsockname()[1])
    out, err = proc.communicate(timeout=60)
    taken.close()
    assert proc.returncode == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_cli_serve_answers_and_stops_on_ctrl_c(smollm2_dir):
    proc = _hetero("serve", smollm2_dir, "--port", 0, "--context", 256, "--max-queue", 1)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("serving "):
                break
        else:
            pytest.fail("hetero serve did not start:\n" + "".join(seen[-20:]))
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        assert url.startswith("http://127.0.0.1:")
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c:
            assert [m.id for m in c.models.list().data] == [smollm2_dir.name]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "server stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
