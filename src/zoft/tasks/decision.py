"""From level probabilities to one score: the ``decision`` rule of a classification run.

* ``argmax``: the most probable level (every task; the default).
* ``expected``: the level nearest the expected score Σ_k k·p_k, for tasks whose choices are an ordered
  scale (scoring tasks: levels lowest first). Of all levels it has the smallest expected squared
  distance from the true one (E[(j − Y)²] = (j − E[Y])² + Var[Y]), which is what quadratic weighted
  kappa penalises; argmax minimises the chance of any error, near or far. Between two levels (a
  binary scale) the two agree. A tie (E[Y] half-way between two levels) goes to the higher level,
  as round-half-up does.

A response's confidence (:mod:`zoft.tasks.rubric.confidence`) is the probability of the level the
rule chose.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zoft.errors import ZoftError

DECISIONS = ("argmax", "expected")


def requires_scale(decision: str, task) -> None:
    """Refuse ``expected`` for a task whose choices are not an ordered scale (only scoring tasks have levels)."""
    if decision == "expected" and getattr(task, "levels", None) is None:
        raise ZoftError(f"decision=expected needs a scoring task (ordered score levels); task '{task.name}' "
                        "has unordered choices: use decision=argmax")


def decide(probabilities: torch.Tensor, decision: str) -> list[int]:
    """The chosen level index of each row of (B, C) probabilities."""
    if decision == "argmax":
        return probabilities.argmax(-1).tolist()
    if decision != "expected":
        raise ZoftError(f"unknown decision '{decision}'; choose from {', '.join(DECISIONS)}")
    levels = torch.arange(probabilities.shape[-1], dtype=probabilities.dtype)
    mean = (probabilities @ levels) / probabilities.sum(-1)
    return torch.floor(mean + 0.5).clamp(0, probabilities.shape[-1] - 1).long().tolist()


def decide_one(probabilities: Sequence[float], decision: str) -> int:
    """:func:`decide` for one distribution given as a list."""
    if not probabilities or not all(math.isfinite(p) for p in probabilities):
        raise ZoftError("a decision needs finite level probabilities")
    return decide(torch.tensor([list(probabilities)], dtype=torch.float64), decision)[0]


__all__ = ["DECISIONS", "decide", "decide_one", "requires_scale"]
