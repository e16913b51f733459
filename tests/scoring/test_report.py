"""zoft report: a page per experiment with a table per item set, plots, and the human ceiling."""
import json
import re

from zoft.cli import main


def test_report_from_a_comparison_on_a_scoring_task(tmp_path, capsys):
    cmp_dir = tmp_path / "cmp"
    assert main(["compare", "--methods", "zero-shot,mezo", "--output-dir", str(cmp_dir), "model=tiny-llama",
                 "task=asap-1", "n_train=8", "n_dev=4", "n_eval=12", "steps=2", "eval_every=1", "batch_size=4",
                 "progress=false"]) == 0
    assert main(["report", str(cmp_dir), "--output-dir", str(tmp_path / "rep"), "--title", "ASAP set 1"]) == 0
    page = (tmp_path / "rep" / "report.md").read_text()
    assert page.startswith("# ASAP set 1")
    assert "## asap-1" in page and "| zero-shot |" in page and "| mezo |" in page
    assert "eval qwk" in page
    assert "Human agreement (QWK, rater 1 vs rater 2, train rows): **0.944**" in page
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert "asap-1-dev.png" in pngs and "asap-1-zero-shot-confusion.png" in pngs and "asap-1-mezo-confusion.png" in pngs
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("<table") == 1 and "<img src='asap-1-dev.png'" in html


def fake_run(path, task="asap-1", method="mezo", targets=(0, 1, 2, 3), predictions=(0, 1, 2, 3), qwk=0.5):
    """A run folder with just the eval.json that `zoft report` reads (no training needed)."""
    path.mkdir(parents=True)
    result = {"method": method, "mode": "full", "task": task, "model": "tiny-llama", "metric": "qwk",
              "eval": {"qwk": qwk}, "dev": {"qwk": qwk}, "steps": 2, "n_train": 8, "n_eval": len(targets),
              "eval_outputs": {"targets": list(targets), "predictions": list(predictions)}}
    (path / "eval.json").write_text(json.dumps(result))
    return path


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_report_file_names_from_task_and_label_stay_in_the_output_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    a = fake_run(runs / "a", task="../../escaped", method="../../../pwned")
    b = fake_run(runs / "b", task="Set 1.yaml", method="x/../../y")
    rep = tmp_path / "deep" / "rep"
    assert main(["report", str(a), str(b), "--output-dir", str(rep)]) == 0
    capsys.readouterr()
    outside = [f for f in files_under(tmp_path) if not f.startswith(("runs/", "deep/rep/"))]
    assert outside == [], outside
    names = ["escaped-dev.png", "escaped-pwned-confusion.png", "set-1.yaml-dev.png", "set-1.yaml-x-y-confusion.png"]
    assert files_under(rep) == sorted(names + ["report.html", "report.md"])
    assert re.findall(r"\]\(([^)]*)\)", (rep / "report.md").read_text()) == names


def test_slug_is_a_plain_file_name():
    from zoft.report import slug
    assert [slug(s) for s in ("/etc/passwd", "..", ".hidden", "", "MeZO (LoRA)", "icl (k=16)", "Café", "-rf")] == [
        "etc-passwd", "x", "hidden", "x", "mezo-lora", "icl-k-16", "cafe", "rf"]
    assert len(slug("a" * 500)) == 60


def test_runs_sharing_a_label_get_their_own_confusion_matrix(tmp_path, monkeypatch):
    import zoft.tasks.rubric.metrics as metrics
    from zoft.report import write_report
    seed0 = fake_run(tmp_path / "mezo-seed0", targets=[0, 1, 2, 3], predictions=[0, 0, 0, 0])
    seed1 = fake_run(tmp_path / "mezo-seed1", targets=[0, 1, 2, 3], predictions=[3, 3, 2, 1])
    results = [json.loads((p / "eval.json").read_text()) | {"run_dir": str(p)} for p in (seed0, seed1)]
    drawn = {}
    real_png = metrics.confusion_matrix_png

    def record(y_true, y_pred, labels, path, title=""):
        drawn[path.name] = (list(y_true), list(y_pred), title)
        return real_png(y_true, y_pred, labels, path, title)
    monkeypatch.setattr(metrics, "confusion_matrix_png", record)
    rep = tmp_path / "rep"
    page = write_report(results, rep).read_text()
    first, second = "asap-1-mezo-mezo-seed0-confusion.png", "asap-1-mezo-mezo-seed1-confusion.png"
    assert drawn == {first: ([0, 1, 2, 3], [0, 0, 0, 0], "mezo (mezo-seed0)"),
                     second: ([0, 1, 2, 3], [3, 3, 2, 1], "mezo (mezo-seed1)")}
    assert (rep / first).read_bytes() != (rep / second).read_bytes()
    assert f"mezo (mezo-seed0): ![confusion]({first})" in page
    assert f"mezo (mezo-seed1): ![confusion]({second})" in page
    # the same run folder name in two comparisons: still two files
    other = fake_run(tmp_path / "cmp2" / "mezo-seed0", predictions=[1, 1, 1, 1])
    results.append(json.loads((other / "eval.json").read_text()) | {"run_dir": str(other)})
    drawn.clear()
    write_report(results, rep)
    assert sorted(drawn) == ["asap-1-mezo-mezo-seed0-2-confusion.png", first, second]
    assert drawn["asap-1-mezo-mezo-seed0-2-confusion.png"][1] == [1, 1, 1, 1]
