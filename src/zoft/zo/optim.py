"""ZO-SGD: apply an estimate without ever materialising the gradient.

With n directions the update is

    θ ← θ − lr · (1/n) Σᵢ gᵢ zᵢ − lr · λ · θ   (λ only on weights with ≥ 2 dims)

and each zᵢ is regenerated from its seed, one backend pass per direction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from zoft.zo.estimator import Estimate
from zoft.zo.perturb import PerturbationBackend


def decay_mask(params: Sequence[torch.Tensor]) -> list[bool]:
    """Weight decay applies to matrices only, not to biases and norm gains (as in nanoGPT)."""
    return [p.dim() >= 2 for p in params]


@dataclass
class ZOSGD:
    """Plain MeZO update (ZO-SGD) with decoupled weight decay that skips biases and norms."""

    weight_decay: float = 0.0

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], estimate: Estimate, lr: float,
               backend: PerturbationBackend, distribution: str) -> None:
        if self.weight_decay:
            for p, decays in zip(params, decay_mask(params)):
                if decays:
                    p.mul_(1 - lr * self.weight_decay)
        n = len(estimate.directions)
        for seed, projected_grad in estimate.directions:
            backend.add_noise_(params, seed, -lr * projected_grad / n, distribution)


OPTIMIZERS = {"zo-sgd": ZOSGD}
