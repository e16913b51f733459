"""Scoring new responses with a trained run: a CSV in, the same rows with scores out.

The input is a CSV with columns ``id`` and ``text`` and, optionally, ``item_id`` (the
task's item the response answers; needed only when the task has several items, e.g.
SciEntsBank's questions). Every other column is copied through. The output has every
input row, in input order, plus:

* ``score``: the score level the run's ``decision`` rule picks (default the most probable; see
  :mod:`zoft.tasks.decision`), "" if the row could not be scored;
* ``p_<level>``: the probability of each level (softmax of the model's log-likelihoods
  of the levels after the prompt), one column per level, lowest level first;
* ``confidence``: the probability of the predicted level (multi-label: the least confident
  aspect's), see :mod:`zoft.scoring.confidence`;
* ``needs_review`` (with ``review_fraction`` F): ``yes`` for the ceil(F·n) least confident scored
  rows, a teacher's to check, else ``no``;
* ``error``: why the row was not scored (one line), "" for scored rows.

With ``gold_column`` (a column of human scores, e.g. for a pilot batch), QWK on the automatically
scored part against coverage is written next to the output as ``<name>.coverage.csv`` and
``<name>.coverage.png``, so a teacher can choose F.

For a multi-label task (rubric aspects, e.g. claim/evidence/reasoning), ``score`` is the
aspects' levels joined by commas (``"1,0,1"``, as in OpenAI chat JSONL), and the extra
columns are ``<aspect>`` (its level) and ``p_<aspect>_<level>`` for each aspect.

A bad row (no id, empty text, an unknown item, a wrong number of fields) is reported
in its ``error`` cell and the others are still scored. The output file is written to
a temporary file next to it and renamed, so it is complete or absent.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from zoft.atomic import atomic_write_text
from zoft.errors import DataError, ZoftError, excerpt
from zoft.tasks.decision import decide_one
from zoft.tasks.rubric.confidence import confidence, coverage_curve, coverage_png, needs_review, review_count
from zoft.tasks.readers import read_csv_records
from zoft.tasks.rubric import Response, ScoringTask

INPUT_COLUMNS = ("id", "text")
ITEM_COLUMN = "item_id"
_ERRORS_SHOWN = 5


def output_columns(levels: list[str], aspects: list[str] | None = None, review: bool = False) -> list[str]:
    """The columns score_file adds to the input's: ``score``, ``p_<level>`` per level, ``confidence``,
    [``needs_review``], ``error`` (multi-label: ``score``, each aspect, ``p_<aspect>_<level>``, ...)."""
    routing = ["confidence", *(["needs_review"] if review else []), "error"]
    if aspects:
        return ["score", *aspects, *(f"p_{a}_{level}" for a in aspects for level in levels), *routing]
    return ["score", *(f"p_{level}" for level in levels), *routing]


def coverage_paths(output_path: Path) -> tuple[Path, Path]:
    """Where the coverage table and curve of a scored CSV go: ``<name>.coverage.csv`` and ``.png``."""
    return output_path.with_suffix(".coverage.csv"), output_path.with_suffix(".coverage.png")


def _read_input(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the ``(row number, values)`` of each non-blank data row."""
    if path.is_dir():
        raise DataError("is a folder, not a CSV file", str(path))
    if not path.is_file():
        raise DataError("input file not found", str(path))
    # refuses binary files and unclosed quotes; rows with the wrong field count are kept (per-row errors)
    header, rows = read_csv_records(path)
    if not header:
        raise DataError("file is empty (no header)", str(path))
    missing = [c for c in INPUT_COLUMNS if c not in header]
    if missing:
        has = excerpt(", ".join(header))   # the header may be anything: a wrong file, a swallowed row
        raise DataError(f"missing column (has: {has})", str(path), field=missing[0])
    dup = next((c for c in header if header.count(c) > 1), None)
    if dup is not None:
        raise DataError("column appears twice in the header", str(path), field=dup)
    return header, rows


