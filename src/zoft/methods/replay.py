"""MeZO trajectories in a run: record them, resume from them, and rebuild weights (``zoft replay``).

The format and the replay loop are in :mod:`zoft.zo.trajectory`; this module ties them to a
run: which base model and config a trajectory names, when it is written (at each checkpoint,
before the weights), and how ``--resume`` and ``zoft replay BASE TRAJECTORY`` rebuild θ.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from zoft.atomic import atomic_dir
from zoft.errors import ZoftError
from zoft.training import TrainState
from zoft.zo.estimator import Estimate
from zoft.zo.trajectory import (FILENAME, FORMAT, VERSION, FusedSchedule, Trajectory, check_base, replay,
                                tensors_sha)

log = logging.getLogger(__name__)


def _init_sha(mode: str, named: dict[str, torch.Tensor]) -> str | None:
    """Hash of the adapter init (LoRA/prefix start from seeded random tensors); full mode starts
    from the base weights, which the base identity already names, so it skips the cost."""
    return None if mode == "full" else tensors_sha(named)


class TrajectoryRecorder:
    """Keeps a MeZO run's trajectory: one record per step, saved at each checkpoint."""

    def __init__(self, setup, run_dir, named: dict[str, torch.Tensor], estimator, optimizer, par=None,
                 params: list[torch.Tensor] | None = None, fused=None):
        cfg = setup.cfg
        self.fused = fused_schedule(cfg, fused)
        self.run_dir, self.named, self.estimator, self.optimizer = run_dir, named, estimator, optimizer
        self.params = params if params is not None else list(named.values())   # what the passes see (flat?)
        self.trajectory: Trajectory | None = Trajectory({
            "format": FORMAT, "version": VERSION,
            "base": {"name": setup.loaded.name, "identity": setup.loaded.identity},
            "init_sha": _init_sha(cfg.mode, named),
            "config": cfg.to_dict(),
            "backend": estimator.backend.name,              # "auto" resolved: replay must use the same z
            "device_type": next(iter(named.values())).device.type,
            "torch": torch.__version__,
            "n_probed": cfg.n_directions,                   # seeds per step this process probed itself
            "parallel": cfg.parallel, "world_size": par.world if par else 1,
            "fused": fused is not None,                     # 2-pass steps: replay runs the same passes
        })

    @property
    def path(self) -> Path:
        return self.run_dir.path / FILENAME

    def record(self, estimate: Estimate, lr: float, losses: list[float]) -> None:
        if self.trajectory is not None:
            self.trajectory.append([s for s, _ in estimate.directions], [g for _, g in estimate.directions],
                                   lr, losses)

    def save(self, step: int, state: dict) -> None:
        if self.trajectory is not None:
            assert self.trajectory.steps == step, "one record per step"
            self.trajectory.save(self.path, state)

    def resume(self, state: TrainState | None) -> TrainState | None:
        """Continue the trajectory from a weight checkpoint, or rebuild θ by replay when there is none."""
        saved = Trajectory.load(self.path) if self.path.is_file() else None
        if state is not None:   # weights came from checkpoint-N: keep the first N records
            if saved is None or saved.steps < state.step:
                log.warning("%s covers %s of the %d steps done; not continuing it", self.path,
                            saved.steps if saved else "none", state.step)
                self.trajectory = None
            else:
                self.trajectory.records = saved.records[:state.step]
            return state
        if saved is None or saved.steps == 0:
            return None   # nothing to resume from: start over
        loaded = self.trajectory.header
        check_base(saved.header, loaded["base"]["identity"], loaded["init_sha"], where=str(self.path))
        with tqdm(total=saved.steps, desc="replay", disable=not saved.header["config"].get("progress")) as bar:
            replay(self.params, saved, self.estimator, self.optimizer, progress=lambda t: bar.update(1),
                   fused=self.fused)
        self.trajectory.records = saved.records
        return TrainState(**saved.header["state"])


def fused_schedule(cfg, fused) -> FusedSchedule | None:
    """The pass schedule of a fused-step run (None when the run did not use the fused step)."""
    if fused is None:
        return None
    from zoft.methods.mezo import fused_next_seed, settles_after
    return FusedSchedule(fused, lambda t: fused_next_seed(cfg, t), lambda done: settles_after(cfg, done))


def rebuild(base: str, trajectory_path: str | Path, output: str | Path, device: str | None = None,
            progress: bool = True, trust_remote_code: bool = False) -> Path:
    """``zoft replay``: the fine-tuned weights of a MeZO run from its base model and trajectory.

    Writes ``output/trainable.safetensors`` (the trained tensors by name, as in a checkpoint)
    and the model in Hugging Face format (full: ``save_pretrained`` + tokenizer; LoRA/prefix: the
    peft adapter), atomically. ``trust_remote_code`` is the caller's alone: the trajectory's
    recorded config cannot turn it on.
    """
    from zoft.adapters import named_trainable
    from zoft.config import load_config
    from zoft.methods.common import Setup
    from zoft.methods.mezo import fused_stepper, trained_params, zo_components
    from zoft.models import load_model

    traj = Trajectory.load(trajectory_path)
    header = traj.header
    overrides = {"backend": header["backend"], "parallel": "none", "trust_remote_code": trust_remote_code} \
        | ({"device": device} if device else {})
    cfg = load_config(overrides={**header["config"], **overrides})
    loaded = load_model(base, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    model = Setup(cfg, None, None, loaded).with_mode()
    named = named_trainable(model)
    check_base(header, loaded.identity, _init_sha(cfg.mode, named), where=str(trajectory_path))
    if torch.device(cfg.device).type != header["device_type"]:
        log.warning("replaying a %s trajectory on %s: close to the trained weights, not bit-identical",
                    header["device_type"], cfg.device)
    estimator, optimizer = zo_components(cfg)
    params = trained_params(cfg, named)
    # the header says how the run stepped (a data-parallel run, say, did not fuse)
    fused = fused_stepper(cfg, params, estimator) if header.get("fused") else None
    if header.get("fused") and fused is None:
        raise ZoftError(f"{trajectory_path}: recorded with the fused 2-pass step, which backend "
                        f"'{estimator.backend.name}' cannot replay")
    with tqdm(total=traj.steps, desc="replay", disable=not progress) as bar:
        replay(params, traj, estimator, optimizer, progress=lambda t: bar.update(1), fused=fused_schedule(cfg, fused))

    output = Path(output)
    with atomic_dir(output) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(tmp / "trainable.safetensors"),
                  metadata={"steps": str(traj.steps), "base": header["base"]["identity"]})
        model.save_pretrained(str(tmp), safe_serialization=True)
        if cfg.mode == "full" and loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
    return output
