"""zoft report: an RSMTool-style page per experiment, read back cell by cell from its HTML and
checked against measures computed here independently (scikit-learn, numpy)."""
import csv
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score

from zoft.cli import main
from zoft.tasks.readers import data_dir

DATA = data_dir()   # resolved once at import, like the other scoring tests: never a machine's own path


class Page(HTMLParser):
    """The tables (rows of cell texts, with the class of each row and cell) and figures of a page."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.figures, self.headings = [], [], []
        self._cell = self._figure = self._heading = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append({"class": attrs.get("class"), "cells": [], "flags": []})
        elif tag in ("td", "th"):
            self._cell = ""
            self.tables[-1][-1]["flags"].append(attrs.get("class") == "flag")
        elif tag == "figure":
            self._figure = {"imgs": [], "caption": None}
        elif tag == "img" and self._figure is not None:
            self._figure["imgs"].append(attrs["src"])
        elif tag == "figcaption":
            self._figure["caption"] = ""
        elif tag in ("h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1]["cells"].append(self._cell.strip())
            self._cell = None
        elif tag == "figure":
            self.figures.append(self._figure)
            self._figure = None
        elif tag in ("h2", "h3"):
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._figure is not None and self._figure["caption"] is not None:
            self._figure["caption"] += data
        elif self._heading is not None:
            self._heading += data

    def rows(self, table=0):
        """``{first cell: cells}`` of a table's body rows."""
        return {r["cells"][0]: r["cells"] for r in self.tables[table][1:]}


def expected_cells(human, system, levels, pooled=False):
    """n, exact %, adjacent %, QWK, r, SMD, RMSE and macro-F1 %, from their definitions (RSMTool's)."""
    h, s = np.asarray(human, float), np.asarray(system, float)
    sd = np.sqrt((h.var(ddof=1) + s.var(ddof=1)) / 2) if pooled else h.std(ddof=1)
    r = "–" if h.std() == 0 or s.std() == 0 else f"{np.corrcoef(h, s)[0, 1]:.3f}"
    return [str(len(h)), f"{100 * np.mean(h == s):.1f}", f"{100 * np.mean(np.abs(h - s) <= 1):.1f}",
            f"{cohen_kappa_score(h, s, weights='quadratic', labels=levels):.3f}", r,
            f"{(s.mean() - h.mean()) / sd:.3f}", f"{np.sqrt(np.mean((h - s) ** 2)):.3f}",
            f"{100 * f1_score(h, s, labels=levels, average='macro', zero_division=0):.1f}"]


