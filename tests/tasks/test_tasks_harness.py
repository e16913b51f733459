"""lm-evaluation-harness task YAMLs as they are: ignored keys, !function, include, booleans,
per-row choices, and nested rows flattened with ``explode:``."""
import json
import logging

import pytest

from zoft.errors import DataError
from zoft.tasks import load_task

# lm-evaluation-harness's super_glue/boolq/default.yaml, pointed at the local BoolQ folder.
HARNESS_BOOLQ = """\
tag:
  - super-glue-lm-eval-v1
task: boolq
dataset_path: {path}
dataset_name: boolq
output_type: multiple_choice
training_split: validation
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
should_decontaminate: true
doc_to_decontamination_query: passage
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def test_harness_boolq_yaml_loads_with_one_note_and_boolean_labels(tmp_path, caplog, data_dir):
    (tmp_path / "boolq.yaml").write_text(HARNESS_BOOLQ.format(path=data_dir / "boolq"))
    with caplog.at_level(logging.WARNING):
        task = load_task(tmp_path / "boolq.yaml")
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [(f"{tmp_path / 'boolq.yaml'}: ignoring lm-evaluation-harness keys zoft does not use: "
                      "doc_to_decontamination_query, metadata, should_decontaminate, tag, "
                      "metric_list.aggregation, metric_list.higher_is_better")]
    examples = task.load_split("validation")
    rows = [json.loads(line) for line in (data_dir / "boolq" / "validation.jsonl").read_text().splitlines()]
    assert all(isinstance(r["label"], bool) for r in rows)
    # as the harness indexes doc_to_choice with the label: False -> "no", True -> "yes"
    assert [ex.answers[0] for ex in examples] == ["yes" if r["label"] else "no" for r in rows]
    assert examples[0].context == f"{rows[0]['passage']}\nQuestion: {rows[0]['question']}?\nAnswer:"


def write(tmp_path, yaml_text, rows, name="train.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(yaml_text)
    return tmp_path / "t.yaml"


BASE = "task: t\ndataset_path: .\ndata_files: {train: train.jsonl}\noutput_type: multiple_choice\n"


def test_boolean_text_labels_from_csv_map_like_booleans(tmp_path):
    (tmp_path / "train.csv").write_text("q,label\nsky blue,True\nsky green,false\n")
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: .\noutput_type: multiple_choice\n"
                                     "doc_to_text: '{{q}}?'\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: label\n")
    assert [ex.target for ex in load_task(tmp_path / "t.yaml").load_split("train")] == [1, 0]


def test_unknown_label_message_names_class_labels(tmp_path):
    path = write(tmp_path, BASE + "doc_to_text: '{{q}}'\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: label\n",
                 [{"q": "a", "label": "maybe"}])
    with pytest.raises(DataError) as e:
        load_task(path).load_split("train")
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'}:1: field 'label': unknown label 'maybe'")
    assert "true/false" in text and "class_labels" in text and "\n" not in text


def test_misspelt_key_still_errors_with_did_you_mean(tmp_path):
    with pytest.raises(DataError) as e:
        load_task(write(tmp_path, BASE + "doc_to_txt: '{{q}}'\ndoc_to_choice: [a, b]\ndoc_to_target: l\n", []))
    assert str(e.value).startswith(f"{tmp_path / 't.yaml'}: field 'doc_to_txt': unknown key (did you mean "
                                   "'doc_to_text'?)")


@pytest.mark.parametrize("key,alternative", [("process_docs", "explode:"), ("doc_to_text", "jinja2 template")])
def test_function_tags_are_one_line_naming_the_alternative(tmp_path, key, alternative):
    text = BASE + "doc_to_text: '{{q}}'\ndoc_to_choice: [a, b]\ndoc_to_target: l\n"
    text = text.replace("doc_to_text: '{{q}}'\n", "") + f"{key}: !function utils.process\n"
    if key != "doc_to_text":
        text += "doc_to_text: '{{q}}'\n"
    with pytest.raises(DataError) as e:
        load_task(write(tmp_path, text, []))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 't.yaml'}: field '{key}': !function utils.process is Python code")
    assert alternative in msg and "\n" not in msg


def test_include_merges_a_base_yaml_under_the_file(tmp_path):
    (tmp_path / "_base.yaml").write_text(BASE + "doc_to_text: 'Q: {{q}}'\ndoc_to_choice: [a, b]\n"
                                         "doc_to_target: l\ntarget_delimiter: '|'\n")
    path = write(tmp_path, "include: _base.yaml\ntask: child\ndoc_to_text: 'Child: {{q}}'\n", [{"q": "x", "l": 1}])
    task = load_task(path)
    assert task.name == "child" and task.target_delimiter == "|"
    assert task.load_split("train")[0].context == "Child: x"


def test_doc_to_choice_as_field_and_as_list_template(tmp_path):
    rows = [{"q": "2+2", "options": ["3", "4"], "gold": 1, "a": "yes"}]
    path = write(tmp_path, BASE + "doc_to_text: '{{q}}='\ndoc_to_choice: options\ndoc_to_target: gold\n", rows)
    ex = load_task(path).load_split("train")[0]
    assert ex.choices == ["3", "4"] and ex.target == 1
    # the harness's MultiRC form: a template rendering a Python list literal
    text = BASE + ("doc_to_text: '{{q}}'\ndoc_to_choice: \"['''{{a}}? no''', '''{{a}}? yes''']\"\n"
                   "doc_to_target: gold\n")
    ex = load_task(write(tmp_path, text, rows)).load_split("train")[0]
    assert ex.choices == ["yes? no", "yes? yes"] and ex.answers == ["yes? yes"]


# SuperGLUE's MultiRC as released (one passage, many questions, many answers each), shrunk.
MULTIRC = [
    {"idx": 0, "passage": {"text": "Sam has a red bike and a blue car.", "questions": [
        {"idx": 0, "question": "What colour is the bike?", "answers": [
            {"idx": 0, "text": "red", "label": 1}, {"idx": 1, "text": "blue", "label": 0}]},
        {"idx": 1, "question": "What does Sam have?", "answers": [
            {"idx": 2, "text": "a car", "label": 1}, {"idx": 3, "text": "a boat", "label": 0},
            {"idx": 4, "text": "a bike", "label": 1}]}]}},
    {"idx": 1, "passage": {"text": "It rained all day.", "questions": [
        {"idx": 2, "question": "Was it sunny?", "answers": [{"idx": 5, "text": "no", "label": True}]}]}},
]
MULTIRC_YAML = BASE + """\
explode:
  question: passage.questions
  answer: question.answers
