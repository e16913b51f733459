"""score_file: a trained scoring run scores a CSV of new responses; bad rows are reported, not fatal."""
import csv
import os
from pathlib import Path

import pytest
import torch

from zoft import api
from zoft.errors import DataError, ZoftError
from zoft.methods import load_run
from zoft.scoring.score import score_file
from zoft.tasks.readers import data_dir
from zoft.tasks.rubric.data import Response

DATA = data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")
TINY = dict(model="tiny-llama", progress=False, eval_batch_size=16, n_train=8, n_dev=4, n_eval=8)
LEVELS = ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def asap_run(tmp_path_factory):
    """A 2-step MeZO run on ASAP set 1 (so load_run restores trained weights)."""
    path = tmp_path_factory.mktemp("runs") / "asap1"
    api.train(method="mezo", task="asap-1", steps=2, eval_every=1, batch_size=4, lr=1e-2,
              output_dir=str(path), **TINY)
    assert (path / "best").exists()
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


INPUT = [
    ("a1", "You need to know how much vinegar was used, what type of vinegar, and the size of the samples.", "x"),
    ("a2", "", "empty text"),
    ("", "a response without an id", "no id"),
    ("a4", 'The "container" size, the amount of vinegar,\nand how long to rinse.', "quotes, commas, a newline"),
    ("a5", "   ", "blank text"),
    ("a6", "more trials", "short"),
]


def test_score_file_scores_good_rows_and_reports_bad_ones(asap_run, tmp_path):
    src = write_csv(tmp_path / "in.csv", ["id", "text", "note"], INPUT)
    out = tmp_path / "out" / "scored.csv"
    summary = score_file(asap_run, src, out, batch_size=2)
    assert (summary["rows"], summary["scored"], summary["failed"]) == (6, 3, 3)
    assert summary["task"] == "asap-1" and summary["levels"] == LEVELS
    assert summary["errors"] == ["row 2: empty text", "row 3: missing id", "row 5: empty text"]
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "text", "note", "score", "p_0", "p_1", "p_2", "p_3", "confidence", "error"]
    # every input row, in input order, with its own columns unchanged
    assert [(r["id"], r["text"], r["note"]) for r in rows] == list(INPUT)
    bad = {1: "empty text", 2: "missing id", 4: "empty text"}
    for i, r in enumerate(rows):
        probs = [r[f"p_{lv}"] for lv in LEVELS]
        if i in bad:
            assert r["error"] == bad[i] and r["score"] == "" and probs == ["", "", "", ""]
        else:
            assert r["error"] == ""
            values = [float(p) for p in probs]
            assert sum(values) == pytest.approx(1.0, abs=1e-5)
            assert r["score"] == LEVELS[max(range(4), key=values.__getitem__)]
    assert sum(summary["score_counts"].values()) == 3


def test_probabilities_are_the_softmax_of_candidate_logprobs(asap_run, tmp_path):
    src = write_csv(tmp_path / "in.csv", ["id", "text", "note"], INPUT)
    out = score_file(asap_run, src, tmp_path / "scored.csv", batch_size=4)["output"]
    rows = {r["id"]: r for r in read_csv(out)}
    setup, scorer = load_run(asap_run)
    item = next(iter(setup.task.items.values()))
    for rid, text, _ in (INPUT[0], INPUT[3]):
        ex = setup.task.example(Response(rid, text, None, item_id=item.item_id), item)
        enc = scorer.encode([ex])
        with torch.no_grad():
            logprobs, _ = scorer.candidate_logprobs(enc, [0])
        direct = logprobs.double().softmax(-1)[0].tolist()
        written = [float(rows[rid][f"p_{lv}"]) for lv in LEVELS]
        assert written == pytest.approx(direct, abs=1e-5)
    # and they are not uniform: the model does look at the response
    assert max(direct) - min(direct) > 1e-4


