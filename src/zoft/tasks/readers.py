"""Where local task data lives (:func:`data_dir`) and its row readers: JSON Lines and CSV.

Both return ``(row_number, dict)`` pairs so that later checks (templates, labels) can
point at the exact row. Row numbers are 1-based lines for JSONL and 1-based data rows
(header excluded) for CSV, matching :class:`zoft.errors.DataError`.
"""
from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

from zoft.errors import DataError

Row = tuple[int, dict]


_DATA_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("zoft_data_dir", default=None)


@contextlib.contextmanager
def using_data_dir(path: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, :func:`data_dir` is ``path`` (a config's ``data_dir``), for this thread or
    task only: the process environment is left alone. ``None`` changes nothing."""
    token = _DATA_DIR.set(str(path)) if path else None
    try:
        yield
    finally:
        if token is not None:
            _DATA_DIR.reset(token)


def data_dir() -> Path | None:
    """The shared data folder: a config's ``data_dir`` (:func:`using_data_dir`), else
    ``$ZOFT_DATA_DIR``, else ``../shared/data`` from cwd or the repo."""
    if _DATA_DIR.get():
        return Path(_DATA_DIR.get()).expanduser()
    if os.environ.get("ZOFT_DATA_DIR"):
        return Path(os.environ["ZOFT_DATA_DIR"]).expanduser()
    repo_root = Path(__file__).resolve().parents[3]
    for candidate in (Path.cwd() / "../shared/data", repo_root / "../shared/data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def read_text(path: Path) -> str:
    """Reads a file as UTF-8 (BOM tolerated), else Windows-1252, else Latin-1.

    Real-world CSVs (e.g. exported from spreadsheets) are sometimes not UTF-8. Binary
    files (an .xlsx, an image, UTF-16 text) are refused rather than decoded as Latin-1,
    which accepts any byte and would turn them into pages of garbage rows.

    Raises:
        DataError: the file cannot be read, or is not text (a NUL byte; or not UTF-8 and
            holding control bytes no 8-bit text has), naming the first offending byte.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", str(path)) from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise DataError("UTF-16 text; save it as UTF-8", str(path)) from None
        if _BINARY_BYTE.search(data):
            offset = bom + e.start
            raise DataError(f"not a UTF-8 text file (byte 0x{data[offset]:02x} at offset {offset})",
                            str(path)) from None
        # Not UTF-8 usually means Windows-1252 (ASAP's item files: 0x95 is a bullet there, a control
        # character in Latin-1); Latin-1 is the last resort because it decodes any byte.
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    nul = data.find(b"\x00")
    if nul >= 0:   # valid UTF-8 but no text file has one (and csv would stop at it with a vaguer message)
        raise DataError(f"not a text file (NUL byte at offset {nul})", str(path))
    return text


# C0 control bytes other than tab, line feed, vertical tab, form feed, carriage return and the old
# DOS end-of-file mark (0x1a): no 8-bit text encoding uses them for characters, and nearly every
# binary format has some (NUL above all).
_BINARY_BYTE = re.compile(rb"[\x00-\x08\x0e-\x19\x1b-\x1f]")


def read_jsonl(path: Path) -> list[Row]:
    """Reads one JSON object per line; blank lines are skipped but still counted.

    Raises:
        DataError: a malformed or non-object line (with its line number), or no rows.
    """
    rows = []
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 etc.
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", str(path), lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", str(path), lineno)
        rows.append((lineno, obj))
    if not rows:
        raise DataError("file is empty (no rows)", str(path))
    return rows


def read_csv_records(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """The header (None for an empty file) and ``(row number, values)`` of each non-blank data
    row, as ``csv.reader`` splits them; rows are numbered as DataError numbers them (blank ones count).

    Raises:
        DataError: the file is not text, a quote is never closed, or csv rejects a row.
    """
    # Lines as csv.reader sees them (\n, \r\n or \r ends), so its line_num indexes this list.
    lines = io.StringIO(read_text(path), newline="").readlines()
    reader = csv.reader(lines)
    header, rows, row = None, [], 0
    start = last_start = 1   # the lines where the next and the last-read record begin
    try:
        for values in reader:
            if header is None:
                header = values
            else:
                row += 1
                if values:
                    rows.append((row, values))
            last_start, start = start, reader.line_num + 1
    except csv.Error as e:
        # e.g. "field larger than field limit": often an unclosed quote that swallowed the file
        where = None if header is None else row + 1
        _check_quotes(path, lines, start, where)
        raise DataError(f"malformed CSV (line {reader.line_num}): {e}", str(path), where) from None
    # A quote that never closes makes csv.reader (non-strict) return the rest of the file as one
    # field of the last record, silently merging the rows after it. strict=True catches that only
    # at some line ends and also rejects stray quotes (`"ab"c`) that are harmless here, so look
    # for an open quote in the last record ourselves: an unclosed quote always ends up there.
    _check_quotes(path, lines, last_start, row if row else None)
    return header, rows


def _check_quotes(path: Path, lines: list[str], first: int, row: int | None) -> None:
    """Raises if the record starting at line ``first`` opens a quoted field it never closes.

    Follows csv's default (excel) dialect: a quote opens a quoted field only at the start of
    a field, ``""`` inside one is a literal quote, and a quote inside an unquoted field
    (`a 5" nail`) is a literal character.
    """
    state, opened = "start", 0   # start of a field, in an unquoted field, in quotes, a quote in quotes
    for n, line in enumerate(lines[first - 1:], start=first):
        for c in line:
            if state == "quoted":
                if c == '"':
                    state = "quote"      # closes the field, or is the first half of ""
            elif state == "quote" and c == '"':
                state = "quoted"
            elif state == "start" and c == '"':
                state, opened = "quoted", n
            elif c in ",\r\n":
                state = "start"
            else:
                state = "field"
    if state == "quoted":
        where = " in the header" if row is None else ""
        raise DataError(f"unclosed quote{where}: the quoted field opened on line {opened} runs to "
                        "the end of the file", str(path), row)


def read_csv(path: Path) -> list[Row]:
    """Reads a CSV file with a header row; every value is a string.

    Raises:
        DataError: a row whose field count differs from the header's, an unclosed quote,
            or no data rows.
    """
    header, records = read_csv_records(path)
    if not header:
        raise DataError("file is empty (no header)", str(path))
    rows = []
    for i, values in records:
        if len(values) < len(header):
            raise DataError(f"missing: row has {len(values)} fields, header has {len(header)}",
                            str(path), i, header[len(values)])
        if len(values) > len(header):
            raise DataError(f"row has {len(values)} fields, header has {len(header)}", str(path), i)
        rows.append((i, dict(zip(header, values))))
    if not rows:
        raise DataError("file is empty (header but no rows)", str(path))
    return rows


def read_rows(path: Path) -> list[Row]:
    """Reads a data file, choosing the reader by its suffix (.jsonl/.json or .csv).

    Raises:
        DataError: the file is missing, has an unknown suffix, or is malformed.
    """
    if not path.is_file():
        raise DataError("data file not found", str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    raise DataError(f"unsupported file type '{suffix}' (use .jsonl or .csv)", str(path))
