"""Rubric scoring metrics on raw scores (multi-label lists too): accuracy (the scoring paper's),
macro F1, human inter-rater agreement (QWK, from :mod:`zoft.tasks.metrics`, the ASAP convention)
and a confusion-matrix figure."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from zoft.atomic import atomic_file
from zoft.errors import DataError
from zoft.tasks.metrics import check_scores, confusion_matrix, quadratic_weighted_kappa
from zoft.tasks.rubric.data import Response


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of exact matches; for multi-label scores (lists) all aspects must match."""
    check_scores(y_true, y_pred)
    return sum(list(t) == list(p) if isinstance(t, list | tuple) else t == p
               for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> float:
    """F1 averaged over classes with equal weight (for 0/1 multi-label lists: over aspects).

    A class in ``labels`` that never occurs counts as F1 0 rather than being dropped,
    so a scorer that ignores a rare score is penalised.
    """
    check_scores(y_true, y_pred)
    from sklearn.metrics import f1_score  # imported lazily: sklearn is slow to import

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=labels, average="macro",
                          zero_division=0))


def confusion_matrix_png(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                         labels: Sequence[Hashable], path: str | Path, title: str = "") -> Path:
    """Draws the confusion matrix (rows: human, columns: model) with counts to a PNG.

    Written to a temporary file in the same folder and renamed, so a reader never sees
    a half-written image (e.g. a report built while a run is still going).
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, matrix = confusion_matrix(y_true, y_pred, labels)
    size = 1.2 + 0.6 * len(labels)
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(x) for x in labels])
    ax.set_yticks(ticks, [str(x) for x in labels])
    ax.set_xlabel("predicted score")
    ax.set_ylabel("human score")
    if title:
        ax.set_title(title)
    for (r, c), n in np.ndenumerate(matrix):
        ax.text(c, r, str(n), ha="center", va="center",
                color="white" if n > matrix.max() / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as f:   # a Figure without pyplot: nothing to close
        fig.savefig(f, format="png", dpi=100)
    return path


def human_agreement(responses: Sequence[Response], labels: Sequence[int] | None = None) -> float:
    """QWK between the two human raters (``score`` vs ``second_score``), on rows with both.

    Raises:
        DataError: no response has two single-label scores.
    """
    both = [(r.score, r.second_score) for r in responses
            if isinstance(r.score, int) and r.second_score is not None]
    if not both:
        raise DataError("no response has both a score and a second_score")
    first, second = zip(*both)
    return quadratic_weighted_kappa(first, second, labels)
