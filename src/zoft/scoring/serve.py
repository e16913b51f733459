"""``zoft serve``: a fine-tuned scorer behind an OpenAI-compatible chat completions endpoint.

A tool written against the official ``openai`` client sets ``base_url`` to
``http://HOST:PORT/v1`` and sends the same chat messages the OpenAI chat JSONL export
trains on (:mod:`zoft.scoring.openai_jsonl`): a system turn with the rubric instructions
and a user turn with the item and the response. The reply's content is the score level.

How chat messages become the scorer's context (the prompt the model was fine-tuned on):

* if the run's task has a ``context_from_chat(messages)`` method, it decides;
* otherwise :func:`~zoft.tasks.rubric.prompts.default_context`: every system message's content,
  then the **last** user message's content, joined by blank lines, then ``"\\n\\nScore:"``:
  the context of :func:`~zoft.tasks.rubric.prompts.to_example` for the messages the chat export
  writes. Earlier user and assistant turns are ignored.

Every prompt is built in :mod:`zoft.tasks.rubric.prompts`. Content may be a string or a list of
text parts (``[{"type": "text", "text": ...}]``, as the ``openai`` client can send): the parts are
joined as text on every path. An empty or whitespace-only response to score is rejected, as
``zoft score`` rejects empty text.

Instead of generating, the server scores every level as a candidate continuation (as
evaluation does) and answers with the best one; with ``logprobs: true`` the reply's
``choices[0].logprobs.content[0].top_logprobs`` lists the levels with their
log-probabilities normalised over the levels (``exp`` of them sums to 1). Sampling
parameters (``temperature``, ``top_p``, ``max_tokens``, ``seed``, ...) are accepted and
ignored: scoring is deterministic. ``stream: true`` and ``n > 1`` are rejected with 400.

Multi-label tasks (several rubric aspects) answer as their chat export trains: the aspects'
levels in order, joined by commas (``"1,0,1"``). Each aspect is scored on its own prompt (the
training prompt with its ``Aspect:`` line, from the task's ``contexts_from_chat``), and
``logprobs.content`` holds one entry per aspect, in order, each with its levels'
``top_logprobs`` (the commas are not listed: they are not scored).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and a short
message that never carries internal exception text:

* 400 ``invalid_request_error``: a malformed request of any kind: a body that is not UTF-8 or
  not JSON, nested too deeply, with a lone surrogate escape (``"\\ud800"``: not text), not an
  object, or with bad or empty messages. The keep-alive connection stays usable.
* 401 ``invalid_api_key``: with ``api_key`` set (``--api-key``, else ``$ZOFT_API_KEY``), on every
  route, ``/v1/models`` included, without ``Authorization: Bearer <key>``.
* 413: a body over ``max_body_bytes`` (``--max-body-bytes``, default 1 MiB), refused from its
  ``Content-Length`` or, without one, as soon as it grows past the limit.
* 500 ``server_error``: ``"internal server error"``; the traceback goes to the server's log.

The server binds to 127.0.0.1 unless told otherwise; another host without a key prints a warning.

Needs the ``serve`` extra: ``pip install 'zoft[serve]'`` (fastapi and uvicorn).
"""
# No "from __future__ import annotations": FastAPI must see the real Request class in the
# route signature below, and fastapi is imported lazily (it is an optional extra).

import hmac
import ipaddress
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zoft.errors import ZoftError
from zoft.tasks.decision import decide_one
from zoft.tasks.example import Example
from zoft.tasks.rubric import ScoringTask
from zoft.tasks.rubric.prompts import ChatError, default_context, message_text

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_BODY_BYTES = 1 << 20   # 1 MiB: a scoring prompt is a few KiB
INVALID_KEY = ("Incorrect API key provided. Send the key this server was started with "
               "(--api-key or ZOFT_API_KEY) as 'Authorization: Bearer <key>'.")
log = logging.getLogger(__name__)


class RequestError(ChatError):
    """A malformed request: answered with an OpenAI-style error, like the :class:`ChatError` it extends.

    Attributes:
        status: The HTTP status, 400 unless said otherwise (413: the body is too large).
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message, param)
        self.status = status


async def read_body(request, limit: int) -> bytes:
    """The request's raw body, refused (413) past ``limit`` bytes before more is read into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is larger than this server's limit of {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():   # no Content-Length (chunked): count as it arrives
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is larger than this server's limit of {limit} bytes",
                               status=413)
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    """JSON from raw bytes, strictly: every way it can be malformed is a :class:`RequestError`."""
    try:
        # Strict UTF-8 (json.loads on bytes would let encoded surrogates through); deep nesting
        # is a RecursionError and an integer of over 4300 digits a ValueError, not a JSONDecodeError.
        body = json.loads(raw.decode("utf-8"))
        # A "\ud800" escape decodes to a lone surrogate, which is no text: it would crash the
        # tokenizer (or the reply's encoding) later. Re-encoding finds one anywhere in the body.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None
    except UnicodeEncodeError:
        raise RequestError("the request body has a lone surrogate escape (\\ud800-\\udfff): not valid text") \
            from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    return body


