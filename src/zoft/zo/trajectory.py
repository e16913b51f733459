"""Trajectory checkpoints: a whole MeZO run as the base model's identity plus a few numbers per step.

A MeZO step changes θ only through seeded directions and scalars, so the run

    θ_T = step_{T-1}( ... step_1(step_0(θ_0)) ... ),   step_t = stepper.step(seeds_t, losses_t, lr_t)

is fully described by θ_0 (the base model, named by a content hash, plus the adapter init for
LoRA/prefix) and, per step, the direction seeds, the projected grads g, the learning rate, the
tape of objective values the estimator saw and whether the weights were settled after it.
Replay (:func:`replay_through`) feeds that tape back through the same stepper that training ran
(:mod:`zoft.zo.step`), so it redoes exactly the same passes without any forward pass, and the
rebuilt weights are bit-identical on the same device type.

File format (``trajectory.safetensors``): a safetensors file, no pickle. Tensors:

    seeds   int64   [S, n]   direction seeds applied at each step (n = directions per step)
    grads   float64 [S, n]   projected grads g, in the same order
    lr      float64 [S]      learning rate of each step
    losses  f32|f64 [L]      the objective values, in call order (float32 when that is lossless)
    loss_counts int16 [S]    values per step; only stored when steps differ
    settled bool    [S]      whether the weights were settled after the step (version 2 on)

and one metadata entry ``zoft_trajectory``: JSON with the format version, the base model's
identity, the init hash, the run config (ε, distribution, backend, mode, optimizer settings...),
the device type and the trainer state. 20k steps of single-direction MeZO take about 640 KB.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from zoft.atomic import atomic_write_bytes
from zoft.errors import ZoftError
from zoft.zo.estimator import MASK_RULE, Estimate, Objective
from zoft.zo.step import PlainStep, StepRecord, Stepper

# version 2 records each step's settle; version 1 files settled where the training loop did then
FORMAT, VERSION = "zoft-trajectory", 2
FILENAME = "trajectory.safetensors"
# what LOZO and Sparse MeZO runs recorded as their backend until 2026-11-29: their wrappers' names,
# not the backend that drew z (that was the config's, "auto" resolved as it is today)
WRAPPER_NAMES = ("lowrank", "sparse")
log = logging.getLogger(__name__)


class TrajectoryMismatch(ZoftError):
    """The base model or set-up does not match the one the trajectory was recorded from."""


@dataclass
class Trajectory:
    """A run's header (identity, config) and its step records.

    ``header["n_probed"]``: how many of each step's seeds the writing process probed itself
    (all of them, except in direction-parallel mode where rank 0 probes its own share).
    """

    header: dict[str, Any]
    records: list[StepRecord] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.records)

    def append(self, seeds: Sequence[int], grads: Sequence[float], lr: float, losses: Sequence[float]) -> None:
        self.records.append(StepRecord([int(s) for s in seeds], [float(g) for g in grads], float(lr),
                                       [float(v) for v in losses]))

    # -- storage
    def to_bytes(self, state: Mapping[str, Any] | None = None) -> bytes:
        if state is not None:
            self.header["state"] = dict(state)
        self.header.update(format=FORMAT, version=VERSION, steps=self.steps)
        n = len(self.records[0].seeds) if self.records else 0
        if any(len(r.seeds) != n for r in self.records):
            raise ZoftError("trajectory: every step must apply the same number of directions")
        flat = np.array([v for r in self.records for v in r.losses], dtype=np.float64)
        lossless32 = np.array_equal(flat.astype(np.float32).astype(np.float64), flat)
        tensors = {
            "seeds": torch.tensor([r.seeds for r in self.records], dtype=torch.int64).reshape(self.steps, n),
            "grads": torch.tensor([r.grads for r in self.records], dtype=torch.float64).reshape(self.steps, n),
            "lr": torch.tensor([r.lr for r in self.records], dtype=torch.float64),
            # model losses are float32 values already: storing them as float32 loses nothing
            "losses": torch.from_numpy(flat.astype(np.float32) if lossless32 else flat),
            "settled": torch.tensor([r.settled for r in self.records], dtype=torch.bool),
        }
        counts = [len(r.losses) for r in self.records]
        if len(set(counts)) > 1:
            tensors["loss_counts"] = torch.tensor(counts, dtype=torch.int16)
        else:
            self.header["losses_per_step"] = counts[0] if counts else 0
        return save_bytes(tensors, metadata={FORMAT: json.dumps(self.header, sort_keys=True)})

    def save(self, path: str | Path, state: Mapping[str, Any] | None = None) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename): a kill never leaves half a file."""
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes(state))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise ZoftError(f"{path}: trajectory not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:   # safetensors raises its own error types for a bad header
            raise ZoftError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
        if FORMAT not in meta:
            raise ZoftError(f"{path}: not a zoft trajectory (no '{FORMAT}' metadata)")
        header = json.loads(meta[FORMAT])
        if header.get("version") not in (1, VERSION):
            raise ZoftError(f"{path}: trajectory format version {header.get('version')}; this zoft reads {VERSION}")
        seeds, grads, lrs = tensors["seeds"].tolist(), tensors["grads"].tolist(), tensors["lr"].tolist()
        losses = tensors["losses"].double().tolist()
        counts = (tensors["loss_counts"].tolist() if "loss_counts" in tensors
                  else [header.get("losses_per_step", 0)] * len(lrs))
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        settled = (tensors["settled"].tolist() if "settled" in tensors
                   else [_settled_in_version_1(header.get("config") or {}, t + 1) for t in range(len(lrs))])
        records = [StepRecord(seeds[i], grads[i], lrs[i], losses[starts[i]:starts[i + 1]], settled[i])
                   for i in range(len(lrs))]
        return cls(header, records)


def _settled_in_version_1(config: Mapping[str, Any], done: int) -> bool:
    """Where the training loop of format version 1 settled (eval, checkpoint, last step), which those
    files did not record. Frozen here: later versions record every settle with the step."""
    if "eval_every" not in config:
        return False
    save_every = config.get("save_every") or config["eval_every"]
    return done % config["eval_every"] == 0 or done % save_every == 0 or done == config["steps"]


def init_sha(mode: str, named: Mapping[str, torch.Tensor]) -> str | None:
    """sha256 of the adapter init (names, dtypes, shapes, bytes): LoRA/prefix start from seeded random
    tensors that replay must match. Full mode starts from the base weights, which the base identity
    already names, so it skips the cost."""
    if mode == "full":
        return None
    h = hashlib.sha256()
    for name, t in named.items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_base(header: Mapping[str, Any], identity: str, init_sha: str | None, where: str = "trajectory") -> None:
    """Refuse to replay onto a different base model (or adapter init), in one line."""
    want = header["base"]["identity"]
    if identity.rsplit("@", 1)[-1] != want.rsplit("@", 1)[-1]:   # the hash decides; names may be paths
        raise TrajectoryMismatch(f"{where}: base model mismatch: it was recorded from {want}, "
                                 f"but the given base is {identity}")
    if header.get("init_sha") and init_sha != header["init_sha"]:
        raise TrajectoryMismatch(f"{where}: the initial trainable weights ({header['config'].get('mode')} init) "
                                 f"hash to {init_sha}, the run started from {header['init_sha']}")


def mask_rule(header: Mapping[str, Any]) -> str | None:
    """The mask rule a run of this header draws by today: Sparse MeZO's, else none."""
    return MASK_RULE if (header.get("config") or {}).get("estimator") == "smezo" else None


def check_mask_rule(header: Mapping[str, Any], where: str = "trajectory") -> None:
    """Refuse, in one line, a Sparse MeZO trajectory whose masks came from another rule than this
    zoft's: its recorded g and losses would replay without complaint onto other weights."""
    if header.get("smezo_mask") != mask_rule(header):
        recorded = header.get("smezo_mask") or "the exact quantile of before 2026-11-29"
        raise TrajectoryMismatch(f"{where}: Sparse MeZO drew this run's masks by {recorded!r}; this zoft draws "
                                 f"them by {MASK_RULE!r}, so replay would not rebuild its weights")


def replay_through(stepper: Stepper, trajectory: Trajectory, steps: int | None = None, progress=None) -> None:
    """Re-apply the first ``steps`` records through ``stepper``, which must be built as training's was.

    Each step's objective reads the recorded tape, so the stepper redoes the very passes training
    ran, settling wherever training settled; the weights end settled. The recomputed g must equal
    the recorded one to the bit; otherwise the estimator code has changed since the trajectory was
    written, and replay stops rather than build other weights.
    """
    n_probed = trajectory.header.get("n_probed")   # direction-parallel: the writer probed only its share
    for t, record in enumerate(trajectory.records[:steps]):
        tape = _Tape(record.losses, t)
        applied = Estimate(loss=0.0, directions=list(zip(record.seeds, record.grads)))

        def exchange(local: Estimate, t=t, applied=applied) -> Estimate:
            if local.directions != applied.directions[:len(local.directions)]:
                raise ZoftError(f"replay: step {t} recomputes (seed, g) = {local.directions[0]}, the run recorded "
                                f"{applied.directions[0]}: the estimator differs from the one that trained")
            return applied

        stepper.step(t, Objective(tape), record.seeds[:n_probed], record.lr, exchange=exchange)
        tape.check_used()
        if record.settled:
            stepper.settle()
        if progress is not None:
            progress(t + 1)
    stepper.settle()


def replay(params: Sequence[torch.Tensor], trajectory: Trajectory, estimator, optimizer,
           steps: int | None = None, progress=None) -> None:
    """:func:`replay_through` the plain step (estimator, then optimizer) over ``params``, in place."""
    replay_through(PlainStep(params, estimator, optimizer), trajectory, steps, progress)


class TrajectoryRecorder:
    """A run's trajectory as it trains: ``header`` (base identity, init hash, config...) and each
    step's record, written at every checkpoint, before the weights; ``--resume`` reads it."""

    def __init__(self, path: str | Path, header: dict[str, Any], stepper: Stepper):
        self.path, self.stepper = Path(path), stepper
        self.trajectory: Trajectory | None = Trajectory({
            **header, "format": FORMAT, "version": VERSION, "torch": torch.__version__,
            "fused": stepper.fused,   # 2-pass steps: replay runs the same passes
            **({"smezo_mask": mask_rule(header)} if mask_rule(header) else {})})

    def append(self, record: StepRecord) -> None:
        if self.trajectory is not None:
            self.trajectory.records.append(record)   # the stepper marks it if the weights settle after it

    def save(self, step: int, state: dict) -> None:
        if self.trajectory is not None:
            assert self.trajectory.steps == step, "one record per step"
            self.trajectory.save(self.path, state)

    def resume(self, state):
        """Continue from a weight checkpoint's ``state``, or rebuild θ by replay and return the saved state."""
        saved = Trajectory.load(self.path) if self.path.is_file() else None
        recorded, ours_backend = (saved.header.get("backend") if saved else None), self.trajectory.header["backend"]
        if recorded in WRAPPER_NAMES:   # recorded before runs named the backend under LOZO's / Sparse MeZO's
            recorded = None
        if recorded is not None and recorded != ours_backend:   # z would change under the run's feet
            raise ZoftError(f"{self.path}: the run drew its directions with backend '{recorded}', this resume "
                            f"would use '{ours_backend}'; resume with backend={recorded}")
        if state is not None:   # weights came from checkpoint-N: keep the first N records
            if saved is None or saved.steps < state.step:
                log.warning("%s covers %s of the %d steps done; not continuing it", self.path,
                            saved.steps if saved else "none", state.step)
                self.trajectory = None
            elif saved.header.get("smezo_mask") != self.trajectory.header.get("smezo_mask"):
                # the weights resume fine; a trajectory mixing two mask rules would replay wrong
                log.warning("%s drew Sparse MeZO's masks by another rule than this zoft; not continuing it",
                            self.path)
                self.trajectory = None
            else:
                self.trajectory.records = saved.records[:state.step]
            return state
        if saved is None or saved.steps == 0:
            return None   # nothing to resume from: start over
        ours = self.trajectory.header
        check_base(saved.header, ours["base"]["identity"], ours["init_sha"], where=str(self.path))
        check_mask_rule(saved.header, where=str(self.path))
        with tqdm(total=saved.steps, desc="replay", disable=not saved.header["config"].get("progress")) as bar:
            replay_through(self.stepper, saved, progress=lambda t: bar.update(1))
        self.trajectory.records = saved.records
        return saved.header["state"]


class _Tape:
    """A loss function that returns one step's recorded objective values, in order."""

    def __init__(self, values: Sequence[float], step: int):
        self.values, self.step, self.used = values, step, 0

    def __call__(self) -> float:
        if self.used == len(self.values):
            raise ZoftError(f"replay: step {self.step} asks for more losses than the run recorded "
                            f"({len(self.values)}): the estimator differs from the one that trained")
        self.used += 1
        return self.values[self.used - 1]

    def check_used(self) -> None:
        if self.used != len(self.values):
            raise ZoftError(f"replay: step {self.step} used {self.used} of {len(self.values)} recorded losses: "
                            "the estimator differs from the one that trained")
