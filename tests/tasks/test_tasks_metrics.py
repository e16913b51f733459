"""Metrics against hand-computed values and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from zoft.errors import ZoftError
from zoft.tasks import METRICS, Example, compute_metric
from zoft.tasks.metrics import normalize_answer


def gen(*answers):
    return Example("q", [], None, list(answers), {}, "f:1")


def choice(target, choices=("No", "Yes", "Maybe")):
    return Example("q", list(choices), target, [choices[target]], {}, "f:1")


def test_normalize_answer():
    assert normalize_answer("  The Cat, sat on A mat! ") == "cat sat on mat"


def test_squad_f1_hand_computed():
    # "cat sat" vs "cat sat down": precision 1, recall 2/3 -> F1 0.8; best over gold answers.
    assert compute_metric("squad_f1", ["the cat sat"], [gen("dog", "a cat sat down")]) == pytest.approx(0.8)
    # second example: no overlap -> 0; mean (0.8 + 0) / 2
    assert compute_metric("squad_f1", ["the cat sat", "blue"],
                          [gen("a cat sat down"), gen("red")]) == pytest.approx(0.4)
    # "new york city" vs "york": p = 1/3, r = 1 -> 0.5
    assert compute_metric("squad_f1", ["New York City"], [gen("York")]) == pytest.approx(0.5)


def test_exact_match_hand_computed():
    preds = ["Paris!", "the Seine river", "London"]
    golds = [gen("paris"), gen("Seine", "The Seine River"), gen("Berlin")]
    assert compute_metric("exact_match", preds, golds) == pytest.approx(2 / 3)


def test_choice_predictions():
    examples = [choice(0), choice(1), choice(2), choice(1)]
    preds = [0, 1, 1, 0]
    assert compute_metric("acc", preds, examples) == 0.5
    assert compute_metric("exact_match", preds, examples) == 0.5
    assert compute_metric("squad_f1", preds, examples) == 0.5


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 200).tolist(), rng.integers(0, 3, 200).tolist()
    got = compute_metric("f1", pred, [choice(g) for g in gold])
    assert got == pytest.approx(f1_score(gold, pred, average="macro"))
    assert 0 < got < 1


def test_generation_acc_and_f1():
    examples = [gen("great"), gen("terrible"), gen("great")]
    preds = ["Great.", "great", "great"]
    assert compute_metric("acc", preds, examples) == pytest.approx(2 / 3)
    assert compute_metric("f1", preds, examples) == pytest.approx(
        f1_score(["great", "terrible", "great"], ["great", "great", "great"], average="macro", zero_division=0))


def test_registry_and_errors():
    assert set(METRICS) == {"acc", "f1", "exact_match", "squad_f1", "qwk", "response_acc"}
    with pytest.raises(ZoftError, match="unknown metric 'bleu'"):
        compute_metric("bleu", [], [])
    with pytest.raises(ValueError):
        compute_metric("acc", [0], [])
    assert compute_metric("acc", [], []) == 0.0


def test_agreement_measures_follow_rsmtools_definitions():
    from scipy.stats import pearsonr
    from sklearn.metrics import cohen_kappa_score
    from zoft.tasks.metrics import agreement_measures, standardized_mean_difference
    human = [0, 1, 2, 3, 2, 1, 0, 3, 2, 2]
    system = [0, 2, 2, 3, 0, 1, 1, 3, 3, 2]
    h, s = np.array(human, float), np.array(system, float)
    m = agreement_measures(human, system, [0, 1, 2, 3])
    assert m["n"] == 10
    assert m["exact"] == pytest.approx(0.6) and m["adjacent"] == pytest.approx(0.9)   # one response 2 apart
    assert m["qwk"] == pytest.approx(cohen_kappa_score(human, system, weights="quadratic"))
    assert m["r"] == pytest.approx(pearsonr(h, s)[0])
    # SMD: (mean(system) - mean(human)) / sd(human), sd with ddof 1 (RSMTool's "unpooled")
    assert m["smd"] == pytest.approx((1.7 - 1.6) / np.std(h, ddof=1))
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 1 + 1 + 1) / 10))
    # between two humans RSMTool pools the two sds
    pooled = np.sqrt((np.var(h, ddof=1) + np.var(s, ddof=1)) / 2)
    assert standardized_mean_difference(human, system, pooled=True) == pytest.approx(0.1 / pooled)
    # constant scores: no correlation and no SMD rather than a division by zero
    flat = agreement_measures([1, 1, 1], [0, 1, 2])
    assert flat["r"] is None and flat["smd"] is None and flat["exact"] == pytest.approx(1 / 3)
