"""Task metrics, all with the signature ``fn(predictions, examples) -> float``.

Predictions are choice indices for classification / multiple-choice tasks and strings
for generation tasks; every metric accepts both, so any metric can be asked of any
task. They also serve as non-differentiable training objectives (MeZO only needs a
scalar), so they are plain Python on small lists and cheap to call.

Under them, on two raters' raw scores: the confusion matrix and quadratic weighted kappa
(the ``qwk`` metric; rubric scoring reports it against human raters too).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from zoft.errors import DataError, ZoftError

if TYPE_CHECKING:
    from zoft.tasks.example import Example

Prediction = int | str
Metric = Callable[[Sequence[Prediction], Sequence["Example"]], float]

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squash spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD 2.0 convention: both empty counts as a match
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _check(predictions: Sequence[Prediction], examples: Sequence[Example]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")


def _text(pred: Prediction, ex: Example) -> str:
    """A prediction as text: a choice index becomes that choice's string."""
    return ex.choices[pred] if isinstance(pred, int) and ex.choices else str(pred)


def _label(pred: Prediction, ex: Example) -> Prediction:
    """A prediction as a class label: the index for choice tasks, normalised text otherwise."""
    return pred if isinstance(pred, int) else normalize_answer(pred)


def _gold_label(ex: Example) -> Prediction:
    return ex.target if ex.target is not None else normalize_answer(ex.answers[0])


