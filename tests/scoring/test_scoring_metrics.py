"""QWK from its definition against scikit-learn, human agreement on ASAP, the PNG writer."""
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score

from zoft.errors import DataError
from zoft.tasks.metrics import quadratic_weighted_kappa
from zoft.tasks.rubric.data import Response, read_asap
from zoft.tasks.rubric.metrics import accuracy, confusion_matrix_png, human_agreement, macro_f1
from zoft.tasks.readers import data_dir

DATA = data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")


@pytest.mark.parametrize("seed", range(20))
def test_qwk_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(2, 6)), int(rng.integers(5, 60))
    y_true = rng.integers(0, k, n)
    noise = rng.integers(-1, 2, n) * (rng.random(n) < 0.5)  # correlated, so kappa is not ~0
    y_pred = np.clip(y_true + noise, 0, k - 1)
    if seed % 4 == 0:  # a label that never appears among the predictions
        y_true[0], y_pred = k - 1, np.minimum(y_pred, k - 2)
    labels = list(range(k))
    ours = quadratic_weighted_kappa(y_true.tolist(), y_pred.tolist(), labels)
    theirs = cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
    assert ours == pytest.approx(theirs, abs=1e-12)
    if seed % 4 == 0:
        assert k - 1 not in y_pred and k - 1 in y_true


def test_qwk_labels_order_the_scale():
    y_true, y_pred = ["incorrect", "correct", "correct"], ["incorrect", "correct", "incorrect"]
    labels = ["incorrect", "correct"]
    assert quadratic_weighted_kappa(y_true, y_pred, labels) == pytest.approx(
        cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"))
    # a label unused by both raters widens the scale, as in scikit-learn
    assert quadratic_weighted_kappa([0, 1, 1], [0, 1, 0], [0, 1, 2]) == pytest.approx(
        cohen_kappa_score([0, 1, 1], [0, 1, 0], labels=[0, 1, 2], weights="quadratic"))
    assert quadratic_weighted_kappa([2, 2], [2, 2]) == 1.0  # 0/0: identical constant ratings


@pytest.mark.parametrize("y_true, y_pred, labels, reason", [
    ([0, 1], [0], None, "2 true scores but 1 predictions"),
    ([], [], None, "no scores"),
    ([0, 3], [0, 1], [0, 1, 2], r"scores \[3\] are not among the labels"),
    ([[0, 1]], [[0, 1]], None, "one score per response"),
])
def test_qwk_bad_input(y_true, y_pred, labels, reason):
    with pytest.raises(DataError, match=reason):
        quadratic_weighted_kappa(y_true, y_pred, labels)


def test_accuracy_and_macro_f1():
    y_true, y_pred = [0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 1, 1]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    # a level nobody used still counts (as 0), so ignoring a rare score is penalised
    assert macro_f1(y_true, y_pred, labels=[0, 1, 2, 3]) == pytest.approx(
        f1_score(y_true, y_pred, average="macro") * 3 / 4)
    multi_true, multi_pred = [[1, 0, 1], [0, 0, 1]], [[1, 0, 1], [0, 1, 1]]
    assert accuracy(multi_true, multi_pred) == 0.5  # all aspects must match
    assert macro_f1(multi_true, multi_pred) == pytest.approx(
        f1_score(np.array(multi_true), np.array(multi_pred), average="macro", zero_division=0))


def test_confusion_matrix_png(tmp_path):
    path = confusion_matrix_png([0, 1, 2, 2], [0, 2, 2, 1], [0, 1, 2, 3], tmp_path / "figs" / "cm.png",
                                title="set 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # the temporary file is gone
    with pytest.raises(DataError, match="not among the labels"):
        confusion_matrix_png([0, 5], [0, 1], [0, 1], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@needs_data
@pytest.mark.parametrize("set_id, expected", [(1, 0.944), (10, 0.884)])
def test_human_agreement_asap(set_id, expected):
    item, responses = read_asap(set_id, DATA)
    assert human_agreement(responses) == pytest.approx(expected, abs=0.001)
    assert human_agreement(responses, labels=range(len(item.score_levels))) == pytest.approx(expected, abs=0.001)


def test_human_agreement_needs_two_raters():
    with pytest.raises(DataError, match="no response has both"):
        human_agreement([Response("1", "a", 1), Response("2", "b", [1, 0], second_score=1)])
