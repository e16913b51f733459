"""OpenAI chat fine-tuning files as scoring tasks: ``task=train.jsonl`` trains and evaluates on them.

Each line is ``{"messages": [system..., user, assistant]}``: the system prompt is the item
(its instructions and rubric: one item per distinct system prompt and item text), the user
turn holds the response, and the assistant turn is its score. The score levels are the
distinct assistant contents, sorted (numerically when they are all integers).

Files written by :func:`zoft.scoring.openai_jsonl.export_chat_jsonl` come back as the items
they were made from: the system prompt is parsed into rubric, reference answers, scored
examples, levels (in the item's order) and aspects, and kept only if
:func:`~zoft.tasks.rubric.prompts.system_prompt` writes it back identically, so training on the
export gives the same prompts and labels as training on the original task. Any other system
prompt becomes the item's rubric as it is.

Splits follow OpenAI's ``training_file`` / ``validation_file``: a bare file is one pool from
which the eval sample is held out (with a note saying so); a YAML names both::

    training_file: train.jsonl        # relative to this YAML
    validation_file: valid.jsonl      # optional
    prompt: {rubric: 400}             # optional word budgets
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import yaml

from zoft.errors import DataError
from zoft.tasks.readers import read_text
from zoft.tasks.rubric.data import Response, ScoringItem, parse_score
from zoft.tasks.rubric.prompts import system_prompt
from zoft.tasks.rubric.task import ScoringTask

CHAT_YAML_KEYS = {"training_file", "validation_file", "prompt", "kind"}
ROLES = ("system", "developer", "user", "assistant")
log = logging.getLogger(__name__)

_ROW_SHAPE = "zoft trains on system messages, one user message (the response), then the assistant's score"
_HEAD = system_prompt(ScoringItem("", "", "", [], ["0", "1"])).split("\n\n")[0] + "\n\n"
_SINGLE = re.compile(r"\n*Reply with one score \((?P<levels>.+)\) and nothing else\.\Z", re.DOTALL)
_ASPECTS = re.compile(r"\n*Score each aspect \((?P<levels>.+)\): (?P<aspects>.+)\. Reply with the scores in "
                      r"that order, separated by commas, and nothing else\.\Z", re.DOTALL)


def _content(message: dict, path: str, row: int, where: str) -> str:
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content.strip():
        raise DataError("missing or empty content (expected text)", path, row, f"{where}.content")
    return content


def read_chat_rows(path: Path) -> list[tuple[int, str, str, str]]:
    """``(row, system, user, assistant)`` for each conversation of a chat JSONL file.

    Raises:
        DataError: a line that is not JSON or has no ``messages`` list, an unknown role, empty
            content, no assistant turn, or a multi-turn conversation; ``path:row: field: what``.
    """
    p, out = str(path), []
    for row, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", p, row) from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError('expected {"messages": [...]} (OpenAI chat format), a non-empty list', p, row,
                            "messages")
        system, turns = [], []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise DataError(f"unknown role {role!r} (expected {', '.join(ROLES)}): {_ROW_SHAPE}", p, row,
                                f"{where}.role")
            text = _content(m, p, row, where)
            if role in ("system", "developer"):
                if turns:
                    raise DataError(f"a system message after the conversation started: {_ROW_SHAPE}", p, row, where)
                system.append(text)
            else:
                turns.append((role, text))
        if not turns or turns[-1][0] != "assistant":
            raise DataError(f"no assistant message at the end (the score to learn): {_ROW_SHAPE}", p, row,
                            "messages")
        if [r for r, _ in turns] != ["user", "assistant"]:
            raise DataError(f"{len(turns)} user/assistant turns; multi-turn conversations are not supported: "
                            f"{_ROW_SHAPE}", p, row, "messages")
        out.append((row, "\n\n".join(system), turns[0][1], turns[1][1].strip()))
    if not out:
        raise DataError("file is empty (no conversations)", p)
    return out


def _split_user(user: str) -> tuple[str, str]:
    """``(item text, response)`` of a user turn; the export's ``Item:\\n...\\n\\nResponse:\\n...`` layout."""
    if user.startswith("Item:\n") and "\n\nResponse:\n" in user:
        question, text = user[len("Item:\n"):].split("\n\nResponse:\n", 1)
        return question, text
    return "", user.removeprefix("Response:\n")