def fake_run(path, task="asap-1", method="mezo", targets=(0, 1, 2, 3), predictions=(0, 1, 2, 3), qwk=0.5,
             second=None, groups=None, best_step=None, confidences=None):
    """A run folder with just the eval.json that `zoft report` reads (no training needed)."""
    path.mkdir(parents=True)
    outputs = {"targets": list(targets), "predictions": list(predictions),
               "ids": [f"{path.name}-{i}" for i in range(len(targets))], "levels": ["0", "1", "2", "3"]}
    if second is not None:
        outputs["second_targets"] = list(second)
    if groups is not None:
        outputs["subgroups"] = groups
    if confidences is not None:
        outputs["confidences"] = list(confidences)
    result = {"method": method, "mode": "full", "task": task, "model": "tiny-llama", "metric": "qwk",
              "eval": {"qwk": qwk}, "dev": {"qwk": qwk}, "steps": 2, "n_train": 8, "n_eval": len(targets),
              "eval_outputs": outputs}
    if best_step is not None:
        result |= {"best_step": best_step, "best_dev": qwk}
    (path / "eval.json").write_text(json.dumps(result))
    return path


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_report_cells_equal_measures_computed_independently(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # two runs with the same label and different eval samples (40 and 100 responses), a second
    # rater on some of the first run's responses, and a subgroup column
    t1, p1 = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    p1[:25] = t1[:25]
    second = [int(t) if i % 3 else None for i, t in enumerate(np.clip(t1 + rng.integers(-1, 2, 40), 0, 3))]
    school = ["north" if i % 2 else "south" for i in range(40)]
    t2, p2 = rng.integers(0, 4, 100), np.clip(rng.integers(0, 4, 100) + 1, 0, 3)
    a = fake_run(tmp_path / "runs" / "mezo-seed0", targets=t1.tolist(), predictions=p1.tolist(), second=second,
                 groups={"school": school})
    b = fake_run(tmp_path / "runs" / "mezo-seed1", targets=t2.tolist(), predictions=p2.tolist())
    rep = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--output-dir", str(rep)]) == 0
    capsys.readouterr()
    page = Page((rep / "report.html").read_text())
    levels = [0, 1, 2, 3]

    head = page.tables[0][0]["cells"]
    assert head[:9] == ["system", "n", "exact % (accuracy)", "adjacent %", "QWK", "r", "SMD", "RMSE", "macro-F1 %"]
    rows = page.rows()
    assert rows["mezo (mezo-seed0)"][1:9] == expected_cells(t1, p1, levels)
    assert rows["mezo (mezo-seed1)"][1:9] == expected_cells(t2, p2, levels)
    # human-human on the same responses: the 40 run's rows that a second rater scored
    both = [(t, s) for t, s in zip(t1, second) if s is not None]
    assert rows["human–human (rater 2)"][1:9] == expected_cells(*zip(*both), levels, pooled=True)
    # the SMD flag follows |SMD| > 0.15
    smd_col = head.index("SMD")
    for row in page.tables[0][1:]:
        assert row["flags"][smd_col] == (abs(float(row["cells"][smd_col])) > 0.15)

    # each run its own confusion matrix, named and titled after its run, with its own n
    confusion = {f["imgs"][0]: f["caption"] for f in page.figures if "confusion" in f["imgs"][0]}
    assert confusion == {
        "asap-1-mezo-seed0-confusion.png": "Confusion matrix of mezo (mezo-seed0) on its 40 evaluated responses: "
                                           "rows human score, columns model score.",
        "asap-1-mezo-seed1-confusion.png": "Confusion matrix of mezo (mezo-seed1) on its 100 evaluated responses: "
                                           "rows human score, columns model score."}
    # every figure holds one image and its own caption; every image exists
    assert all(len(f["imgs"]) == 1 and f["caption"] for f in page.figures)
    assert {"asap-1-dev.png", "asap-1-scores.png"} <= {f["imgs"][0] for f in page.figures}
    assert all((rep / f["imgs"][0]).is_file() for f in page.figures)

    # the subgroup table: each school × system that has responses in it
    assert "By school" in page.headings
    groups = {(r["cells"][0], r["cells"][1]): r["cells"][2:] for r in page.tables[1][1:]}
    assert set(groups) == {("north", "mezo (mezo-seed0)"), ("south", "mezo (mezo-seed0)")}
    for name in ("north", "south"):
        picked = [i for i, g in enumerate(school) if g == name]
        assert groups[(name, "mezo (mezo-seed0)")] == expected_cells(t1[picked], p1[picked], levels)[:7]

    # the markdown page carries the same table
    md = (rep / "report.md").read_text()
    assert "| mezo (mezo-seed0) | " + " | ".join(
        f"**{c}**" if i == 5 and abs(float(c)) > 0.15 else c
        for i, c in enumerate(expected_cells(t1, p1, levels))) + " |" in md


def test_rsmtool_export_holds_each_runs_scores(tmp_path, capsys):
    run = fake_run(tmp_path / "mezo", targets=[0, 1, 2, 3, 2], predictions=[0, 2, 2, 1, 3],
                   second=[0, None, 2, 3, 1], groups={"school": ["a", "b", "a", "b", "a"]})
    rep = tmp_path / "rep"
    assert main(["report", str(run), "--output-dir", str(rep)]) == 0
    capsys.readouterr()
    with open(rep / "rsmtool" / "asap-1-mezo.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["spkitemid", "sc1", "sc2", "system", "school"]
    assert [(r["spkitemid"], r["sc1"], r["sc2"], r["system"], r["school"]) for r in rows] == [
        ("mezo-0", "0", "0", "0", "a"), ("mezo-1", "1", "", "2", "b"), ("mezo-2", "2", "2", "2", "a"),
        ("mezo-3", "3", "3", "1", "b"), ("mezo-4", "2", "1", "3", "a")]
    config = json.loads((rep / "rsmtool" / "asap-1-mezo.json").read_text())
    assert config == {"experiment_id": "asap_1_mezo", "predictions_file": "asap-1-mezo.csv",
                      "system_score_column": "system", "human_score_column": "sc1", "id_column": "spkitemid",
                      "trim_min": 0, "trim_max": 3, "exclude_zero_scores": False,
                      "description": "asap-1: mezo", "second_human_score_column": "sc2", "subgroups": ["school"]}
    assert "rsmtool/asap-1-mezo.csv" in (rep / "report.html").read_text()


def test_confidence_routing_table_is_qwk_on_the_most_confident_part(tmp_path, capsys):
    rng = np.random.default_rng(1)
    # 50 responses whose confident half is right and whose unsure half is mostly wrong: QWK rises as
    # the least confident go to a human; a second run without confidences gets no row
    targets = rng.integers(0, 4, 50)
    preds = np.where(np.arange(50) % 2 == 0, targets, (targets + 2) % 4)
    conf = np.where(np.arange(50) % 2 == 0, 0.6 + 0.3 * rng.random(50), 0.3 + 0.2 * rng.random(50)).round(6)
    a = fake_run(tmp_path / "lm-cls", method="lm-cls", targets=targets.tolist(), predictions=preds.tolist(),
                 confidences=conf.tolist())
    b = fake_run(tmp_path / "zero-shot", method="zero-shot", targets=targets.tolist(), predictions=preds.tolist())
    rep = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--output-dir", str(rep)]) == 0
    capsys.readouterr()
    page = Page((rep / "report.html").read_text())
    assert "Confidence routing" in page.headings
    table = next(t for t in page.tables if t[0]["cells"][0] == "system" and "QWK at 100%" in t[0]["cells"])
    assert table[0]["cells"] == ["system", "QWK at 100%", "QWK at 90%", "QWK at 80%", "QWK at 70%", "QWK at 50%"]
    assert [r["cells"][0] for r in table[1:]] == ["lm-cls"]
    order = np.argsort(-conf, kind="stable")          # most confident first
    expected = ["lm-cls"]
    for coverage in (1.0, 0.9, 0.8, 0.7, 0.5):
        keep = order[:50 - int(np.ceil(round((1 - coverage) * 50, 9)))]
        expected.append(f"{cohen_kappa_score(targets[keep], preds[keep], weights='quadratic', labels=[0, 1, 2, 3]):.3f}")
    assert table[1]["cells"] == expected
    assert float(expected[5]) > float(expected[1])    # routing the unsure half to a human helps here
    figure = next(f for f in page.figures if "coverage" in f["imgs"][0])
    assert figure["imgs"] == ["asap-1-coverage.png"] and (rep / "asap-1-coverage.png").is_file()
    assert "| lm-cls | " + " | ".join(expected[1:]) + " |" in (rep / "report.md").read_text()


def test_dev_curves_mark_the_best_step(tmp_path, monkeypatch):
    import zoft.report as report
    run = fake_run(tmp_path / "mezo", qwk=0.7, best_step=20)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "loss": 1.0, "dev": 0.5}, {"step": 20, "loss": 0.9, "dev": 0.7}, {"step": 30, "loss": 0.8, "dev": 0.6}]))
    drawn = []
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.append(fig) or path)
    report.plot_dev_curves([json.loads((run / "eval.json").read_text()) | {"run_dir": str(run)}],
                           tmp_path / "dev.png", "qwk")
    lines = drawn[0].axes[0].get_lines()
    stars = [(list(l.get_xdata()), list(l.get_ydata())) for l in lines if l.get_marker() == "*"]
    assert stars == [([20], [0.7])]


@pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(), reason="shared data folder not found")
def test_report_from_a_comparison_on_asap_shows_the_train_row_ceiling_without_zoft_data_dir(
        tmp_path, capsys, monkeypatch):
    cmp_dir = tmp_path / "cmp"
    assert main(["compare", "--methods", "zero-shot,mezo", "--output-dir", str(cmp_dir), "model=tiny-llama",
                 "task=asap-1", "n_train=8", "n_dev=4", "n_eval=12", "steps=2", "eval_every=1", "batch_size=4",
                 "progress=false", f"data_dir={DATA}"]) == 0
    # the report finds the data through the runs' saved data_dir, not the environment
    import zoft.tasks.rubric.task as rubric_task
    monkeypatch.delenv("ZOFT_DATA_DIR", raising=False)
    monkeypatch.setattr(rubric_task, "data_dir", lambda: None)
    assert main(["report", str(cmp_dir), "--output-dir", str(tmp_path / "rep"), "--title", "ASAP set 1"]) == 0
    capsys.readouterr()
    page = Page((tmp_path / "rep" / "report.html").read_text())
    rows = page.rows()
    assert set(rows) == {"zero-shot", "mezo", "human–human (rater 2), train rows"}
    for name in ("zero-shot", "mezo"):
        result = json.loads((cmp_dir / name / "eval.json").read_text())["eval_outputs"]
        assert rows[name][1:9] == expected_cells(result["targets"], result["predictions"], [0, 1, 2, 3])
    with open(f"{DATA}/asap-sas/set01.csv", newline="") as f:
        both = [(int(r["Score1"]), int(float(r["Score2"]))) for r in csv.DictReader(f)
                if r["split"] == "train" and r["Score2"].strip()]
    ceiling = rows["human–human (rater 2), train rows"]
    assert ceiling[1:9] == expected_cells(*zip(*both), [0, 1, 2, 3], pooled=True)
    assert ceiling[4] == "0.944"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# ASAP set 1") and "not on the responses scored above" in md
    pngs = files_under(tmp_path / "rep")
    assert {"asap-1-dev.png", "asap-1-zero-shot-confusion.png", "asap-1-mezo-confusion.png"} <= set(pngs)


