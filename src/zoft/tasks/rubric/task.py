"""Automatic scoring as a zoft task: rubric-aware prompts whose choices are the score levels.

:class:`ScoringTask` duck-types :class:`zoft.tasks.Task` (``name``, ``kind``, ``metric``,
``metrics``, ``target_delimiter``, ``generation_kwargs``, ``label_words``, ``get_data``),
so every method (zero-shot, icl, lp, ft, lp-ft, mezo) trains and evaluates on scored
student responses unchanged. Each response becomes one classification example::

    Item: <question, shortened>
    Reference answers: ...            (when the source has them)
    Rubric:
    <rubric, shortened>
    Scored examples: ...              (when the item has them)
    Possible scores: 0, 1, 2, 3.
    Response: <the student's response>
    Score:

followed by ``" " + level``. The language model scores each level after the prompt.

Multi-label items (several rubric aspects, e.g. claim / evidence / reasoning, each 0/1)
become one example per aspect: the same prompt with an ``Aspect: <name>`` line before
``Score:``. Every method then trains on aspect decisions unchanged; train/dev/eval are
sampled by response (all aspects of a response land in the same split), and the extra
metric ``response_acc`` counts a response right only if all its aspects are.

Builtin names (:func:`zoft.tasks.load_task` routes them here): ``asap-<N>`` (ASAP-SAS set N:
train rows for train/dev, the public test rows for eval) and ``scientsbank``
(SemEval-2013 2-way: train.jsonl for train/dev, test-unseen-answers.jsonl for eval).
Any CSV/JSONL file works through :meth:`ScoringTask.from_table`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from zoft.errors import DataError, ZoftError
from zoft.tasks.example import Example, TaskData
from zoft.tasks.readers import data_dir
from zoft.tasks.rubric.data import Response, ScoringItem, read_asap, read_semeval, read_table, read_tables
from zoft.tasks.rubric.metrics import human_agreement
from zoft.tasks.rubric.prompts import BUDGET, chat_response, item_header, response_context
from zoft.tasks.sampling import sample_task_data
from zoft.tasks.task import GENERATION_DEFAULTS

METRICS = ["qwk", "acc", "f1"]    # QWK first: the ASAP convention; accuracy is what the scoring paper reports
ASAP_NAME = re.compile(r"asap-(\d+)")
SCIENTSBANK_EVAL = "test-unseen-answers"

# ---------------------------------------------------------------- the task

class ScoringTask:
    """Scoring student responses to one or more items, as a classification task.

    Attributes:
        name: The task name (``"asap-1"``, ``"scientsbank"``, a table's file stem).
        kind: Always ``"classification"``: the choices are the score levels.
        metric: The main metric, ``"qwk"``.
        metrics: ``["qwk", "acc", "f1"]``, plus ``"response_acc"`` for multi-label items.
        target_delimiter: ``" "``, between ``"Score:"`` and the level.
        generation_kwargs: Unused (not a generation task); kept for the Task interface.
        label_words: The score levels, lowest first (``"0".."3"``; SemEval
            ``"incorrect", "correct"``).
        levels: Same as ``label_words``.
        items: The items by ``item_id``.
        aspects: The rubric aspects every item shares (multi-label), or ``[]``.
        human_qwk: QWK between the two human raters on the training rows (ASAP:
            Score1 vs Score2), the ceiling a scorer is measured against; None where the
            source has no second rater.
        description: ``""`` (the prompt carries its own instructions).
    """

    kind = "classification"
    target_delimiter = " "
    description = ""

    def __init__(self, name: str, items: Sequence[ScoringItem], train: Sequence[Response],
                 eval: Sequence[Response], *, same_split: bool = False, source: str = "",
                 prompt: Mapping[str, int] | None = None):
        """Builds a task from items and their train and eval responses.

        Args:
            name: The task name.
            items: Every item a response refers to; all must share the same score levels.
            train: Responses to draw train and dev samples from.
            eval: Responses to draw the eval sample from (the same list if ``same_split``).
            same_split: Train and eval are one pool: eval rows are held out before
                train/dev are drawn (see :func:`zoft.tasks.sampling.sample_task_data`).
            source: Where the data came from, for messages.
            prompt: Word budgets overriding the defaults: ``question``, ``rubric``,
                ``example``, ``examples``, ``response``.

        Raises:
            DataError: no items, items with different levels or different aspects, or a
                response to an unknown item.
        """
        if not items:
            raise DataError(f"task '{name}' has no items", source or None)
        self.name, self.source = name, source
        self.items: dict[str, ScoringItem] = {}
        for item in items:
            self.items.setdefault(item.item_id, item)
        aspects = {tuple(i.aspects) for i in self.items.values()}
        if len(aspects) != 1:
            raise DataError(f"items of task '{name}' have different rubric aspects {sorted(aspects)}; one task "
                            "scores either one score per response or the same aspects for every item",
                            source or None)
        self.aspects: list[str] = list(next(iter(aspects)))
        if len(set(self.aspects)) != len(self.aspects):
            raise DataError(f"multi-label aspects repeat a name {self.aspects}; each aspect needs its own column",
                            source or None)
        levels = {tuple(i.score_levels) for i in self.items.values()}
        if len(levels) != 1:
            raise DataError(f"items of task '{name}' have different score levels {sorted(levels)}; "
                            "one task needs one scale", source or None)
        self.levels: list[str] = list(next(iter(levels)))
        if len(self.levels) < 2:
            hint = " (a table without scores needs 'levels' in its mapping)" if not self.levels else ""
            raise DataError(f"task '{name}' needs at least two score levels, has {self.levels}{hint}",
                            source or None)
        self.label_words = list(self.levels)
        self.metrics: list[str] = list(METRICS) + (["response_acc"] if self.aspects else [])
        self.metric: str = self.metrics[0]
        self.generation_kwargs: dict[str, Any] = dict(GENERATION_DEFAULTS)
        unknown = set(prompt or {}) - set(BUDGET)
        if unknown:
            raise ZoftError(f"unknown prompt budget '{sorted(unknown)[0]}' (use {', '.join(BUDGET)})")
        self.budget = {**BUDGET, **(prompt or {})}
        for r in [*train, *eval]:
            if r.item_id not in self.items:
                raise DataError(f"response '{r.id}' refers to unknown item '{r.item_id}'", r.ref or None)
        self._train, self._eval, self.same_split = list(train), list(eval), same_split
        self._headers: dict[str, str] = {}
        self._cache: dict[str, list[Example]] = {}
        self.human_qwk: float | None = self._human_qwk()

    def __repr__(self) -> str:
        return f"ScoringTask({self.name!r}, items={len(self.items)}, levels={self.levels})"

    # -- prompts -----------------------------------------------------------------------

    def header(self, item: ScoringItem) -> str:
        """The part of the prompt shared by every response to ``item`` (:func:`item_header`, cached)."""
        if item.item_id not in self._headers:
            self._headers[item.item_id] = item_header(item, self.budget)
        return self._headers[item.item_id]

    def context(self, item: ScoringItem, text: str, aspect: str | None = None) -> str:
        """The full prompt for one response: header, ``Response: <text>``, [``Aspect: <name>``], ``Score:``."""
        return response_context(self.header(item), text, self.budget["response"], aspect)

    def context_from_chat(self, messages: list[dict]) -> str:
        """The training prompt for an OpenAI chat request (as exported by ``openai_jsonl``).

        The item and response are :func:`~zoft.tasks.rubric.prompts.chat_response`'s. ``zoft
        serve`` scores this, so a served model sees exactly the prompt it was trained on. A
        multi-label task has one prompt per aspect: :meth:`contexts_from_chat`.

        Raises:
            ValueError: (a :class:`~zoft.tasks.rubric.prompts.ChatError`) no user message, an
                empty response, content that is not text, or a system message that matches no item.
        """
        return self.context(*chat_response(messages, self.items.values()))

    def contexts_from_chat(self, messages: list[dict]) -> list[str]:
        """The training prompts for a chat request: one per rubric aspect (multi-label), else one."""
        item, text = chat_response(messages, self.items.values())
        return [self.context(item, text, aspect) for aspect in self.aspects] or [self.context(item, text)]

    def examples_from_chat(self, messages: list[dict]) -> list[Example]:
        """A chat request as the examples a scorer takes: :meth:`contexts_from_chat`'s prompts,
        with the response text and item a classification head reads (``bert-cls``, ``lm-cls``)."""
        item, text = chat_response(messages, self.items.values())
        return self.examples(Response("request", text, None, None, None, item.item_id, "request"), item)

    def example(self, response: Response, item: ScoringItem | None = None) -> Example:
        """A response as an :class:`Example`; unscored responses get ``target`` None.

        Raises:
            DataError: a multi-label score, or an unknown item.
        """
        item = item or self.items.get(response.item_id)
        if item is None:
            raise DataError(f"unknown item '{response.item_id}'", response.ref or None, field="item_id")
        if isinstance(response.score, list) or self.aspects:
            raise DataError("needs one score per response, not a list (multi-label items: use examples())",
                            response.ref or None, field="score")
        target = response.score
        doc = {"item_id": item.item_id, "id": response.id, "text": response.text, "split": response.split,
               "score": target, "second_score": response.second_score, "subgroups": dict(response.subgroups)}
        return Example(self.context(item, response.text), list(self.levels), target,
                       [self.levels[target]] if target is not None else [], doc, response.ref,
                       shared_prefix=self.header(item))

    def examples(self, response: Response, item: ScoringItem | None = None) -> list[Example]:
        """A response as its examples: one, or one per aspect for a multi-label item.

        Raises:
            DataError: an unknown item, or a multi-label score with the wrong number of aspects.
        """
        if not self.aspects:
            return [self.example(response, item)]
        item = item or self.items.get(response.item_id)
        if item is None:
            raise DataError(f"unknown item '{response.item_id}'", response.ref or None, field="item_id")
        scores = response.score
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(self.aspects)):
            raise DataError(f"needs {len(self.aspects)} aspect scores ({', '.join(self.aspects)}), got {scores!r}",
                            response.ref or None, field="score")
        out = []
        for k, aspect in enumerate(self.aspects):
            target = scores[k] if scores is not None else None
            doc = {"item_id": item.item_id, "id": response.id, "text": response.text, "split": response.split,
                   "aspect": aspect, "score": target, "response_key": f"{item.item_id}/{response.id}",
                   "subgroups": dict(response.subgroups)}
            out.append(Example(self.context(item, response.text, aspect), list(self.levels), target,
                               [self.levels[target]] if target is not None else [], doc, response.ref,
                               shared_prefix=self.header(item)))
        return out

    # -- data --------------------------------------------------------------------------

    def _examples(self, which: str) -> list[Example]:
        if which not in self._cache:
            responses = self._train if which == "train" else self._eval
            unscored = next((r for r in responses if r.score is None), None)
            if unscored is not None:
                raise DataError("response has no score: training and evaluation need scored responses",
                                unscored.ref or None, field="score")
            self._cache[which] = [ex for r in responses for ex in self.examples(r)]
        return list(self._cache[which])

    def load_split(self, split: str) -> list[Example]:
        """All examples of ``"train"`` or ``"eval"``."""
        if split not in ("train", "eval"):
            raise ZoftError(f"task '{self.name}' has splits 'train' and 'eval', not '{split}'")
        return self._examples(split)

    def get_data(self, n_train: int = 1000, n_dev: int = 500, n_eval: int = 1000, seed: int = 0,
                 k_per_class: int | None = None) -> TaskData:
        """Samples disjoint train and dev sets from the train responses and eval from the eval ones.

        Deterministic for a ``seed``; ``k_per_class`` draws k responses per score level.
        """
        train = self._examples("train")
        evals = train if self.same_split else self._examples("eval")
        if not self.aspects:
            return sample_task_data(train, evals, same_split=self.same_split, n_train=n_train, n_dev=n_dev,
                                    n_eval=n_eval, seed=seed, k_per_class=k_per_class, name=self.name)
        # Multi-label: sample responses (by their first aspect's example, so k_per_class balances
        # that aspect), then bring every aspect along: no response straddles two splits.
        train_groups, eval_groups = _by_response(train), _by_response(evals)
        picked = sample_task_data([g[0] for g in train_groups.values()], [g[0] for g in eval_groups.values()],
                                  same_split=self.same_split, n_train=n_train, n_dev=n_dev, n_eval=n_eval,
                                  seed=seed, k_per_class=k_per_class, name=self.name)

        def expand(split: list[Example], groups: dict[str, list[Example]]) -> list[Example]:
            return [e for ex in split for e in groups[ex.doc["response_key"]]]
        return TaskData(expand(picked.train, train_groups), expand(picked.dev, train_groups),
                        expand(picked.eval, eval_groups))

    def _human_qwk(self) -> float | None:
        both = [r for r in self._train if isinstance(r.score, int) and r.second_score is not None]
        if not both:
            return None
        return human_agreement(both, list(range(len(self.levels))))

    def train_rater_pairs(self) -> list[tuple[int, int]]:
        """``(score, second_score)`` of the training responses a second human rater scored
        (ASAP: Score1, Score2 on the train rows; its public test rows have no Score2)."""
        return [(r.score, r.second_score) for r in self._train
                if isinstance(r.score, int) and r.second_score is not None]

    def response_columns(self, examples: Sequence[Example]) -> dict[str, Any]:
        """What a report needs beside each prediction, one entry per example, for eval.json.

        ``ids`` (the response id; ``item/id`` when the task has several items, ``/aspect``
        added for multi-label), ``levels``, ``second_targets`` (the second rater's score
        index or None; only when some response has one) and ``subgroups`` (column -> values:
        the mapping's ``subgroups``, plus ``item`` when the examples span several items).
        """
        docs = [ex.doc for ex in examples]
        several_items = len(self.items) > 1
        ids = [(f"{d['item_id']}/{d['id']}" if several_items else str(d["id"]))
               + (f"/{d['aspect']}" if "aspect" in d else "") for d in docs]
        columns: dict[str, Any] = {"ids": ids, "levels": list(self.levels)}
        second = [d.get("second_score") for d in docs]
        if any(s is not None for s in second):
            columns["second_targets"] = second
        groups = {name: [d["subgroups"].get(name, "") for d in docs]
                  for name in dict.fromkeys(k for d in docs for k in d.get("subgroups", {}))}
        if len({d["item_id"] for d in docs}) > 1:
            groups["item"] = [d["item_id"] for d in docs]
        if groups:
            columns["subgroups"] = groups
        return columns

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def from_table(cls, path: str | Path | Mapping[str, Sequence[str | Path]],
                   mapping: Mapping[str, Any] | str | Path, *,
                   name: str | None = None, train_split: str = "train", eval_split: str = "test",
                   prompt: Mapping[str, int] | None = None) -> ScoringTask:
        """A task from any CSV or JSONL file, read by :func:`zoft.tasks.rubric.data.read_table`.

        ``path`` may also map split names to lists of files (:func:`~zoft.tasks.rubric.data.read_tables`):
        each file's rows then belong to the split it is listed under.

        If the mapping names a ``split`` column, rows of ``train_split`` give train/dev
        and rows of ``eval_split`` give eval (other rows are unused); without one, all
        rows form one pool and eval rows are held out of it before train/dev are drawn.

        Raises:
            DataError: a bad file or mapping (see ``read_table``), or a split column without rows of ``train_split`` or ``eval_split``.
        """
        if isinstance(path, Mapping):   # one or more files per split
            groups = read_tables({k: [Path(p) for p in v] for k, v in path.items()}, mapping)
            path = Path(next(iter(path.values()))[0])
        else:
            path = Path(path)
            groups = read_table(path, mapping)
        items = [item for item, _ in groups]
        responses = [r for _, rs in groups for r in rs]
        name = name or path.stem
        if all(r.split is None for r in responses):
            return cls(name, items, responses, responses, same_split=True, source=str(path), prompt=prompt)
        found = sorted({r.split for r in responses if r.split is not None})
        train = [r for r in responses if r.split == train_split]
        evals = [r for r in responses if r.split == eval_split]
        for split, rows in ((train_split, train), (eval_split, evals)):
            if not rows:
                raise DataError(f"no rows of split '{split}' (splits found: {', '.join(found)})", str(path),
                                field="split")
        return cls(name, items, train, evals, source=str(path), prompt=prompt)


SCORING_YAML_KEYS = {"table", "data_files", "mapping", "train_split", "eval_split", "prompt"}


def load_scoring_yaml(path: str | Path) -> ScoringTask:
    """A scoring task described by a YAML file, for ``task=path/to/task.yaml``::

        table: responses.jsonl        # CSV or JSONL, relative to this file; or, one file (or a list) per split:
        # data_files: {train: train.jsonl, test: [test-a.jsonl, test-b.jsonl]}
        mapping: responses.yaml       # the column mapping of read_table (a file, or inline keys)
        train_split: train            # optional, as in ScoringTask.from_table
        eval_split: test
        prompt: {rubric: 300}         # optional word budgets

    Raises:
        DataError: an unreadable file, an unknown key, or a missing ``table``/``mapping``.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read scoring task: {e}".splitlines()[0], str(path)) from None
    unknown = sorted(set(spec) - SCORING_YAML_KEYS)
    if unknown:
        raise DataError(f"unknown key (a scoring task has {', '.join(sorted(SCORING_YAML_KEYS))})", str(path),
                        field=unknown[0])
    if ("table" in spec) == ("data_files" in spec):
        raise DataError("give either table (one file) or data_files (files per split)", str(path),
                        field="data_files" if "table" in spec else "table")
    if not spec.get("mapping"):
        raise DataError("missing key", str(path), field="mapping")
    mapping = spec["mapping"]
    if isinstance(mapping, str):
        mapping = path.parent / mapping
    table = spec.get("table")
    if "data_files" in spec:
        files = spec["data_files"]
        if not isinstance(files, dict) or not files or not all(
                isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(f, str) for f in v))
                for v in files.values()):
            raise DataError("expected split names mapped to a file or a list of files, e.g. "
                            "{train: train.jsonl, test: test.jsonl}", str(path), field="data_files")
        table = {str(k): [path.parent / f for f in ([v] if isinstance(v, str) else v)] for k, v in files.items()}
    elif not table:
        raise DataError("missing key", str(path), field="table")
    else:
        table = path.parent / table
    return ScoringTask.from_table(table, mapping, name=path.stem,
                                  train_split=spec.get("train_split", "train"),
                                  eval_split=spec.get("eval_split", "test"), prompt=spec.get("prompt"))


