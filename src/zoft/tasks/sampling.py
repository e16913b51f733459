"""Seeded train/dev/eval sampling as in the MeZO paper (Malladi et al. 2023).

Train and dev are drawn disjointly from the training split and eval from the
validation split. When both are the same split (BoolQ here), eval is drawn first and
train/dev come from the remaining rows, so the three never overlap.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from zoft.errors import DataError
from zoft.tasks.example import Example, TaskData

log = logging.getLogger(__name__)

ALL_TRAIN = -1   # n_train=-1: every row of the training split that dev does not take


def class_of(ex: Example) -> int | str:
    """The class an example belongs to, for per-class sampling (gold answer for generation)."""
    return ex.target if ex.target is not None else ex.answers[0]


def sample_task_data(train_pool: list[Example], eval_pool: list[Example], *, same_split: bool,
                     n_train: int, n_dev: int, n_eval: int, seed: int,
                     k_per_class: int | None = None, name: str = "task") -> TaskData:
    """Draws disjoint train, dev and eval samples, deterministically for a seed.

    Args:
        train_pool: Examples of the training split.
        eval_pool: Examples of the validation split (the same list if ``same_split``).
        same_split: Whether both pools are one split, so eval rows must be held out.
        n_train, n_dev, n_eval: Requested sizes (``n_train=-1``: every training row dev does not
            take, so one setting fits splits of any size). A training split too small for n_train + n_dev is
            split between them in the asked proportion (dev is never left empty), with a warning;
            a small validation split gives what it has.
        seed: Seed for ``numpy.random.default_rng``.
        k_per_class: If set, train and dev get exactly k examples of each class
            (LM-BFF few-shot setting) instead of ``n_train`` / ``n_dev``.
        name: Task name, for warnings.

    Returns:
        The sampled :class:`TaskData`.
    """
    sizes = (0 if n_train == ALL_TRAIN else n_train, n_dev, n_eval)
    if min(sizes) < 0 or (k_per_class is not None and k_per_class < 1):
        raise ValueError("sample sizes must be >= 0 and k_per_class >= 1")
    if not eval_pool:
        raise DataError("the validation split has no usable rows", name)
    rng = np.random.default_rng(seed)
    eval_idx = rng.permutation(len(eval_pool))[:n_eval]
    eval_set = [eval_pool[i] for i in eval_idx]
    if same_split:
        held_out = set(eval_idx.tolist())
        train_pool = [ex for i, ex in enumerate(train_pool) if i not in held_out]
    shuffled = [train_pool[i] for i in rng.permutation(len(train_pool))]

    if k_per_class is None:
        if n_train == ALL_TRAIN:
            n_train = max(len(shuffled) - n_dev, 1)
        n_train_used, n_dev_used = n_train, n_dev
        if len(shuffled) < n_train + n_dev:
            # Split what there is in the asked proportion, so that dev (which picks the best
            # checkpoint) is never left empty by a large n_train on a small split.
            if n_train >= 1 and n_dev >= 1 and len(shuffled) < 2:
                raise DataError(f"the training split has {len(shuffled)} usable row(s); at least 2 are needed "
                                f"(1 train + 1 dev)", name)
            n_dev_used = min(n_dev, max(1 if n_dev else 0, round(len(shuffled) * n_dev / (n_train + n_dev))))
            n_train_used = min(n_train, len(shuffled) - n_dev_used)
            log.warning("%s: asked for %d train + %d dev examples but only %d rows are available; "
                        "using %d train, %d dev", name, n_train, n_dev, len(shuffled), n_train_used, n_dev_used)
        train, dev = shuffled[:n_train_used], shuffled[n_train_used:n_train_used + n_dev_used]
        return TaskData(train, dev, eval_set)

    # Walking the shuffled pool once keeps classes interleaved and the choice seeded.
    train, dev, n_tr, n_dv = [], [], Counter(), Counter()
    for ex in shuffled:
        c = class_of(ex)
        if n_tr[c] < k_per_class:
            train.append(ex)
            n_tr[c] += 1
        elif n_dv[c] < k_per_class:
            dev.append(ex)
            n_dv[c] += 1
    short = sorted(str(c) for c in n_tr if n_tr[c] < k_per_class or n_dv[c] < k_per_class)
    if short:
        log.warning("%s: fewer than %d train + %d dev examples for class(es) %s; using what there is",
                    name, k_per_class, k_per_class, ", ".join(short))
    if not train or not dev:
        raise DataError(f"k_per_class={k_per_class} leaves {len(train)} train and {len(dev)} dev examples "
                        f"from {len(shuffled)} rows; lower k_per_class", name)
    return TaskData(train, dev, eval_set)
