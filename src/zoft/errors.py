"""One exception type for everything a user can get wrong.

Every message is one line and names where the problem is (file, row, field) so that
the CLI can print it as is, without a traceback.
"""
from __future__ import annotations


def excerpt(value: object, limit: int = 40) -> str:
    """``value`` as it may appear inside a one-line message: control characters and line
    breaks escaped, cut to about ``limit`` characters (a bad file must not flood the terminal)."""
    text = repr(str(value))[1:-1]   # escapes \n, \r, \x00 ...; keeps printable non-ASCII
    return text if len(text) <= limit else text[:limit] + "..."


class ZoftError(Exception):
    """A user-facing error: bad config, bad data, bad model path, diverged training."""


class DataError(ZoftError):
    """Bad input data. Formats as ``path:row: field 'name': message``.

    Rows are 1-based line numbers for JSONL and 1-based data rows (header excluded)
    for CSV, i.e. what a user sees in an editor.
    """

    def __init__(self, message: str, path: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.path, self.row, self.field, self.message = path, row, field, message
        where = ":".join(str(x) for x in (path, row) if x is not None)
        what = f"field '{excerpt(field)}': " if field else ""   # field names come from the file
        super().__init__(f"{where}: {what}{message}" if where else f"{what}{message}")
