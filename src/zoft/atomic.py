"""Atomic writes: the one way zoft writes a file or a folder.

Everything goes to a temporary name in the target's own folder (``.NAME.XXXXXX``), is flushed
to disk (fsync), and is renamed into place, so a reader, a resume or a kill -9 never meets half
a file. A failed write removes its temporary and leaves what was there before; an OS-level
failure (a full disk, a read-only folder) becomes a one-line :class:`WriteError` naming the file.

The crash tests stop a process inside these writes through :mod:`zoft.faults`, at the phases
``before``, ``middle`` (the temporary is written, not yet renamed), ``swap`` (a folder that
replaces another, between its two renames) and ``after``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from zoft import faults
from zoft.errors import ZoftError


class WriteError(ZoftError):
    """A file could not be written (disk full, read-only, ...); what was there before is intact."""


@contextlib.contextmanager
def one_line_write_errors(path: Path) -> Iterator[None]:
    """Turn an OS-level write failure into one line that names the file."""
    from safetensors import SafetensorError   # safetensors reports I/O errors (ENOSPC too) as its own type
    try:
        yield
    except OSError as e:
        raise WriteError(f"{path}: cannot write: {e.strerror or e}") from None
    except SafetensorError as e:
        raise WriteError(f"{path}: cannot write: {str(e).split(': ', 1)[-1]}") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_file(p) as f: f.write(...)``: ``p`` appears complete, or not at all."""
    path = Path(path)
    with one_line_write_errors(path):
        faults.write_point(path, "before")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                faults.write_point(path, "middle")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        faults.write_point(path, "after")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, with the newlines as given (no platform translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: <write files into tmp>``: then ``tmp`` becomes ``p``.

    Replacing an existing folder takes two renames (a folder cannot be renamed over a non-empty
    one): the old one goes to ``.NAME.old`` first. A kill between the two leaves ``.NAME.old``
    and no ``NAME``; :func:`restore_half_replaced` puts it back.
    """
    path = Path(path)
    with one_line_write_errors(path):
        faults.write_point(path, "before")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            yield tmp
            faults.write_point(path, "middle")
            for file in tmp.rglob("*"):
                if file.is_file():
                    with open(file, "rb") as f:
                        os.fsync(f.fileno())
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                faults.write_point(path, "swap")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(path.parent)
        faults.write_point(path, "after")


def restore_half_replaced(old: Path) -> bool:
    """Given ``.NAME.old`` left by a kill inside :func:`atomic_dir`: move it back to ``NAME`` if
    ``NAME`` is missing (the new folder never arrived). Returns whether it did."""
    target = old.with_name(old.name[1:-len(".old")])
    if old.name.startswith(".") and old.name.endswith(".old") and not target.exists():
        os.replace(old, target)
        return True
    return False
