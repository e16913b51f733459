"""ScoringTask: rubric prompts over ASAP-SAS / SciEntsBank, sampling, the qwk metric, and
every method's path (zero-shot, MeZO) end to end on a tiny random model."""
import csv
import json
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score

from zoft import api
from zoft.errors import DataError, ZoftError
from zoft.tasks.rubric.data import read_asap
from zoft.tasks.rubric.prompts import shorten, shorten_rubric, truncate_end
from zoft.tasks.rubric.task import ScoringTask, load_scoring_task
from zoft.tasks import Example, compute_metric, load_task
from zoft.tasks.readers import data_dir

DATA = data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")
TINY = dict(model="tiny-llama", progress=False, eval_batch_size=16)


def asap_rows(set_id: int) -> dict[str, dict]:
    """The raw CSV rows of an ASAP set by Id, read with the stdlib (independent of zoft's reader)."""
    with open(DATA / "asap-sas" / f"set{set_id:02d}.csv", newline="", encoding="utf-8") as f:
        return {row["Id"]: row for row in csv.DictReader(f)}


# ---------------------------------------------------------------- prompts and targets

@needs_data
def test_asap1_examples_hold_rubric_response_and_score1():
    task = load_task("asap-1")
    assert isinstance(task, ScoringTask)
    assert (task.kind, task.metric, task.metrics) == ("classification", "qwk", ["qwk", "acc", "f1"])
    assert task.label_words == ["0", "1", "2", "3"] and task.target_delimiter == " "
    raw = asap_rows(1)
    data = task.get_data(n_train=16, n_dev=8, n_eval=24, seed=0)
    for ex in data.train + data.dev + data.eval:
        row = raw[ex.doc["id"]]
        assert ex.choices == ["0", "1", "2", "3"]
        assert ex.target == int(row["Score1"]) and ex.answers == [row["Score1"]]
        # the item's own rubric, with its score-point definitions, is in the prompt
        assert "Rubric:\nRubric for Acid Rain" in ex.context
        assert "Score 3\nThe response describes three additional pieces of information" in ex.context
        assert "Score 0\nThe response describes little or no accurate" in ex.context
        # the question's ask (the end of the item text) survives shortening
        assert "describe what additional information you would need" in ex.context
        # the response comes last, right before the score cue
        text = " ".join(row["EssayText"].split())
        if len(text.split()) <= 150:
            assert ex.context.endswith(f"\nResponse: {text}\nScore:")
        # the general two-page rubric preamble is dropped
        assert "Scoring Rubric for Science Open-Ended Items" not in ex.context
    assert {ex.doc["split"] for ex in data.eval} == {"test"}


@needs_data
def test_prompt_budget_keeps_score_points_and_caps_length():
    for set_id in (1, 2, 3, 4, 10):
        task = load_task(f"asap-{set_id}")
        ex = task.get_data(n_train=0, n_dev=0, n_eval=50, seed=1).eval
        assert max(len(e.context.split()) for e in ex) < 600
    item, _ = read_asap(2, DATA)
    short = shorten_rubric(item.rubric, 200)
    assert len(short.split()) <= 200
    for line in ("Score 3", "Score 2", "Score 1", "Score 0", "3-Point Rubric:"):
        assert line in short.split("\n")
    assert "[...]" in short          # sample answers were dropped, and it says so
    # a long response is cut at its end, and the cue still ends the prompt
    task = load_task("asap-1")
    item = next(iter(task.items.values()))
    from zoft.tasks.rubric.data import Response
    long = task.example(Response("x", "water " * 400, None, item_id=item.item_id))
    assert long.context.endswith("water [...]\nScore:") and long.target is None
    assert truncate_end("a b c", 2) == "a b [...]" and truncate_end("a  b", 5) == "a b"
    assert shorten("one two\nthree four\nfive six", 4).split("\n")[1] == "[...]"


