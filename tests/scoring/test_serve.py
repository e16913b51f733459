"""zoft serve: the official openai client against a tiny random scorer on a local port."""
from __future__ import annotations

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

from zoft.lm import CandidateScorer  # noqa: E402
from zoft.models import tiny_random_model  # noqa: E402
from zoft.scoring.data import Response, ScoringItem, system_prompt, to_example, user_prompt  # noqa: E402
from zoft.scoring.serve import RequestError, create_app, default_context, level_probabilities, serve  # noqa: E402
from zoft.tasks.example import Example  # noqa: E402

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


@pytest.fixture(scope="module")
def server(scorer):
    """The app on a free localhost port, in a background thread; shut down after the module."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(scorer, LEVELS, default_context, MODEL)
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

    setup = types.SimpleNamespace(task=FakeTask(), data=None)
    monkeypatch.setattr("zoft.methods.common.load_run", lambda run_dir: (setup, scorer))

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


def assert_openai_error(r, status: int, kind: str = "invalid_request_error") -> dict:
    """An OpenAI-style error body, with a short message that names no Python exception."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    assert len(error["message"]) < 200 and not re.search(r"Error|Exception|Traceback|\.py", error["message"])
    return error


# ---------------------------------------------------------------- a scoring task's own prompt builder

MULTI = ScoringItem("m1", "Explain the result.", "Claim, evidence, reasoning: 1 each.", [], ["0", "1"],
                    aspects=["claim", "evidence"])


def task_messages(item, content):
    return [{"role": "system", "content": system_prompt(item)}, {"role": "user", "content": content}]


def as_parts(messages):
    return [{**m, "content": [{"type": "text", "text": m["content"][:7]}, {"type": "text", "text": m["content"][7:]}]}
            for m in messages]


def test_task_context_from_chat_joins_parts():
    from zoft.scoring.task import ScoringTask
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
    from zoft.scoring.task import ScoringTask
    task = ScoringTask("t", [ITEM], [], [])
    with pytest.raises(RequestError, match="empty"):
        task.context_from_chat(task_messages(ITEM, content))
    with pytest.raises(ValueError):   # what context_from_chat documents
        ScoringTask("m", [MULTI], [], []).contexts_from_chat(task_messages(MULTI, content))


def test_served_task_parts_and_empty_content(scorer):
    from starlette.testclient import TestClient

    from zoft.scoring.task import ScoringTask
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
