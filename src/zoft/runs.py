"""Run directories: config, metrics log, checkpoints, final results. Every write is atomic.

Layout (HF-style)::

    RUN_DIR/
      config.yaml          the resolved config
      metrics.jsonl        one JSON object per logged step
      checkpoint-N/        trainable.safetensors + optimizer.safetensors + trainer_state.json (with log_history)
      best/                trainable weights of the best dev step, and the model (full mode) or PEFT
                           adapter (LoRA, prefix) with its tokenizer, as ``from_pretrained`` loads them
      runs/                TensorBoard event files (report_to=tensorboard)
      eval.json            final results
      curve.png            dev metric and loss against step
      members/             an ensemble's member runs, one folder each
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoft.atomic import atomic_dir, atomic_file, atomic_write_text, one_line_write_errors, restore_half_replaced
from zoft.errors import ZoftError


def owned_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view into a larger storage (flat_params): safetensors refuses shared memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_tensors_dir(path: Path, files: dict[str, dict[str, torch.Tensor]], state: dict | None = None,
                     export: Callable[[Path], None] | None = None) -> None:
    """Write a folder of safetensors files (+ trainer_state.json) atomically (zoft.atomic.atomic_dir);
    ``export(folder)`` adds files of its own (an HF model folder) inside the same atomic write."""
    with atomic_dir(path) as tmp:
        for name, tensors in files.items():
            save_file({k: owned_tensor(v.detach().contiguous().cpu()) for k, v in tensors.items()}, str(tmp / name))
        if export is not None:
            export(tmp)
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))


# What a run (or a comparison of runs) writes into its folder; an overwrite removes these and
# nothing else, so a user's own files next to them survive.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "eval.json", "curve.png", "trajectory.safetensors", "best",
               "checkpoint-*", "probe_head.safetensors", "events.out.tfevents.*", "tensorboard", "comparison.*", "report",
               "members")
OVERWRITE_MARKER = ".zoft-overwrite-in-progress"


def _is_run_entry(entry: Path) -> bool:
    name = entry.name
    if name.startswith("."):   # a temp of a killed write: .NAME.XXXXXX or .NAME.old
        return any(fnmatch.fnmatch(name[1:], f"{pattern}.*") for pattern in RUN_ENTRIES) or name == OVERWRITE_MARKER
    if any(fnmatch.fnmatch(name, pattern) for pattern in RUN_ENTRIES):
        return True
    return entry.is_dir() and (entry / "config.yaml").is_file()   # a method's run inside a comparison


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ZoftError(f"{path}: missing (deleted, or the run never saved weights)") from None
    except (SafetensorError, OSError) as e:
        raise ZoftError(f"{path}: unreadable, truncated or corrupt ({e})") from None


class RunDir:
    """A run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- opening: fresh, overwritten or resumed
    def entries(self) -> list[Path]:
        """What zoft wrote here (runs, comparisons, their temps); a user's other files are not listed."""
        if not self.path.is_dir():
            return []
        return sorted(e for e in self.path.iterdir() if _is_run_entry(e))

    def check_usable(self, overwrite: bool = False, resumable: bool = True) -> None:
        """Fail with one line, before any work, if a fresh run cannot start here.

        A folder that holds an earlier run is refused unless ``overwrite``: mixing two runs'
        checkpoints and metrics in one folder loses data (rotation keeps the higher step number).
        """
        if self.path.exists() and not self.path.is_dir():
            raise ZoftError(f"{self.path}: exists and is not a directory; choose another output_dir")
        if (self.path / OVERWRITE_MARKER).exists() and not overwrite:
            raise ZoftError(f"{self.path}: an earlier overwrite of this run directory was interrupted; "
                            f"start over with overwrite_output_dir=true")
        if not overwrite and any(not e.name.startswith(".") for e in self.entries()):
            resume = f"continue it with --resume {self.path}, or " if resumable else ""
            raise ZoftError(f"{self.path}: holds an earlier run; {resume}replace it with overwrite_output_dir=true "
                            f"(or choose another output_dir)")
        # Probe the folder (or the nearest one that exists) with a nameless temp file, so that a
        # read-only or unreachable place fails now, not after the model has loaded; nothing is created.
        existing = next(p for p in (self.path, *self.path.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise ZoftError(f"{self.path}: cannot create the run directory: {existing} is not a directory")
        with one_line_write_errors(self.path):
            with tempfile.TemporaryFile(dir=existing, prefix=".zoft-probe."):
                pass

    def clear(self) -> None:
        """Remove an earlier run's entries; a kill half-way leaves the marker, which refuses to resume."""
        entries = self.entries()
        if not entries:
            return
        atomic_write_text(self.path / OVERWRITE_MARKER, "an overwrite of this run directory is in progress\n")
        with one_line_write_errors(self.path):
            for entry in entries:
                if entry.name == OVERWRITE_MARKER:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            (self.path / OVERWRITE_MARKER).unlink()

    def sweep(self) -> None:
        """On resume: put back a folder a kill left half-replaced, and delete the temps of killed writes."""
        if (self.path / OVERWRITE_MARKER).exists():
            raise ZoftError(f"{self.path}: an overwrite of this run directory was interrupted, so it cannot be "
                            f"resumed; start over with overwrite_output_dir=true")
        for entry in self.entries():
            if not entry.name.startswith("."):
                continue
            if restore_half_replaced(entry):   # killed between the two renames of a replaced folder
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # -- config and results
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise ZoftError(f"{self.path}: not a zoft run directory (no config.yaml)")
        try:
            config = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ZoftError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise ZoftError(f"{path}: a run's config is a mapping of key: value, got {type(config).__name__}")
        return config

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=1))

    # -- metrics
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        # appended, not rewritten: a kill can cut the last line, which read_metrics drops
        with one_line_write_errors(self.metrics_path):
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

    def truncate_metrics(self, step: int, keep=None) -> None:
        """On resume, forget records written after the checkpoint we restart from (and those
        ``keep(record)`` rejects)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step and (keep is None or keep(r))]
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

    def save_best(self, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                  export: Callable[[Path], None] | None = None) -> None:
        save_tensors_dir(self.path / "best", {"trainable.safetensors": trainable}, state, export)

    def load_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
        """Weights, trainer state and optimizer state of ``checkpoint-N/`` or ``best/``; a missing,
        truncated or corrupt file is one line naming it."""
        opt_path = path / "optimizer.safetensors"
        trainable = _load_tensors(path / "trainable.safetensors")
        state_path = path / "trainer_state.json"
        try:
            state = json.loads(state_path.read_text())
        except FileNotFoundError:
            raise ZoftError(f"{state_path}: missing (the checkpoint is incomplete)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ZoftError(f"{state_path}: corrupt ({e})") from None
        if not isinstance(state, dict):
            raise ZoftError(f"{state_path}: corrupt (not a JSON object)")
        optimizer = _load_tensors(opt_path) if opt_path.exists() else {}
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
        try:
            with atomic_file(out) as f:
                fig.savefig(f, dpi=100, format="png")
        finally:
            plt.close(fig)
        return out