doc_to_text: "{{passage.text}}\\nQuestion: {{question.question}}\\nAnswer: {{answer.text}}\\nIs it correct?"
doc_to_choice: ["no", "yes"]
doc_to_target: answer.label
"""


def test_explode_flattens_nested_multirc_rows(tmp_path):
    task = load_task(write(tmp_path, MULTIRC_YAML, MULTIRC))
    examples = task.load_split("train")
    expected = [(p["passage"]["text"], q["question"], a["text"], int(a["label"]))
                for p in MULTIRC for q in p["passage"]["questions"] for a in q["answers"]]
    assert len(examples) == 6
    assert [ex.context for ex in examples] == [f"{p}\nQuestion: {q}\nAnswer: {a}\nIs it correct?"
                                               for p, q, a, _ in expected]
    assert [ex.target for ex in examples] == [t for *_, t in expected]
    assert [ex.ref.rsplit(":", 1)[1] for ex in examples] == ["1"] * 5 + ["2"]
    same = load_task(write(tmp_path, MULTIRC_YAML + "validation_split: train\n", MULTIRC))
    data = same.get_data(n_train=3, n_dev=1, n_eval=2, seed=0)
    assert (len(data.train), len(data.dev), len(data.eval)) == (3, 1, 2)


def test_explode_errors_name_file_row_and_path(tmp_path):
    rows = [MULTIRC[0], {"idx": 2, "passage": {"text": "x", "questions": {"not": "a list"}}}]
    with pytest.raises(DataError) as e:
        load_task(write(tmp_path, MULTIRC_YAML, rows)).load_split("train")
    assert str(e.value) == (f"{tmp_path / 'train.jsonl'}:2: field 'passage.questions': a dict, not a list in "
                            "this row (explode: question: passage.questions)")
    with pytest.raises(DataError, match=r"t\.yaml: field 'explode': must map a new field name"):
        load_task(write(tmp_path, BASE + "explode: [passage.questions]\ndoc_to_text: x\ndoc_to_choice: [a, b]\n"
                        "doc_to_target: l\n", MULTIRC))
