"""Data- and direction-parallel MeZO over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Start with torchrun, e.g. ``torchrun --nproc_per_node=2 -m zoft train ... parallel=data``.
No gradient and no parameter is ever sent; each rank keeps a full copy of θ.

* ``parallel=data``: every rank draws the same seeds and computes L+ and L− on its shard of the
  step's batch. The loss of the concatenated batch is the shard-size-weighted mean

      L = Σ_r (|B_r| / |B|) · L_r,

  exchanged as one float per rank per forward pass (2 per step). The ranks all-gather those
  floats and sum them in rank order, so every rank gets bitwise the same L± (an all_reduce does
  not promise one reduction order), hence the same g and the same θ.
* ``parallel=direction``: rank r probes its own seeds (direction indices r·n .. r·n+n−1) on the
  full batch; the ranks all-gather their (seed, g) pairs and every rank applies all of them in
  rank order, which is n-SPSA with world·n directions at the cost of one.

A dead or stuck rank makes the others fail within ``dist_timeout`` seconds with a one-line
:class:`DistError` (gloo reports a closed connection at once; NCCL when the timeout fires).
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from zoft.errors import ZoftError
from zoft.runs import RunDir
from zoft.zo.estimator import Estimate, LossFn
from zoft.zo.schedule import direction_seed


class DistError(ZoftError):
    """Another rank died, hung, or runs a different configuration."""


def shard(idx: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a batch; part sizes differ by at most one."""
    n = len(idx)
    return list(idx[rank * n // world:(rank + 1) * n // world])


@dataclass
class Parallel:
    """This process's place in a parallel MeZO run."""

    mode: str            # "data" or "direction"
    rank: int
    world: int
    device: torch.device  # where collectives' tensors live (cuda for NCCL)

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes the run directory."""
        return self.rank == 0

    def seeds(self, seed: int, step: int, n: int) -> list[int]:
        """The directions this rank probes at ``step``."""
        first = self.rank * n if self.mode == "direction" else 0
        return [direction_seed(seed, step, first + k) for k in range(n)]

    def loss_fn(self, objective: Callable[[list[int]], float], idx: list[int], step: int) -> LossFn:
        """The objective on the step's batch: sharded and gathered (data), or local (direction)."""
        if self.mode == "direction":
            return lambda: objective(idx)
        part, weight = shard(idx, self.rank, self.world), len(shard(idx, self.rank, self.world)) / len(idx)

        def gathered_loss() -> float:
            local = float(objective(part)) * weight if part else 0.0
            return float(sum(self.all_gather([local], step)[:, 0].tolist()))   # rank order: same sum everywhere
        return gathered_loss

    def exchange(self, step: int) -> Callable[[Estimate], Estimate] | None:
        """Direction-parallel: every rank's (seed, g) pairs, in rank order (None in data mode)."""
        if self.mode != "direction":
            return None

        def gather_directions(local: Estimate) -> Estimate:
            # seeds need all 64 bits: send (seed, loss, g) as int64, the floats by their bit pattern
            floats = torch.tensor([[local.loss, g] for _, g in local.directions], dtype=torch.float64)
            rows = torch.cat([torch.tensor([[s] for s, _ in local.directions], dtype=torch.int64),
                              floats.view(torch.int64)], dim=1)
            table = self.all_gather(rows, step).reshape(-1, 3)
            seeds, values = table[:, 0].tolist(), table[:, 1:].contiguous().view(torch.float64)
            losses = values[:, 0].reshape(self.world, -1)[:, 0].tolist()
            return Estimate(loss=sum(losses) / len(losses), directions=list(zip(seeds, values[:, 1].tolist())))
        return gather_directions

    def all_gather(self, values, step: int | None = None) -> torch.Tensor:
        """``[world, ...]`` stack of every rank's ``values``, or a one-line DistError if a rank is gone."""
        local = (values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64)).to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world)]
        try:
            dist.all_gather(out, local)
        except RuntimeError as e:   # DistBackendError, gloo "Connection closed by peer", timeouts
            where = f" at step {step}" if step is not None else ""
            reason = " ".join(str(e).split())[:160]
            raise DistError(f"rank {self.rank}: lost the other ranks{where} (one died or hung; "
                            f"see its log): {reason}") from None
        return torch.stack(out).cpu()

    def check_same_config(self, config: dict) -> None:
        """Refuse to start if the ranks were given different options (a silent divergence otherwise)."""
        text = json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)
        mine = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
        hashes = self.all_gather(torch.tensor([mine]))[:, 0].tolist()
        if len(set(hashes)) > 1:
            raise DistError(f"rank {self.rank}: the ranks were started with different configs")

    def broadcast_text(self, text: str) -> str:
        """Rank 0's string on every rank (e.g. the run directory, whose name holds a timestamp)."""
        data = torch.zeros(4096, dtype=torch.int64)
        raw = text.encode()[:4096]
        data[:len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
        row = self.all_gather(data)[0]
        return bytes(v for v in row.tolist() if v).decode()


def from_config(cfg) -> Parallel | None:
    """The run's :class:`Parallel` (joining the process group on first use), or None if not parallel."""
    if cfg.parallel == "none":
        return None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ZoftError(f"parallel={cfg.parallel} runs under torchrun, e.g. "
                        f"torchrun --nproc_per_node=2 -m zoft train ... parallel={cfg.parallel}")
    cuda = str(cfg.device).startswith("cuda")
    if cuda:   # one GPU per rank: "cuda" then means this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    try:
        if not dist.is_initialized():   # once per process: later runs in it reuse the group
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
            atexit.register(shutdown)
            if not cuda:
                dist.monitored_barrier(timeout=timeout)   # names a rank that never arrived
    except RuntimeError as e:
        raise DistError(f"could not join the process group: {' '.join(str(e).split())[:200]}") from None
    par = Parallel(cfg.parallel, dist.get_rank(), dist.get_world_size(),
                   torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    par.check_same_config(cfg.to_dict())
    return par


def shutdown() -> None:
    """Leave the process group (at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class ReadOnlyRunDir(RunDir):
    """Rank > 0's view of the run directory: it reads rank 0's checkpoints (resume) and writes nothing."""

    def write_config(self, config) -> None: ...
    def write_json(self, name, obj) -> None: ...
    def log(self, record) -> None: ...
    def truncate_metrics(self, step) -> None: ...
    def save_checkpoint(self, step, trainable, state, optimizer=None, keep=1): return None
    def save_best(self, trainable, state, export=None) -> None: ...
    def plot(self, metric_name="dev"): return None