def _check_request(body: Any) -> dict:
    """Validates the parts of a chat completions body the server uses; returns it."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("stream"):
        raise RequestError("streaming is not supported", "stream")
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError("model must be a string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError("each message must be an object with role and content", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise RequestError(f"role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        message_text(m, f"messages[{i}]")   # content shape
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("only n=1 is supported", "n")
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise RequestError("logprobs must be a boolean", "logprobs")
    k = body.get("top_logprobs")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise RequestError("top_logprobs must be a non-negative integer", "top_logprobs")
    return body


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _internal_error():
    # The traceback goes to the server's log; the client learns nothing about the internals.
    log.exception("zoft serve: internal error")
    return _error(500, "internal server error", "server_error")


class _RequireKey:
    """ASGI middleware: every HTTP request, on any path, needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest: the time taken does not tell how much of a guess was right.
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                # As OpenAI answers a missing or wrong key; the 401 body never echoes a key.
                response = _error(401, INVALID_KEY, "invalid_request_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _logprob_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def create_app(scorer, levels: list[str], build_context: Callable[[list[dict]], str], model_name: str,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, headers: Sequence[str] = (),
               decision: str = "argmax"):
    """The FastAPI app serving ``scorer`` (a :class:`zoft.lm.CandidateScorer`) over ``levels``.

    Args:
        scorer: scores the levels after a context.
        levels: the score labels, lowest first (the candidates; the reply is one of them).
        build_context: chat messages -> the scorer's context, or a list of contexts (one per
            rubric aspect: the reply joins their levels with commas); a context is a prompt or a
            task's :class:`~zoft.tasks.Example` (which a classification head needs: it reads the
            response text); may raise a :class:`~zoft.tasks.rubric.prompts.ChatError` (answered 400).
        model_name: the id ``/v1/models`` lists and replies carry.
        api_key: if set (non-empty), every request needs ``Authorization: Bearer <api_key>``
            (else 401, ``code: "invalid_api_key"``).
        max_body_bytes: larger request bodies are refused with 413.
        decision: how the reply's level is chosen from the level probabilities (the run's
            ``decision``: :mod:`zoft.tasks.decision`).
        headers: the shared headers a context may start with (a scoring task's item headers):
            marked as the example's ``shared_prefix``, so a scorer inside
            :meth:`~zoft.lm.CandidateScorer.frozen_weights` runs each item's header once for
            every request (``serve`` does; the weights never change while served).

    Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``.
    """
    try:
        from fastapi import FastAPI, Request
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
    except ImportError:
        raise ZoftError("zoft serve needs fastapi and uvicorn: pip install 'zoft[serve]'") from None
    if len(levels) < 2 or len(set(levels)) != len(levels):
        raise ZoftError(f"serving needs at least two distinct score levels, got {levels}")
    if max_body_bytes < 1:
        raise ZoftError(f"max_body_bytes must be positive, got {max_body_bytes}")
    levels = list(levels)
    lock = threading.Lock()   # one forward pass at a time: the model is shared
    created = int(time.time())
    app = FastAPI(title="zoft scorer", docs_url=None, redoc_url=None)
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)

    def score(context: str | Example) -> tuple[list[float], int, list[int]]:
        """Log-probs normalised over the levels, the prompt's token count, each level's tokens."""
        if isinstance(context, Example):   # a task's example: the prompt, and the response a head reads
            ex = context
        else:
            header = next((h for h in headers if context.startswith(h)), "")
            ex = Example(context, levels, 0, [levels[0]], {}, "request", shared_prefix=header)
        with lock, torch.no_grad():
            was_training = scorer.model.training
            scorer.model.eval()
            try:
                enc = scorer.encode([ex])
                scores, lengths = scorer.candidate_logprobs(enc, [0])
            finally:
                scorer.model.train(was_training)
        if scorer.kind != "classification":   # as CandidateScorer.predict: per-token mean for options
            scores = scores / lengths
        normalised = scores[0].double().log_softmax(-1).tolist()
        choice_ids = getattr(enc, "choice_ids", None)   # a classification head's levels are one "token" each
        return normalised, len(enc.context_ids[0]), [len(c) for c in choice_ids[0]] if choice_ids else [1] * len(levels)

    @app.exception_handler(ChatError)
    async def bad_request(request, exc: ChatError):
        # A prompt builder's ChatError is the client's mistake (400); a RequestError may carry another status.
        return _error(getattr(exc, "status", 400), exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):   # a last resort: chat_completions catches its own
        return _internal_error()

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "zoft"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            return _error(404, f"The model '{model_id}' does not exist (this server has '{model_name}')",
                          "invalid_request_error", "model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # Errors are answered here, not raised: Starlette re-raises an exception that reaches its
        # catch-all handler, and uvicorn then drops the keep-alive connection.
        try:
            return await complete(request)
        except ChatError as e:
            return await bad_request(request, e)
        except Exception:
            return _internal_error()

    async def complete(request) -> dict:
        body = _check_request(parse_json(await read_body(request, max_body_bytes)))
        try:
            contexts = build_context(body["messages"])
        except ChatError:
            raise
        except ZoftError as e:   # zoft's own errors are written for users
            raise RequestError(f"cannot build the prompt from the messages: {e}", "messages") from None
        except (ValueError, KeyError, TypeError) as e:   # a task's check, or it tripped on odd messages:
            log.warning("zoft serve: cannot build the prompt: %r", e)   # the text may be internal
            raise RequestError("cannot build the prompt from the messages", "messages") from None
        contexts = [contexts] if isinstance(contexts, (str, Example)) else list(contexts)
        if not contexts or not all(isinstance(c, Example) or (isinstance(c, str) and c.strip()) for c in contexts):
            raise RequestError("the messages give an empty prompt", "messages")
        scored = [await run_in_threadpool(score, c) for c in contexts]   # one per aspect (or one)
        best = [decide_one([math.exp(q) for q in logprobs], decision) for logprobs, _, _ in scored]
        content = ",".join(levels[b] for b in best)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": content, "refusal": None}}
        if body.get("logprobs"):
            k = body.get("top_logprobs")
            entries = []
            for (logprobs, _, _), b in zip(scored, best):
                order = sorted(range(len(levels)), key=lambda j: -logprobs[j])
                order = order if k is None else order[:k]
                top = [_logprob_entry(levels[j], logprobs[j]) for j in order]
                entries.append({**_logprob_entry(levels[b], logprobs[b]), "top_logprobs": top})
            choice["logprobs"] = {"content": entries, "refusal": None}
        prompt_tokens = sum(n for _, n, _ in scored)
        completion_tokens = sum(tokens[b] for (_, _, tokens), b in zip(scored, best))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "system_fingerprint": None,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def level_probabilities(top_logprobs) -> dict[str, float]:
    """``{level: probability}`` from a reply's ``top_logprobs`` (dicts or openai client objects)."""
    get = (lambda e, k: e[k]) if top_logprobs and isinstance(top_logprobs[0], dict) else getattr
    return {get(e, "token"): math.exp(get(e, "logprob")) for e in top_logprobs}


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: it may resolve to anything
        return False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          log_level: str = "info", api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          trust_remote_code: bool = False) -> None:
    """Loads a finished run (best, else last weights) and serves it until interrupted.

    The levels are the task's label words (else the choices of its first example); the
    examples come from a scoring task's ``examples_from_chat(messages)`` (one per aspect of a
    multi-label task), else the context from the task's ``context_from_chat(messages)`` if it
    has one, else :func:`~zoft.tasks.rubric.prompts.default_context`. ``model_name`` defaults to the run
    folder's name. ``api_key`` and ``max_body_bytes`` are :func:`create_app`'s; serving a non-loopback ``host`` without a key
    prints a warning to stderr (anyone who can reach the port can use the model).
    ``trust_remote_code`` is the caller's alone: the run's config.yaml cannot turn it on.
    """
    try:
        import uvicorn
    except ImportError:
        raise ZoftError("zoft serve needs fastapi and uvicorn: pip install 'zoft[serve]'") from None
    from zoft.methods import load_run

    setup, scorer = load_run(run_dir, trust_remote_code=trust_remote_code)
    task = setup.task
    levels = list(getattr(task, "label_words", None) or [])
    if not levels:
        first = next((ex for split in (setup.data.train, setup.data.dev, setup.data.eval) for ex in split), None)
        levels = list(first.choices) if first is not None else []
    if not levels:
        raise ZoftError(f"{run_dir}: the run's task has no score levels (label words) to serve")
    # a scoring task's own examples (a classification head reads their response text, an LM their
    # prompt); else a task's context_from_chat, else the default prompt
    build_context = getattr(task, "examples_from_chat", None) or getattr(task, "context_from_chat", None) \
        or default_context
    name = model_name or Path(run_dir).resolve().name
    headers = [task.header(item) for item in task.items.values()] if isinstance(task, ScoringTask) else []
    app = create_app(scorer, levels, build_context, name, api_key=api_key, max_body_bytes=max_body_bytes,
                     headers=headers, decision=setup.cfg.decision)
    print(f"zoft serve: model '{name}', levels {levels}, at http://{host}:{port}/v1, "
          f"{'API key required' if api_key else 'no API key'}", flush=True)
    if not api_key and not _is_loopback(host):
        print(f"zoft serve: warning: serving on {host} without an API key: anyone who can reach port {port} "
              "can use the model (set --api-key or ZOFT_API_KEY)", file=sys.stderr, flush=True)
    with scorer.frozen_weights():   # each item's header runs once, for its first request
        uvicorn.run(app, host=host, port=port, log_level=log_level)
