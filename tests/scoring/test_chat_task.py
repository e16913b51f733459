"""OpenAI chat fine-tuning files train and evaluate as they are: task=FILE.jsonl."""
import json
import logging

import pytest

from zoft.cli import main
from zoft.errors import DataError
from zoft.scoring.openai_jsonl import export_chat_jsonl
from zoft.tasks import load_task
from zoft.tasks.rubric.task import ScoringTask

RUBRIC = "2: names both causes. 1: names one. 0: neither."


def same_examples(a, b):
    return [(e.context, e.choices, e.target) for e in a] == [(e.context, e.choices, e.target) for e in b]


@pytest.mark.parametrize("name", ["scientsbank", "asap-1"])
def test_export_then_train_from_the_chat_files_gives_the_same_prompts_and_labels(tmp_path, name, data_dir,
                                                                                   monkeypatch):
    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    original = load_task(name)
    for split, responses in (("train", original._train), ("val", original._eval)):
        export_chat_jsonl([(original.items[r.item_id], r) for r in responses], tmp_path / f"{split}.jsonl")
    (tmp_path / "chat.yaml").write_text("training_file: train.jsonl\nvalidation_file: val.jsonl\n")
    chat = load_task(str(tmp_path / "chat.yaml"))
    assert isinstance(chat, ScoringTask) and chat.levels == original.levels   # item order, not sorted
    assert len(chat.items) == len(original.items)
    assert same_examples(chat.load_split("train"), original.load_split("train"))
    assert same_examples(chat.load_split("eval"), original.load_split("eval"))
    a, b = chat.get_data(n_train=8, n_dev=4, n_eval=8), original.get_data(n_train=8, n_dev=4, n_eval=8)
    assert same_examples(a.train + a.dev + a.eval, b.train + b.dev + b.eval)


def conversation(system, user, score):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": score}]
    return json.dumps({"messages": messages})


def test_a_foreign_chat_file_groups_items_by_system_prompt(tmp_path, caplog):
    lines = [conversation("Grade the answer about rain. " + RUBRIC, f"Rain answer {i}", str(i % 3))
             for i in range(9)]
    lines += [conversation("Grade the answer about wind. " + RUBRIC, f"Wind answer {i}", str(i % 2 * 10 % 11))
              for i in range(4)]   # scores 0 and 10: levels sort as numbers
    (tmp_path / "grades.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        task = load_task(str(tmp_path / "grades.jsonl"))
    assert "no validation file" in caplog.text
    assert task.name == "grades" and task.levels == ["0", "1", "2", "10"]
    assert len(task.items) == 2 and task.same_split
    examples = task.load_split("train")
    assert examples[4].context.endswith("Response: Rain answer 4\nScore:")
    assert "Grade the answer about rain." in examples[4].context and examples[4].target == 1
    assert examples[10].answers == ["10"] and examples[10].target == 3
    # zoft serve matches a request to its item by the system prompt it was trained with
    request = json.loads(lines[10])["messages"][:2]
    assert task.context_from_chat(request) == examples[10].context
    data = task.get_data(n_train=6, n_dev=3, n_eval=4)
    assert len({e.ref for e in data.train + data.dev + data.eval}) == 13


@pytest.mark.parametrize("line,field,what", [
    ('{"messages": [{"role": "user", "content": "x"}', None, "malformed JSON"),
    ('{"prompt": "x", "completion": "1"}', "messages", "OpenAI chat format"),
    (conversation("", "an answer", "1").replace('"assistant"', '"bot"'), "messages[1].role", "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "an answer"}]}), "messages", "no assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"},
                              {"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}]}),
     "messages", "multi-turn conversations are not supported"),
    (conversation("", "an answer", " "), "messages[1].content", "missing or empty content"),
])
def test_bad_rows_are_one_line_with_file_row_and_field(tmp_path, capsys, line, field, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(conversation("", "fine", "0") + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_task(str(path))
    prefix = f"{path}:2: " + (f"field '{field}': " if field else "")
    assert str(e.value).startswith(prefix) and what in str(e.value) and "\n" not in str(e.value)
    run = tmp_path / "run"
    assert main(["train", f"task={path}", "model=tiny-llama", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"zoft: error: {e.value}" and not run.exists()


def test_a_score_outside_the_exported_levels_names_the_row(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    original = load_task("asap-10")
    path = export_chat_jsonl([(original.items[r.item_id], r) for r in original._train[:3]], tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"content": "' + json.loads(lines[1])["messages"][2]["content"] + '"',
                                '"content": "7"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'messages\[-1\]\.content': not a score of this "
                                        r"item: '7' is not one of the levels \['0', '1', '2'\]"):
        load_task(str(path))


def test_train_and_eval_from_a_chat_file(tmp_path, capsys):
    lines = [conversation("Score the answer. " + RUBRIC, f"answer number {i}", str(i % 3)) for i in range(24)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "method=mezo", "mode=lora", "model=tiny-llama", f"task={tmp_path / 'chat.jsonl'}",
                 "n_train=8", "n_dev=4", "n_eval=6", "steps=2", "eval_every=2", "progress=false",
                 "max_length=64", f"output_dir={run}"]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["metric"] == "qwk" and {"qwk", "acc", "f1"} <= set(metrics["eval"])
    assert len(metrics["eval_outputs"]["targets"]) == 6
    capsys.readouterr()
    assert main(["eval", "--model", str(run)]) == 0
