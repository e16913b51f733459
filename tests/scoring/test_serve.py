"""zoft serve: the official openai client against a tiny random scorer on a local port."""
from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import types

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from zoft.errors import ZoftError  # noqa: E402
from zoft.lm import CandidateScorer  # noqa: E402
from zoft.models import tiny_random_model  # noqa: E402
from zoft.scoring.serve import (MAX_BODY_BYTES, RequestError, create_app, level_probabilities,  # noqa: E402
                                read_body, serve)
from zoft.tasks.example import Example  # noqa: E402
from zoft.tasks.rubric.data import Response, ScoringItem  # noqa: E402
from zoft.tasks.rubric.prompts import ChatError, default_context, system_prompt, to_example, user_prompt  # noqa: E402

LEVELS = ["0", "1", "2"]
MODEL = "tiny-scorer"
ITEM = ScoringItem("set01", "Why does the sea look blue?", "2: light and water named. 1: one. 0: neither.",
                   ["The water absorbs red light."], LEVELS)
RESPONSE = Response("r1", "because the sun light is in the water", 2)
MESSAGES = [{"role": "system", "content": system_prompt(ITEM)},
            {"role": "user", "content": user_prompt(ITEM, RESPONSE)}]


@pytest.fixture(scope="module")
def scorer():
    loaded = tiny_random_model("causal", seed=0)
    return CandidateScorer(loaded.model, loaded.tokenizer, "classification")


def running(app):
    """Serves ``app`` on a free localhost port in a background thread; yields its /v1 URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(scorer):
    """The app on a free localhost port, in a background thread; shut down after the module."""
    yield from running(create_app(scorer, LEVELS, default_context, MODEL))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=30)


def direct_logprobs(scorer, context: str) -> list[float]:
    """What the server should compute: the levels' log-probs, normalised over the levels."""
    enc = scorer.encode([Example(context, LEVELS, 0, ["0"], {}, "test")])
    scores, _ = scorer.candidate_logprobs(enc, [0])
    return scores[0].double().log_softmax(-1).tolist()


def test_default_context_is_the_training_prompt():
    assert default_context(MESSAGES) == to_example(ITEM, RESPONSE).context
    # earlier turns are ignored; the last user message is scored
    older = [MESSAGES[0], {"role": "user", "content": "old"}, {"role": "assistant", "content": "1"}, MESSAGES[1]]
    assert default_context(older) == to_example(ITEM, RESPONSE).context


def test_chat_completion_scores_the_levels(client, scorer):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3,
                                           temperature=0, max_tokens=1, n=1)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    expected = direct_logprobs(scorer, to_example(ITEM, RESPONSE).context)
    best = max(range(len(LEVELS)), key=expected.__getitem__)
    assert choice.message.content in LEVELS and choice.message.content == LEVELS[best]

    entry = choice.logprobs.content[0]
    assert entry.token == choice.message.content
    probs = level_probabilities(entry.top_logprobs)
    assert set(probs) == set(LEVELS)
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
    for level, lp in zip(LEVELS, expected):
        assert math.isclose(probs[level], math.exp(lp), rel_tol=1e-5, abs_tol=1e-7)
    assert [e.logprob for e in entry.top_logprobs] == sorted((e.logprob for e in entry.top_logprobs), reverse=True)

    context_tokens = len(scorer.tokenizer(to_example(ITEM, RESPONSE).context).input_ids)
    assert reply.usage.prompt_tokens == context_tokens and reply.usage.completion_tokens == 1
    assert reply.usage.total_tokens == context_tokens + 1


