"""Scoring prompts, the one place they are built: two styles, and chat messages back to either.

* The training prompt of a :class:`~zoft.tasks.rubric.task.ScoringTask` (:func:`item_header`,
  :func:`response_context`): item, reference answers, rubric and scored examples cut to word
  budgets, then the response and ``Score:``, after which the language model scores each level.
* The chat prompt of the OpenAI export (:func:`system_prompt`, :func:`user_prompt`) and its plain
  context (:func:`to_example`: ``system + "\\n\\n" + user + "\\n\\nScore:"``).

A chat request comes back to a prompt through :func:`chat_response` (the item and response of a
request the task's export made; the task then builds its training prompt) or :func:`default_context`
(the plain context, from any messages). Both read content through :func:`message_text`, so text
parts read as a string does, and both refuse an empty response to score, as ``zoft score``
refuses empty text. They raise :class:`ChatError`, which ``zoft serve`` answers with a 400.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from zoft.errors import DataError
from zoft.tasks.example import Example
from zoft.tasks.rubric.data import Response, ScoringItem, format_score

# Word budgets of the training prompt, in whitespace-separated words (a real subword tokenizer
# makes ~1.3 tokens of a word): about 600 words at most; an ASAP prompt is 300-370 words
# (400-500 tokens), so runs on real models want max_length 512 or more. "example" is per
# scored example, "examples" all of them together.
BUDGET = {"question": 50, "rubric": 250, "example": 40, "examples": 120, "response": 150}
_ELLIPSIS = "[...]"


# ---------------------------------------------------------------- shortening texts

def shorten(text: str, max_words: int, head: float = 0.4) -> str:
    """``text`` cut to about ``max_words`` words by dropping its middle (marked ``[...]``).

    Keeping both ends suits rubrics: they open with what the item asks for and usually
    close with the score-point definitions, while the middle holds sample answers and
    tables. Cuts snap to a line break when one is within a few words, so the kept
    parts start and end on whole lines. Whitespace inside the kept parts is unchanged.
    """
    words = re.findall(r"\S+\s*", text.strip())
    if len(words) <= max_words:
        return text.strip()
    n_head = max(1, round(max_words * head))
    n_tail = max(1, max_words - n_head)
    cut_head, cut_tail = n_head, len(words) - n_tail
    slack = max(3, max_words // 10)
    for i in range(n_head, max(0, n_head - slack), -1):       # end the head at a line break
        if "\n" in words[i - 1]:
            cut_head = i
            break
    for i in range(cut_tail, min(len(words), cut_tail + slack)):  # start the tail on a new line
        if i > 0 and "\n" in words[i - 1]:
            cut_tail = i
            break
    return "".join(words[:cut_head]).rstrip() + f"\n{_ELLIPSIS}\n" + "".join(words[cut_tail:]).strip()


def truncate_end(text: str, max_words: int) -> str:
    """The first ``max_words`` words of ``text`` (whitespace squashed), ``[...]`` if cut."""
    words = text.split()
    return " ".join(words[:max_words]) + (f" {_ELLIPSIS}" if len(words) > max_words else "")


def item_rubric(rubric: str) -> str:
    """The part of a rubric that is specific to the item, with runs of blank lines squashed.

    ASAP science sets 1 and 2 open with two pages of the general open-ended rubric
    ("Scoring Rubric for Science Open-Ended Items ...") before the item's own
    ("Rubric for Acid Rain ..."), which defines the same score points concretely; the
    item's own is kept when there is one after the start.
    """
    text = re.sub(r"\n\s*\n+", "\n", rubric.strip())
    own = re.search(r"^Rubric for\b", text, re.M)
    return text[own.start():] if own and own.start() > 0 else text


_BULLET = re.compile(r"^\s*([•*\-–o]|\d+[.)])\s+")
# Where score points are defined: "Score 3", "Score Point 2", "2 points", "3-Point Rubric".
_SCORE_HEADING = re.compile(r"^\s*(score(\s+point)?\s+\d+\b|\d+\s*-?\s*points?\b)", re.I)


def shorten_rubric(rubric: str, max_words: int) -> str:
    """A rubric cut to about ``max_words`` words, keeping its score-point definitions.

    In order, until it fits: take the item's own rubric (:func:`item_rubric`); drop
    bulleted list entries (sample answers, "acceptable responses"), last ones first and
    from the longest list first, each list keeping its first entry and a ``[...]``
    where entries went; shorten the preamble between the title line and the first
    score-point heading ("Score 3", "Score Point 2", "2 points"); finally drop the
    middle of the whole text (:func:`shorten`).
    """
    lines = item_rubric(rubric).split("\n")
    sizes = [len(line.split()) for line in lines]
    total = sum(sizes)
    if total <= max_words:
        return "\n".join(lines)
    runs: list[list[int]] = []      # consecutive bullet lines
    for i, line in enumerate(lines):
        if _BULLET.match(line):
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    dropped: set[int] = set()
    kept = [list(run) for run in runs]
    while total > max_words:
        longest = max(kept, key=len, default=[])
        if len(longest) <= 1:
            break
        i = longest.pop()
        dropped.add(i)
        total -= sizes[i]
    out = []
    for i, line in enumerate(lines):
        if i in dropped:
            if i - 1 not in dropped:
                out.append(_ELLIPSIS)
            continue
        out.append(line)
    if total > max_words:
        heading = next((i for i, line in enumerate(out) if i > 0 and _SCORE_HEADING.match(line)), None)
        if heading is not None and heading > 1:
            preamble = "\n".join(out[1:heading])
            size = len(preamble.split())
            room = max(15, max_words - (total - size))
            if size > room:
                out[1:heading] = shorten(preamble, room).split("\n")
                total = len("\n".join(out).split())
    text = "\n".join(out)
    return text if total <= max_words else shorten(text, max_words, head=0.5)


# ---------------------------------------------------------------- the training prompt

def item_header(item: ScoringItem, budget: Mapping[str, int] = BUDGET) -> str:
    """The part of the training prompt shared by every response to ``item``.

    The response comes after it, last, right before ``"Score:"``: the scorer
    truncates contexts that do not fit ``max_length`` from the left, so a too-long
    prompt loses the start of the item text (then of the rubric), never the response
    or the score cue.
    """
    parts = []
    if item.question.strip():
        # Item texts set the scene first and ask last: keep more of the end.
        parts.append("Item: " + " ".join(shorten(item.question, budget["question"], head=0.35).split()))
    if item.reference_answers:
        parts.append("Reference answers:\n" + "\n".join(
            f"- {truncate_end(a, budget['example'])}" for a in item.reference_answers))
    if item.rubric.strip():
        parts.append("Rubric:\n" + shorten_rubric(item.rubric, budget["rubric"]))
    if item.examples:
        shown, used = [], 0
        for text, score in item.examples:
            line = truncate_end(text, budget["example"])
            used += len(line.split())
            if shown and used > budget["examples"]:
                break
            shown.append(f"- Score {format_score(score, item.score_levels)}: {line}")
        parts.append("Scored examples:\n" + "\n".join(shown))
    if item.aspects:
        parts.append(f"Aspects, scored one at a time: {', '.join(item.aspects)}.")
    parts.append(f"Possible scores: {', '.join(item.score_levels)}.")
    return "\n".join(parts) + "\n"


def response_context(header: str, text: str, max_words: int = BUDGET["response"],
                     aspect: str | None = None) -> str:
    """The full training prompt for one response: ``header`` (:func:`item_header`),
    ``Response: <text>``, [``Aspect: <name>``], ``Score:``."""
    cue = f"Aspect: {aspect}\nScore:" if aspect else "Score:"
    return f"{header}Response: {truncate_end(text, max_words)}\n{cue}"


# ---------------------------------------------------------------- the chat prompt

def system_prompt(item: ScoringItem) -> str:
    """Scoring instructions for an item: rubric, reference answers, examples, output format.

    An item read from someone else's chat file keeps that file's system prompt
    (``metadata["system_prompt"]``), so ``zoft serve`` recognises requests that send it.
    """
    if "system_prompt" in item.metadata:
        return item.metadata["system_prompt"]
    parts = ["You score student responses to a science item against its scoring rubric."]
    if item.rubric:
        parts.append("Rubric:\n" + item.rubric)
    if item.reference_answers:
        parts.append("Reference answers:\n" + "\n".join(f"- {a}" for a in item.reference_answers))
    if item.examples:
        parts.append("Scored examples:\n" + "\n".join(
            f"- [{format_score(s, item.score_levels)}] {t}" for t, s in item.examples))
    levels = ", ".join(item.score_levels)
    if item.aspects:
        parts.append(f"Score each aspect ({levels}): {', '.join(item.aspects)}. Reply with the "
                     "scores in that order, separated by commas, and nothing else.")
    else:
        parts.append(f"Reply with one score ({levels}) and nothing else.")
    return "\n\n".join(parts)


def user_prompt(item: ScoringItem, response: Response) -> str:
    """The item text followed by the student's response."""
    head = f"Item:\n{item.question}\n\n" if item.question else ""
    return f"{head}Response:\n{response.text}"