def accuracy(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Fraction of predictions equal to the gold label (exact match for generation)."""
    _check(predictions, examples)
    if not examples:
        return 0.0
    if all(ex.target is not None for ex in examples) and all(isinstance(p, int) for p in predictions):
        return sum(p == ex.target for p, ex in zip(predictions, examples)) / len(examples)
    return exact_match(predictions, examples)


def macro_f1(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Unweighted mean of per-class F1 (scikit-learn), over classes in gold or predictions."""
    _check(predictions, examples)
    if not examples:
        return 0.0
    from sklearn.metrics import f1_score  # imported lazily: sklearn is slow to import

    gold = [_gold_label(ex) for ex in examples]
    pred = [_label(p, ex) for p, ex in zip(predictions, examples)]
    return float(f1_score(gold, pred, average="macro", zero_division=0))


def exact_match(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Fraction of predictions equal to some gold answer after SQuAD normalisation."""
    _check(predictions, examples)
    if not examples:
        return 0.0
    hits = 0
    for p, ex in zip(predictions, examples):
        text = normalize_answer(_text(p, ex))
        hits += any(text == normalize_answer(a) for a in ex.answers)
    return hits / len(examples)


def squad_f1(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Mean token-overlap F1, taking the best gold answer for each example (SQuAD)."""
    _check(predictions, examples)
    if not examples:
        return 0.0
    total = sum(max(_token_f1(_text(p, ex), a) for a in ex.answers)
                for p, ex in zip(predictions, examples))
    return total / len(examples)


def qwk(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Quadratic weighted kappa between gold and predicted choice indices (ASAP-SAS convention).

    Choices are taken as an ordinal scale in their listed order (score levels, lowest
    first); distances use the whole scale, including levels that never occur.

    Raises:
        ZoftError: a generation task (predictions that are not choice indices) or an
            example without a gold choice.
    """
    _check(predictions, examples)
    if not examples:
        return 0.0
    from numbers import Integral

    if any(ex.target is None for ex in examples) or not all(
            isinstance(p, Integral) and not isinstance(p, bool) for p in predictions):
        raise ZoftError("metric 'qwk' needs choice-index predictions and gold choices "
                        "(a classification or multiple-choice task)")
    labels = list(range(max(len(ex.choices) for ex in examples)))
    return quadratic_weighted_kappa([ex.target for ex in examples], [int(p) for p in predictions], labels)


def response_accuracy(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Fraction of responses with every aspect right (multi-label scoring).

    Examples of one response share ``doc["response_key"]``; an example without one is a
    response of its own, so on single-label data this equals accuracy.
    """
    _check(predictions, examples)
    right: dict[object, bool] = {}
    for i, (p, ex) in enumerate(zip(predictions, examples)):
        key = (ex.doc or {}).get("response_key", ("example", i))
        right[key] = right.get(key, True) and _label(p, ex) == _gold_label(ex)
    return sum(right.values()) / len(right) if right else 0.0


METRICS: dict[str, Metric] = {
    "acc": accuracy,
    "f1": macro_f1,
    "exact_match": exact_match,
    "response_acc": response_accuracy,
    "squad_f1": squad_f1,
    "qwk": qwk,
}


def compute_metric(name: str, predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Computes the metric registered as ``name`` in :data:`METRICS`.

    Raises:
        ZoftError: ``name`` is not a known metric.
    """
    if name not in METRICS:
        raise ZoftError(f"unknown metric '{name}' (known: {', '.join(METRICS)})")
    return METRICS[name](predictions, examples)


# ---------------------------------------------------------------- two raters' raw scores

def check_scores(y_true: Sequence, y_pred: Sequence) -> None:
    """Raises a DataError unless both raters scored the same, non-zero number of responses."""
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true scores but {len(y_pred)} predictions")
    if not len(y_true):
        raise DataError("no scores to compare")


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                     labels: Sequence[Hashable] | None = None) -> tuple[list, np.ndarray]:
    """The ordered labels (default: the sorted scores that occur) and the counts of
    ``(true, predicted)`` pairs, rows true, columns predicted.

    Raises:
        DataError: different lengths, no scores, a multi-label score (a list), or a score
            not among ``labels``.
    """
    check_scores(y_true, y_pred)
    if any(isinstance(y, list | tuple | np.ndarray) for y in (*y_true, *y_pred)):
        raise DataError("needs one score per response (for multi-label scores, one aspect at a time)")
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    unknown = (set(y_true) | set(y_pred)) - set(labels)
    if unknown:
        raise DataError(f"scores {sorted(unknown, key=str)} are not among the labels {list(labels)}")
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([index[y] for y in y_true], [index[y] for y in y_pred]), 1)
    return list(labels), matrix


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
    labels, observed = confusion_matrix(y_true, y_pred, labels)
    observed = observed.astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    k = len(labels)
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / max(k - 1, 1) ** 2
    disagreement = (weights * expected).sum()
    if disagreement == 0:
        return 1.0
    return float(1 - (weights * observed).sum() / disagreement)


# ---------------------------------------------------------------- RSMTool's agreement measures

def standardized_mean_difference(human: Sequence[float], system: Sequence[float],
                                 pooled: bool = False) -> float | None:
    """SMD as RSMTool defines it: ``(mean(system) - mean(human)) / sd(human)`` (ddof 1).

    ``pooled`` divides by ``sqrt((sd(human)^2 + sd(system)^2) / 2)`` instead: RSMTool's SMD
    between two human raters. None where the denominator is 0 (every score the same).
    """
    h, s = np.asarray(human, dtype=float), np.asarray(system, dtype=float)
    if len(h) < 2:
        return None
    sd = np.sqrt((h.var(ddof=1) + s.var(ddof=1)) / 2) if pooled else h.std(ddof=1)
    return float((s.mean() - h.mean()) / sd) if sd > 0 else None


def agreement_measures(human: Sequence[float], system: Sequence[float], labels: Sequence[int] | None = None,
                       pooled_smd: bool = False) -> dict[str, float | int | None]:
    """The measures RSMTool reports for one system against human scores.

    ``n``; ``exact`` and ``adjacent`` (fractions of responses with ``|system - human|`` 0 and at
    most 1); ``qwk`` (over ``labels``, default the scores that occur); ``r`` (Pearson, None when
    either side is constant); ``smd`` (:func:`standardized_mean_difference`, ``pooled_smd`` for
    human-human); ``rmse``.

    Raises:
        DataError: different lengths or no scores.
    """
    check_scores(human, system)
    from scipy.stats import pearsonr   # imported lazily, as sklearn: slow to import

    h, s = np.asarray(human, dtype=float), np.asarray(system, dtype=float)
    diff = np.abs(s - h)
    constant = h.std() == 0 or s.std() == 0
    return {"n": len(h), "exact": float((diff == 0).mean()), "adjacent": float((diff <= 1).mean()),
            "qwk": quadratic_weighted_kappa(list(human), list(system), labels),
            "r": None if constant else float(pearsonr(h, s)[0]),
            "smd": standardized_mean_difference(h, s, pooled=pooled_smd),
            "rmse": float(np.sqrt(((s - h) ** 2).mean()))}
