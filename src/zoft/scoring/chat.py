"""Chat messages (OpenAI format) as prompt text: the rules every prompt builder shares.

``zoft serve``'s :func:`~zoft.scoring.serve.default_context` and a scoring task's
``context_from_chat`` both read messages through :func:`message_text`, so content sent as
text parts (as the ``openai`` client can) reads the same as a plain string everywhere, and
both refuse an empty response to score, as ``zoft score`` refuses empty text.
"""
from __future__ import annotations


class RequestError(ValueError):
    """A malformed chat request: ``zoft serve`` answers it with an OpenAI-style error.

    A ValueError, so a task's ``context_from_chat`` (documented to raise ValueError) can raise it.

    Attributes:
        message: A short reason, safe to send back (never internal exception text).
        param: The offending field (``"messages[1].content"``), or None.
        status: The HTTP status, 400 unless said otherwise (413: the body is too large).
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def message_text(message: dict, where: str) -> str:
    """A message's content as text: a string, or its text parts joined; missing content is ``""``.

    Raises:
        RequestError: content that is neither a string nor a list of text parts.
    """
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                   f"{where}.content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError("content must be a string or a list of text parts", f"{where}.content")


def require_text(text: str, what: str, param: str) -> str:
    """``text`` itself, unless it is empty or whitespace (a :class:`RequestError`)."""
    if not text.strip():
        raise RequestError(f"{what} is empty", param)
    return text
