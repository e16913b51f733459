"""Every bad input gives one DataError line naming the file, row and field."""
import json

import pytest

from zoft.errors import DataError
from zoft.tasks import load_task
from zoft.tasks.readers import read_rows

NLI = """\
task: nli
dataset_path: .
output_type: multiple_choice
doc_to_text: "{{premise}} Question: {{hypothesis}}?"
doc_to_choice: ["Yes", "No"]
doc_to_target: label
class_labels: [entailment, not_entailment]
"""
GOOD = {"premise": "It rains.", "hypothesis": "It is wet", "label": "entailment"}


def nli_task(tmp_path, train_text, yaml_text=NLI, name="train.jsonl"):
    (tmp_path / name).write_text(train_text, encoding="utf-8")
    (tmp_path / "validation.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "nli.yaml").write_text(yaml_text)
    return load_task(tmp_path / "nli.yaml")


def message(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_malformed_jsonl_row(tmp_path):
    task = nli_task(tmp_path, json.dumps(GOOD) + "\n\n" + '{"premise": "x", "hypothesis": }\n')
    with pytest.raises(DataError) as e:
        task.load_split("train")
    assert message(e).startswith(f"{tmp_path / 'train.jsonl'}:3: malformed JSON")


def test_non_object_jsonl_row(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "x.jsonl")
    assert message(e) == f"{tmp_path / 'x.jsonl'}:2: expected a JSON object, got list"


def test_csv_row_with_wrong_field_count(tmp_path):
    csv_text = "premise,hypothesis,label\nIt rains.,It is wet,entailment\nIt rains.,It is dry\n"
    task = nli_task(tmp_path, csv_text, name="train.csv")
    with pytest.raises(DataError) as e:
        task.load_split("train")
    assert message(e).startswith(f"{tmp_path / 'train.csv'}:2: field 'label': missing")
    (tmp_path / "extra.csv").write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match=r"extra\.csv:2: row has 3 fields, header has 2"):
        read_rows(tmp_path / "extra.csv")


def test_unknown_label(tmp_path):
    task = nli_task(tmp_path, json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "label": "maybe"}) + "\n")
    with pytest.raises(DataError) as e:
        task.load_split("train")
    assert message(e).startswith(f"{tmp_path / 'train.jsonl'}:2: field 'label': unknown label 'maybe'")


def test_template_field_missing_from_row(tmp_path):
    bad = {"premise": "It rains.", "label": "entailment"}
    task = nli_task(tmp_path, json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        task.load_split("train")
    assert message(e) == (f"{tmp_path / 'train.jsonl'}:2: field 'hypothesis': "
                          "missing or null in this row (used by doc_to_text)")


def test_target_field_missing_from_row(tmp_path):
    task = nli_task(tmp_path, json.dumps({"premise": "a", "hypothesis": "b"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'label': missing"):
        task.load_split("train")


def test_missing_split_file(tmp_path):
    task = nli_task(tmp_path, json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        task.load_split("test")
    assert message(e).startswith(f"{tmp_path / 'test.jsonl'}: split 'test' of task 'nli' not found")


def test_empty_split(tmp_path):
    task = nli_task(tmp_path, "\n  \n")
    with pytest.raises(DataError) as e:
        task.get_data()
    assert message(e) == f"{tmp_path / 'train.jsonl'}: file is empty (no rows)"
    (tmp_path / "h.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"h\.csv: file is empty"):
        read_rows(tmp_path / "h.csv")


def test_unknown_yaml_key(tmp_path):
    with pytest.raises(DataError) as e:
        nli_task(tmp_path, "", yaml_text=NLI + "doc_to_txt: oops\n")
    assert message(e).startswith(f"{tmp_path / 'nli.yaml'}: field 'doc_to_txt': unknown key")


@pytest.mark.parametrize("extra,field", [
    ("metric_list: [{metric: bleu}]", "metric_list"),
    ("doc_to_choice: Yes", "doc_to_choice"),
    ("output_type: loglikelihood", "output_type"),
    ("class_labels: [entailment]", "class_labels"),
    ("generation_kwargs: {temperature: 0.5}", "generation_kwargs"),
])
def test_bad_yaml_values(tmp_path, extra, field):
    key = extra.split(":")[0]
    text = "".join(line + "\n" for line in NLI.splitlines() if not line.startswith(key + ":")) + extra + "\n"
    with pytest.raises(DataError) as e:
        nli_task(tmp_path, "", yaml_text=text)
    assert message(e).startswith(f"{tmp_path / 'nli.yaml'}: field '{field}': ")


def test_bad_template_syntax(tmp_path):
    with pytest.raises(DataError, match=r"nli\.yaml: field 'doc_to_text': bad template"):
        nli_task(tmp_path, "", yaml_text=NLI.replace("{{premise}}", "{{premise"))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(DataError, match=r"nli\.yaml:\d+: invalid YAML"):
        nli_task(tmp_path, "", yaml_text="task: [unclosed\n")


def test_latin1_fallback(tmp_path):
    (tmp_path / "l.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    assert read_rows(tmp_path / "l.csv") == [(1, {"text": "café", "label": "1"})]


def test_binary_files_are_one_short_line(tmp_path):
    """Every reader goes through read_text: a binary file is refused, not decoded as Latin-1."""
    xlsx = b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5U0#\xf4" + bytes(range(256)) * 4
    for name in ("sheet.csv", "sheet.jsonl"):
        (tmp_path / name).write_bytes(xlsx)
        with pytest.raises(DataError) as e:
            read_rows(tmp_path / name)
        assert message(e) == f"{tmp_path / name}: not a UTF-8 text file (byte 0xb5 at offset 14)"
    (tmp_path / "nul.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\x00\n")
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "nul.jsonl")
    assert message(e) == f"{tmp_path / 'nul.jsonl'}: not a text file (NUL byte at offset {len(json.dumps(GOOD)) + 1})"


def test_csv_unclosed_quote_names_the_row(tmp_path):
    (tmp_path / "q.csv").write_text('text,label\nfine,1\n"never closed,0\nnext,1\n')
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "q.csv")
    assert message(e) == (f"{tmp_path / 'q.csv'}:2: unclosed quote: the quoted field opened on line 3 "
                          "runs to the end of the file")
    (tmp_path / "ok.csv").write_text('text,label\n"two\nlines, ""quoted""",1\n5" nail,0\n')
    assert read_rows(tmp_path / "ok.csv") == [(1, {"text": 'two\nlines, "quoted"', "label": "1"}),
                                              (2, {"text": '5" nail', "label": "0"})]


def test_unreachable_dataset_path(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub access in tests
    task = nli_task(tmp_path, "", yaml_text=NLI.replace("dataset_path: .", "dataset_path: no/such_dir"))
    with pytest.raises(DataError) as e:
        task.load_split("train")
    assert message(e).startswith(f"{tmp_path / 'nli.yaml'}: field 'dataset_path': 'no/such_dir' is not a local")
