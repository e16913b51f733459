"""Confidence routing: the confidence order, the review fraction, and QWK against coverage."""
import csv
import json
import math

import pytest
from sklearn.metrics import cohen_kappa_score

from zoft import api, cli
from zoft.errors import ZoftError
from zoft.scoring.score import score_file
from zoft.tasks.rubric.confidence import (confidence, coverage_curve, coverage_table, eval_coverage,
                                          needs_review, review_count, review_order)
from zoft.tasks.readers import data_dir

DATA = data_dir()
needs_asap = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")


def test_confidence_is_the_predicted_levels_probability_and_the_weakest_aspect():
    assert confidence([[0.1, 0.7, 0.2]]) == 0.7
    assert confidence([[0.9, 0.1], [0.4, 0.6]]) == 0.6


def test_review_fraction_marks_the_ceil_least_confident_with_ties_in_row_order():
    conf = [0.9, 0.5, 0.7, 0.5, 0.99, 0.6, 0.8, 0.55, 0.95, 0.65]
    assert review_order(conf) == [1, 3, 7, 5, 9, 2, 6, 0, 8, 4]
    assert review_count(0.3, 10) == 3            # 0.3·10 is 3.0000000000000004 in floats
    assert review_count(0.25, 10) == 3 and review_count(0.0, 10) == 0 and review_count(1.0, 10) == 10
    marks = needs_review(conf, 0.3)
    assert [i for i, m in enumerate(marks) if m] == [1, 3, 7]
    assert [i for i, m in enumerate(needs_review(conf, 0.1)) if m] == [1]   # the tie goes to the earlier row
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ZoftError, match="review fraction must be between 0 and 1"):
            needs_review(conf, bad)


def test_coverage_curve_is_qwk_on_the_most_confident_part():
    conf = [0.9, 0.4, 0.8, 0.3, 0.7, 0.6, 0.95, 0.5]
    gold = ["0", "1", "2", "3", "1", "2", "0", "3"]
    pred = ["0", "3", "2", "0", "1", "1", "0", "1"]       # the confident ones are mostly right
    curve = coverage_curve(conf, pred, gold, ["0", "1", "2", "3"], coverages=(1.0, 0.5, 0.25))
    assert [r["n_auto"] for r in curve] == [8, 4, 2]
    for row in curve:
        keep = sorted(range(8), key=lambda i: -conf[i])[:row["n_auto"]]
        want = cohen_kappa_score([gold[i] for i in keep], [pred[i] for i in keep], weights="quadratic",
                                 labels=["0", "1", "2", "3"])
        want = 1.0 if math.isnan(want) else want
        assert row["qwk"] == pytest.approx(want)
        assert row["acc"] == pytest.approx(sum(gold[i] == pred[i] for i in keep) / len(keep))
    assert curve[1]["qwk"] > curve[0]["qwk"]
    table = coverage_table(curve)
    assert "| 50% | 50% | 4 |" in table


@pytest.fixture(scope="module")
def asap_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "asap1"
    api.train(method="mezo", task="asap-1", model="tiny-llama", steps=1, eval_every=1, batch_size=4, lr=1e-2,
              n_train=8, n_dev=4, n_eval=4, progress=False, output_dir=str(path))
    return path


TEXTS = ["vinegar amount", "rinse time and size of container", "", "more trials", "the type of vinegar",
         "how long", "what kind of container", "size of the samples", "temperature", "i do not know"]


def write_input(path, gold=True):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "human"] if gold else ["id", "text"])
        for i, text in enumerate(TEXTS):
            w.writerow([f"r{i}", text, str(i % 4) if i != 9 else ""] if gold else [f"r{i}", text])
    return path


@needs_asap
def test_score_marks_the_least_confident_rows_and_writes_the_coverage_curve(asap_run, tmp_path):
    out = tmp_path / "scored.csv"
    summary = score_file(asap_run, write_input(tmp_path / "in.csv"), out, batch_size=3, review_fraction=0.3,
                         gold_column="human")
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    scored = [r for r in rows if r["error"] == ""]
    assert len(scored) == 9 and summary["review"] == 3                       # ceil(0.3 · 9)
    for r in scored:
        assert float(r["confidence"]) == pytest.approx(max(float(r[f"p_{lv}"]) for lv in "0123"), abs=1e-6)
    flagged = [r for r in scored if r["needs_review"] == "yes"]
    others = [r for r in scored if r["needs_review"] == "no"]
    assert len(flagged) == 3 and len(others) == 6
    assert max(float(r["confidence"]) for r in flagged) <= min(float(r["confidence"]) for r in others)
    assert rows[2]["needs_review"] == "" and rows[2]["confidence"] == ""     # the empty text is not scored
    # coverage: rows with a gold score only (r9 has none); 100% is the QWK of all of them
    curve = summary["coverage"]
    graded = [r for r in scored if r["human"]]
    assert curve[0]["coverage"] == 1.0 and curve[0]["n_auto"] == len(graded) == 8
    want = cohen_kappa_score([r["human"] for r in graded], [r["score"] for r in graded], weights="quadratic",
                             labels=list("0123"))
    assert curve[0]["qwk"] == pytest.approx(1.0 if math.isnan(want) else want)
    table, png = (tmp_path / "scored.coverage.csv"), (tmp_path / "scored.coverage.png")
    assert [str(table), str(png)] == summary["coverage_files"] and png.read_bytes()[:4] == b"\x89PNG"
    assert len(list(csv.DictReader(open(table)))) == len(curve)


@needs_asap
def test_bad_review_fraction_and_gold_are_one_line_errors(asap_run, tmp_path, capsys):
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "never.csv"
    assert cli.main(["score", "--model", str(asap_run), "--input", str(src), "--output", str(out),
                     "--review-fraction", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "zoft: error: review fraction must be between 0 and 1, got 1.5"
    assert cli.main(["score", "--model", str(asap_run), "--input", str(src), "--output", str(out),
                     "--gold-column", "teacher"]) == 2
    assert "field 'teacher': no gold column" in capsys.readouterr().err
    with open(src, "a", encoding="utf-8") as f:
        f.write("r10,a text,7\n")
    assert cli.main(["score", "--model", str(asap_run), "--input", str(src), "--output", str(out),
                     "--gold-column", "human"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zoft: error: {src}:11: field 'human': gold score '7' is not a level (0, 1, 2, 3)"]
    assert not out.exists()


@needs_asap
def test_eval_json_keeps_confidences_and_its_full_coverage_qwk_is_the_runs(asap_run):
    saved = json.loads((asap_run / "eval.json").read_text())
    outputs = saved["eval_outputs"]
    assert len(outputs["confidences"]) == len(outputs["predictions"]) == 4
    assert all(0.25 <= c <= 1.0 for c in outputs["confidences"])      # max of 4 probabilities
    curve = eval_coverage(outputs, levels=range(4))
    assert curve[0]["n_auto"] == 4 and curve[0]["qwk"] == pytest.approx(saved["eval"]["qwk"])
    assert eval_coverage({"predictions": [0], "targets": [0]}) is None
