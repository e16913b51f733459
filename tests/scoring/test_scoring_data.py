"""Readers on the real ASAP-SAS and SemEval files, the table reader, and bad input."""
from collections import Counter
from pathlib import Path

import pytest

from zoft.errors import DataError
from zoft.tasks.rubric.data import pairs, read_asap, read_asap_item, read_semeval, read_table
from zoft.tasks.rubric.prompts import system_prompt, to_example
from zoft.tasks.readers import data_dir

DATA = data_dir()
FIXTURES = Path(__file__).parent / "fixtures"
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")
SCIENTSBANK = (DATA / "semeval2013-2way" / "scientsbank") if DATA else Path("missing")


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- ASAP-SAS

@needs_data
@pytest.mark.parametrize("set_id, train, test, levels", [
    (1, 1672, 557, ["0", "1", "2", "3"]),
    (2, 1278, 426, ["0", "1", "2", "3"]),
    (10, 1640, 546, ["0", "1", "2"]),
])
def test_asap_counts_and_ranges(set_id, train, test, levels):
    item, responses = read_asap(set_id, DATA)
    assert item.score_levels == levels
    assert Counter(r.split for r in responses) == {"train": train, "test": test}
    # every score level is used; Score2 exists exactly on train rows
    assert {r.score for r in responses} == set(range(len(levels)))
    assert all((r.second_score is not None) == (r.split == "train") for r in responses)
    assert {r.second_score for r in responses if r.split == "train"} == set(range(len(levels)))
    assert {r.item_id for r in responses} == {item.item_id}


@needs_data
def test_asap_known_rows():
    _, responses = read_asap(1, DATA)
    first = responses[0]
    assert (first.id, first.score, first.second_score, first.split) == ("1", 1, 1, "train")
    assert first.text.startswith("Some additional information that we would need to replicate")
    assert first.ref.endswith("set01.csv:1")
    test_row = next(r for r in responses if r.id == "1673")
    assert (test_row.score, test_row.second_score, test_row.split) == (1, None, "test")
    _, responses10 = read_asap(10, DATA / "asap-sas")  # the asap-sas folder itself works too
    assert responses10[0].text.startswith("black :: black might affect the dog house")
    assert (responses10[0].id, responses10[0].score) == ("25949", 2)


@needs_data
def test_asap_item_file_decodes_latin1_and_line_ends():
    item = read_asap_item(DATA / "asap-sas" / "items" / "set01.txt", 1)
    assert "\r" not in item.question + item.rubric
    assert "• You need to know how much vinegar was used in each container." in item.rubric
    assert not any(0x80 <= ord(c) <= 0x9F for c in item.rubric)  # no C1 controls from Latin-1
    assert item.question.startswith("A group of students wrote the following procedure")
    assert item.question.endswith("Make sure to include at least three pieces of information.")
    assert item.rubric.startswith("Scoring Rubric for Science Open-Ended Items")
    assert item.rubric.endswith("from the acid rain investigation.")  # page number "1" dropped
    assert item.metadata["title"] == "Acid Rain" and item.metadata["Rubric range"] == "0-3"
    item10 = read_asap_item(DATA / "asap-sas" / "items" / "set10.txt", 10)
    assert "the starting temperature inside the jar is 24° C." in item10.question
    assert "\nBlack\nThe doghouse will be warmer." in item10.rubric  # lone CRs split table cells
    assert "\r" not in item10.question + item10.rubric
    with pytest.raises(DataError, match="describes data set 10, not 2"):
        read_asap_item(DATA / "asap-sas" / "items" / "set10.txt", 2)


def test_asap_item_file_that_is_binary(tmp_path):
    (tmp_path / "set01.txt").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\x00" + bytes(range(256)))
    with pytest.raises(DataError) as e:
        read_asap_item(tmp_path / "set01.txt", 1)
    assert one_line(e) == f"{tmp_path / 'set01.txt'}: not a UTF-8 text file (byte 0xe2 at offset 10)"


def asap_copy(tmp_path, set_id=1, csv_text=None, rubric_range="0-3"):
    """A tiny ASAP folder: the real item file's header with a chosen range, and a CSV."""
    (tmp_path / "items").mkdir()
    item = (f"Data Set #{set_id}\r\nType of response:\rX\rRubric range:\r{rubric_range}\rPrompt-Test\r\n"
            "Describe.\r\nScoring Rubric for Test\r\nScore 1\r\nGood.\r\n1\r\n")
    (tmp_path / "items" / f"set{set_id:02d}.txt").write_bytes(item.encode("cp1252"))
    (tmp_path / f"set{set_id:02d}.csv").write_text(csv_text, encoding="utf-8")
    return tmp_path