def test_output_is_atomic_and_file_level_errors_write_nothing(asap_run, tmp_path):
    out = tmp_path / "scored.csv"
    out.write_text("old contents\n")
    src = write_csv(tmp_path / "in.csv", ["id", "text"], [("1", "vinegar"), ("2", "rinse time")])
    assert score_file(asap_run, src, out)["scored"] == 2
    assert [r["id"] for r in read_csv(out)] == ["1", "2"]
    assert sorted(os.listdir(tmp_path)) == ["in.csv", "scored.csv"]     # no temp file left
    with pytest.raises(DataError, match="field 'text': missing column"):
        score_file(asap_run, write_csv(tmp_path / "notext.csv", ["id", "answer"], [("1", "x")]),
                   tmp_path / "never.csv")
    with pytest.raises(DataError, match="input already has the column 'score'"):
        score_file(asap_run, write_csv(tmp_path / "clash.csv", ["id", "text", "score"], [("1", "x", "2")]),
                   tmp_path / "never.csv")
    with pytest.raises(DataError, match="input file not found"):
        score_file(asap_run, tmp_path / "missing.csv", tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()


def test_item_ids_duplicates_and_ragged_rows(asap_run, tmp_path):
    item_id = "asap-sas/set01"
    src = tmp_path / "in.csv"
    src.write_text("id,text,item_id\n"
                   f"1,vinegar amount,{item_id}\n"
                   "2,rinse time,set99\n"
                   "3,no item given,\n"         # one-item task: the item is implied
                   "1,same id again,\n"
                   "5,too,many,fields\n"
                   "6\n", encoding="utf-8")
    summary = score_file(asap_run, src, tmp_path / "out.csv")
    rows = read_csv(tmp_path / "out.csv")
    assert [r["id"] for r in rows] == ["1", "2", "3", "1", "5", "6"]
    errors = [r["error"] for r in rows]
    assert errors[0] == "" and errors[2] == ""
    assert errors[1].startswith("unknown item_id 'set99' (task 'asap-1' has: asap-sas/set01)")
    assert errors[3] == "duplicate id '1' (first at row 1)"
    assert errors[4] == "row has 4 fields, header has 3" and errors[5] == "row has 1 fields, header has 3"
    assert all("\n" not in e for e in errors)
    assert (summary["scored"], summary["failed"]) == (2, 4)


def test_multi_item_task_needs_item_id_and_non_scoring_run_is_refused(tmp_path):
    run = tmp_path / "sb"
    api.train(method="zero-shot", task="scientsbank", output_dir=str(run), **TINY)
    setup, _ = load_run(run)
    qid = sorted(setup.task.items)[0]
    src = write_csv(tmp_path / "in.csv", ["id", "text", "item_id"],
                    [("1", "it has seeds", qid), ("2", "it has seeds", "")])
    summary = score_file(run, src, tmp_path / "out.csv")
    rows = read_csv(tmp_path / "out.csv")
    assert list(rows[0])[-4:] == ["p_incorrect", "p_correct", "confidence", "error"]
    assert rows[0]["error"] == "" and rows[0]["score"] in ("incorrect", "correct")
    assert rows[1]["error"].startswith("no item_id: task 'scientsbank' has ")
    assert (summary["scored"], summary["failed"]) == (1, 1)
    plain = tmp_path / "sst2"
    api.train(method="zero-shot", task="sst2", output_dir=str(plain), **TINY)
    with pytest.raises(ZoftError, match="not a scoring task"):
        score_file(plain, src, tmp_path / "never.csv")


def test_zoft_score_cli_scores_the_batch_and_reports_bad_rows(asap_run, tmp_path, capsys):
    from zoft.cli import main
    src = write_csv(tmp_path / "in.csv", ["id", "text", "note"], INPUT)
    out = tmp_path / "scored.csv"
    assert main(["score", "--model", str(asap_run), "--input", str(src), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "scored 3 of 6 rows" in captured.out
    assert "3 rows failed" in captured.err
    rows = read_csv(out)
    assert [r["id"] for r in rows] == [r[0] for r in INPUT]
    assert [bool(r["error"]) for r in rows] == [False, True, True, False, True, False]


# ---------------------------------------------------------------- bad files: one line, exit 2, nothing written

def zoft_score(capsys, run, src, out):
    """Runs `zoft score`; returns (exit code, stderr). Every file-level error is exactly one line."""
    from zoft.cli import main
    code = main(["score", "--model", str(run), "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("zoft: error: "), err
    return code, err


def test_unclosed_quote_is_an_error_naming_the_row_where_it_opened(asap_run, tmp_path, capsys):
    out = tmp_path / "out.csv"
    src = tmp_path / "in.csv"
    # row 2 opens a quote that never closes: csv.reader would merge rows 2-4 into one text
    src.write_text('id,text\n1,vinegar\n2,"never closed\n3,rinse\n4,more\n', encoding="utf-8")
    assert zoft_score(capsys, asap_run, src, out) == (
        2, f"zoft: error: {src}:2: unclosed quote: the quoted field opened on line 3 runs to the end of the file\n")
    # no final line break; and a closed multi-line field before it: row 3 starts on line 5
    src.write_text('id,text\n1,"two\nlines"\n2,ok\n3,"never closed\n4,x', encoding="utf-8")
    assert zoft_score(capsys, asap_run, src, out) == (
        2, f"zoft: error: {src}:3: unclosed quote: the quoted field opened on line 5 runs to the end of the file\n")
    src.write_text('id,"text\n1,a\n2,b\n', encoding="utf-8")
    assert zoft_score(capsys, asap_run, src, out)[1] == (
        f"zoft: error: {src}: unclosed quote in the header: the quoted field opened on line 1 runs to the end "
        "of the file\n")
    assert not out.exists()


def test_closed_quotes_spanning_lines_still_score(asap_run, tmp_path):
    rows = [("1", 'a 5" nail'),                     # a quote inside a field csv.writer leaves unquoted
            ("2", 'she said "rinse",\nthen\r\nwaited'),
            ("3", 'ends with a quote"'),
            ("4", "the last row\nspans lines")]    # the last record is where an unclosed quote would show
    src = write_csv(tmp_path / "in.csv", ["id", "text"], rows)
    summary = score_file(asap_run, src, tmp_path / "out.csv")
    assert (summary["rows"], summary["scored"]) == (4, 4)
    assert [(r["id"], r["text"]) for r in read_csv(tmp_path / "out.csv")] == rows


def test_binary_input_is_one_short_line(asap_run, tmp_path, capsys):
    out = tmp_path / "out.csv"
    png = tmp_path / "scores.bin"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    assert zoft_score(capsys, asap_run, png, out) == (
        2, f"zoft: error: {png}: not a UTF-8 text file (byte 0x89 at offset 0)\n")
    nul = tmp_path / "nul.csv"                   # valid UTF-8, but a NUL byte: not text either
    nul.write_bytes(b"id,text\n1,caf\xc3\xa9\x00\n")
    assert zoft_score(capsys, asap_run, nul, out) == (
        2, f"zoft: error: {nul}: not a text file (NUL byte at offset 15)\n")
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("id,text\n1,vinegar\n".encode("utf-16"))
    assert zoft_score(capsys, asap_run, utf16, out) == (2, f"zoft: error: {utf16}: UTF-16 text; save it as UTF-8\n")
    # a text file that is not the expected CSV: its header is echoed, but cut short
    wrong = tmp_path / "essay.csv"
    wrong.write_text("x" * 5000 + "\n", encoding="utf-8")
    code, err = zoft_score(capsys, asap_run, wrong, out)
    assert code == 2 and err.startswith(f"zoft: error: {wrong}: field 'id': missing column (has: xxx")
    assert len(err) < len(str(wrong)) + 120
    assert not out.exists()


def test_windows_1252_input_still_reads(asap_run, tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes("id,text\n1,24\xb0 and \x95 more vinegar\n".encode("latin-1"))   # cp1252 degree, bullet
    assert score_file(asap_run, src, tmp_path / "out.csv")["scored"] == 1
    assert read_csv(tmp_path / "out.csv")[0]["text"] == "24\u00b0 and \u2022 more vinegar"


def test_bad_output_path_fails_before_the_model_loads(tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", ["id", "text"], [("1", "vinegar")])
    no_run = tmp_path / "no-such-run"            # loading it would fail: the output check comes first
    folder = tmp_path / "results"
    folder.mkdir()
    assert zoft_score(capsys, no_run, src, folder) == (
        2, f"zoft: error: {folder}: output is a folder; give a file name, e.g. {folder / 'scored.csv'}\n")
    under_file = src / "sub" / "scored.csv"
    assert zoft_score(capsys, no_run, src, under_file) == (
        2, f"zoft: error: {under_file}: cannot create the output's folder: {src} is a file\n")
    assert sorted(os.listdir(tmp_path)) == ["in.csv", "results"] and not os.listdir(folder)


def test_unwritable_output_folder_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    src = write_csv(tmp_path / "in.csv", ["id", "text"], [("1", "vinegar")])
    locked = tmp_path / "locked"
    locked.mkdir()
    # chmod would not stop root (tests may run as root), so deny the permission check itself
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    out = locked / "new" / "scored.csv"
    assert zoft_score(capsys, tmp_path / "no-such-run", src, out) == (
        2, f"zoft: error: {out}: cannot write the output: no write permission in {locked}\n")
    assert not os.listdir(locked)


def test_write_failure_is_one_line_and_leaves_no_file(asap_run, tmp_path, capsys, monkeypatch):
    import errno
    import zoft.scoring.score as score

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(score, "atomic_write_text", full_disk)
    src = write_csv(tmp_path / "in.csv", ["id", "text"], [("1", "vinegar")])
    out = tmp_path / "out.csv"
    assert zoft_score(capsys, asap_run, src, out) == (
        2, f"zoft: error: {out}: cannot write the output: No space left on device\n")
    assert not out.exists()


def test_a_decision_expected_run_scores_the_level_nearest_the_expected_score(asap_run, tmp_path):
    """The run's decision rule reaches zoft score: each row's score is the level nearest the expected
    score of its own p_ columns, and its confidence that level's probability."""
    import shutil

    import yaml

    run = tmp_path / "expected"
    shutil.copytree(asap_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "decision": "expected"}))
    src = write_csv(tmp_path / "in.csv", ["id", "text", "note"], INPUT)
    score_file(run, src, tmp_path / "out.csv", batch_size=2)
    scored = [r for r in read_csv(tmp_path / "out.csv") if r["score"]]
    assert len(scored) == 3
    for row in scored:
        probs = [float(row[f"p_{level}"]) for level in LEVELS]
        mean = sum(k * p for k, p in enumerate(probs)) / sum(probs)
        nearest = min(range(len(LEVELS)), key=lambda k: abs(k - mean))
        assert row["score"] == LEVELS[nearest]
        assert float(row["confidence"]) == pytest.approx(probs[nearest], abs=1e-6)
