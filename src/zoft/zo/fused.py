"""MeZO with ZO-SGD in two weight passes per step: the update fused with the next perturbation.

The plain step makes four passes over the weights (+εz, −2εz, +εz, −lr·g·z), or three when
the restore and the update are merged. Two suffice if the weights carry the next step's
perturbation between steps. With z_t = z(s_t) and ε fixed, step t is

    weights on entry:  θ_t + ε z_t                                  (pending perturbation)
    L+ = L(θ_t + ε z_t)
    pass 1:  combine_(undo=(s_t, +ε), then=(s_t, −ε))            →  θ_t − ε z_t
    L− = L(θ_t − ε z_t),    g_t = (L+ − L−) / 2ε
    pass 2:  combine_(undo=(s_t, −ε), terms=[(s_t, −lr·g_t)],
                      then=(s_{t+1}, +ε))                           →  θ_{t+1} + ε z_{t+1}

where θ_{t+1} = rnd(θ_t − lr·g_t·z_t) is rounded to the parameter dtype before ε z_{t+1} is
added, so pass 2 equals the two separate passes (update, then perturb) bit for bit. The
``undo`` terms invert the earlier rounded adds exactly where the backend can (bf16/fp16 in
both backends, fp32 too in the Triton one), so θ does not drift over the ±ε round trips.

Between steps the weights are therefore *not* θ. Anything that reads them (dev eval, a
checkpoint, the end of training) must call ``settle()`` first, which removes the pending
perturbation; the next ``step`` re-applies it with one extra pass. ``training.train_loop``
calls ``Trainable.settle`` before every eval and save, so checkpoints hold θ and resume
stays exact.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from zoft.zo.perturb import PerturbationBackend, Term


class FusedZOSGD:
    """Two-pass MeZO steps (n = 1 direction, ZO-SGD without weight decay).

    The only state is ``offset``: the perturbation currently added to the weights, as
    (seed, scale), or None when the weights are θ. ``settle()`` removes it.
    """

    def __init__(self, params: Sequence[torch.Tensor], backend: PerturbationBackend, eps: float,
                 distribution: str = "gaussian") -> None:
        self.params, self.backend, self.eps, self.distribution = list(params), backend, eps, distribution
        self.offset: Term | None = None

    def _combine(self, terms: Sequence[Term] = (), undo: Term | None = None, then: Term | None = None) -> None:
        self.backend.combine_(self.params, terms, self.distribution, undo=undo, then=then)
        self.offset = then

    @torch.no_grad()
    def step(self, loss_fn: Callable[[], float], seed: int, lr: float,
             next_seed: int | None) -> tuple[float, float, float]:
        """One MeZO step at direction ``seed``; returns ``(L+, L−, g)``.

        Leaves ``θ_{t+1} + ε z(next_seed)`` in the weights (θ_{t+1} if ``next_seed`` is None).
        A non-finite g is not applied: the weights are left settled at θ_t.
        """
        eps = self.eps
        if self.offset != (seed, eps):            # first step, or after a settle
            self.settle()
            self._combine(then=(seed, +eps))
        loss_plus = float(loss_fn())                                        # at θ + εz
        self._combine(undo=(seed, +eps), then=(seed, -eps))                 # θ + εz → θ − εz
        loss_minus = float(loss_fn())
        g = (loss_plus - loss_minus) / (2 * eps)
        if not math.isfinite(g):
            self.settle()
            return loss_plus, loss_minus, g
        then = (next_seed, +eps) if next_seed is not None else None
        self._combine(terms=[(seed, -lr * g)], undo=(seed, -eps), then=then)   # → θ' (+ εz')
        return loss_plus, loss_minus, g

    @torch.no_grad()
    def settle(self) -> None:
        """Remove the pending perturbation, so that the weights are θ (exactly where the
        backend's undo is exact)."""
        if self.offset is not None:
            self._combine(undo=self.offset)
