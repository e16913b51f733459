"""``report_to=tensorboard``: training metrics as TensorBoard scalars, laid out as HF Trainer's are.

HF's TensorBoardCallback writes to ``OUTPUT_DIR/runs/<time>_<host>`` with tags ``train/loss``,
``train/learning_rate`` and ``eval/<metric>``; this uses the same tags and folder naming under
``RUN_DIR/tensorboard/`` (not ``runs/``: that is where zoft keeps run folders by default, and
``overwrite_output_dir`` must never mistake a folder of runs for one run's logs), so
``tensorboard --logdir RUN_DIR/tensorboard`` shows a zoft run as it shows a Trainer run (a resumed
run adds a second folder, which TensorBoard draws as one more curve from the step it resumed at).
"""
from __future__ import annotations

import datetime
import math
import socket
from pathlib import Path
from typing import Protocol

from zoft.errors import ZoftError

# metrics.jsonl names → HF's; the rest keep their name under train/
_HF_NAMES = {"lr": "learning_rate"}
_NOT_SCALARS = ("step", "elapsed", "dev")


class MetricWriter(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


class TensorBoardWriter:
    """One SummaryWriter per (resumed) run; ``write`` takes a metrics.jsonl record."""

    def __init__(self, run_path: Path, metric_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ZoftError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
        stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
        self.log_dir = Path(run_path) / "tensorboard" / f"{stamp}_{socket.gethostname()}"
        self.metric_name = metric_name
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key in _NOT_SCALARS or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._writer.add_scalar(f"train/{_HF_NAMES.get(key, key)}", value, step)
        if record.get("dev") is not None:
            self._writer.add_scalar(f"eval/{self.metric_name}", record["dev"], step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def metric_writer(report_to: str, run_path: Path, metric_name: str) -> MetricWriter | None:
    """The writer ``report_to`` names (None for "none")."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        return TensorBoardWriter(run_path, metric_name)
    raise ZoftError(f"unknown report_to '{report_to}'; choose from none, tensorboard")