def to_example(item: ScoringItem, response: Response) -> Example:
    """A single-label scored response as the :class:`Example` every method trains on.

    The choices are the item's score levels, so the LM scores each label after the prompt.

    Raises:
        DataError: a multi-label or unscored response (there is no single target).
    """
    if not isinstance(response.score, int):
        raise DataError("needs one integer score (multi-label items: use one example per aspect)",
                        response.ref or None, field="score")
    context = f"{system_prompt(item)}\n\n{user_prompt(item, response)}\n\nScore:"
    doc = {"item_id": item.item_id, "id": response.id, "text": response.text, "split": response.split}
    return Example(context, list(item.score_levels), response.score,
                   [item.score_levels[response.score]], doc, response.ref)


# ---------------------------------------------------------------- chat messages back to a prompt

class ChatError(ValueError):
    """Chat messages that make no prompt; ``zoft serve`` answers it with an OpenAI-style 400.

    Attributes:
        message: A short reason, safe to send back (never internal exception text).
        param: The offending field (``"messages[1].content"``), or None.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def message_text(message: dict, where: str) -> str:
    """A message's content as text: a string, or its text parts joined; missing content is ``""``.

    Raises:
        ChatError: content that is neither a string nor a list of text parts.
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
                raise ChatError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                f"{where}.content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError("content must be a string or a list of text parts", f"{where}.content")


