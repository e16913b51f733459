"""Scoring metrics: quadratic weighted kappa (ASAP convention), accuracy (the scoring
paper's), macro F1, a confusion-matrix figure, and human inter-rater agreement."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from zoft.atomic import atomic_file
from zoft.errors import DataError
from zoft.scoring.data import Response


def _check_lengths(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true scores but {len(y_pred)} predictions")
    if not len(y_true):
        raise DataError("no scores to compare")


def _labels(y_true: Sequence, y_pred: Sequence, labels: Sequence | None) -> list:
    """The ordered label set, checking that every score is a single label within it."""
    _check_lengths(y_true, y_pred)
    if any(isinstance(y, list | tuple | np.ndarray) for y in (*y_true, *y_pred)):
        raise DataError("needs one score per response (for multi-label scores, one aspect at a time)")
    if labels is None:
        return sorted(set(y_true) | set(y_pred))
    unknown = (set(y_true) | set(y_pred)) - set(labels)
    if unknown:
        raise DataError(f"scores {sorted(unknown, key=str)} are not among the labels {list(labels)}")
    return list(labels)


def _confusion(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: list) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([index[y] for y in y_true], [index[y] for y in y_pred]), 1)
    return matrix


def quadratic_weighted_kappa(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                             labels: Sequence[Hashable] | None = None) -> float:
    """Cohen's kappa with quadratic weights, from its definition.

    ``kappa = 1 - sum(W * O) / sum(W * E)`` where ``O`` is the confusion matrix, ``E``
    the matrix expected by chance (outer product of the two marginals, scaled to the
    same total) and ``W[i, j] = (i - j)^2 / (K - 1)^2``. Distances are positions in
    ``labels``, so they order the scale (default: the sorted scores that occur).

    Returns:
        Kappa in [-1, 1]; 1.0 when both raters give one and the same score throughout
        (kappa is 0/0 there; identical ratings count as perfect agreement).

    Raises:
        DataError: different lengths, no scores, or a score not among ``labels``.
    """
    labels = _labels(y_true, y_pred, labels)
    observed = _confusion(y_true, y_pred, labels).astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    k = len(labels)
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / max(k - 1, 1) ** 2
    disagreement = (weights * expected).sum()
    if disagreement == 0:
        return 1.0
    return float(1 - (weights * observed).sum() / disagreement)


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of exact matches; for multi-label scores (lists) all aspects must match."""
    _check_lengths(y_true, y_pred)
    return sum(list(t) == list(p) if isinstance(t, list | tuple) else t == p
               for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> float:
    """F1 averaged over classes with equal weight (for 0/1 multi-label lists: over aspects).

    A class in ``labels`` that never occurs counts as F1 0 rather than being dropped,
    so a scorer that ignores a rare score is penalised.
    """
    _check_lengths(y_true, y_pred)
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

    labels = _labels(y_true, y_pred, labels)
    matrix = _confusion(y_true, y_pred, labels)
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
