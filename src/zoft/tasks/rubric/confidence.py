"""Confidence routing: which scored responses a teacher should check by hand, and what checking buys.

A response's **confidence** is the probability the scorer gives its predicted level: with the default
``decision=argmax`` the largest level probability, as in selective classification's "softmax
response", in [1/K, 1] for K levels; with ``decision=expected`` the probability of the level nearest
the expected score (:mod:`zoft.tasks.decision`), which can be lower. A multi-label response is as
confident as its least confident aspect. Confidence orders responses: how it is calibrated does not
matter for routing, only the order.

``zoft score --review-fraction F`` marks the ceil(F·n) least confident scored responses
``needs_review`` (:func:`needs_review`; equal confidences: the earlier row is reviewed first), so
the rest are scored automatically. With gold scores, :func:`coverage_curve` measures QWK on the
automatically scored part against **coverage** (the fraction scored automatically): the curve a
teacher reads to choose F. :func:`coverage_table` and :func:`coverage_png` are what ``zoft score``
writes; ``zoft report`` draws every run of an item set in one :func:`coverage_plot`, from the
confidences eval.json keeps for each prediction (:func:`eval_coverage` reads one run's curve).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path

from zoft.atomic import atomic_file
from zoft.errors import ZoftError
from zoft.tasks.metrics import quadratic_weighted_kappa

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def confidence(distributions: Sequence[Sequence[float]], chosen: Sequence[int] | None = None) -> float:
    """The smallest, over a response's aspects (one for a single-label task), of the chosen level's
    probability (``chosen``: one level index per aspect; default the most probable level)."""
    if not distributions or not all(distributions):
        raise ZoftError("confidence needs at least one level distribution")
    if chosen is None:
        return min(max(dist) for dist in distributions)
    if len(chosen) != len(distributions):
        raise ZoftError(f"{len(chosen)} chosen levels for {len(distributions)} level distributions")
    return min(dist[c] for dist, c in zip(distributions, chosen))


def review_count(fraction: float, n: int) -> int:
    """ceil(fraction·n), robust to float rounding (0.3·10 is 3, not 4)."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ZoftError(f"review fraction must be between 0 and 1, got {fraction}")
    return min(n, math.ceil(round(fraction * n, 9)))


def review_order(confidences: Sequence[float]) -> list[int]:
    """Positions from least to most confident; equal confidences keep their input order."""
    return sorted(range(len(confidences)), key=lambda i: (confidences[i], i))


def needs_review(confidences: Sequence[float], fraction: float) -> list[bool]:
    """Per response: among the ceil(fraction·n) least confident (:func:`review_order`)."""
    flagged = set(review_order(confidences)[:review_count(fraction, len(confidences))])
    return [i in flagged for i in range(len(confidences))]


def coverage_curve(confidences: Sequence[float], predicted: Sequence[Hashable], gold: Sequence[Hashable],
                   levels: Sequence[Hashable], coverages: Sequence[float] = COVERAGES) -> list[dict]:
    """QWK and accuracy on the automatically scored part at each coverage.

    At coverage c the ceil((1−c)·n) least confident responses go to a human (exactly the rows
    ``needs_review`` marks for F = 1−c) and the rest are scored automatically.

    Returns:
        One row per coverage with at least one response left: ``coverage``, ``review_fraction``,
        ``n_auto``, ``qwk`` and ``acc`` on those ``n_auto`` responses.
    """
    if not len(confidences) == len(predicted) == len(gold):
        raise ZoftError(f"{len(confidences)} confidences, {len(predicted)} predictions, {len(gold)} gold scores")
    order = review_order(confidences)
    rows = []
    for coverage in coverages:
        review = round(1.0 - coverage, 9)
        auto = order[review_count(review, len(order)):]
        if not auto:
            continue
        y_true, y_pred = [gold[i] for i in auto], [predicted[i] for i in auto]
        rows.append({"coverage": coverage, "review_fraction": review, "n_auto": len(auto),
                     "qwk": quadratic_weighted_kappa(y_true, y_pred, list(levels)),
                     "acc": sum(t == p for t, p in zip(y_true, y_pred)) / len(auto)})
    return rows


def eval_coverage(outputs: dict, levels: Sequence[Hashable] | None = None) -> list[dict] | None:
    """The coverage curve of a run's eval split, from its eval.json ``eval_outputs`` (predictions,
    targets and confidences; level indices), or None for a run without confidences: the report's hook."""
    if not outputs.get("confidences"):
        return None
    preds, targets = outputs["predictions"], outputs["targets"]
    labels = list(levels) if levels is not None else sorted(set(targets) | set(preds))
    return coverage_curve(outputs["confidences"], preds, targets, labels)


def coverage_table(curve: Sequence[dict]) -> str:
    """The curve as a Markdown table (for ``zoft score``'s output and a report)."""
    lines = ["| coverage | sent to review | scored automatically | QWK (auto part) | accuracy (auto part) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['coverage']:.0%} | {r['review_fraction']:.0%} | {r['n_auto']} | {r['qwk']:.3f} | {r['acc']:.3f} |"
              for r in curve]
    return "\n".join(lines) + "\n"


def coverage_png(curve: Sequence[dict], path: str | Path, title: str = "", human_qwk: float | None = None) -> Path:
    """QWK on the automatically scored part against coverage, as a PNG (written atomically)."""
    return coverage_plot({"model, auto part": curve}, path, title, human_qwk)


def coverage_plot(curves: dict[str, Sequence[dict]], path: str | Path, title: str = "",
                  human_qwk: float | None = None) -> Path:
    """One line per named curve (QWK on the auto part against coverage), plus the human-human
    QWK as a dashed line, as a PNG written atomically: a report draws every run of an item set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot([r["coverage"] for r in curve], [r["qwk"] for r in curve], marker="o", label=name)
    if human_qwk is not None:
        ax.axhline(human_qwk, color="grey", linestyle="--", label=f"human-human {human_qwk:.3f}")
    ax.set_xlabel("coverage (fraction scored automatically)")
    ax.set_ylabel("QWK")
    ax.invert_xaxis()   # left: everything automatic; right: most sent to a teacher
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path