def test_a_decision_expected_server_replies_the_level_nearest_the_expected_score(scorer):
    """create_app(decision="expected"): the reply's level is the one nearest Σ k·p_k of the level
    probabilities it reports, and its logprob entry is that level's."""
    from starlette.testclient import TestClient

    with TestClient(create_app(scorer, LEVELS, default_context, MODEL, decision="expected")) as tc:
        for text in ("because the sun light is in the water", "no", "red light is absorbed, blue scattered back"):
            messages = [MESSAGES[0], {"role": "user", "content": user_prompt(ITEM, Response("r", text, 0))}]
            reply = tc.post("/v1/chat/completions", json={"messages": messages, "logprobs": True}).json()
            entry = reply["choices"][0]["logprobs"]["content"][0]
            probs = level_probabilities(entry["top_logprobs"])
            mean = sum(k * probs[level] for k, level in enumerate(LEVELS))
            nearest = LEVELS[min(range(len(LEVELS)), key=lambda k: abs(k - mean))]
            assert reply["choices"][0]["message"]["content"] == entry["token"] == nearest


def test_logprobs_off_and_top_k(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content in LEVELS
    top1 = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=1)
    entries = top1.choices[0].logprobs.content[0].top_logprobs
    assert [e.token for e in entries] == [top1.choices[0].message.content]
    # content given as a list of text parts scores the same as the plain string
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    assert client.chat.completions.create(model=MODEL, messages=parts).choices[0].message.content == \
        plain.choices[0].message.content


@pytest.mark.parametrize("kwargs, fragment", [
    ({"messages": [MESSAGES[0]]}, "user message"),
    ({"messages": [MESSAGES[0], {"role": "user", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"messages": []}, "non-empty"),
    ({"messages": MESSAGES, "stream": True}, "streaming is not supported"),
    ({"messages": MESSAGES, "n": 2}, "n=1"),
])
def test_bad_requests_are_400(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and fragment in err.value.body["message"]


def test_raw_error_bodies(server):
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server}/chat/completions", json=["a list"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.get(f"{server}/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_models(client):
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_serve_uses_the_run(monkeypatch, scorer):
    """serve(): levels from the task's label words, the task's context_from_chat when it has one."""
    seen = {}

    class FakeTask:
        label_words = LEVELS

        def context_from_chat(self, messages):
            seen["messages"] = messages
            return "custom prompt Score:"

    setup = types.SimpleNamespace(task=FakeTask(), data=None, cfg=types.SimpleNamespace(decision="argmax"))
    monkeypatch.setattr("zoft.methods.load_run", lambda run_dir, trust_remote_code=False: (setup, scorer))

    def fake_run(app, host, port, log_level):
        from starlette.testclient import TestClient
        seen["where"] = (host, port)
        with TestClient(app) as tc:
            seen["reply"] = tc.post("/v1/chat/completions", json={"model": "x", "messages": MESSAGES}).json()
            seen["models"] = tc.get("/v1/models").json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    serve("/tmp/runs/my-run", port=9999)
    assert seen["where"] == ("127.0.0.1", 9999) and seen["messages"] == MESSAGES
    assert seen["reply"]["choices"][0]["message"]["content"] in LEVELS
    assert seen["reply"]["model"] == "my-run" and seen["models"]["data"][0]["id"] == "my-run"


# ---------------------------------------------------------------- malformed requests

GOOD_BODY = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
USER = b'{"messages": [{"role": "user", "content": %s}]}'


def connection(r) -> tuple:
    """The client's end of the TCP connection a response came on (the same for a kept-alive one)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")


def assert_openai_error(r, status: int, kind: str = "invalid_request_error") -> dict:
    """An OpenAI-style error body, with a short message that names no Python exception."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    assert len(error["message"]) < 200 and not re.search(r"Error|Exception|Traceback|\.py", error["message"])
    return error


@pytest.mark.parametrize("body", [
    USER % b'"\\ud800"',                                   # a lone surrogate escape: json.loads accepts it
    USER % b'[{"type": "text", "text": "a\\udfff"}]',       # ... inside a content part
    b'{"model": "\\udc80", "messages": [{"role": "user", "content": "hi"}]}',   # ... anywhere
    USER % b'"\xed\xa0\x80"',                              # a surrogate encoded in the bytes: not UTF-8
    USER % b'"\xff"',                                      # not UTF-8 at all
    b"[" * 100_000,                                        # nesting past the recursion limit
    b'{"a":' * 100_000,
    b"",
    b"{not json",
    b"null",
    b'{"messages": "hi"}',
    USER % b'"hi"' + b" trailing",
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 1' + b"0" * 5000 + b"}",   # int too long
    b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}',
    USER % b'[{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]',
    USER % b'[{"type": "text", "text": 3}]',
    USER % b'{"text": "hi"}',
    USER % b'""',
    USER % b'" \\n\\t "',
    USER % b"[]",
    USER % b'[{"type": "text", "text": " "}, {"type": "text", "text": ""}]',
    USER % b"null",
    b'{"messages": [{"role": "user"}]}',
    b'{"messages": [["user", "hi"]]}',
])
def test_malformed_bodies_get_400_and_the_connection_survives(server, body):
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{server}/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
        again = http.post(f"{server}/chat/completions", content=GOOD_BODY,
                          headers={"content-type": "application/json"})
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] in LEVELS
        assert connection(again) == connection(r)   # kept alive, not reset


