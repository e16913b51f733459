"""Run directories: config, metrics log, checkpoints, final results. Every write is atomic.

Layout (HF-style)::

    RUN_DIR/
      config.yaml          the resolved config
      metrics.jsonl        one JSON object per logged step
      checkpoint-N/        trainable.safetensors + optimizer.safetensors + trainer_state.json
      best/                trainable weights of the best dev step
      eval.json            final results
      curve.png            dev metric and loss against step
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from zoft.errors import ZoftError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view into a larger storage (flat_params): safetensors refuses shared memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_tensors_dir(path: Path, files: dict[str, dict[str, torch.Tensor]], state: dict | None = None) -> None:
    """Write a folder of safetensors files (+ trainer_state.json) atomically: build it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    for name, tensors in files.items():
        save_file({k: _owned(v.detach().contiguous().cpu()) for k, v in tensors.items()}, str(tmp / name))
    if state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class RunDir:
    """A run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- config and results
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise ZoftError(f"{self.path}: not a zoft run directory (no config.yaml)")
        return yaml.safe_load(path.read_text())

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=1))

    # -- metrics
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut by a kill: drop it
                pass
        return out

    def truncate_metrics(self, step: int) -> None:
        """On resume, forget records written after the checkpoint we restart from."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # -- checkpoints
    def checkpoints(self) -> list[Path]:
        found = [p for p in self.path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                        optimizer: dict[str, torch.Tensor] | None = None, keep: int = 1) -> Path:
        files = {"trainable.safetensors": trainable}
        if optimizer:
            files["optimizer.safetensors"] = optimizer
        target = self.path / f"checkpoint-{step}"
        save_tensors_dir(target, files, state)
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def save_best(self, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        save_tensors_dir(self.path / "best", {"trainable.safetensors": trainable}, state)

    def load_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
        trainable = load_file(str(path / "trainable.safetensors"))
        state = json.loads((path / "trainer_state.json").read_text())
        opt_path = path / "optimizer.safetensors"
        optimizer = load_file(str(opt_path)) if opt_path.exists() else {}
        return trainable, state, optimizer

    # -- plot
    def plot(self, metric_name: str = "dev") -> Path | None:
        records = self.read_metrics()
        if not records:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [r["step"] for r in records if "loss" in r]
        ax[0].plot(steps, [r["loss"] for r in records if "loss" in r], lw=0.8)
        ax[0].set(xlabel="step", ylabel="train loss", title="loss")
        dev = [(r["step"], r["dev"]) for r in records if r.get("dev") is not None]
        if dev:
            ax[1].plot(*zip(*dev), marker="o")
        ax[1].set(xlabel="step", ylabel=f"dev {metric_name}", title="dev metric")
        fig.tight_layout()
        out = self.path / "curve.png"
        tmp = self.path / ".curve.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out)
        return out
