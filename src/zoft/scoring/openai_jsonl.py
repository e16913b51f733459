"""OpenAI chat fine-tuning files: export scored responses, read them back, and check them.

Each line is ``{"messages": [system, user, assistant]}``: the system turn holds the
rubric instructions (:func:`zoft.tasks.rubric.prompts.system_prompt`), the user turn the item
and the response (:func:`~zoft.tasks.rubric.prompts.user_prompt`), and the assistant turn the
score label (``format_score``: ``"2"``, ``"correct"``, or ``"1,0,1"`` for multi-label).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from zoft.atomic import atomic_write_text
from zoft.errors import DataError
from zoft.tasks.rubric.data import Response, Score, ScoringItem, format_score, parse_score
from zoft.tasks.rubric.prompts import system_prompt, user_prompt

ROLES = ("system", "user", "assistant", "function", "tool")
# The message keys OpenAI's chat fine-tuning format accepts; anything else is rejected on upload.
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "tool_calls", "tool_call_id",
                          "weight"})
# gpt-3.5-turbo-0125's per-example context; newer models allow more (pass token_limit).
DEFAULT_TOKEN_LIMIT = 16385


def approx_tokens(text: str) -> int:
    """OpenAI's rule of thumb, one token per 4 characters of English (no tokenizer needed)."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class ChatRow:
    """One example read back from a chat JSONL file.

    Attributes:
        messages: The prompt: every message before the last assistant turn.
        completion: The last assistant turn's content (the score label).
        score: ``completion`` parsed (see :func:`zoft.tasks.rubric.data.parse_score`).
        ref: ``"path:line"``.
    """

    messages: list[dict]
    completion: str
    score: Score
    ref: str


def chat_example(item: ScoringItem, response: Response) -> dict:
    """The chat fine-tuning example of one scored response."""
    if response.score is None:
        raise DataError("response has no score to train on", response.ref or None, field="score")
    return {"messages": [{"role": "system", "content": system_prompt(item)},
                         {"role": "user", "content": user_prompt(item, response)},
                         {"role": "assistant", "content": format_score(response.score, item.score_levels)}]}


def export_chat_jsonl(examples: Iterable[tuple[ScoringItem, Response]], path: str | Path) -> Path:
    """Writes ``(item, response)`` pairs as chat fine-tuning JSONL (UTF-8, atomically).

    Returns:
        The path written.
    """
    path = Path(path)
    lines = [json.dumps(chat_example(item, r), ensure_ascii=False) + "\n" for item, r in examples]
    atomic_write_text(path, "".join(lines))
    return path


def _problems(path: Path, token_limit: int | None,
              count_tokens: Callable[[str], int] | None) -> list[DataError]:
    """Every problem OpenAI's format checker reports, one DataError each, in file order."""
    p, count = str(path), count_tokens or approx_tokens
    if not path.is_file():
        return [DataError("file not found", p)]
    found, rows = [], 0
    # Bytes split on "\n" so that a bad line neither hides the others nor shifts line numbers.
    for row, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows += 1

        def bad(message: str, field: str | None = None, row: int = row) -> None:
            found.append(DataError(message, p, row, field))

        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad("not UTF-8 text")
            continue
        except json.JSONDecodeError as e:
            bad(f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad(f"expected a JSON object, got {type(obj).__name__}")
            continue
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            bad("missing, empty or not a list", "messages")
            continue
        ok = True
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                bad("message is not an object", where)
                ok = False
                continue
            if "role" not in msg:
                bad("missing role", f"{where}.role")
            elif msg["role"] not in ROLES:
                bad(f"unknown role {msg['role']!r} (expected {', '.join(ROLES)})", f"{where}.role")
            extra = sorted(set(msg) - MESSAGE_KEYS)
            if extra:
                bad(f"unrecognised key(s) {', '.join(map(repr, extra))}", where)
            content = msg.get("content")
            calls = msg.get("function_call") or msg.get("tool_calls")  # may stand in for content
            if not calls and (not isinstance(content, str) or not content.strip()):
                bad("missing or empty content", f"{where}.content")
            ok = ok and "role" in msg and msg["role"] in ROLES and not extra
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            bad("no assistant message", "messages")
            ok = False
        if ok and token_limit is not None:
            # OpenAI cookbook's count: 3 per message, 1 per name, 3 priming the reply.
            tokens = 3 + sum(3 + count(m.get("content") or "") + (1 if "name" in m else 0) for m in messages)
            if tokens > token_limit:
                how = "estimated at 4 characters per token" if count_tokens is None else "counted"
                bad(f"{tokens} tokens ({how}), over the limit of {token_limit}")
    if not rows:
        found.append(DataError("file is empty (no examples)", p))
    return found


def validate_chat_jsonl(path: str | Path, token_limit: int | None = DEFAULT_TOKEN_LIMIT,
                        count_tokens: Callable[[str], int] | None = None) -> list[str]:
    """Checks a chat fine-tuning file the way OpenAI's format checker does.

    Reports rows that are not JSON, not an object, or have no ``messages`` list;
    messages with a missing or unknown ``role``, unrecognised keys, or missing/empty
    ``content``; examples without an assistant turn; and examples over ``token_limit``.

    Args:
        path: The JSONL file.
        token_limit: Most tokens per example; None skips the check.
        count_tokens: Tokens in a text, e.g. ``lambda s: len(tokenizer.encode(s))``;
            default :func:`approx_tokens` (4 characters per token, about right for
            English with OpenAI's tokenizers, not exact).

    Returns:
        One line per problem, ``path:line: field 'x': reason``; empty if the file is valid.
    """
    return [str(e) for e in _problems(Path(path), token_limit, count_tokens)]


def assert_valid(path: str | Path, token_limit: int | None = DEFAULT_TOKEN_LIMIT,
                 count_tokens: Callable[[str], int] | None = None) -> None:
    """Like :func:`validate_chat_jsonl`, but raises the first problem.

    Raises:
        DataError: the first problem in file order.
    """
    problems = _problems(Path(path), token_limit, count_tokens)
    if problems:
        raise problems[0]


def read_chat_jsonl(path: str | Path, levels: list[str] | None = None) -> list[ChatRow]:
    """Reads a chat fine-tuning file back into prompts and scores.

    Args:
        path: The JSONL file (checked with :func:`assert_valid`, without a token limit).
        levels: The item's score labels, to turn ``"correct"`` back into 1; None reads
            integer labels as integers. A label with commas reads as a multi-label list.

    Raises:
        DataError: an invalid file, or a completion that is not a score.
    """
    path = Path(path)
    assert_valid(path, token_limit=None)
    rows = []
    for row, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        messages = json.loads(raw)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        completion = messages[last]["content"]
        try:
            score = parse_score(completion, levels)
        except ValueError as e:
            raise DataError(f"not a score: {e}", str(path), row, f"messages[{last}].content") from None
        rows.append(ChatRow(messages[:last], completion, score, f"{path}:{row}"))
    return rows