@needs_data
def test_load_task_dispatch_and_bad_names():
    ten = load_task("asap-10")
    assert ten.levels == ["0", "1", "2"] and ten.name == "asap-10"
    assert ten.human_qwk == pytest.approx(0.884, abs=5e-4)       # README: set 10 0.884
    assert load_task("asap-1").human_qwk == pytest.approx(0.944, abs=5e-4)
    sb = load_task("scientsbank")
    assert sb.levels == ["incorrect", "correct"] and sb.human_qwk is None and len(sb.items) > 100
    data = sb.get_data(n_train=8, n_dev=8, n_eval=8, seed=0)
    assert all("test-unseen-answers.jsonl" in ex.ref for ex in data.eval)
    assert all("train.jsonl" in ex.ref for ex in data.train + data.dev)
    ex = data.eval[0]
    assert "Reference answers:\n- " in ex.context and ex.context.endswith(
        f"Response: {' '.join(ex.doc['text'].split())}\nScore:")
    with pytest.raises(DataError) as e:
        load_task("asap-99")                  # no such set: the file is named
    assert "set99" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ZoftError, match="unknown task 'asap-x'.*asap-<N>"):
        load_task("asap-x")
    with pytest.raises(ZoftError, match="unknown scoring task"):
        load_scoring_task("sst2")


# ---------------------------------------------------------------- sampling

@needs_data
def test_sampling_is_deterministic_and_disjoint():
    task = load_task("asap-1")

    def ids(data):
        return [[ex.doc["id"] for ex in part] for part in (data.train, data.dev, data.eval)]

    a = ids(task.get_data(n_train=40, n_dev=30, n_eval=50, seed=3))
    assert a == ids(load_task("asap-1").get_data(n_train=40, n_dev=30, n_eval=50, seed=3))
    assert a != ids(task.get_data(n_train=40, n_dev=30, n_eval=50, seed=4))
    train, dev, evals = a
    assert (len(train), len(dev), len(evals)) == (40, 30, 50)
    assert len(set(train) | set(dev) | set(evals)) == 120          # no overlap anywhere
    raw = asap_rows(1)
    assert {raw[i]["split"] for i in train + dev} == {"train"} and {raw[i]["split"] for i in evals} == {"test"}
    few = task.get_data(n_train=0, n_dev=0, n_eval=0, seed=0, k_per_class=2)
    assert sorted(ex.target for ex in few.train) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not {ex.doc["id"] for ex in few.train} & {ex.doc["id"] for ex in few.dev}


def test_from_table_splits_pool_and_errors(tmp_path):
    rows = [("r1", "plants need light", 1, "train"), ("r2", "no idea", 0, "train"),
            ("r3", "light and water", 2, "train"), ("r4", "sun", 1, "test"), ("r5", "water", 0, "test"),
            ("r6", "held back", 2, "other")]
    path = tmp_path / "answers.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rid", "answer", "points", "part"])
        w.writerows(rows)
    mapping = {"id": "rid", "text": "answer", "score": "points", "split": "part",
               "item": {"question": "What do plants need?", "rubric": "2: light and water\n1: one\n0: none",
                        "examples": [{"text": "light", "score": 1}]}}
    task = ScoringTask.from_table(path, mapping)
    assert task.name == "answers" and task.levels == ["0", "1", "2"]
    data = task.get_data(n_train=2, n_dev=1, n_eval=5, seed=0)
    assert sorted(ex.doc["id"] for ex in data.train + data.dev) == ["r1", "r2", "r3"]
    assert sorted(ex.doc["id"] for ex in data.eval) == ["r4", "r5"]
    ctx = data.eval[0].context
    assert "Item: What do plants need?" in ctx and "Rubric:\n2: light and water" in ctx
    assert "Scored examples:\n- Score 1: light" in ctx
    # without a split column: one pool, eval held out of train/dev
    pooled = ScoringTask.from_table(path, {k: v for k, v in mapping.items() if k != "split"})
    d = pooled.get_data(n_train=3, n_dev=1, n_eval=2, seed=0)
    assert len({ex.doc["id"] for ex in d.train + d.dev + d.eval}) == 6
    with pytest.raises(DataError, match="no rows of split 'validation'"):
        ScoringTask.from_table(path, mapping, eval_split="validation")
    with pytest.raises(DataError, match="needs 'levels'"):
        ScoringTask.from_table(path, {"id": "rid", "text": "answer"})
    unscored = ScoringTask.from_table(path, {"id": "rid", "text": "answer", "levels": ["0", "1", "2"]})
    with pytest.raises(DataError, match="has no score"):
        unscored.get_data(n_train=1, n_dev=1, n_eval=1)
    with pytest.raises(DataError, match="aspects repeat"):
        ScoringTask.from_table(path, {"id": "rid", "text": "answer", "scores": ["points", "points"]})


