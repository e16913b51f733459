"""OpenAI chat JSONL: export/import round trip and every format error, with its line."""
import json
from pathlib import Path

import pytest

from zoft.errors import DataError
from zoft.tasks.rubric.data import pairs, read_asap, read_semeval, read_table
from zoft.tasks.rubric.prompts import system_prompt, user_prompt
from zoft.scoring.openai_jsonl import (approx_tokens, assert_valid, export_chat_jsonl, read_chat_jsonl,
                                       validate_chat_jsonl)
from zoft.tasks.readers import data_dir

DATA = data_dir()
FIXTURES = Path(__file__).parent / "fixtures"
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")


def round_trip(tmp_path, examples, levels):
    path = export_chat_jsonl(examples, tmp_path / "sub" / "train.jsonl")
    assert validate_chat_jsonl(path) == []
    rows = read_chat_jsonl(path, levels)
    assert len(rows) == len(examples)
    for (item, response), row in zip(examples, rows):
        assert row.messages == [{"role": "system", "content": system_prompt(item)},
                                {"role": "user", "content": user_prompt(item, response)}]
        assert row.score == response.score
    return path, rows


@needs_data
def test_round_trip_asap(tmp_path):
    item, responses = read_asap(10, DATA)
    path, rows = round_trip(tmp_path, [(item, r) for r in responses], item.score_levels)
    first = json.loads(path.read_text(encoding="utf-8").split("\n")[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][2]["content"] == "2"
    assert "Rubric for Doghouse" in first["messages"][0]["content"]
    assert "24° C" in first["messages"][1]["content"]  # written as UTF-8, not escaped or mangled
    assert read_chat_jsonl(path)[0].score == 2  # integer labels need no levels


@needs_data
def test_round_trip_semeval_labels(tmp_path):
    examples = pairs(read_semeval(DATA / "semeval2013-2way" / "scientsbank" / "test-unseen-answers.jsonl"))
    path, rows = round_trip(tmp_path, examples, ["incorrect", "correct"])
    assert {row.completion for row in rows} == {"incorrect", "correct"}
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'messages\[2\].content': not a score"):
        read_chat_jsonl(path)  # word labels cannot be read as integers


def test_round_trip_multilabel(tmp_path):
    examples = pairs(read_table(FIXTURES / "multilabel.jsonl", FIXTURES / "multilabel.yaml"))
    path, rows = round_trip(tmp_path, examples, ["0", "1"])
    assert rows[1].completion == "1,0,1" and rows[1].score == [1, 0, 1]


def test_export_refuses_unscored(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,answer\n1,a\n")
    with pytest.raises(DataError, match=r"t.csv:1: field 'score': response has no score"):
        export_chat_jsonl(pairs(read_table(path, {"id": "id", "text": "answer"})), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


EXPECTED = {  # line -> (field, reason) in fixtures/chat_bad.jsonl; line 1 and 12 are valid, 11 blank
    2: (None, "not valid JSON"),
    3: (None, "expected a JSON object, got list"),
    4: ("messages", "missing, empty or not a list"),
    5: ("messages[0].role", "missing role"),
    6: ("messages[0].role", "unknown role 'student'"),
    7: ("messages[0]", "unrecognised key(s) 'score'"),
    8: ("messages", "no assistant message"),
    9: ("messages[1].content", "missing or empty content"),
    10: (None, "tokens (estimated at 4 characters per token), over the limit of 60"),
}


def test_every_format_error_with_its_line():
    path = FIXTURES / "chat_bad.jsonl"
    problems = validate_chat_jsonl(path, token_limit=60)
    assert len(problems) == len(EXPECTED), problems
    for problem, (line, (field, reason)) in zip(problems, sorted(EXPECTED.items())):
        where = f"{path}:{line}: " + (f"field '{field}': " if field else "")
        assert problem.startswith(where) and reason in problem, problem
        assert "\n" not in problem
    with pytest.raises(DataError) as e:
        assert_valid(path, token_limit=60)
    assert str(e.value) == problems[0] and e.value.row == 2
    # without a limit the long example passes; a tokenizer function changes the count
    assert len(validate_chat_jsonl(path, token_limit=None)) == len(EXPECTED) - 1
    by_words = validate_chat_jsonl(path, token_limit=60, count_tokens=lambda s: len(s.split()))
    assert any(":10: " in p and "tokens (counted)" in p for p in by_words)


def test_token_estimate_and_limit(tmp_path):
    assert approx_tokens("") == 0 and approx_tokens("abcd") == 1 and approx_tokens("abcde") == 2
    path = tmp_path / "t.jsonl"
    row = {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "1"}]}
    path.write_text(json.dumps(row) + "\n")
    # 3 priming + (3 + 10) user + (3 + 1) assistant = 20
    assert validate_chat_jsonl(path, token_limit=20) == []
    assert validate_chat_jsonl(path, token_limit=19) == [
        f"{path}:1: 20 tokens (estimated at 4 characters per token), over the limit of 19"]


def test_file_level_problems(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert validate_chat_jsonl(empty) == [f"{empty}: file is empty (no examples)"]
    assert validate_chat_jsonl(tmp_path / "nope.jsonl") == [f"{tmp_path / 'nope.jsonl'}: file not found"]
    latin = tmp_path / "latin.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "1"}]})
    latin.write_bytes(good.encode() + b"\n" + good.replace("x", "24\xb0").encode("latin-1") + b"\n")
    assert validate_chat_jsonl(latin) == [f"{latin}:2: not UTF-8 text"]
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        read_chat_jsonl(latin)
