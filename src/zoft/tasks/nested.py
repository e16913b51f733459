"""Nested rows made flat without code: the ``explode:`` key of a task YAML.

A MultiRC row is one passage with many questions, each with many answers, and each answer
is one example. ``explode`` names, in order, the lists to unnest and what to call one
element of each, the way SQL's ``UNNEST`` or pandas' ``explode`` do::

    explode:
      question: passage.questions     # a list inside the row
      answer: question.answers        # a list inside the element just named

Each output row is the input row plus ``question`` and ``answer`` (one element each), so
templates read ``{{passage.text}}``, ``{{question.question}}``, ``{{answer.text}}`` and
``doc_to_target: answer.label``. A row whose list is empty yields no examples.
"""
from __future__ import annotations

from typing import Any

from zoft.errors import DataError
from zoft.tasks.readers import Row


def field_value(doc: dict, name: str) -> Any:
    """``doc[name]``, where a dotted name (``answer.label``) walks into nested objects; None if absent."""
    value: Any = doc
    for part in name.split(".") if name not in doc else [name]:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def check_explode(spec: Any, where: str) -> dict[str, str]:
    """The ``explode`` mapping, validated: new field name -> dotted path of a list.

    Raises:
        DataError: not a non-empty mapping of names to paths.
    """
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not spec or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in spec.items()):
        raise DataError("must map a new field name to the dotted path of a list, e.g. "
                        "{question: passage.questions, answer: question.answers}", where, field="explode")
    return dict(spec)


def explode_rows(rows: list[Row], spec: dict[str, str], path: str) -> list[Row]:
    """Every row unnested along ``spec`` (see the module doc); rows keep their source row number.

    Raises:
        DataError: a path that is missing from a row or is not a list of objects or values.
    """
    out = rows
    for name, source in spec.items():
        step = []
        for row, doc in out:
            values = field_value(doc, source)
            if not isinstance(values, list):
                what = "missing or null" if values is None else f"a {type(values).__name__}, not a list"
                raise DataError(f"{what} in this row (explode: {name}: {source})", path, row, source)
            step += [(row, {**doc, name: value}) for value in values]
        out = step
    if not out:
        raise DataError(f"no rows left after explode ({', '.join(spec.values())} are all empty)", path)
    return out