def require_text(text: str, what: str, param: str) -> str:
    """``text`` itself, unless it is empty or whitespace (a :class:`ChatError`)."""
    if not text.strip():
        raise ChatError(f"{what} is empty", param)
    return text


def chat_response(messages: list[dict], items: Iterable[ScoringItem]) -> tuple[ScoringItem, str]:
    """The item and the response text of a chat request made as the export makes them.

    The item is the one whose :func:`system_prompt` is the request's system message (the
    only item, if there is one); the response is the last user message's text after
    ``"Response:\n"``.

    Raises:
        ChatError: no user message, an empty response, content that is not text, or a
            system message that matches no item.
    """
    items = list(items)
    system = "\n\n".join(message_text(m, f"messages[{i}]") for i, m in enumerate(messages)
                         if m.get("role") == "system")
    users = [(i, message_text(m, f"messages[{i}]")) for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ChatError("no user message", "messages")
    matches = [item for item in items if system_prompt(item) == system]
    if not matches and len(items) == 1:
        matches = items
    if not matches:
        raise ChatError("the system message matches no item of this scorer (send the exported system "
                        "prompt)", "messages")
    i, user = users[-1]
    return matches[0], require_text(user.split("Response:\n", 1)[-1], "the response to score",
                                    f"messages[{i}].content")


def default_context(messages: list[dict]) -> str:
    """System messages + the last user message + ``"\\n\\nScore:"``, as in :func:`to_example`.

    Every system (or developer) message's content, then the **last** user message's, joined by
    blank lines; earlier user and assistant turns are ignored. For messages built by
    :func:`system_prompt` and :func:`user_prompt` this is exactly :func:`to_example`'s context.

    Raises:
        ChatError: no user message, an empty one, or content that is not text.
    """
    system = [message_text(m, f"messages[{i}]") for i, m in enumerate(messages)
              if m.get("role") in ("system", "developer")]
    users = [(i, m) for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ChatError("messages must include a user message (the item and the response to score)",
                        "messages")
    i, last = users[-1]
    user = require_text(message_text(last, f"messages[{i}]"), "the user message", f"messages[{i}].content")
    return "\n\n".join([s for s in system if s.strip()] + [user]) + "\n\nScore:"