HEADER = "Id,EssaySet,Score1,Score2,EssayText,split\n"


def test_asap_score_outside_rubric_range(tmp_path):
    folder = asap_copy(tmp_path, csv_text=HEADER + "1,1,2,2.0,fine,train\n2,1,4,3.0,too high,train\n",
                       rubric_range="0-3")
    with pytest.raises(DataError) as e:
        read_asap(1, folder)
    assert one_line(e) == f"{folder / 'set01.csv'}:2: field 'Score1': score '4' is not one of the levels ['0', '1', '2', '3']"


@pytest.mark.parametrize("csv_text, row, field, reason", [
    (HEADER + "1,1,2,2.0,ok,train\n2,1,two,2.0,bad,train\n", 2, "Score1", "score 'two' is not one of the levels"),
    (HEADER + "1,1,2,2.5,half,train\n", 1, "Score2", "score '2.5' is not one of the levels"),
    (HEADER + "1,1,2,2.0,ok,train\n2,1,2\n", 2, "Score2", "missing: row has 3 fields"),
    (HEADER + "1,1,2,2.0,ok,train\n2,2,2,2.0,other set,train\n", 2, "EssaySet", "row of set 2"),
    (HEADER + "1,1,2,2.0,ok,train\n1,1,2,2.0,again,train\n", 2, "Id", "duplicate response id '1'"),
])
def test_asap_bad_rows(tmp_path, csv_text, row, field, reason):
    folder = asap_copy(tmp_path, csv_text=csv_text)
    with pytest.raises(DataError) as e:
        read_asap(1, folder)
    assert one_line(e).startswith(f"{folder / 'set01.csv'}:{row}: field '{field}': {reason}")


def test_asap_missing_column(tmp_path):
    folder = asap_copy(tmp_path, csv_text="Id,EssaySet,Score1,EssayText,split\n1,1,2,ok,train\n")
    with pytest.raises(DataError) as e:
        read_asap(1, folder)
    assert one_line(e).startswith(f"{folder / 'set01.csv'}:1: field 'Score2': missing column")


def test_asap_bad_item_file(tmp_path):
    folder = asap_copy(tmp_path, csv_text=HEADER + "1,1,2,2.0,ok,train\n", rubric_range="three")
    with pytest.raises(DataError, match=r"set01.txt: field 'Rubric range': no valid 'Rubric range:'"):
        read_asap(1, folder)


# ---------------------------------------------------------------- SemEval

@needs_data
@pytest.mark.parametrize("name, rows, questions, correct", [
    ("train", 4969, 135, 2008),
    ("test-unseen-answers", 540, 135, 233),
    ("test-unseen-questions", 733, 15, 301),
    ("test-unseen-domains", 4562, 46, 1917),
])
def test_semeval_counts(name, rows, questions, correct):
    groups = read_semeval(SCIENTSBANK / f"{name}.jsonl")
    responses = [r for _, rs in groups for r in rs]
    assert (len(responses), len(groups)) == (rows, questions)
    assert sum(r.score for r in responses) == correct
    assert {r.split for r in responses} == {name}
    assert all(item.score_levels == ["incorrect", "correct"] for item, _ in groups)


@needs_data
def test_semeval_known_row():
    item, response = pairs(read_semeval(SCIENTSBANK / "train.jsonl"))[0]
    assert item.item_id == "EM_45b"
    assert item.question.endswith("How did you separate the salt from the water?")
    assert item.reference_answers == ["The water was evaporated, leaving the salt."]
    assert (response.id, response.text, response.score) == (
        "EM.45b.110.1", "By letting it sit in a dish for a day.", 0)
    example = to_example(item, response)
    assert example.choices == ["incorrect", "correct"] and example.target == 0
    assert "The water was evaporated, leaving the salt." in example.context


def test_semeval_inconsistent_question(tmp_path):
    row = ('{"question_id": "Q1", "question": "%s", "reference_answers": ["r"], "answer_id": "%s", '
           '"answer": "a", "label": "%s"}\n')
    path = tmp_path / "train.jsonl"
    path.write_text(row % ("Why?", "a1", "correct") + row % ("How?", "a2", "incorrect"))
    with pytest.raises(DataError) as e:
        read_semeval(path)
    assert one_line(e).startswith(f"{path}:2: field 'question': differs from the first row of question 'Q1'")
    path.write_text(row % ("Why?", "a1", "partially_correct"))
    with pytest.raises(DataError, match=r":1: field 'label': score 'partially_correct' is not one of"):
        read_semeval(path)


