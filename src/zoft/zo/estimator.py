"""Zeroth-order gradient estimators (SPSA and n-SPSA), the heart of MeZO.

For a direction z ~ N(0, I) (or Rademacher) and a small ε, SPSA estimates the
directional derivative of the loss L at θ:

    g = (L(θ + εz) − L(θ − εz)) / 2ε  ≈  zᵀ∇L(θ),

and the gradient estimate is g·z. n-SPSA averages n such estimates. Only the scalar
``g`` and the seed of z are kept: the step is a list of (seed, projected_grad) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from zoft.zo.perturb import PerturbationBackend, TorchBackend

LossFn = Callable[[], float]


@dataclass
class Estimate:
    """Outcome of one estimator call: the mean of L+ and L−, and one (seed, g) per direction."""

    loss: float
    directions: list[tuple[int, float]] = field(default_factory=list)


@torch.no_grad()
def spsa(params: Sequence[torch.Tensor], loss_fn: LossFn, seed: int, eps: float,
         backend: PerturbationBackend, distribution: str = "gaussian") -> tuple[float, float]:
    """One two-sided SPSA probe, in place. Returns ``(L(θ+εz), L(θ−εz))``.

    The parameters are back at θ afterwards: exactly in bf16/fp16 (the backend inverts its own
    rounding, see ``undo``), within a few ulp per step in fp32.
    """
    backend.add_noise_(params, seed, +eps, distribution)              # θ + εz
    loss_plus = float(loss_fn())
    backend.add_noise_(params, seed, -eps, distribution, undo=+eps)   # θ − εz
    loss_minus = float(loss_fn())
    backend.add_noise_(params, seed, 0.0, distribution, undo=-eps)    # back to θ
    return loss_plus, loss_minus


@dataclass
class SPSA:
    """n-SPSA: ``n_directions`` probes at the same θ, each with its own seed.

    Args:
        eps: perturbation scale ε (MeZO default 1e-3).
        n_directions: number of directions n averaged per step (MeZO's n-SPSA).
        distribution: "gaussian" (MeZO) or "rademacher".
        backend: the perturbation backend.
    """

    eps: float = 1e-3
    n_directions: int = 1
    distribution: str = "gaussian"
    backend: PerturbationBackend = field(default_factory=TorchBackend)

    def estimate(self, params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int]) -> Estimate:
        assert len(seeds) == self.n_directions, "one seed per direction"
        losses, directions = [], []
        for seed in seeds:
            loss_plus, loss_minus = spsa(params, loss_fn, seed, self.eps, self.backend, self.distribution)
            losses += [loss_plus, loss_minus]
            directions.append((seed, (loss_plus - loss_minus) / (2 * self.eps)))
        return Estimate(loss=sum(losses) / len(losses), directions=directions)


ESTIMATORS = {"spsa": SPSA}