TABLE_ROWS = [  # id, text, score, a second rater, split, school
    (f"r{i:02d}", f"The ice on the {'metal' if i % 3 else 'plastic'} tray melts {'first' if i % 2 else 'later'}.",
     i % 3, (i + (i % 4 == 0)) % 3 if i >= 30 and i % 5 else "", "train" if i < 30 else "test",
     "north" if i % 2 else "south") for i in range(42)]


def test_report_on_a_table_task_uses_its_second_rater_and_subgroups(tmp_path, capsys):
    with open(tmp_path / "responses.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "text", "score", "rater2", "split", "school"), *TABLE_ROWS])
    (tmp_path / "responses.yaml").write_text(
        "id: id\ntext: text\nscore: score\nsecond_score: rater2\nsplit: split\nsubgroups: [school]\n"
        "item: {question: 'Which tray melts ice first?', rubric: '2 full, 1 partial, 0 none'}\n")
    (tmp_path / "trays.yaml").write_text("table: responses.csv\nmapping: responses.yaml\n")
    cmp_dir = tmp_path / "cmp"
    assert main(["compare", "--methods", "zero-shot,lp", "--output-dir", str(cmp_dir), "model=tiny-llama",
                 f"task={tmp_path / 'trays.yaml'}", "n_train=12", "n_dev=4", "n_eval=12", "progress=false"]) == 0
    assert main(["report", str(cmp_dir), "--output-dir", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    page = Page((tmp_path / "rep" / "report.html").read_text())
    rows = page.rows()
    assert set(rows) == {"zero-shot", "lp", "human–human (rater 2)"}
    lp = json.loads((cmp_dir / "lp" / "eval.json").read_text())["eval_outputs"]
    assert rows["lp"][1:9] == expected_cells(lp["targets"], lp["predictions"], [0, 1, 2])
    by_id = {r[0]: r for r in TABLE_ROWS}
    assert sorted(lp["ids"]) == sorted(r[0] for r in TABLE_ROWS if r[4] == "test")
    both = [(by_id[i][2], by_id[i][3]) for i in lp["ids"] if by_id[i][3] != ""]
    assert rows["human–human (rater 2)"][1:9] == expected_cells(*zip(*both), [0, 1, 2], pooled=True)
    # the linear probe has its confusion matrix; both methods a row per school
    assert any(f["imgs"] == ["trays-lp-confusion.png"] for f in page.figures)
    groups = {(r["cells"][0], r["cells"][1]) for r in page.tables[1][1:]}
    assert groups == {(g, m) for g in ("north", "south") for m in ("zero-shot", "lp")}
    with open(tmp_path / "rep" / "rsmtool" / "trays-lp.csv", newline="") as f:
        exported = {r["spkitemid"]: r for r in csv.DictReader(f)}
    assert {i: (int(r["sc1"]), r["sc2"], r["school"]) for i, r in exported.items()} == {
        i: (by_id[i][2], str(by_id[i][3]), by_id[i][5]) for i in lp["ids"]}


def test_report_file_names_stay_in_the_output_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    a = fake_run(runs / "..a", task="../../escaped", method="../../../pwned")
    b = fake_run(runs / "b", task="Set 1.yaml", method="x/../../y")
    rep = tmp_path / "deep" / "rep"
    assert main(["report", str(a), str(b), "--output-dir", str(rep)]) == 0
    capsys.readouterr()
    outside = [f for f in files_under(tmp_path) if not f.startswith(("runs/", "deep/rep/"))]
    assert outside == [], outside
    pngs = ["escaped-a-confusion.png", "escaped-dev.png", "escaped-scores.png", "set-1.yaml-b-confusion.png",
            "set-1.yaml-dev.png", "set-1.yaml-scores.png"]
    exports = ["rsmtool/escaped-a.csv", "rsmtool/escaped-a.json", "rsmtool/set-1.yaml-b.csv", "rsmtool/set-1.yaml-b.json"]
    assert files_under(rep) == sorted(pngs + exports + ["report.html", "report.md"])
    assert sorted(re.findall(r"\]\(([^)]*)\)", (rep / "report.md").read_text())) == pngs


def test_slug_is_a_plain_file_name():
    from zoft.report import slug
    assert [slug(s) for s in ("/etc/passwd", "..", ".hidden", "", "MeZO (LoRA)", "icl (k=16)", "Café", "-rf")] == [
        "etc-passwd", "x", "hidden", "x", "mezo-lora", "icl-k-16", "cafe", "rf"]
    assert len(slug("a" * 500)) == 60


def test_runs_with_one_folder_name_in_two_comparisons_get_their_own_confusion_matrix(tmp_path, monkeypatch):
    import zoft.tasks.rubric.metrics as metrics
    from zoft.report import write_report
    first = fake_run(tmp_path / "cmp1" / "mezo", targets=[0, 1, 2, 3], predictions=[0, 0, 0, 0])
    other = fake_run(tmp_path / "cmp2" / "mezo", targets=[0, 1, 2, 3, 3], predictions=[1, 1, 1, 1, 1])
    results = [json.loads((p / "eval.json").read_text()) | {"run_dir": str(p)} for p in (first, other)]
    drawn = {}
    real_png = metrics.confusion_matrix_png

    def record(y_true, y_pred, labels, path, title=""):
        drawn[path.name] = (list(y_true), list(y_pred))
        return real_png(y_true, y_pred, labels, path, title)
    monkeypatch.setattr(metrics, "confusion_matrix_png", record)
    write_report(results, tmp_path / "rep")
    assert drawn == {"asap-1-mezo-confusion.png": ([0, 1, 2, 3], [0, 0, 0, 0]),
                     "asap-1-mezo-2-confusion.png": ([0, 1, 2, 3, 3], [1, 1, 1, 1, 1])}


def test_a_result_without_a_task_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"method": "mezo", "eval": {}}))
    assert main(["report", str(tmp_path / "run"), "--output-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err == f"zoft: error: {tmp_path / 'run' / 'eval.json'}: corrupt (a result without 'task')\n"
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("outputs, what", [
    ({"targets": [0, 1], "predictions": [0]}, "predictions and targets must be score indices"),
    ({"targets": [0, 7], "predictions": [0, 1], "levels": ["0", "1"]}, "predictions and targets must be"),
    ({"targets": [0, 1], "predictions": [0, 1], "ids": ["a"]}, "ids, second_targets and subgroups"),
    ({"targets": [0, 1], "predictions": [0, 1], "subgroups": {"school": ["n"]}}, "ids, second_targets"),
    ({"targets": [0, 1], "predictions": [0, 1], "confidences": [0.9]}, "confidences must be one probability"),
    ({"targets": [0, 1], "predictions": [0, 1], "confidences": [0.9, "high"]}, "confidences must be one"),
])
def test_corrupt_eval_outputs_are_one_line(tmp_path, capsys, outputs, what):
    run = fake_run(tmp_path / "run")
    result = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps(result | {"eval_outputs": outputs}))
    assert main(["report", str(run), "--output-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoft: error: {run / 'eval.json'}: corrupt eval_outputs (" + what) and err.count("\n") == 1
    assert not (tmp_path / "rep").exists()
