"""One MeZO step: the two steppers, the only code that picks the sequence of passes over θ.

    PlainStep (zo_step):  per seed s: θ+εz_s, L+ = f(), θ−εz_s, L− = f(), back to θ;  g_s = (L+ − L−)/2ε;
                          exchange (direction-parallel); check (NaN guard); the optimizer's update passes
    FusedStep (fused.py): one direction, ZO-SGD, 2 passes: the update fused with the next step's +εz,
                          which stays in the weights until ``settle()``

Training, resume, replay and the distributed modes all step through a stepper that
:func:`zoft.zo.build.build_stepper` built, because in fp32 the ±ε round trip is not exact to
the bit: replay rebuilds the trained weights only by redoing *exactly* the same passes, with the
losses read from a tape. Each step returns its :class:`StepRecord`, all a trajectory keeps of
it; ``settle()`` marks that record, so replay settles where training did without re-deriving when.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from zoft.errors import ZoftError
from zoft.zo.estimator import Estimate, LossFn, Objective
from zoft.zo.fused import FusedZOSGD

Exchange = Callable[[Estimate], Estimate]   # the local estimate -> the one applied
Check = Callable[[int, Estimate], None]     # (step, estimate before any update): raise to stop


@dataclass
class StepRecord:
    """One step: the applied (seed, g) pairs, the lr, the objective values in call order, and
    whether the weights were settled after it (a fused step's pending +εz removed)."""

    seeds: list[int]
    grads: list[float]
    lr: float
    losses: list[float]
    settled: bool = False
    estimate: Estimate | None = field(default=None, compare=False, repr=False)   # for the logs; not stored


class Stepper(Protocol):
    fused: bool   # the trajectory header records it: replay must take the same kind of step

    def step(self, step: int, objective: LossFn, seeds: Sequence[int], lr: float,
             exchange: Exchange | None = None) -> StepRecord: ...

    def settle(self) -> None:
        """Leave θ in the weights (before an eval or a checkpoint reads them)."""


@torch.no_grad()
def zo_step(params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int], lr: float,
            estimator, optimizer, *, step: int = 0, exchange: Exchange | None = None,
            check: Callable[[Estimate], None] | None = None) -> Estimate:
    """Probe ``seeds`` with ``estimator`` and apply the update with ``optimizer``, in place.

    ``params`` is in a fixed order (tensor index i seeds z's i-th block); ``loss_fn`` is called
    in the order the estimator probes, and again by optimizers that compare points (conservative);
    ``step`` lets LOZO resample its low-rank factor; ``check`` raising leaves θ as it was.
    Returns the estimate that was applied.
    """
    estimate = estimator.estimate(params, loss_fn, seeds, step=step)   # ±εz probes, θ restored
    if exchange is not None:
        estimate = exchange(estimate)                               # all ranks' (seed, g) pairs
    if check is not None:
        check(estimate)                                             # NaN guard: nothing applied yet
    optimizer.update(params, estimate, lr, estimator.backend, estimator.distribution, loss_fn=loss_fn)
    return estimate


def taped(objective: LossFn, tape: list[float]) -> Objective:
    """``objective``, also writing each value it returns to ``tape``: all replay needs of the forwards."""
    def loss() -> float:
        tape.append(float(objective()))
        return tape[-1]

    def pair() -> tuple[float, float]:   # L+ and L− of one dual forward, taped in probe order
        tape.extend(float(v) for v in objective.pair())
        return tape[-2], tape[-1]
    return Objective(loss, pair if getattr(objective, "pair", None) else None)


class _Recorded:
    """What both steppers share: the record of the last step, marked when the weights settle."""

    last: StepRecord | None = None

    def _record(self, estimate: Estimate, lr: float, tape: list[float]) -> StepRecord:
        self.last = StepRecord([s for s, _ in estimate.directions], [g for _, g in estimate.directions],
                               lr, tape, estimate=estimate)
        return self.last

    def settle(self) -> None:
        if self.last is not None:   # a recorded trajectory holds this very record
            self.last.settled = True


class PlainStep(_Recorded):
    """Any estimator and optimizer: the probes restore θ, then the optimizer's update passes."""

    fused = False

    def __init__(self, params: Sequence[torch.Tensor], estimator, optimizer, check: Check | None = None):
        self.params, self.estimator, self.optimizer, self.check = list(params), estimator, optimizer, check

    def step(self, step, objective, seeds, lr, exchange=None) -> StepRecord:
        tape: list[float] = []
        check = self.check and functools.partial(self.check, step)
        estimate = zo_step(self.params, taped(objective, tape), seeds, lr, self.estimator, self.optimizer,
                           step=step, exchange=exchange, check=check)
        return self._record(estimate, lr, tape)


class FusedStep(_Recorded):
    """Plain MeZO (one two-sided direction, ZO-SGD) in two weight passes: see :mod:`zoft.zo.fused`."""

    fused = True

    def __init__(self, sgd: FusedZOSGD, next_seed: Callable[[int], int | None], check: Check | None = None):
        self.sgd, self.next_seed, self.check = sgd, next_seed, check   # next_seed: the +εz left after a step

    def step(self, step, objective, seeds, lr, exchange=None) -> StepRecord:
        tape: list[float] = []
        loss_plus, loss_minus, g = self.sgd.step(taped(objective, tape), seeds[0], lr, self.next_seed(step))
        estimate = Estimate(loss=(loss_plus + loss_minus) / 2, directions=[(seeds[0], g)], forwards=2)
        if exchange is not None and exchange(estimate).directions != estimate.directions:   # replay checks g here
            raise ZoftError("the fused step applies only its own direction; it cannot exchange directions")
        if self.check is not None:
            self.check(step, estimate)   # the step is done, but FusedZOSGD applies no non-finite g
        return self._record(estimate, lr, tape)

    def settle(self) -> None:
        self.sgd.settle()
        super().settle()