def test_content_parts_score_as_their_joined_text(client):
    """Parts are joined as text (no Python repr of the list), system turn included."""
    def parts(text):
        cut = len(text) // 2
        return [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]

    as_parts = [{"role": m["role"], "content": parts(m["content"])} for m in MESSAGES]
    plain, split = (client.chat.completions.create(model=MODEL, messages=m, logprobs=True, top_logprobs=3)
                    for m in (MESSAGES, as_parts))
    assert split.choices[0].message.content == plain.choices[0].message.content
    assert split.usage == plain.usage
    assert [(e.token, e.logprob) for e in split.choices[0].logprobs.content[0].top_logprobs] == \
        [(e.token, e.logprob) for e in plain.choices[0].logprobs.content[0].top_logprobs]


# ---------------------------------------------------------------- a scoring task's own prompt builder

MULTI = ScoringItem("m1", "Explain the result.", "Claim, evidence, reasoning: 1 each.", [], ["0", "1"],
                    aspects=["claim", "evidence"])


def task_messages(item, content):
    return [{"role": "system", "content": system_prompt(item)}, {"role": "user", "content": content}]


def as_parts(messages):
    return [{**m, "content": [{"type": "text", "text": m["content"][:7]}, {"type": "text", "text": m["content"][7:]}]}
            for m in messages]


def test_task_context_from_chat_joins_parts():
    from zoft.tasks.rubric import ScoringTask
    task = ScoringTask("t", [ITEM], [], [])
    messages = task_messages(ITEM, user_prompt(ITEM, RESPONSE))
    assert task.context_from_chat(as_parts(messages)) == task.context_from_chat(messages) == \
        task.context(ITEM, RESPONSE.text)
    multi = ScoringTask("m", [MULTI], [], [])
    messages = task_messages(MULTI, user_prompt(MULTI, RESPONSE))
    assert multi.contexts_from_chat(as_parts(messages)) == multi.contexts_from_chat(messages) == \
        [multi.context(MULTI, RESPONSE.text, a) for a in MULTI.aspects]


@pytest.mark.parametrize("content", ["", "  ", "Response:\n", "Item:\nWhy?\n\nResponse:\n \n", [],
                                     [{"type": "text", "text": " "}], None])
def test_task_context_from_chat_rejects_empty_responses(content):
    from zoft.tasks.rubric import ScoringTask
    task = ScoringTask("t", [ITEM], [], [])
    with pytest.raises(ChatError, match="empty"):
        task.context_from_chat(task_messages(ITEM, content))
    with pytest.raises(ValueError):   # what context_from_chat documents
        ScoringTask("m", [MULTI], [], []).contexts_from_chat(task_messages(MULTI, content))