def is_scoring_yaml(path: str | Path) -> bool:
    """Whether a YAML file describes a scoring task (it has a top-level ``table`` or ``mapping`` key)."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False   # Task.from_yaml reports the problem
    return isinstance(spec, dict) and ("table" in spec or "mapping" in spec)


def _by_response(examples: list[Example]) -> dict[str, list[Example]]:
    """Examples grouped by the response they score (the aspects of a multi-label response), in order."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.doc["response_key"], []).append(ex)
    return groups


def load_scoring_task(name: str, data_root: str | Path | None = None) -> ScoringTask:
    """A builtin scoring task: ``asap-<N>`` (ASAP-SAS set N) or ``scientsbank``.

    Args:
        name: The task name.
        data_root: The shared data folder; default ``$ZOFT_DATA_DIR`` or ``../shared/data``.

    Raises:
        ZoftError: an unknown name, or no data folder.
        DataError: missing or malformed data files.
    """
    root = Path(data_root) if data_root is not None else data_dir()
    asap = ASAP_NAME.fullmatch(name)
    if asap is None and name != "scientsbank":
        raise ZoftError(f"unknown scoring task '{name}' (use asap-<N>, e.g. asap-1, or scientsbank)")
    if root is None:
        raise ZoftError(f"task '{name}' needs the shared data folder: set ZOFT_DATA_DIR or data_dir")
    if asap is not None:
        item, responses = read_asap(int(asap[1]), root)
        train = [r for r in responses if r.split == "train"]
        test = [r for r in responses if r.split == "test"]
        if not train or not test:
            raise DataError(f"ASAP set {asap[1]} needs rows with split 'train' and 'test' (found "
                            f"{len(train)} and {len(test)})", str(root / "asap-sas"), field="split")
        return ScoringTask(name, [item], train, test, source=str(root / "asap-sas"))
    folder = root / "semeval2013-2way" / "scientsbank"
    train_groups = read_semeval(folder / "train.jsonl")
    eval_groups = read_semeval(folder / f"{SCIENTSBANK_EVAL}.jsonl")
    # Unseen answers are new responses to the training questions: the items are the same.
    items = [item for item, _ in train_groups] + [item for item, _ in eval_groups]
    return ScoringTask(name, items, [r for _, rs in train_groups for r in rs],
                       [r for _, rs in eval_groups for r in rs], source=str(folder))


def is_scoring_task_name(name: str) -> bool:
    """Whether ``name`` is one :func:`load_scoring_task` knows."""
    return name == "scientsbank" or ASAP_NAME.fullmatch(name) is not None
