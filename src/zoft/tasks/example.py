"""The data types every task produces: one :class:`Example` per row, grouped in :class:`TaskData`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One prompt with its candidate continuations or gold answers.

    A model scores ``context + task.target_delimiter + choice`` for each choice, or
    generates after ``context`` for generation tasks.

    Attributes:
        context: The rendered prompt (``doc_to_text``, after any ``description``).
        choices: Candidate continuations, without the delimiter; empty for generation.
        target: Index of the gold choice; None for generation.
        answers: Gold strings: ``[choices[target]]`` for choice tasks, all accepted
            answers for generation.
        doc: The raw row.
        ref: ``"path:row"`` of the row, for error messages.
        shared_prefix: The start of ``context`` that many examples share word for word (a
            scoring item's header: item text and rubric), or ``""``. A causal LM may run it
            once for all of them (:mod:`zoft.shared_prefix`); the prompt is the same either way.
    """

    context: str
    choices: list[str]
    target: int | None
    answers: list[str]
    doc: dict
    ref: str
    shared_prefix: str = ""


@dataclass
class TaskData:
    """The three disjoint samples of a run: train and dev for fitting, eval for reporting."""

    train: list[Example]
    dev: list[Example]
    eval: list[Example]
