"""Fault injection for crash tests: fail at a chosen point instead of racing a timer.

The environment variable ``ZOFT_FAULT`` names a fault (or several); without it every hook is a no-op::

    ZOFT_FAULT=kill:step=5                     SIGKILL right after step 5's update, before it is logged
    ZOFT_FAULT=kill:write=3:middle             SIGKILL half-way through the 3rd atomic write
    ZOFT_FAULT=kill:write=2:after:checkpoint-* ... counting only writes whose file name matches the glob
    ZOFT_FAULT=enospc:write=2                  the 2nd write fails with ENOSPC (a full disk)
    ZOFT_FAULT=climb:step=7                    from step 7 on the training loss reads 10× higher while the
                                               lr is still the run's own (the divergence guard's test)
    ZOFT_FAULT=hard:step=7                     steps 7-16 read a 3× training loss while the weights are fine
                                               (hard batches: the guard's reference batches disagree)
    ZOFT_FAULT=climb:step=7,kill:step=10       several faults, comma-separated

Phases of a write: ``before`` (nothing written yet), ``middle`` (the temporary file or folder is
half written; the default), ``swap`` (a folder that replaces an older one, such as ``best/``:
between moving the old one aside and renaming the new one in) and ``after`` (renamed into
place, before older checkpoints are rotated away). Steps count from 1, as metrics.jsonl and checkpoint-N do. Writes are counted per
process, so a resumed run counts from 1 again.

A test sets the variable on a subprocess and then checks what a resume makes of the wreck; a
user never sets it.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal
from dataclasses import dataclass
from pathlib import Path

PHASES = ("before", "middle", "swap", "after")


@dataclass(frozen=True)
class Fault:
    action: str             # kill | enospc | climb | hard
    step: int | None = None
    write: int | None = None
    phase: str = "middle"
    match: str = "*"


def parse(text: str) -> Fault:
    """``"kill:write=3:after:checkpoint-*"`` → Fault(...); a malformed spec is a ValueError."""
    action, *parts = text.strip().split(":")
    if action not in ("kill", "enospc", "climb", "hard") or not parts:
        raise ValueError(f"ZOFT_FAULT={text!r}: expected kill|enospc:step=N, kill|enospc:write=N[:phase[:glob]] "
                         f"or climb|hard:step=N")
    where, _, n = parts[0].partition("=")
    if where not in ("step", "write") or not n.isdigit() or int(n) < 1:
        raise ValueError(f"ZOFT_FAULT={text!r}: expected step=N or write=N with N >= 1")
    if action in ("climb", "hard") and (where != "step" or len(parts) > 1):
        raise ValueError(f"ZOFT_FAULT={text!r}: expected {action}:step=N")
    phase = parts[1] if len(parts) > 1 else "middle"
    if phase not in PHASES:
        raise ValueError(f"ZOFT_FAULT={text!r}: phase must be one of {', '.join(PHASES)}")
    return Fault(action, **{where: int(n)}, phase=phase, match=parts[2] if len(parts) > 2 else "*")


_FAULTS = [parse(part) for part in os.environ.get("ZOFT_FAULT", "").split(",") if part.strip()]
_FAULT = next((f for f in _FAULTS if f.action in ("kill", "enospc")), None)   # the kill or ENOSPC, if any
_CLIMB = next((f for f in _FAULTS if f.action == "climb"), None)
_HARD = next((f for f in _FAULTS if f.action == "hard"), None)
HARD_STEPS = 10
_writes_seen = 0


def _fire(fault: Fault, path: Path | None) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)


def step_done(step: int) -> None:
    """Called by the training loop once step ``step`` (1-based) has updated the weights."""
    if _FAULT is not None and _FAULT.step == step:
        _fire(_FAULT, None)


def loss(step: int, value: float, lr_scale: float, reference: bool = False) -> float:
    """The training loss of step ``step`` as the loop sees it: 10× from the climb's step on, while
    the divergence guard has not yet lowered the lr (``lr_scale`` 1), also on the guard's reference
    batches (``reference``), as in a real climb; 3× for the ``HARD_STEPS`` steps of hard batches,
    which leave the reference batches alone."""
    if _CLIMB is not None and step >= _CLIMB.step and lr_scale == 1.0:
        return 10.0 * value
    if _HARD is not None and not reference and _HARD.step <= step < _HARD.step + HARD_STEPS:
        return 3.0 * value
    return value


def write_point(path: Path, phase: str) -> None:
    """Called by every atomic write of ``path`` at each of its phases, in order."""
    global _writes_seen
    if _FAULT is None or _FAULT.write is None or not fnmatch.fnmatch(Path(path).name, _FAULT.match):
        return
    if phase == "before":
        _writes_seen += 1
    if _writes_seen == _FAULT.write and phase == _FAULT.phase:
        _fire(_FAULT, path)