# ---------------------------------------------------------------- table reader

def test_multilabel_fixture():
    groups = read_table(FIXTURES / "multilabel.jsonl", FIXTURES / "multilabel.yaml")
    assert len(groups) == 1
    item, responses = groups[0]
    assert item.item_id == "ice-trays" and item.aspects == ["claim", "evidence", "reasoning"]
    assert item.score_levels == ["0", "1"] and item.rubric.startswith("claim (1):")
    assert len(responses) == 12
    assert Counter(r.split for r in responses) == {"train": 8, "test": 4}
    assert responses[1].score == [1, 0, 1] and responses[8].score == [0, 0, 0]
    assert [sum(col) for col in zip(*(r.score for r in responses))] == [8, 6, 6]
    assert "Score each aspect (0, 1): claim, evidence, reasoning." in system_prompt(item)
    with pytest.raises(DataError, match="one integer score"):
        to_example(item, responses[0])


def test_table_csv_with_dict_mapping_and_rubric_file(tmp_path):
    (tmp_path / "rubric.txt").write_bytes("2: names the force\r\n1: partly\r0: no°\r\n".encode("cp1252"))
    path = tmp_path / "answers.csv"
    path.write_text("qid,sid,answer,s1,s2\nA,1,gravity pulls it,2,2\nA,2,it falls,1,\nB,1,friction,0,1\n")
    mapping = {"id": "sid", "text": "answer", "score": "s1", "second_score": "s2", "item_id": "qid",
               "item": {"rubric_file": "rubric.txt", "question": "Why does it fall?"}}
    groups = read_table(path, mapping)
    assert [item.item_id for item, _ in groups] == ["A", "B"]
    item, responses = groups[0]
    assert item.rubric == "2: names the force\n1: partly\n0: no°"
    assert item.score_levels == ["0", "1", "2"]  # derived from the data, 0 to the highest score
    assert [(r.score, r.second_score) for r in responses] == [(2, 2), (1, None)]
    assert groups[1][1][0].score == 0 and groups[1][1][0].second_score == 1
    unscored = read_table(path, {"id": "sid", "text": "answer", "item_id": "qid"})
    assert [r.score for _, rs in unscored for r in rs] == [None, None, None]


@pytest.mark.parametrize("text, mapping, row, field, reason", [
    ("id,answer,score\n1,a,1\n2,b,high\n", {}, 2, "score", "not an integer score: 'high'"),
    ("id,answer,score\n1,a,1\n2,b,1.5\n", {}, 2, "score", "not an integer score: '1.5'"),
    ("id,answer,score\n1,a,1\n2,b,\n", {}, 2, "score", "not an integer score: ''"),
    ("id,answer,score\n1,a,1\n2,b,-1\n", {}, 2, "score", "negative score"),
    ("id,answer,score\n1,a,1\n2,b,\"x\",extra\n", {}, 2, None, "row has 4 fields, header has 3"),
    ("id,answer\n1,a\n", {}, 1, "score", "missing column"),
    ("id,answer,score\n1,a,1\n1,b,0\n", {}, 2, "id", "duplicate response id '1'"),
    ("id,answer,score\n1,a,good\n", {"levels": ["poor", "fair"]}, 1, "score", "score 'good' is not one of"),
    ("id,answer,score\n1,a,1\n", {"subgroups": ["school"]}, 1, "school", "missing column"),
])
def test_table_bad_rows(tmp_path, text, mapping, row, field, reason):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_table(path, {"id": "id", "text": "answer", "score": "score", **mapping})
    where = f"{path}:{row}: " + (f"field '{field}': " if field else "")
    assert one_line(e).startswith(where + reason)


def test_table_subgroup_columns_are_kept_per_response(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,answer,score,school,gender\n1,a,1,north,f\n2,b,0, south ,m\n")
    groups = read_table(path, {"id": "id", "text": "answer", "score": "score", "subgroups": ["school", "gender"]})
    assert [r.subgroups for r in groups[0][1]] == [{"school": "north", "gender": "f"},
                                                   {"school": "south", "gender": "m"}]


def test_table_item_rows_disagree(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("item,q,id,answer,score\nA,Why?,1,a,1\nB,How?,1,b,0\nA,Why not?,2,c,0\n")
    with pytest.raises(DataError) as e:
        read_table(path, {"id": "id", "text": "answer", "score": "score", "item_id": "item", "question": "q"})
    assert one_line(e).startswith(f"{path}:3: field 'q': differs from the first row of item 'A' ({path}:1)")


def test_table_jsonl_row_missing_aspect(tmp_path):
    lines = (FIXTURES / "multilabel.jsonl").read_text().splitlines()
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines[:3] + [lines[3].replace('"evidence": 0, ', "")]) + "\n")
    with pytest.raises(DataError) as e:
        read_table(path, FIXTURES / "multilabel.yaml")
    assert one_line(e).startswith(f"{path}:4: field 'evidence': missing column")


