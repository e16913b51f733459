"""Multi-label scoring (several rubric aspects, each 0/1) on a small fixture: task, metric, training, scoring."""
import csv
import json
from pathlib import Path

import pytest

from zoft import api
from zoft.errors import DataError
from zoft.scoring.score import score_file
from zoft.tasks import compute_metric, load_task
from zoft.tasks.example import Example

FIXTURES = Path(__file__).parent / "fixtures"
TASK = FIXTURES / "multilabel_task.yaml"
ASPECTS = ["claim", "evidence", "reasoning"]


def gold_table():
    rows = [json.loads(line) for line in (FIXTURES / "multilabel.jsonl").read_text().splitlines()]
    return {r["id"]: [r[a] for a in ASPECTS] for r in rows}


def test_task_expands_each_response_into_its_aspects():
    task = load_task(str(TASK))
    assert task.aspects == ASPECTS and task.levels == ["0", "1"]
    assert task.metrics == ["qwk", "acc", "f1", "response_acc"]
    train = task.load_split("train")
    assert len(train) == 8 * 3
    gold = gold_table()
    for ex in train:
        aspect = ex.doc["aspect"]
        assert ex.context.endswith(f"Response: {ex.doc['text']}\nAspect: {aspect}\nScore:")
        assert ex.target == gold[ex.doc["id"]][ASPECTS.index(aspect)]
        assert "Aspects, scored one at a time: claim, evidence, reasoning." in ex.context
    data = task.get_data(n_train=6, n_dev=2, n_eval=10, seed=3)
    assert (len(data.train), len(data.dev), len(data.eval)) == (18, 6, 12)
    splits = {}
    for name in ("train", "dev", "eval"):
        for ex in getattr(data, name):
            splits.setdefault(ex.doc["id"], set()).add(name)
    assert all(len(s) == 1 for s in splits.values()), "a response straddles two splits"
    for name in ("train", "dev", "eval"):   # every aspect of a sampled response comes along, in order
        docs = [ex.doc for ex in getattr(data, name)]
        assert [d["aspect"] for d in docs] == ASPECTS * (len(docs) // 3)
    assert task.get_data(n_train=6, n_dev=2, n_eval=10, seed=3).train[0].doc == data.train[0].doc


def test_response_accuracy_needs_every_aspect_right():
    def ex(key, target):
        return Example("c", ["0", "1"], target, [str(target)], {"response_key": key}, "")
    examples = [ex("a", 1), ex("a", 0), ex("b", 1), ex("b", 1), ex("c", 0), ex("c", 0)]
    preds = [1, 0, 1, 0, 0, 0]            # a right, b one aspect wrong, c right
    assert compute_metric("response_acc", preds, examples) == pytest.approx(2 / 3)
    assert compute_metric("acc", preds, examples) == pytest.approx(5 / 6)
    plain = [Example("c", ["0", "1"], t, [str(t)], {}, "") for t in (1, 0, 1)]
    assert compute_metric("response_acc", [1, 1, 1], plain) == pytest.approx(2 / 3)   # = accuracy


def test_bad_multilabel_rows_are_named(tmp_path):
    rows = (FIXTURES / "multilabel.jsonl").read_text().splitlines()
    (tmp_path / "t.jsonl").write_text("\n".join(rows[:3] + [rows[3].replace('"claim": 0', '"claim": 2')]) + "\n")
    (tmp_path / "t.yaml").write_text((FIXTURES / "multilabel.yaml").read_text())
    (tmp_path / "task.yaml").write_text("table: t.jsonl\nmapping: t.yaml\nsplits: x\n")
    with pytest.raises(DataError, match=r"task.yaml.*splits"):
        load_task(str(tmp_path / "task.yaml"))
    (tmp_path / "task.yaml").write_text("table: t.jsonl\nmapping: t.yaml\n")
    with pytest.raises(DataError, match=r"t.jsonl:4.*claim"):
        load_task(str(tmp_path / "task.yaml"))


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ml"
    result = api.train(method="mezo", task=str(TASK), model="tiny-llama", steps=2, eval_every=1, batch_size=6,
                       lr=1e-2, n_train=6, n_dev=2, n_eval=10, progress=False, output_dir=str(out))
    return out, result


def test_training_reports_response_accuracy(multilabel_run):
    out, result = multilabel_run
    saved = json.loads((out / "eval.json").read_text())
    preds, targets = saved["eval_outputs"]["predictions"], saved["eval_outputs"]["targets"]
    assert len(preds) == 12 and result["n_eval"] == 12
    by_response = [(preds[i:i + 3], targets[i:i + 3]) for i in range(0, 12, 3)]
    assert saved["eval"]["response_acc"] == pytest.approx(sum(p == t for p, t in by_response) / 4)
    assert saved["eval"]["acc"] == pytest.approx(sum(p == t for p, t in zip(preds, targets)) / 12)


def test_score_file_writes_each_aspect_and_reports_bad_rows(multilabel_run, tmp_path):
    out, _ = multilabel_run
    src = tmp_path / "new.csv"
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows([["id", "text"], ["n1", "Metal conducts heat into the ice."], ["n2", "  "],
                                 ["n3", "The metal one melted first."]])
    summary = score_file(out, src, tmp_path / "scored.csv", batch_size=4)
    assert summary["scored"] == 2 and summary["failed"] == 1 and "row 2: empty text" in summary["errors"]
    with open(tmp_path / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[-len(ASPECTS) * 3 - 3:] == (["score", *ASPECTS]
                                             + [f"p_{a}_{lv}" for a in ASPECTS for lv in "01"]
                                             + ["confidence", "error"])
    for row in (rows[0], rows[2]):
        levels = []
        for a in ASPECTS:
            p0, p1 = float(row[f"p_{a}_0"]), float(row[f"p_{a}_1"])
            assert p0 + p1 == pytest.approx(1, abs=1e-5)
            levels.append("1" if p1 > p0 else "0")
            assert row[a] == levels[-1]
        assert row["score"] == ",".join(levels) and row["error"] == ""
    assert rows[1]["score"] == "" and rows[1]["error"] == "empty text"


def test_serve_answers_every_aspect_as_zoft_score_does(multilabel_run, tmp_path, monkeypatch):
    """zoft serve on the multi-label run: the reply is the aspects' levels joined by commas (the chat
    export's format), with one logprobs entry per aspect whose probabilities equal the
    p_<aspect>_<level> columns zoft score writes for the same text."""
    uvicorn = pytest.importorskip("uvicorn")
    from starlette.testclient import TestClient

    from zoft.scoring.serve import level_probabilities, serve
    from zoft.tasks.rubric.data import Response
    from zoft.tasks.rubric.prompts import system_prompt, user_prompt

    out, _ = multilabel_run
    text = "Metal conducts heat into the ice."
    src = tmp_path / "one.csv"
    src.write_text(f"id,text\nn1,{text}\n")
    score_file(out, src, tmp_path / "scored.csv", batch_size=4)
    with open(tmp_path / "scored.csv", newline="") as f:
        expected = next(csv.DictReader(f))
    item = next(iter(load_task(str(TASK)).items.values()))
    messages = [{"role": "system", "content": system_prompt(item)},
                {"role": "user", "content": user_prompt(item, Response("n1", text, None))}]
    seen = {}

    def fake_run(app, host, port, log_level):
        with TestClient(app) as client:
            seen["reply"] = client.post("/v1/chat/completions", json={
                "model": "ml", "messages": messages, "logprobs": True}).json()
    monkeypatch.setattr(uvicorn, "run", fake_run)
    serve(out)
    choice = seen["reply"]["choices"][0]
    assert choice["message"]["content"] == expected["score"]
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [expected[a] for a in ASPECTS]
    for aspect, entry in zip(ASPECTS, entries):
        probs = level_probabilities(entry["top_logprobs"])
        for level in "01":
            assert probs[level] == pytest.approx(float(expected[f"p_{aspect}_{level}"]), abs=1e-5)
