"""Seeded, disjoint train/dev/eval sampling."""
import logging
from collections import Counter

import pytest

from zoft.errors import DataError
from zoft.tasks import Example, load_task
from zoft.tasks.readers import data_dir
from zoft.tasks.sampling import sample_task_data

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared data folder not found")


def refs(examples):
    return [ex.ref for ex in examples]


def make(n, classes=2):
    return [Example(f"x{i}", ["a", "b", "c"][:classes], i % classes, ["a"], {}, f"f:{i + 1}")
            for i in range(n)]


@needs_data
def test_sst2_deterministic_and_seed_dependent():
    task = load_task("sst2")
    a, b, c = task.get_data(seed=0), task.get_data(seed=0), task.get_data(seed=1)
    assert refs(a.train) == refs(b.train) and refs(a.dev) == refs(b.dev) and refs(a.eval) == refs(b.eval)
    assert refs(a.train) != refs(c.train)
    assert (len(a.train), len(a.dev), len(a.eval)) == (1000, 500, 872)  # validation has 872 rows
    assert not set(refs(a.train)) & set(refs(a.dev))
    assert all(r.split(":")[0].endswith("train.jsonl") for r in refs(a.train) + refs(a.dev))
    assert all(r.split(":")[0].endswith("validation.jsonl") for r in refs(a.eval))


@needs_data
@pytest.mark.parametrize("name,k", [("sst2", 16), ("cb", 4), ("copa", 8)])
def test_k_per_class_gives_exactly_k(name, k):
    task = load_task(name)
    data = task.get_data(k_per_class=k, seed=3)
    n_classes = len(task.label_words) or 2
    for part in (data.train, data.dev):
        assert Counter(ex.target for ex in part) == {c: k for c in range(n_classes)}
    assert not set(refs(data.train)) & set(refs(data.dev))


def test_same_split_holds_out_eval():
    pool = make(100)
    data = sample_task_data(pool, pool, same_split=True, n_train=50, n_dev=30, n_eval=40, seed=0)
    # 60 rows left for 50 + 30 asked: split in the asked proportion, 5:3
    assert (len(data.train), len(data.dev), len(data.eval)) == (38, 22, 40)
    all_refs = refs(data.train) + refs(data.dev) + refs(data.eval)
    assert len(set(all_refs)) == len(all_refs) == 100


def test_small_splits_take_what_there_is(caplog):
    train, val = make(10), make(5)
    with caplog.at_level(logging.WARNING):
        data = sample_task_data(train, val, same_split=False, n_train=8, n_dev=8, n_eval=100, seed=0,
                                name="tiny")
    assert (len(data.train), len(data.dev), len(data.eval)) == (5, 5, 5)
    assert "tiny" in caplog.text and "5 train, 5 dev" in caplog.text


def test_a_large_n_train_never_leaves_dev_empty(caplog):
    """The defaults (1000 train + 500 dev) on a 32-row split used to give 32 train and 0 dev rows."""
    with caplog.at_level(logging.WARNING):
        data = sample_task_data(make(32), make(8), same_split=False, n_train=1000, n_dev=500, n_eval=1000, seed=0)
    assert (len(data.train), len(data.dev)) == (21, 11)
    assert "using 21 train, 11 dev" in caplog.text
    with pytest.raises(DataError, match="1 usable row"):
        sample_task_data(make(1), make(8), same_split=False, n_train=10, n_dev=5, n_eval=8, seed=0)


def test_k_per_class_short_class_warns(caplog):
    pool = make(9, classes=3)  # 3 per class: not enough for 2 train + 2 dev
    with caplog.at_level(logging.WARNING):
        data = sample_task_data(pool, make(3), same_split=False, n_train=0, n_dev=0, n_eval=3, seed=0,
                                k_per_class=2)
    assert Counter(ex.target for ex in data.train) == {0: 2, 1: 2, 2: 2}
    assert Counter(ex.target for ex in data.dev) == {0: 1, 1: 1, 2: 1}
    assert "fewer than 2" in caplog.text


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        # -1 means "every row dev does not take"; other negatives stay errors
        sample_task_data(make(4), make(4), same_split=False, n_train=-2, n_dev=0, n_eval=0, seed=0)


def test_n_train_minus_one_takes_every_row_dev_does_not():
    pool = make(50)
    data = sample_task_data(pool, make(10), same_split=False, n_train=-1, n_dev=8, n_eval=10, seed=0)
    assert len(data.dev) == 8 and len(data.train) == 42
    assert sorted(refs(data.train) + refs(data.dev)) == sorted(refs(pool))   # disjoint, and nothing left out
    same = sample_task_data(pool, make(10), same_split=False, n_train=42, n_dev=8, n_eval=10, seed=0)
    assert refs(same.train) == refs(data.train) and refs(same.dev) == refs(data.dev)


@needs_data
def test_n_train_minus_one_on_asap_is_the_train_split_less_dev():
    data = load_task("asap-1").get_data(n_train=-1, n_dev=100, n_eval=1000, seed=0)
    assert (len(data.train), len(data.dev), len(data.eval)) == (1672 - 100, 100, 557)


def test_n_train_below_minus_one_is_refused():
    from zoft.config import load_config
    from zoft.errors import ZoftError

    assert load_config(overrides={"n_train": -1}).n_train == -1
    with pytest.raises(ZoftError, match=r"n_train must be >= 1, got -?\d+ \(or -1: every"):
        load_config(overrides={"n_train": -2})
    with pytest.raises(ZoftError, match=r"n_train must be >= 1, got -?\d+ \(or -1: every"):
        load_config(overrides={"n_train": 0})