@pytest.mark.parametrize("mapping, field", [
    ({"text": "answer"}, "id"),
    ({"id": "id", "text": "answer", "scroe": "score"}, "scroe"),
    ({"id": "id", "text": "answer", "score": "s", "scores": ["a", "b"]}, "scores"),
    ({"id": "id", "text": "answer", "levels": ["a", "a"]}, "levels"),
    ({"id": "id", "text": "answer", "item": {"rubrik": "x"}}, "item"),
    ({"id": "id", "text": "answer", "subgroups": "school"}, "subgroups"),
])
def test_table_bad_mapping(tmp_path, mapping, field):
    path = tmp_path / "t.csv"
    path.write_text("id,answer,score\n1,a,1\n")
    with pytest.raises(DataError) as e:
        read_table(path, mapping)
    assert one_line(e).startswith(f"mapping: field '{field}': ")


def test_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_table(tmp_path / "nope.csv", {"id": "id", "text": "t"})


SCIENTSBANK_YAML = """\
data_files:
  train: {root}/train.jsonl
  test: [{root}/test-unseen-answers.jsonl{more}]
mapping:
  id: answer_id
  text: answer
  score: label
  item_id: question_id
  question: question
  reference_answers: reference_answers
  levels: [incorrect, correct]
  item: {{rubric: {rubric}}}
"""


def test_scoring_yaml_with_one_file_per_split_matches_the_builtin_task(tmp_path, data_dir, monkeypatch):
    """SemEval ships one file per split: a scoring YAML names them instead of a concatenated table."""
    import json

    from zoft.tasks import load_task
    from zoft.tasks.rubric.data import SEMEVAL_RUBRIC

    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    root = data_dir / "semeval2013-2way" / "scientsbank"
    (tmp_path / "sb.yaml").write_text(SCIENTSBANK_YAML.format(root=root, more="", rubric=json.dumps(SEMEVAL_RUBRIC)))
    mine, builtin = load_task(str(tmp_path / "sb.yaml")), load_task("scientsbank")
    for split in ("train", "eval"):
        a, b = mine.load_split(split), builtin.load_split(split)
        assert [(e.context, e.target) for e in a] == [(e.context, e.target) for e in b]
    assert len(mine.load_split("eval")) == 540
    both = SCIENTSBANK_YAML.format(root=root, more=f", {root}/test-unseen-questions.jsonl",
                                   rubric=json.dumps(SEMEVAL_RUBRIC))
    (tmp_path / "sb2.yaml").write_text(both)
    assert len(load_task(str(tmp_path / "sb2.yaml")).load_split("eval")) == 540 + 733


def test_scoring_files_per_split_infer_one_scale_and_refuse_table_and_files(tmp_path):
    from zoft.tasks import load_task

    (tmp_path / "a.csv").write_text("id,text,score\n1,x,0\n2,y,3\n3,z,1\n")
    (tmp_path / "b.csv").write_text("id,text,score\n1,u,0\n2,v,1\n")   # no 3 in the test file
    (tmp_path / "t.yaml").write_text("data_files: {train: a.csv, test: b.csv}\nmapping: {id: id, text: text, "
                                     "score: score}\n")
    task = load_task(str(tmp_path / "t.yaml"))
    assert task.levels == ["0", "1", "2", "3"] and [e.target for e in task.load_split("eval")] == [0, 1]
    (tmp_path / "t.yaml").write_text("table: a.csv\ndata_files: {train: a.csv}\nmapping: {id: id, text: text}\n")
    with pytest.raises(DataError, match=r"t\.yaml: field 'data_files': give either table"):
        load_task(str(tmp_path / "t.yaml"))
    (tmp_path / "t.yaml").write_text("data_files: [a.csv]\nmapping: {id: id, text: text}\n")
    with pytest.raises(DataError, match=r"t\.yaml: field 'data_files': expected split names"):
        load_task(str(tmp_path / "t.yaml"))