# ---------------------------------------------------------------- the qwk metric

def test_qwk_metric_matches_sklearn():
    gold = [0, 1, 2, 3, 3, 2, 1, 0, 2, 2, 1, 3]
    pred = [0, 2, 2, 3, 1, 2, 0, 0, 3, 2, 1, 2]
    examples = [Example("c", ["0", "1", "2", "3"], g, [str(g)], {}, "") for g in gold]
    ours = compute_metric("qwk", pred, examples)
    assert ours == pytest.approx(cohen_kappa_score(gold, pred, weights="quadratic"), abs=1e-12)
    assert 0 < ours < 1
    # a level that never occurs still counts on the scale (sklearn: pass the labels)
    gold2, pred2 = [0, 1, 3, 3, 1, 0], [0, 1, 3, 1, 0, 0]
    ex2 = [Example("c", ["0", "1", "2", "3"], g, [str(g)], {}, "") for g in gold2]
    assert compute_metric("qwk", pred2, ex2) == pytest.approx(
        cohen_kappa_score(gold2, pred2, weights="quadratic", labels=[0, 1, 2, 3]), abs=1e-12)
    assert compute_metric("qwk", gold, examples) == 1.0
    with pytest.raises(ZoftError, match="qwk"):
        compute_metric("qwk", ["a"] * 12, examples)


# ---------------------------------------------------------------- methods end to end

@needs_data
def test_zero_shot_asap1_end_to_end(tmp_path):
    result = api.train(method="zero-shot", task="asap-1", n_train=8, n_dev=8, n_eval=16,
                       output_dir=str(tmp_path / "run"), **TINY)
    assert result["task"] == "asap-1" and result["metric"] == "qwk" and result["n_eval"] == 16
    for split in ("eval", "dev"):
        assert set(result[split]) == {"qwk", "acc", "f1"}
        assert -1 <= result[split]["qwk"] <= 1 and 0 <= result[split]["acc"] <= 1
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["eval"] == result["eval"]


@needs_data
def test_mezo_asap10_runs(tmp_path):
    result = api.train(method="mezo", task="asap-10", steps=2, eval_every=1, n_train=8, n_dev=4, n_eval=8,
                       batch_size=4, lr=1e-3, output_dir=str(tmp_path / "run"), **TINY)
    assert result["task"] == "asap-10" and result["metric"] == "qwk" and result["steps"] == 2
    assert set(result["eval"]) == {"qwk", "acc", "f1"} and result["best_step"] in (1, 2)
    assert (tmp_path / "run" / "best").exists()
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "task: asap-10" in config
    assert Path(result["run_dir"]) == tmp_path / "run"


def test_context_from_chat_rebuilds_the_training_prompt():
    from zoft.tasks.rubric.data import Response
    from zoft.tasks.rubric.prompts import system_prompt, user_prompt
    from zoft.tasks.rubric.task import load_scoring_task
    task = load_scoring_task("asap-1")
    item = next(iter(task.items.values()))
    response = Response(id="x", text="They should say how much vinegar to use.", score=None, second_score=None,
                        split="test", item_id=item.item_id, ref="")
    messages = [{"role": "system", "content": system_prompt(item)},
                {"role": "user", "content": user_prompt(item, response)}]
    assert task.context_from_chat(messages) == task.context(item, response.text)
