"""Rubric scoring data: items (question + rubric) and student responses, read from real files.

One rule relates scores and labels everywhere: ``ScoringItem.score_levels`` lists the
labels a scorer may output, lowest first, and a :class:`Response` score is an index into
that list. For ASAP-SAS the labels are ``"0".."3"`` so index and points coincide; for
SemEval 2-way they are ``["incorrect", "correct"]`` (0 = incorrect, 1 = correct), so the
words a language model produces stay meaningful while metrics see ordinal integers.
Multi-label items score several rubric aspects, each on the same levels (usually 0/1);
their scores are lists, one index per aspect.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from zoft.errors import DataError
from zoft.tasks.readers import Row, data_dir as default_data_dir, read_rows, read_text

Score = int | list[int]
Group = tuple["ScoringItem", list["Response"]]


@dataclass(frozen=True)
class ScoringItem:
    """A question with what a scorer needs to grade responses to it.

    Attributes:
        item_id: Stable identifier (``"asap-sas/set01"``, a SemEval ``question_id``, ...).
        question: The item text the student saw (may be empty).
        rubric: Scoring instructions (may be empty).
        reference_answers: Model answers, if the source has any.
        score_levels: Output labels, lowest first; a score is an index into this list.
        examples: Scored example responses ``(text, score)`` to show a scorer.
        aspects: Names of the rubric aspects of a multi-label item; empty otherwise.
        metadata: Anything else the source states (ASAP header fields, title).
    """

    item_id: str
    question: str
    rubric: str
    reference_answers: list[str]
    score_levels: list[str]
    examples: list[tuple[str, Score]] = field(default_factory=list)
    aspects: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """One student response.

    Attributes:
        id: The source's response id, as a string.
        text: The response as the student wrote it.
        score: Index into the item's ``score_levels``; a list (one per aspect) for a
            multi-label item; None for an unscored response (a table without a score).
        second_score: A second human rater's score, where the source has one.
        split: The source's split name ("train", "test", a SemEval file stem), or None.
        item_id: The :class:`ScoringItem` this responds to.
        ref: ``"path:row"`` of the source row, for error messages.
        subgroups: Column -> value of the columns a report groups by (the mapping's
            ``subgroups``, RSMTool's name), e.g. ``{"gender": "f"}``.
    """

    id: str
    text: str
    score: Score | None
    second_score: int | None = None
    split: str | None = None
    item_id: str = ""
    ref: str = ""
    subgroups: dict[str, str] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------- labels

def format_score(score: Score, levels: Sequence[str]) -> str:
    """The label text of a score: ``levels[score]``, or comma-joined labels per aspect."""
    if isinstance(score, list):
        return ",".join(levels[s] for s in score)
    return levels[score]


def parse_score(text: str, levels: Sequence[str] | None = None) -> Score:
    """Inverse of :func:`format_score`; integer labels are read as integers if ``levels`` is None.

    A text with a comma is a multi-label score (a list), otherwise a single score.

    Raises:
        ValueError: a label that is not one of ``levels`` (or not an integer).
    """
    parts = [p.strip() for p in text.strip().split(",")]
    if levels is None:
        values = [int(p) for p in parts]
    else:
        unknown = [p for p in parts if p not in levels]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not one of the levels {list(levels)}")
        values = [list(levels).index(p) for p in parts]
    return values if len(values) > 1 else values[0]


def pairs(groups: Iterable[Group]) -> list[tuple[ScoringItem, Response]]:
    """Flattens ``(item, responses)`` groups into ``(item, response)`` pairs."""
    return [(item, r) for item, responses in groups for r in responses]


# ---------------------------------------------------------------- shared parsing helpers

def read_text_file(path: Path) -> str:
    """Reads a text file as UTF-8, else cp1252, with every line ending made ``\\n``.

    cp1252 rather than Latin-1 as the fallback: the ASAP item files use its bullet
    (0x95) and degree (0xB0) bytes, which Latin-1 would turn into control characters.
    Bytes cp1252 leaves undefined fall back to Latin-1. Lone ``\\r`` (old Mac line
    ends, used inside the ASAP files' tables and headers) also become ``\\n``.
    """
    if not path.is_file():
        raise DataError("file not found", str(path))
    # the same decoding, and refusal of binary files, as the task readers
    return read_text(path).replace("\r\n", "\n").replace("\r", "\n")


def _as_int(value: Any, path: str, row: int | None, name: str) -> int:
    """An integer from an int, an integral float or a numeric string ("1.0" as pandas writes it)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise DataError(f"not an integer score: {value!r}", path, row, name)


def _level(value: Any, levels: Sequence[str], path: str, row: int, name: str) -> int:
    """The index of a raw score in ``levels``, matched as text or as an integer."""
    text = value.strip() if isinstance(value, str) else str(value)
    if text in levels:
        return list(levels).index(text)
    try:  # "1.0" (as pandas writes integer columns with gaps) matches the level "1"
        as_int = str(_as_int(value, path, row, name))
    except DataError:
        as_int = None
    if as_int in levels:
        return list(levels).index(as_int)
    raise DataError(f"score {value!r} is not one of the levels {list(levels)}", path, row, name)


def _require(rows: list[Row], columns: Iterable[str], path: str) -> None:
    """Checks that the file's header (CSV) or every row (JSONL) has each column."""
    for row, doc in rows:
        for col in columns:
            if col not in doc:
                raise DataError(f"missing column (has: {', '.join(doc)})", path, row, col)


def _check_unique(responses: list[Response], column: str) -> None:
    """Response ids must be unique per item: predictions and reports are joined on them."""
    seen: dict[tuple[str, str], str] = {}
    for r in responses:
        key = (r.item_id, r.id)
        if key in seen:
            path, _, row = r.ref.rpartition(":")
            raise DataError(f"duplicate response id '{r.id}' (first at {seen[key]})", path,
                            int(row), column)
        seen[key] = r.ref


# ---------------------------------------------------------------- ASAP-SAS

ASAP_COLUMNS = ("Id", "EssaySet", "Score1", "Score2", "EssayText", "split")
# Where the item text ends and the rubric begins: science sets start it with "Scoring
# Rubric ..." (1, 2) or "Rubric for ..." (10), reading sets (3, 4) with "... Scoring and Rubric".
_RUBRIC_START = re.compile(r"^(Scoring Rubric\b|Rubric for\b|.*\bScoring and Rubric\b)", re.M)


def read_asap_item(path: str | Path, set_id: int | None = None) -> ScoringItem:
    """Reads an ASAP-SAS "ReadMeFirst" item file: header, item text and rubric.

    The header is ``Key:`` / value line pairs (``Rubric range:`` gives the levels), then
    a title line such as ``Prompt-Acid Rain``. The files hold no scored student
    responses, so ``examples`` is empty.

    Raises:
        DataError: a missing or malformed header, range or rubric, or the wrong set.
    """
    path = Path(path)
    lines = [line.rstrip() for line in read_text_file(path).split("\n")]
    head = re.fullmatch(r"Data Set #(\d+)", lines[0].strip())
    if not head:
        raise DataError("expected 'Data Set #N' on the first line", str(path), 1)
    if set_id is not None and int(head[1]) != set_id:
        raise DataError(f"describes data set {head[1]}, not {set_id}", str(path), 1)
    meta, i = {}, 1
    while i + 1 < len(lines) and lines[i].endswith(":"):
        meta[lines[i][:-1].strip()] = lines[i + 1].strip()
        i += 2
    meta["title"] = lines[i].split("-", 1)[-1].strip()  # "Prompt-Acid Rain" -> "Acid Rain"
    span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", meta.get("Rubric range", ""))
    if not span or int(span[1]) > int(span[2]):
        raise DataError(f"no valid 'Rubric range:' in the header (got {meta.get('Rubric range')!r})",
                        str(path), field="Rubric range")
    body = "\n".join(lines[i + 1:])
    start = _RUBRIC_START.search(body)
    if not start:
        raise DataError("no rubric heading found (e.g. 'Scoring Rubric', 'Rubric for')", str(path))
    # The files end with a page number ("1") and blank lines from the original PDF.
    rubric = re.sub(r"\n\d+$", "", body[start.start():].strip())
    return ScoringItem(item_id=f"asap-sas/set{int(head[1]):02d}", question=body[:start.start()].strip(),
                       rubric=rubric, reference_answers=[],
                       score_levels=[str(s) for s in range(int(span[1]), int(span[2]) + 1)],
                       metadata=meta)


def read_asap(set_id: int, data_dir: str | Path | None = None) -> tuple[ScoringItem, list[Response]]:
    """Reads one ASAP-SAS set: its item file and its responses (train and test rows).

    Args:
        set_id: The set number (1, 2 and 10 are science).
        data_dir: The shared data folder (holding ``asap-sas/``) or the ``asap-sas``
            folder itself; default ``$ZOFT_DATA_DIR`` or ``../shared/data``.

    Returns:
        The item (levels from its ``Rubric range``) and the responses, in file order;
        ``score`` is Score1 (the grade), ``second_score`` Score2 (None on test rows).

    Raises:
        DataError: missing files or columns, a row of another set, or a score outside
            the item's rubric range (the data and the item file must agree).
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        raise DataError("no data folder: pass data_dir or set ZOFT_DATA_DIR")
    folder = root / "asap-sas" if (root / "asap-sas").is_dir() else root
    csv_path = folder / f"set{set_id:02d}.csv"
    item = read_asap_item(folder / "items" / f"set{set_id:02d}.txt", set_id)
    rows, p = read_rows(csv_path), str(csv_path)
    _require(rows[:1], ASAP_COLUMNS, p)  # CSV: every row has the header's columns
    responses = []
    for row, d in rows:
        if _as_int(d["EssaySet"], p, row, "EssaySet") != set_id:
            raise DataError(f"row of set {d['EssaySet']} in the file of set {set_id}", p, row, "EssaySet")
        score = _level(d["Score1"], item.score_levels, p, row, "Score1")
        second = _level(d["Score2"], item.score_levels, p, row, "Score2") if d["Score2"].strip() else None
        responses.append(Response(d["Id"], d["EssayText"], score, second, d["split"].strip() or None,
                                  item.item_id, f"{p}:{row}"))
    _check_unique(responses, "Id")
    return item, responses


# ---------------------------------------------------------------- SemEval-2013 2-way

SEMEVAL_LEVELS = ["incorrect", "correct"]
SEMEVAL_FIELDS = ("question_id", "question", "reference_answers", "answer_id", "answer", "label")
# The task's own definition of the 2-way labels (SemEval-2013 Task 7): the data has no rubric.
SEMEVAL_RUBRIC = ("correct: the response is a complete and correct paraphrase of a reference answer.\n"
                  "incorrect: anything else (partially correct, contradictory, irrelevant or off-topic).")


def read_semeval(path: str | Path) -> list[Group]:
    """Reads a SemEval-2013 2-way JSONL file (SciEntsBank or Beetle), grouped by question.

    Labels become indices into ``["incorrect", "correct"]``; the split is the file stem.

    Returns:
        ``(item, responses)`` per ``question_id``, in order of first appearance.

    Raises:
        DataError: a missing field, an unknown label, or rows of one question that
            disagree on its text or reference answers.
    """
    path = Path(path)
    p, groups = str(path), {}
    rows = read_rows(path)
    _require(rows, SEMEVAL_FIELDS, p)
    for row, d in rows:
        refs = d["reference_answers"]
        if not isinstance(refs, list) or not all(isinstance(a, str) for a in refs):
            raise DataError("expected a list of strings", p, row, "reference_answers")
        qid = str(d["question_id"])
        if qid not in groups:
            groups[qid] = (ScoringItem(qid, d["question"], SEMEVAL_RUBRIC, refs, SEMEVAL_LEVELS), [])
        item, responses = groups[qid]
        for name, have in (("question", item.question), ("reference_answers", item.reference_answers)):
            if d[name] != have:
                raise DataError(f"differs from the first row of question '{qid}' ({responses[0].ref})",
                                p, row, name)
        label = _level(d["label"], SEMEVAL_LEVELS, p, row, "label")
        responses.append(Response(str(d["answer_id"]), d["answer"], label, None, path.stem, qid, f"{p}:{row}"))
    _check_unique([r for _, rs in groups.values() for r in rs], "answer_id")
    return list(groups.values())


# ---------------------------------------------------------------- any table

COLUMN_KEYS = ("id", "text", "score", "scores", "second_score", "split", "item_id", "question",
               "rubric", "reference_answers")
ITEM_KEYS = ("item_id", "question", "rubric", "rubric_file", "reference_answers", "examples")


def _load_mapping(mapping: Mapping[str, Any] | str | Path, data_path: Path) -> tuple[dict, str, Path]:
    """The mapping as a dict, a name for errors, and the folder relative paths start from."""
    if isinstance(mapping, Mapping):
        return dict(mapping), "mapping", data_path.parent
    ypath = Path(mapping)
    try:
        loaded = yaml.safe_load(read_text_file(ypath))
    except yaml.YAMLError as e:
        raise DataError(f"bad YAML: {e}".replace("\n", " "), str(ypath)) from None
    if not isinstance(loaded, dict):
        raise DataError("expected a mapping of keys to column names", str(ypath))
    return loaded, str(ypath), ypath.parent


def _check_mapping(m: dict, where: str) -> None:
    unknown = set(m) - set(COLUMN_KEYS) - {"levels", "item", "subgroups"}
    if unknown:
        raise DataError(f"unknown key (use {', '.join(COLUMN_KEYS)}, levels, item, subgroups)", where,
                        field=sorted(unknown)[0])
    if "subgroups" in m and (not isinstance(m["subgroups"], list)
                             or not all(isinstance(c, str) for c in m["subgroups"])):
        raise DataError("expected a list of column names", where, field="subgroups")
    for key in ("id", "text"):
        if not isinstance(m.get(key), str):
            raise DataError("required: the name of a column", where, field=key)
    if "score" in m and "scores" in m:
        raise DataError("give either score (one column) or scores (several, multi-label)", where,
                        field="scores")
    if "scores" in m and (not isinstance(m["scores"], list) or not m["scores"]
                          or not all(isinstance(c, str) for c in m["scores"])):
        raise DataError("expected a non-empty list of column names", where, field="scores")
    for key in sorted(set(COLUMN_KEYS) & set(m) - {"scores"}):
        if not isinstance(m[key], str):
            raise DataError("expected the name of a column", where, field=key)
    levels = m.get("levels")
    if levels is not None and (not isinstance(levels, list) or len(levels) < 2
                               or len(set(map(str, levels))) != len(levels)
                               or any("," in str(v) for v in levels)):
        raise DataError("expected a list of at least two distinct labels without commas", where,
                        field="levels")
    item = m.get("item", {})
    if not isinstance(item, dict) or set(item) - set(ITEM_KEYS):
        raise DataError(f"expected a mapping with keys from {', '.join(ITEM_KEYS)}", where, field="item")
    if not isinstance(item.get("examples", []), list) or not all(
            isinstance(e, dict) and set(e) == {"text", "score"} for e in item.get("examples", [])):
        raise DataError("expected a list of {text, score}", where, field="item.examples")


def read_table(path: str | Path, mapping: Mapping[str, Any] | str | Path) -> list[Group]:
    """Reads responses from any CSV or JSONL file, described by a column mapping.

    Mapping keys (a dict, or a YAML file holding one):

    * columns: ``id`` and ``text`` (required); ``score`` (one column) or ``scores``
      (a list of columns, one per rubric aspect: multi-label); ``second_score``,
      ``split``, ``item_id`` (per row, to group by item), ``question``, ``rubric``,
      ``reference_answers`` (text or, in JSONL, a list), all optional;
    * ``subgroups``: a list of columns to break results down by in ``zoft report``
      (e.g. ``[gender, school]``), optional;
    * ``levels``: the labels, lowest first; default ``"0"`` to the highest integer in
      the data (scores must then be integers);
    * ``item``: constants for every item: ``item_id`` (default the file stem),
      ``question``, ``rubric`` or ``rubric_file`` (relative to the YAML file, or to the
      data file for a dict), ``reference_answers`` (list), ``examples`` (list of
      ``{text, score}``).

    Without a score column the responses are unscored (``score`` None).

    Returns:
        ``(item, responses)`` per item (one unless the mapping names an ``item_id`` column).

    Raises:
        DataError: a bad mapping, a missing file or column, a score that is not an
            integer or not a level, or rows of one item that disagree on its texts.
    """
    path = Path(path)
    m, where, base = _load_mapping(mapping, path)
    _check_mapping(m, where)
    const = dict(m.get("item") or {})
    if "rubric_file" in const:
        if "rubric" in const:
            raise DataError("give either rubric or rubric_file", where, field="item.rubric_file")
        const["rubric"] = read_text_file(base / const.pop("rubric_file")).strip()
    rows, p = read_rows(path), str(path)
    score_cols = m["scores"] if "scores" in m else [m["score"]] if "score" in m else []
    _require(rows, [m[k] for k in COLUMN_KEYS if isinstance(m.get(k), str)] + score_cols
             + m.get("subgroups", []), p)

    levels = [str(v) for v in m["levels"]] if m.get("levels") else None
    if levels is None and score_cols:  # integers 0..max, checked row by row for a precise error
        second = [m["second_score"]] if "second_score" in m else []
        values = [(_as_int(d[c], p, row, c), row, c) for row, d in rows for c in score_cols + second
                  if c in score_cols or str(d[c]).strip()]
        lowest = min(values)
        if lowest[0] < 0:
            raise DataError("negative score (declare levels for other scales)", p, lowest[1], lowest[2])
        levels = [str(s) for s in range(max(v for v, _, _ in values) + 1)]
    levels = levels or []

    def text(d: dict, key: str, default: Any = "") -> Any:
        return d[m[key]] if key in m else const.get(key, default)

    groups: dict[str, Group] = {}
    for row, d in rows:
        item_id = str(d[m["item_id"]]) if "item_id" in m else str(const.get("item_id", path.stem))
        refs = text(d, "reference_answers", [])
        refs = ([refs] if refs.strip() else []) if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not all(isinstance(a, str) for a in refs):
            raise DataError("expected text or a list of strings", p, row,
                            m.get("reference_answers", "item.reference_answers"))
        item = ScoringItem(item_id, str(text(d, "question")), str(text(d, "rubric")), refs, levels,
                           aspects=list(m.get("scores", [])))
        if item_id not in groups:
            try:
                examples = [(str(e["text"]), parse_score(str(e["score"]), levels))
                            for e in const.get("examples", [])]
            except ValueError as e:
                raise DataError(f"bad example score: {e}", where, field="item.examples") from None
            groups[item_id] = (replace(item, examples=examples), [])
        first, responses = groups[item_id]
        for key in ("question", "rubric", "reference_answers"):  # only columns can disagree
            have, now = getattr(first, key), getattr(item, key)
            if have != now:
                raise DataError(f"differs from the first row of item '{item_id}' ({responses[0].ref})",
                                p, row, m[key])
        scores = [_level(d[c], levels, p, row, c) for c in score_cols]
        second = None
        if "second_score" in m and str(d[m["second_score"]]).strip():
            second = _level(d[m["second_score"]], levels, p, row, m["second_score"])
        split = (str(d[m["split"]]).strip() or None) if "split" in m else None
        responses.append(Response(str(d[m["id"]]), str(d[m["text"]]),
                                  scores if "scores" in m else scores[0] if scores else None,
                                  second, split, item_id, f"{p}:{row}",
                                  {c: str(d[c]).strip() for c in m.get("subgroups", [])}))
    _check_unique([r for _, rs in groups.values() for r in rs], m["id"])
    return list(groups.values())


def read_tables(files: Mapping[str, Sequence[str | Path]], mapping: Mapping[str, Any] | str | Path) -> list[Group]:
    """Reads responses from one or more files per split (``{"train": [a.jsonl], "test": [b.jsonl, c.jsonl]}``).

    Every file is read by :func:`read_table` with the same mapping; a response's split is the
    key its file is listed under. Items with the same ``item_id`` in several files are one item.
    Without ``levels`` in the mapping, every item gets ``"0"`` to the highest score of all files.

    Raises:
        DataError: what :func:`read_table` raises, a split column in the mapping (the files are
            the splits), or one item described differently by two files.
    """
    if not isinstance(mapping, Mapping):
        mapping_dict, _, _ = _load_mapping(mapping, Path("."))
    else:
        mapping_dict = dict(mapping)
    if "split" in mapping_dict:
        raise DataError("the files name the splits (data_files); drop the split column from the mapping",
                        str(mapping) if not isinstance(mapping, Mapping) else "mapping", field="split")
    groups: dict[str, Group] = {}
    for split, paths in files.items():
        for path in paths:
            for item, responses in read_table(path, mapping):
                first = groups.setdefault(item.item_id, (item, []))
                for key in ("question", "rubric", "reference_answers"):
                    if getattr(first[0], key) != getattr(item, key):
                        raise DataError(f"item '{item.item_id}' differs from its description in "
                                        f"{first[1][0].ref.rpartition(':')[0] if first[1] else path}",
                                        responses[0].ref.rpartition(":")[0], int(responses[0].ref.rpartition(":")[2]),
                                        mapping_dict.get(key, f"item.{key}"))
                first[1].extend(replace(r, split=split) for r in responses)
    levels = max((item.score_levels for item, _ in groups.values()), key=len, default=[])
    return [(replace(item, score_levels=levels) if not mapping_dict.get("levels") else item, responses)
            for item, responses in groups.values()]