def test_served_task_parts_and_empty_content(scorer):
    from starlette.testclient import TestClient

    from zoft.tasks.rubric import ScoringTask
    task = ScoringTask("t", [ITEM], [], [])
    messages = task_messages(ITEM, user_prompt(ITEM, RESPONSE))
    with TestClient(create_app(scorer, LEVELS, task.context_from_chat, MODEL)) as tc:
        plain, split = (tc.post("/v1/chat/completions", json={"messages": m, "logprobs": True}).json()
                        for m in (messages, as_parts(messages)))
        assert split["choices"] == plain["choices"] and split["usage"] == plain["usage"]
        expected = direct_logprobs(scorer, task.context(ITEM, RESPONSE.text))
        top = {e["token"]: e["logprob"] for e in plain["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        assert all(math.isclose(top[level], lp, rel_tol=1e-5, abs_tol=1e-7) for level, lp in zip(LEVELS, expected))
        for content in ("Response:\n  ", [{"type": "text", "text": "Response:\n"}], [], None):
            r = tc.post("/v1/chat/completions", json={"messages": task_messages(ITEM, content)})
            assert "empty" in assert_openai_error(r, 400)["message"]


# ---------------------------------------------------------------- key, body limit, internal errors

KEY = "sk-test-0123456789"
LIMIT = 4096


def guarded_context(messages):
    """default_context, but a user message "explode" is an internal error (a bug in a prompt builder)."""
    if messages[-1]["content"] == "explode":
        raise RuntimeError("secret internal detail")
    return default_context(messages)


@pytest.fixture(scope="module")
def guarded(scorer):
    """A server that needs KEY and takes bodies of at most LIMIT bytes."""
    yield from running(create_app(scorer, LEVELS, guarded_context, MODEL, api_key=KEY, max_body_bytes=LIMIT))


def test_api_key_with_the_openai_client(guarded):
    good = openai.OpenAI(base_url=guarded, api_key=KEY, max_retries=0, timeout=30)
    assert good.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content in LEVELS
    assert MODEL in [m.id for m in good.models.list()]
    bad = openai.OpenAI(base_url=guarded, api_key="sk-wrong", max_retries=0, timeout=30)
    for call in (lambda: bad.chat.completions.create(model=MODEL, messages=MESSAGES), bad.models.list,
                 lambda: bad.models.retrieve(MODEL)):
        with pytest.raises(openai.AuthenticationError) as err:
            call()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"authorization": f"Bearer {KEY}x"}, {"authorization": f"Basic {KEY}"},
                                     {"authorization": KEY}, {"authorization": "Bearer"}, {"authorization": ""}])
@pytest.mark.parametrize("method, path", [("GET", "/models"), ("GET", f"/models/{MODEL}"),
                                          ("POST", "/chat/completions"), ("GET", "/nowhere")])
def test_api_key_required_on_every_route(guarded, headers, method, path):
    r = httpx.request(method, guarded + path, headers=headers, content=GOOD_BODY if method == "POST" else None)
    error = assert_openai_error(r, 401)
    assert error["code"] == "invalid_api_key" and error["param"] is None
    assert error["message"].startswith("Incorrect API key provided") and KEY not in r.text


def test_body_size_limit(guarded):
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    fits = GOOD_BODY[:-1] + b" " * (LIMIT - len(GOOD_BODY)) + b"}"
    assert len(fits) == LIMIT
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{guarded}/chat/completions", content=fits, headers=auth).status_code == 200
        too_big = fits[:-1] + b" }"
        assert_openai_error(http.post(f"{guarded}/chat/completions", content=too_big, headers=auth), 413)
        # no Content-Length (chunked): refused while reading
        chunks = (too_big[i:i + 1000] for i in range(0, len(too_big), 1000))
        r = http.post(f"{guarded}/chat/completions", content=chunks, headers=auth)
        assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
        assert_openai_error(r, 413)
        again = http.post(f"{guarded}/chat/completions", content=GOOD_BODY, headers=auth)
        assert again.status_code == 200 and connection(again) == connection(r)


