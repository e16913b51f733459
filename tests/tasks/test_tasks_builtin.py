"""Builtin tasks load the shared data and render the MeZO paper's prompts."""
import os
from collections import Counter

import pytest

from zoft.tasks import Task, list_tasks, load_task
from zoft.tasks.readers import data_dir

DATA = data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "sst2").is_dir(),
                                reason="shared data folder (../shared/data) not found")


def test_list_tasks():
    assert list_tasks() == ["boolq", "cb", "copa", "rte", "sst2", "sst2_gen", "sst2_review"]


@pytest.mark.parametrize("name", ["sst2", "rte", "cb", "boolq", "copa", "sst2_gen", "sst2_review"])
def test_every_builtin_loads_both_splits(name):
    task = load_task(name)
    assert isinstance(task, Task) and task.name == name
    for split in (task.training_split, task.validation_split):
        examples = task.load_split(split)
        assert examples and all(ex.context for ex in examples)


def test_sst2_prompt_and_labels():
    task = load_task("sst2")
    ex = task.load_split("validation")[0]
    assert task.kind == "classification" and task.metric == "acc"
    assert ex.context + task.target_delimiter + ex.choices[ex.target] == \
        "one long string of cliches . It was terrible"
    assert ex.choices == ["terrible", "great"] and ex.answers == ["terrible"]
    assert ex.ref == f"{DATA / 'sst2' / 'validation.jsonl'}:1"
    counts = Counter(ex.target for ex in task.load_split("validation"))
    assert counts == Counter(ex.doc["label"] for ex in task.load_split("validation")) == {1: 444, 0: 428}


def test_rte_prompt_and_labels():
    task = load_task("rte")
    ex = task.load_split("validation")[0]
    assert ex.context + task.target_delimiter + ex.choices[ex.target] == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\n"
        'Does this mean that "Christopher Reeve had an accident." is true? Yes or No?\nNo')
    counts = Counter(ex.answers[0] for ex in task.load_split("validation"))
    assert counts == {"Yes": 146, "No": 131}  # entailment 146, not_entailment 131


def test_copa_prompt_and_options():
    task = load_task("copa")
    ex = task.load_split("validation")[0]
    assert task.kind == "multiple_choice"
    assert ex.context == "The man turned on the faucet so"
    assert ex.choices == ["the toilet filled with water.", "water flowed from the spout."]
    assert ex.target == 1
    cause = next(e for e in task.load_split("validation") if e.doc["question"] == "cause")
    assert cause.context.endswith(" because") and not cause.context[:-8].endswith(".")


def test_cb_three_classes():
    task = load_task("cb")
    ex = task.load_split("validation")[0]
    assert ex.context.startswith("Suppose Valence the void-brain")
    assert ex.context.endswith('Can we infer that "Valence was helping"? Yes, No, or Maybe?\n')
    counts = Counter(ex.answers[0] for ex in task.load_split("validation"))
    assert counts == {"No": 28, "Yes": 23, "Maybe": 5}
    assert task.metrics == ["acc", "f1"]


def test_boolq_bool_labels_and_disjoint_sampling():
    task = load_task("boolq")
    examples = task.load_split("validation")
    assert Counter(ex.answers[0] for ex in examples) == {"Yes": 2033, "No": 1237}
    assert examples[0].context.endswith(" does ethanol take more energy make that produces?\n")
    assert task.training_split == task.validation_split == "validation"
    data = task.get_data(seed=0)
    refs = [set(ex.ref for ex in part) for part in (data.train, data.dev, data.eval)]
    assert [len(r) for r in refs] == [1000, 500, 1000]
    assert not (refs[0] & refs[1]) and not (refs[0] & refs[2]) and not (refs[1] & refs[2])


def test_sst2_gen_is_generation():
    task = load_task("sst2_gen")
    ex = task.load_split("validation")[0]
    assert task.kind == "generation" and task.metrics == ["exact_match", "squad_f1"]
    assert ex.context == "one long string of cliches . It was"
    assert ex.choices == [] and ex.target is None and ex.answers == ["terrible"]
    assert task.generation_kwargs["until"] == ["\n", "."]


def test_data_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.jsonl").write_text('{"sentence": "fine .", "label": 1}\n')
    monkeypatch.setenv("ZOFT_DATA_DIR", str(tmp_path))
    [ex] = load_task("sst2").load_split("validation")
    assert ex.context == "fine . It was" and ex.target == 1


def test_a_configs_data_dir_is_used_without_touching_the_environment(tmp_path, monkeypatch):
    """``data_dir=`` reaches the task loads of its own run only (it once set $ZOFT_DATA_DIR for the
    whole process, so a later run in the same process read the first run's folder)."""
    from zoft.config import load_config
    from zoft.methods.common import prepare
    (tmp_path / "sst2").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "sst2" / f"{split}.jsonl").write_text(
            "".join(f'{{"sentence": "{split} {i} .", "label": {i % 2}}}\n' for i in range(8)))
    monkeypatch.delenv("ZOFT_DATA_DIR", raising=False)
    cfg = load_config(overrides={"method": "zero-shot", "task": "sst2", "data_dir": str(tmp_path),
                                 "n_train": 4, "n_dev": 2, "n_eval": 3, "progress": False})
    setup = prepare(cfg, load_lm=False)
    assert {ex.context.split()[0] for ex in setup.data.eval} == {"validation"} and len(setup.data.eval) == 3
    assert "ZOFT_DATA_DIR" not in os.environ
    assert data_dir() != tmp_path   # outside the run, the default folder again
