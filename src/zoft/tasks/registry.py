"""Which task a name or a path means: the one module that knows every task kind.

The kinds stay apart below it: :mod:`zoft.tasks.task` (YAML tasks) does not know rubric
scoring, and :mod:`zoft.tasks.rubric` builds on the shared parts of tasks. A new kind adds
its names or files here.
"""
from __future__ import annotations

from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks.rubric.chat import is_chat_file, is_chat_yaml, load_chat_task, load_chat_yaml
from zoft.tasks.rubric.task import (ScoringTask, is_scoring_task_name, is_scoring_yaml, load_scoring_task,
                                    load_scoring_yaml)
from zoft.tasks.task import CONFIG_DIR, Task, list_tasks


def load_task(name_or_path: str | Path) -> Task | ScoringTask:
    """Loads a builtin task by name, or a user's task YAML by path.

    ``asap-<N>`` and ``scientsbank`` are scoring tasks (a
    :class:`zoft.tasks.rubric.ScoringTask`, which has the same interface), and so is a
    YAML file with a ``table`` key (a CSV/JSONL of scored responses and its column mapping).
    So is an OpenAI chat fine-tuning file (``.jsonl``), or a YAML naming ``training_file`` and
    ``validation_file`` (:mod:`zoft.tasks.rubric.chat`).

    Raises:
        ZoftError: neither a builtin name nor an existing file.
        DataError: the YAML is invalid.
    """
    text = str(name_or_path)
    if text in list_tasks():
        return Task.from_yaml(CONFIG_DIR / f"{text}.yaml", builtin=True)
    if Path(text).is_file() or text.endswith((".yaml", ".yml", ".jsonl")):
        if Path(text).is_file() and is_chat_file(text):
            return load_chat_task(text)
        if Path(text).is_file() and is_chat_yaml(text):
            return load_chat_yaml(text)
        if Path(text).is_file() and is_scoring_yaml(text):
            return load_scoring_yaml(text)
        return Task.from_yaml(text)
    if is_scoring_task_name(text):
        return load_scoring_task(text)
    raise ZoftError(f"unknown task '{text}' (builtin: {', '.join(list_tasks())}; scoring: asap-<N>, "
                    f"scientsbank; or pass a YAML path)")