def _check_output(path: Path) -> None:
    """Fails early, before the model loads, if the scored CSV could not be written to ``path``.

    Looks at the path only (creates nothing): an existing folder, a parent that is a file, or a
    nearest existing folder we may not write in. Writing can still fail later (a full disk);
    score_file turns that into one line too.
    """
    if path.is_dir():
        raise ZoftError(f"{path}: output is a folder; give a file name, e.g. {path / 'scored.csv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:   # the folders to create, up to one that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ZoftError(f"{path}: cannot create the output's folder: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZoftError(f"{path}: cannot write the output: no write permission in {parent}")


def score_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path,
               batch_size: int = 16, trust_remote_code: bool = False, review_fraction: float | None = None,
               gold_column: str | None = None) -> dict[str, Any]:
    """Scores every response of a CSV with a trained scoring run and writes a scored CSV.

    Args:
        run_dir: A finished zoft run on a scoring task (``asap-<N>``, ``scientsbank``);
            its best (else last) weights are loaded with
            :func:`zoft.methods.load_run`.
        input_path: CSV with ``id``, ``text`` and optionally ``item_id`` columns.
        output_path: Where to write the scored CSV (see the module docstring); its
            folder is created if needed.
        batch_size: Responses per forward pass.
        trust_remote_code: Run the Python a model folder ships; the caller's choice alone
            (the run's config.yaml cannot turn it on).
        review_fraction: Mark the ceil(F·n) least confident scored rows ``needs_review``.
        gold_column: A column of human scores (levels; empty cells are left out): write QWK on
            the automatically scored part against coverage (single-label tasks).

    Returns:
        A summary: ``run_dir``, ``task``, ``input``, ``output``, ``levels``, ``rows``,
        ``scored``, ``failed``, ``score_counts`` (predicted level -> rows) and
        ``errors`` (the first few ``"row N: reason"``); with ``review_fraction``, ``review``
        (rows marked); with ``gold_column``, ``coverage`` (:func:`~zoft.scoring.confidence.coverage_curve`)
        and ``coverage_files``.

    Raises:
        ZoftError: the run's task is not a scoring task, batch_size < 1, or the output
            cannot be written (a folder, a parent that is a file, no permission, a full disk).
        DataError: the input is missing, is not a text CSV, has an unclosed quote, lacks
            ``id``/``text`` columns, or already has a column this function writes.
    """
    from zoft.lm import batches
    from zoft.methods import load_run

    if batch_size < 1:
        raise ZoftError(f"batch_size must be >= 1, got {batch_size}")
    if review_fraction is not None:
        review_count(review_fraction, 0)     # checks 0 <= F <= 1
    input_path, output_path = Path(input_path), Path(output_path)
    header, rows = _read_input(input_path)   # a bad file or output path fails before the model loads
    if gold_column is not None and gold_column not in header:
        raise DataError(f"no gold column (has: {excerpt(', '.join(header))})", str(input_path), field=gold_column)
    _check_output(output_path)
    setup, scorer = load_run(run_dir, trust_remote_code=trust_remote_code)
    task = setup.task
    if not isinstance(task, ScoringTask):
        raise ZoftError(f"{run_dir}: task '{task.name}' is not a scoring task (use asap-<N> or scientsbank)")
    added = output_columns(task.levels, task.aspects, review=review_fraction is not None)
    clash = next((c for c in added if c in header), None)
    if clash is not None:
        raise DataError(f"input already has the column '{clash}' that scoring writes; rename it",
                        str(input_path), field=clash)
    if gold_column is not None and task.aspects:
        raise ZoftError(f"{input_path}: a gold column's coverage curve needs a single-label task; "
                        f"'{task.name}' scores aspects")

    p = str(input_path)
    records: list[dict[str, str]] = []
    errors: list[str | None] = []        # per record: why it was not scored, or None
    row_numbers: list[int] = []
    examples, where = [], []             # the scorable rows, and their position in records
    seen: dict[str, int] = {}
    has_item = ITEM_COLUMN in header
    for row, values in rows:
        record = dict(zip(header, values))
        records.append(record)
        row_numbers.append(row)
        error = None
        if len(values) != len(header):
            error = f"row has {len(values)} fields, header has {len(header)}"
            record.update({c: "" for c in header if c not in record})
        rid, text = record["id"].strip(), record["text"]
        item_key = record.get(ITEM_COLUMN, "").strip() if has_item else ""
        if error is None and not rid:
            error = "missing id"
        elif error is None and not text.strip():
            error = "empty text"
        elif error is None and rid in seen:
            error = f"duplicate id '{excerpt(rid)}' (first at row {seen[rid]})"
        item = None
        if error is None:
            if item_key:
                item = task.items.get(item_key)
                if item is None:
                    known = sorted(task.items)
                    shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
                    error = f"unknown item_id '{excerpt(item_key)}' (task '{task.name}' has: {shown})"
            elif len(task.items) == 1:
                item = next(iter(task.items.values()))
            else:
                error = f"no item_id: task '{task.name}' has {len(task.items)} items"
        gold = record.get(gold_column, "").strip() if gold_column is not None else ""
        if error is None and gold and gold not in task.levels:
            raise DataError(f"gold score '{excerpt(gold)}' is not a level ({', '.join(task.levels)})", p, row=row,
                            field=gold_column)
        if error is None:
            seen[rid] = row
            response = Response(rid, text, None, None, None, item.item_id, f"{p}:{row}")
            new = task.examples(response, item)   # one per aspect for multi-label items
            examples += new
            where += [len(records) - 1] * len(new)
        errors.append(error)

    probs: list[list[list[float]]] = [[] for _ in records]   # per record: one distribution per aspect
    if examples:
        enc = scorer.encode(examples)
        was_training = scorer.model.training
        scorer.model.eval()
        # Similar lengths together: padding is wasted compute.
        order = sorted(range(len(examples)), key=lambda i: len(enc.context_ids[i]))
        with torch.no_grad(), scorer.frozen_weights():   # each item's header runs once
            for chunk in batches(len(order), batch_size):
                idx = [order[i] for i in chunk]
                logprobs, _ = scorer.candidate_logprobs(enc, idx)
                for i, dist in zip(idx, logprobs.double().softmax(-1).tolist()):
                    probs[where[i]].append((i, dist))
        probs = [[dist for _, dist in sorted(per)] for per in probs]   # aspects back in their order
        scorer.model.train(was_training)

    scored = [r for r, dists in enumerate(probs) if dists]
    chosen = {r: [decide_one(d, setup.cfg.decision) for d in probs[r]] for r in scored}   # per aspect
    confidences = {r: confidence(probs[r], chosen[r]) for r in scored}
    flagged: set[int] = set()
    if review_fraction is not None:
        marks = needs_review([confidences[r] for r in scored], review_fraction)
        flagged = {r for r, mark in zip(scored, marks) if mark}
    counts: Counter[str] = Counter()
    out_rows, predicted = [], {}
    for r, (record, error, dists) in enumerate(zip(records, errors, probs)):
        if not dists:
            extra = [""] * (len(added) - 1) + [error]
        else:
            bests = [task.levels[c] for c in chosen[r]]
            best = ",".join(bests)
            counts[best] += 1
            predicted[r] = best
            routing = [f"{confidences[r]:.6f}", *(["yes" if r in flagged else "no"] if review_fraction is not None
                                                   else [])]
            extra = [best, *(bests if task.aspects else []), *(f"{q:.6f}" for d in dists for q in d), *routing, ""]
        out_rows.append([record.get(c, "") for c in header] + extra)
    try:
        _write_csv(output_path, header + added, out_rows)
    except OSError as e:   # e.g. a full disk; atomic_write_text has removed its temporary file
        raise ZoftError(f"{output_path}: cannot write the output: {e.strerror or e}") from None

    failed = [f"row {row}: {e}" for row, e in zip(row_numbers, errors) if e]
    routing: dict[str, Any] = {}
    if review_fraction is not None:
        routing["review"] = len(flagged)
    if gold_column is not None:
        with_gold = [r for r in scored if records[r].get(gold_column, "").strip()]
        curve = coverage_curve([confidences[r] for r in with_gold], [predicted[r] for r in with_gold],
                               [records[r][gold_column].strip() for r in with_gold], task.levels) if with_gold else []
        table_path, png_path = coverage_paths(output_path)
        _write_csv(table_path, list(curve[0]) if curve else ["coverage"],
                   [[f"{v:.6g}" if isinstance(v, float) else v for v in row.values()] for row in curve])
        if curve:
            coverage_png(curve, png_path, title=f"{task.name}: {len(with_gold)} responses with gold scores",
                         human_qwk=getattr(task, "human_qwk", None))
        routing |= {"coverage": curve, "coverage_files": [str(table_path)] + ([str(png_path)] if curve else [])}
    return routing | {"run_dir": str(run_dir), "task": task.name, "input": str(input_path), "output": str(output_path),
            "levels": list(task.levels), "rows": len(records), "scored": len(records) - len(failed),
            "failed": len(failed), "score_counts": (dict(sorted(counts.items())) if task.aspects
                                                        else {lv: counts[lv] for lv in task.levels}),
            "errors": failed[:_ERRORS_SHOWN]}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Writes a CSV atomically (zoft.atomic.atomic_write_text: a temporary file, fsync, then a rename)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
