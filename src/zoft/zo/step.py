"""One MeZO step as one function: the only place that decides the sequence of passes over θ.

Training, trajectory replay and the distributed modes all call :func:`zo_step`, so they cannot
drift apart. That matters because in fp32 the ±ε round trip is not exact to the bit (θ + εz − εz
rounds): replay reproduces the trained weights bit for bit only by redoing *exactly* the same
passes (+εz, −εz, restore, update) in the same order, with the losses read from a tape instead of
computed by forward passes.

    probes:   for each seed s:  θ ← θ + εz_s;  L+ = f();  θ ← θ − 2εz_s;  L− = f();  θ ← θ + εz_s
              g_s = (L+ − L−) / 2ε
    exchange: (optional) replace the local (s, g_s) list by every rank's (direction-parallel)
    check:    raise here to stop with θ unchanged (NaN guard)
    update:   the optimizer's passes, e.g. θ ← θ − lr · (1/n) Σ g_s z_s
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from zoft.zo.estimator import Estimate, LossFn


@torch.no_grad()
def zo_step(params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int], lr: float,
            estimator, optimizer, *, step: int = 0, exchange: Callable[[Estimate], Estimate] | None = None,
            check: Callable[[Estimate], None] | None = None) -> Estimate:
    """Probe ``seeds`` with ``estimator`` and apply the update with ``optimizer``, in place.

    Args:
        params: the trained tensors, in a fixed order (tensor index i seeds z's i-th block).
        loss_fn: the objective on this step's batch; called in the order the estimator probes.
        seeds: the directions this process probes.
        lr: this step's learning rate.
        estimator: has ``estimate(params, loss_fn, seeds, step) -> Estimate``, ``backend``, ``distribution``.
        optimizer: has ``update(params, estimate, lr, backend, distribution, loss_fn)``; some call
            ``loss_fn`` again (conservative), which the tape records like the probes.
        step: the step index (LOZO resamples its low-rank factor from it).
        exchange: maps the local estimate to the one applied (direction-parallel gathers every rank's).
        check: called after the probes, before any update; an exception leaves θ as it was.

    Returns:
        The estimate that was applied.
    """
    estimate = estimator.estimate(params, loss_fn, seeds, step=step)   # ±εz probes, θ restored
    if exchange is not None:
        estimate = exchange(estimate)                               # all ranks' (seed, g) pairs
    if check is not None:
        check(estimate)                                             # NaN guard: nothing applied yet
    optimizer.update(params, estimate, lr, estimator.backend, estimator.distribution, loss_fn=loss_fn)
    return estimate
