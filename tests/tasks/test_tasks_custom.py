"""A user's own YAML task works with no code, from JSONL or CSV."""
import json
from pathlib import Path

import pytest

from zoft.tasks import load_task

FIXTURES = Path(__file__).parents[1] / "fixtures"

YAML = """\
task: reviews
dataset_path: {path}
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: [negative, positive]
doc_to_target: label
class_labels: [neg, pos]
metric_list:
  - metric: f1
  - metric: acc
"""
ROWS = [("awful plot", "neg"), ("loved it", "pos"), ("boring, too long", "neg"), ("a gem", "pos")] * 5


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def check_reviews(task, suffix):
    assert task.name == "reviews" and task.kind == "classification" and task.metric == "f1"
    ex = task.load_split("validation")[1]
    assert ex.context == "Review: loved it\nSentiment:" and ex.target == 1 and ex.answers == ["positive"]
    assert ex.ref.endswith(f"validation.{suffix}:2")
    data = task.get_data(n_train=10, n_dev=5, n_eval=8, seed=0)
    assert (len(data.train), len(data.dev), len(data.eval)) == (10, 5, 8)


def test_jsonl_task_relative_to_yaml(tmp_path):
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", [{"text": t, "label": l} for t, l in ROWS])
    (tmp_path / "reviews.yaml").write_text(YAML.format(path="data"))
    check_reviews(load_task(tmp_path / "reviews.yaml"), "jsonl")


def test_csv_task_found_without_data_files(tmp_path):
    for split in ("train", "validation"):
        lines = ["text,label"] + [f'"{t}",{l}' for t, l in ROWS]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "reviews.yaml").write_text(YAML.format(path=str(tmp_path)))  # absolute path
    check_reviews(load_task(str(tmp_path / "reviews.yaml")), "csv")


def test_label_as_choice_string_and_data_files(tmp_path):
    write_jsonl(tmp_path / "all.jsonl", [{"q": "2+2?", "a": "four"}, {"q": "1+2?", "a": "three"}])
    (tmp_path / "t.yaml").write_text(
        "task: math\ndataset_path: .\ndata_files: {train: all.jsonl, validation: all.jsonl}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: [three, four]\n"
        "doc_to_target: a\nkind: multiple_choice\n")
    task = load_task(tmp_path / "t.yaml")
    assert task.kind == "multiple_choice"  # explicit kind overrides the inferred one
    assert [ex.target for ex in task.load_split("train")] == [1, 0]


def test_qa_fixture_generation_task():
    task = load_task(FIXTURES / "qa_small.yaml")
    assert task.kind == "generation" and task.metrics == ["squad_f1", "exact_match"]
    examples = task.load_split("train")
    assert len(examples) == 40
    ex = examples[0]
    assert ex.context == ("Context: The Nile flows north through eleven countries and empties into the "
                          "Mediterranean Sea.\nQuestion: Into which sea does the Nile empty?\nAnswer:")
    assert ex.answers == ["the Mediterranean Sea", "Mediterranean"] and ex.choices == []
    data = task.get_data(n_train=20, n_dev=10, n_eval=10)
    all_refs = [e.ref for e in data.train + data.dev + data.eval]
    assert len(set(all_refs)) == 40


def test_unknown_builtin_name():
    from zoft.errors import ZoftError

    with pytest.raises(ZoftError, match="unknown task 'nope'"):
        load_task("nope")