def parse_system_prompt(system: str, question: str) -> ScoringItem | None:
    """The item :func:`system_prompt` made ``system`` from, or None if it is not one of zoft's."""
    single, multi = _SINGLE.search(system), _ASPECTS.search(system)
    tail = multi or single
    if not system.startswith(_HEAD) or tail is None:
        return None
    levels = tail["levels"].split(", ")
    aspects = multi["aspects"].split(", ") if multi else []
    body = system[len(_HEAD):tail.start()]
    sections = {"Rubric:\n": "", "Reference answers:\n": "", "Scored examples:\n": ""}
    for name in reversed(list(sections)):   # later sections first: the rubric may hold anything
        at = body.rfind("\n\n" + name) + 2 if ("\n\n" + name) in body else (0 if body.startswith(name) else -1)
        if at >= 0:
            sections[name], body = body[at + len(name):], body[:max(at - 2, 0)]
    if body:
        return None
    try:
        refs = [a[2:] for a in sections["Reference answers:\n"].split("\n") if a] if sections[
            "Reference answers:\n"] else []
        examples = []
        for line in sections["Scored examples:\n"].split("\n") if sections["Scored examples:\n"] else []:
            m = re.fullmatch(r"- \[(.+?)\] (.*)", line, re.DOTALL)
            examples.append((m[2], parse_score(m[1], levels)))
    except (TypeError, ValueError):
        return None
    item = ScoringItem("", question, sections["Rubric:\n"], refs, levels, examples, aspects)
    return item if system_prompt(item) == system else None


def _sorted_levels(labels: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def chat_task_data(files: dict[str, Path]) -> tuple[list[ScoringItem], dict[str, list[Response]]]:
    """Items and scored responses, per split, of chat files (split name -> file).

    One item per distinct system prompt and item text, shared across the files. Items whose
    system prompt is not zoft's all take the levels found in every such file's assistant turns.

    Raises:
        DataError: a malformed row (:func:`read_chat_rows`), or a score that is not one of the
            levels its zoft system prompt lists.
    """
    rows = {split: read_chat_rows(path) for split, path in files.items()}
    parsed: dict[str, ScoringItem | None] = {}
    for conversations in rows.values():
        for _, system, _, _ in conversations:
            if system not in parsed:
                parsed[system] = parse_system_prompt(system, "")
    generic = _sorted_levels({a for conversations in rows.values() for _, s, _, a in conversations
                              if parsed[s] is None})
    items: dict[tuple[str, str], ScoringItem] = {}
    responses: dict[str, list[Response]] = {}
    for split, conversations in rows.items():
        path, out = files[split], responses.setdefault(split, [])
        for row, system, user, answer in conversations:
            question, text = _split_user(user)
            if (system, question) not in items:
                zoft_item = parsed[system]
                item = (replace(zoft_item, question=question) if zoft_item is not None else
                        ScoringItem("", question, system, [], generic, metadata={"system_prompt": system}))
                items[(system, question)] = replace(item, item_id=f"item-{len(items) + 1}")
            item = items[(system, question)]
            try:
                score = (item.score_levels.index(answer) if parsed[system] is None
                         else parse_score(answer, item.score_levels))
            except ValueError as e:
                raise DataError(f"not a score of this item: {e}", str(path), row, "messages[-1].content") from None
            out.append(Response(str(row), text, score, None, split, item.item_id, f"{path}:{row}"))
    return list(items.values()), responses


def load_chat_task(training_file: str | Path, validation_file: str | Path | None = None, *,
                   name: str | None = None, prompt: dict | None = None) -> ScoringTask:
    """A scoring task from OpenAI chat fine-tuning files (see the module doc).

    Raises:
        DataError: a malformed file, or items whose score levels differ.
    """
    train_path = Path(training_file)
    files = {"train": train_path}
    if validation_file is not None:
        files["validation"] = Path(validation_file)
    items, responses = chat_task_data(files)
    name = name or train_path.stem
    train = responses["train"]
    if validation_file is None:
        log.warning("%s: no validation file, so the eval sample is held out of this file (name one with "
                    "validation_file in a task YAML: README, 'Chat files')", train_path)
        return ScoringTask(name, items, train, train, same_split=True, source=str(train_path), prompt=prompt)
    return ScoringTask(name, items, train, responses["validation"], source=str(train_path), prompt=prompt)


def is_chat_file(path: str | Path) -> bool:
    """Whether a task path is a chat JSONL file (by its suffix)."""
    return Path(path).suffix.lower() in (".jsonl", ".json")


def is_chat_yaml(path: str | Path) -> bool:
    """Whether a task YAML describes chat files (it has a top-level ``training_file`` key)."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False   # Task.from_yaml reports the problem
    return isinstance(spec, dict) and "training_file" in spec


def load_chat_yaml(path: str | Path) -> ScoringTask:
    """The task of a chat YAML (``training_file``, optional ``validation_file`` and ``prompt``).

    Raises:
        DataError: an unreadable file, an unknown key, or a bad file name.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"invalid YAML: {e}".splitlines()[0], str(path)) from None
    unknown = sorted(set(spec) - CHAT_YAML_KEYS)
    if unknown:
        raise DataError(f"unknown key (a chat task has {', '.join(sorted(CHAT_YAML_KEYS))})", str(path),
                        field=unknown[0])
    if spec.get("kind", "chat") != "chat":
        raise DataError("must be 'chat' for a task with training_file", str(path), field="kind")
    for key in ("training_file", "validation_file"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            raise DataError("expected a file name", str(path), field=key)
    validation = spec.get("validation_file")
    return load_chat_task(path.parent / spec["training_file"],
                          path.parent / validation if validation else None, name=path.stem,
                          prompt=spec.get("prompt"))
