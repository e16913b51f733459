"""zoft report: a page per experiment with a table per item set, plots, and the human ceiling."""
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