def test_body_limit_stops_reading_an_endless_body():
    import asyncio

    from starlette.requests import Request
    received = 0

    async def receive():
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(request, LIMIT))
    assert err.value.status == 413 and received == LIMIT // 1000 + 1


def test_internal_errors_are_a_generic_500(guarded, caplog):
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30, headers=auth) as http:
        r = http.post(f"{guarded}/chat/completions", json={"messages": [{"role": "user", "content": "explode"}]})
        assert assert_openai_error(r, 500, "server_error")["message"] == "internal server error"
        assert "secret" not in r.text
        again = http.post(f"{guarded}/chat/completions", content=GOOD_BODY)
        assert again.status_code == 200 and connection(again) == connection(r)
    assert "secret internal detail" in caplog.text   # the traceback stays in the server's log


def test_create_app_checks_the_limit(scorer):
    with pytest.raises(ZoftError, match="max_body_bytes"):
        create_app(scorer, LEVELS, default_context, MODEL, max_body_bytes=0)


# ---------------------------------------------------------------- serve() and the CLI

@pytest.fixture
def fake_run(monkeypatch, scorer):
    """serve() on a fake run; uvicorn.run replaced by a TestClient that lists the models without a key."""
    setup = types.SimpleNamespace(task=types.SimpleNamespace(label_words=LEVELS), data=None,
                                  cfg=types.SimpleNamespace(decision="argmax"))
    monkeypatch.setattr("zoft.methods.load_run", lambda run_dir, trust_remote_code=False: (setup, scorer))
    seen = {}

    def run(app, host, port, log_level):
        from starlette.testclient import TestClient
        seen["where"] = (host, port)
        with TestClient(app) as tc:
            seen["status"] = tc.get("/v1/models").status_code

    monkeypatch.setattr(uvicorn, "run", run)
    return seen


@pytest.mark.parametrize("host, key, warned", [("127.0.0.1", None, False), ("localhost", None, False),
                                               ("::1", None, False), ("0.0.0.0", None, True),
                                               ("192.168.1.5", None, True), ("my-host.example", None, True),
                                               ("0.0.0.0", KEY, False)])
def test_serve_key_and_host_warning(fake_run, capsys, host, key, warned):
    serve("/tmp/runs/my-run", host=host, port=9999, api_key=key)
    out, err = capsys.readouterr()
    assert fake_run["where"] == (host, 9999) and fake_run["status"] == (401 if key else 200)
    assert ("API key required" if key else "no API key") in out and KEY not in out + err
    assert ("warning" in err) == warned and len(err.splitlines()) == (1 if warned else 0)


def test_serve_binds_to_loopback_by_default(fake_run):
    serve("/tmp/runs/my-run")
    assert fake_run["where"] == ("127.0.0.1", 8000)


def test_cli_serve_key_and_limit(monkeypatch):
    from zoft import cli
    calls = []
    monkeypatch.setattr("zoft.scoring.serve.serve", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.delenv("ZOFT_API_KEY", raising=False)
    assert cli.main(["serve", "--model", "RUN"]) == 0
    assert calls[-1] == (("RUN",), {"host": "127.0.0.1", "port": 8000, "api_key": None,
                                    "max_body_bytes": MAX_BODY_BYTES, "trust_remote_code": False})
    monkeypatch.setenv("ZOFT_API_KEY", "from-env")
    assert cli.main(["serve", "--model", "RUN", "--max-body-bytes", "10"]) == 0
    assert calls[-1][1]["api_key"] == "from-env" and calls[-1][1]["max_body_bytes"] == 10
    assert cli.main(["serve", "--model", "RUN", "--api-key", "from-flag"]) == 0
    assert calls[-1][1]["api_key"] == "from-flag"
