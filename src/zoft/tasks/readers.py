"""Row readers for local task data: JSON Lines and CSV.

Both return ``(row_number, dict)`` pairs so that later checks (templates, labels) can
point at the exact row. Row numbers are 1-based lines for JSONL and 1-based data rows
(header excluded) for CSV, matching :class:`zoft.errors.DataError`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from zoft.errors import DataError

Row = tuple[int, dict]


def read_text(path: Path) -> str:
    """Reads a file as UTF-8 (BOM tolerated), else Windows-1252, else Latin-1.

    Real-world CSVs (e.g. exported from spreadsheets) are sometimes not UTF-8.
    """
    data = path.read_bytes()
    # Not UTF-8 usually means Windows-1252 (ASAP's item files: 0x95 is a bullet there, a control
    # character in Latin-1); Latin-1 is the last resort because it decodes any byte.
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


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


def read_csv(path: Path) -> list[Row]:
    """Reads a CSV file with a header row; every value is a string.

    Raises:
        DataError: a row whose field count differs from the header's, or no data rows.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if not header:
        raise DataError("file is empty (no header)", str(path))
    rows = []
    for i, values in enumerate(reader, start=1):
        if not values:  # a fully blank line
            continue
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
