"""``lr=auto``: the step size from a short probe on training batches, a pure function of the seed.

A ZO step moves θ along the update its optimizer makes of an estimate ĝ (ZO-SGD: −lr·g·z; sign
and Adam: about lr per weight; FZOO: normalised by σ; LOZO: low rank; Sparse MeZO: masked). How
far it can go depends on the model, the mode, the estimator and the optimizer, so no one number
fits them all (MeZO's paper tunes lr per model and mode). The probe measures it instead, with the
run's own estimator and optimizer, so the rule is the same for all of them:

    for each probe p (a training batch B_p and its own seeds):
        ĝ_p    = the estimator on B_p                               (its forwards: 2n for SPSA)
        f_p(lr) = L_B(θ after the optimizer's first update with lr) − L_B(θ)   (1 forward per lr)
                  for lr = 10⁻⁸, 10^-7.5, ..., 1, until the loss has fallen and then risen RISE·|L_B(θ)|
                  above L_B(θ), or doubled
        lr*_p  = argmin f_p, refined to the bottom of the parabola through f_p(0) = 0, the grid's argmin
                 and the next lr; skipped unless its fall beats CLEAR × |f_p| at the three smallest lrs
    lr = min(FRACTION · geometric median of lr*_p,  the run-length cap below)

On its own batch, a ZO-SGD step changes the loss by f(lr) ≈ −g²·lr + ½·g²·(zᵀHz)·lr², whose
argmin 1/zᵀHz does not depend on g (so not on the luck of the direction) and concentrates around
1/tr(H): the largest step the curvature allows along a random direction, MeZO's lr_SGD/d_eff. It
is the edge of what one step tolerates on a batch it has seen; the many noisy steps of a run need
a fraction of it: FRACTION = 0.1, measured (README "lr=auto"): on tiny-llama full mode, lr*/10
trains and lr*/3 climbs. For sign, Adam (≈ lr per weight on their first step), FZOO (ĝ divided by
σ), LOZO and Sparse MeZO the same search runs through their own update, so lr comes out in their
own units. Momentum's steady step is ĝ/(1 − μ), so its lr is scaled by (1 − μ). Probes whose
estimate is zero (a metric objective on a small batch) are skipped; every forward is counted.

The scan stops only on a clear overshoot (the loss RISE = 10% above L_B(θ) after a fall), not at the
first rise: with bf16 compute over fp32 weights a step of 10⁻⁸ changes a few weights' bf16 roundings
and so the loss by a tiny random amount either way, and stopping at the first sign change picked
that noise (SmolLM2-135M on SST-2 got lr 3e-9 and never moved). Past the optimum a real overshoot
is large: one grid point beyond lr* (×√10) a step raises the loss by ~1.8× what the best step lowered it.

**Two refinements against the spread over seeds** (2026-11-29). Each probe's whole curve was
recorded (SmolLM2-135M, SST-2, batch 16, 3 probes a seed: seeds 0-7 in fp32, 0-4 in bf16). In fp32 the curves are
clean (f = −g²·lr to 2-3 digits up to near lr*), and the grid's argmins land on 3.16e-4 or 1e-3, so the
median of three jumps by √10 between seeds. In bf16 the three smallest steps change the loss by
up to ±0.016 (rounding), as much as a probe with a small |g| falls at its best lr, and such a probe's
argmin was noise: 1e-7 where its neighbours found 1e-3. So (a) a probe counts only if its fall is
deeper than CLEAR = 4 × the largest |f| at the three smallest lrs (another batch is probed instead;
if none is clear, the faint ones are used), and (b) its optimum is the bottom of the parabola
through f(0) = 0, the grid's argmin and the next point (exact for a quadratic, where it is 1/zᵀHz).
On the recorded curves (``bench/auto_lr_curves.py``; README "lr=auto") the sd of log10 of each
probe's optimum fell from 1.00 to 0.18 in bf16 (14 probes, 3 of them skipped) and from 0.32 to 0.26
in fp32 (24 probes, none skipped).

**The run's length caps it too.** The one-step optimum is blind to what many steps add up to: the
part of each update that is noise (most of it: a random direction carries little of the gradient)
adds up as a random walk, |Δθ| ≈ lr·u·√T after T steps, where u = |update| / lr on the first step.
Over thousands of steps the one-step optimum diverges (SmolLM2-135M full mode: lr 1e-4 suits 200
steps and diverges over thousands, where 3e-5 is the long-run setting). So the lr is also capped
where the walk over the run stays within DRIFT of the trained tensors' own norm:

    lr ≤ DRIFT · |θ₀| / (u · √T_eff),     T_eff = Σ_t (lr_t / lr)²   (the schedule's shape: T/3 for linear decay)

and the run uses min(FRACTION · lr*, the cap). u is the median over DRIFT_DRAWS = 16 estimates:
the probes', then extra ones on the run's first batches with directions of their own (their
forwards counted; an update's size needs no forward). DRIFT = 0.15 reproduces the lrs picked by
hand for SmolLM2-135M in full mode, 1e-4 for a few hundred steps and 3e-5 for thousands: over seeds
0-7 on SST-2 (2,000 constant steps) the 16-draw cap at 0.1 had a geometric mean of 2.0e-5.
Until 2026-11-29 u was the median of the three probes' own updates, with DRIFT = 0.1 calibrated on
seed 0's draws. Since u ∝ |g| for ZO-SGD and g is heavy-tailed, that cap moved with the luck of
three directions: 6.4e-6 to 5.3e-5 over those eight seeds (3.11e-5 at seed 0, where the 16 draws
give 2.32e-5); with 16 draws, 1.15e-5 to 3.03e-5 at DRIFT 0.1 (``bench/auto_lr_spread.py``).

**In LoRA mode the walk is simulated.** It is measured where the model sees it, on the adapted
matrices W = W₀ + s·B·A against |W₀| (``FunctionWeights``; zoft.methods.mezo.auto_lr): an adapter's
own init norm is no scale of the function (A moves nothing while B = 0; capped by it, at 2e-4,
MeZO-LoRA on ASAP set 1 left the loss flat). But s·B·A is not linear in the step: B and A both walk
by about lr·σ·√T, so W walks by s·(B·A₀ + B·(A − A₀)), a term in lr·√T and one in (lr·√T)², and the
second dominates within a few hundred steps. No one-step u describes that, so the probe runs the
walk itself: WALK_STEPS optimizer updates of the run's kind on pure noise (the probes' directions'
projected gradients g have RMS σ; each simulated step draws g ~ N(0, σ²) with a fresh seed), no
forward pass, and finds by bisection the lr·√T_eff at which the walk of s·B·A reaches
FUNCTION_DRIFT·|W₀|. Both terms depend on lr·√T alone, so WALK_STEPS steps at lr·√(T_eff/WALK_STEPS)
walk as far as T_eff steps at lr. Checked against a real run (README "lr=auto"): MeZO-LoRA on ASAP
set 1 at lr 3.16e-3 had moved W by 0.167·|W₀| at step 200, and this model (σ = 1.68, that run's RMS
g) says 0.170. FUNCTION_DRIFT = 0.025, about a third of the smallest walk at which MeZO-LoRA blew up
on that set: the four blow-ups (lr 1e-2 at step 30, 5e-3 at 90, 2.5e-3 at 400, 3.16e-3 at 290) had
walked 0.067-0.087·|W₀| by this measure at σ = 1 (the RMS g of a run's first 20 steps: 0.99). One
model and one set calibrated it, with bf16 compute, whose rounding made up most of that σ. With fp32
compute (compute_dtype=auto's choice for ZO in LoRA mode since then) the three probes' σ on that set
was 0.065, while the run's own g had an RMS of 0.68 over its first 10 steps and 0.84 over 112: the
cap came out about 10× too large and the guard rolled back three times (README "ε and bf16
compute"). The projected gradients are heavy-tailed (autograd's directional derivatives at B = 0 on
that set: 0.47, 0.07, 0.13, 0.21, 0.46, 0.09 in size), and an RMS of three draws can miss their scale by
10×. So σ is taken over SIGMA_DRAWS = 16 directions: the probes' own, then extra two-sided estimates
on the run's first batches with directions of their own (2 forwards each, counted). On that set
the probe then measured σ = 0.671, the run's first 10 steps had 0.65, and 300 steps at the cap's
2.19e-3 ran without a rollback.
Prefix mode has no weights to measure against and keeps the one-step rule.

θ is copied to CPU memory once and restored after every trial (one copy of the trained tensors:
the model's size in full mode), so training starts from exactly the weights it would have
started from without the probe: replay and resume stay exact.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from zoft.errors import ZoftError
from zoft.zo.optim import ZOSGDMomentum

FRACTION = 0.1              # of the one-step optimum lr* (module docstring)
GRID = [10 ** (k / 2) for k in range(-16, 1)]   # 1e-8, 3.2e-8, ..., 1: the lrs tried
PROBES, MAX_TRIES = 3, 9    # probes that found a descent; batches tried at most
RISE = 0.1                  # relative rise above L_B(θ), after a fall, that ends a probe's scan (docstring)
NOISE_POINTS, CLEAR = 3, 4  # a probe counts if its fall beats CLEAR × |f| at the NOISE_POINTS smallest lrs (docstring)
DRIFT = 0.15                # the run's random walk may move θ by this fraction of |θ₀| (docstring)
FUNCTION_DRIFT = 0.025      # ... and LoRA's s·B·A this fraction of |W₀|, by a simulated walk (docstring)
WALK_STEPS = 100            # steps of that simulation; the walk depends on lr·√T only, so any T maps onto them
WALK_PROBE = 10_000         # seeds(WALK_PROBE + t) give the simulated walk's directions: apart from the probes'
SIGMA_DRAWS = 16            # LoRA: σ is the RMS of this many projected gradients (the probes', then extra ones)
SIGMA_PROBE = 20_000        # seeds(SIGMA_PROBE + i) give those extra estimates' directions, on the run's batches i
DRIFT_DRAWS = 16            # full mode: u is the median update size of this many estimates (the probes', then extra ones)


def probe_seed(seed: int, probe: int, k: int = 0) -> int:
    """Seed of the k-th direction of ``probe``: apart from every training step's (schedule.direction_seed)."""
    return int(np.random.default_rng([seed, probe, k, 0xA070]).integers(0, 2**62))


@dataclass
class AutoLR:
    """The chosen lr and what it cost: forwards spent, and each probe's one-step optimum (None: skipped)."""

    lr: float
    forwards: int
    per_probe: list[float | None] = field(default_factory=list)
    one_step: float | None = None     # FRACTION × the probes' median optimum
    drift_cap: float | None = None    # the run-length cap (None: no run length given)
    walk_sigma: float | None = None   # LoRA: the RMS projected gradient the simulated walk drew from

    def record(self) -> dict:
        return {"event": "lr_auto", "lr": self.lr, "forwards": self.forwards, "per_probe": self.per_probe,
                "one_step": self.one_step, "drift_cap": self.drift_cap, "walk_sigma": self.walk_sigma}


def _distance(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach().float().cpu() - s.float()).square().sum()) for p, s in zip(params, saved)))


@dataclass
class FunctionWeights:
    """Where the drift cap measures the walk when the trained tensors are not the model's weights
    (LoRA: W = W₀ + s·B·A). ``changes()`` gives the tensors a step moves (LoRA: each adapted
    matrix's s·B·A); ``norm`` is the norm of the weights they are added to (|W₀| of those matrices)."""

    changes: Callable[[], list[torch.Tensor]]
    norm: float


@torch.no_grad()
def probe_lr(params: Sequence[torch.Tensor], estimator, optimizer,
             train_loss: Callable[[int], Callable[[], float]], measure: Callable[[int], Callable[[], float]],
             seeds: Callable[[int], list[int]], run_steps: float = 0.0,
             function_weights: FunctionWeights | None = None) -> AutoLR:
    """Choose the lr (module docstring). ``train_loss(p)`` is the training objective on probe p's
    batch, ``measure(p)`` the loss the step is judged by on that batch (the LM loss where the objective
    is a metric), ``seeds(p)`` its directions. ``optimizer`` must be fresh (no state): each trial takes a copy of it.
    ``run_steps`` is T_eff, Σ_t (lr_t / lr)² over the run (0: no drift cap). The cap bounds the walk
    of the trained tensors against their own norm, or of ``function_weights`` against theirs."""
    saved = [p.detach().to("cpu", copy=True) for p in params]
    if function_weights is None:   # the walk of θ itself, against |θ₀|
        norm0 = math.sqrt(sum(float(s.float().square().sum()) for s in saved))
        tensors, start = (lambda: params), saved
    else:
        norm0 = function_weights.norm
        tensors, start = function_weights.changes, [t.detach().float().cpu() for t in function_weights.changes()]

    def moved() -> float:   # how far a trial update took the measured tensors
        return _distance(tensors(), start)

    def restore() -> None:
        for p, s in zip(params, saved):
            p.copy_(s)

    forwards, per_probe, unit_moves = 0, [], []   # unit_moves: u_p = |Δθ| / lr of each probe's update
    faint = []   # optima of probes whose fall was within the rounding noise (CLEAR)
    projected, template = [], None   # every probe direction's g, and an estimate to shape the walk's steps on
    steady = 1 - optimizer.momentum if isinstance(optimizer, ZOSGDMomentum) else 1.0
    for p in range(MAX_TRIES):
        if sum(x is not None for x in per_probe) == PROBES:
            break
        judge = measure(p)
        base = float(judge())
        estimate = estimator.estimate(params, train_loss(p), seeds(p), step=p)
        estimate.extra.setdefault("conservative", -1)   # zo-sgd-cons: the step itself, not its 3-way choice
        forwards += 1 + estimate.forwards
        restore()   # the probes leave θ within a few ulp of itself; the trials must start from θ exactly
        if not any(g for _, g in estimate.directions) or not math.isfinite(base):
            per_probe.append(None)   # a zero estimate moves nothing: it says nothing about lr
            continue
        projected += [g for _, g in estimate.directions]
        template = estimate
        curve = []   # f_p on the grid; +inf once the loss fell and then rose clearly above L_B(θ), or doubled
        for lr in GRID:
            if curve and (curve[-1] > RISE * abs(base) and min(curve) < 0 or curve[-1] > abs(base)):
                curve.append(math.inf)
                continue
            trial_optimizer = copy.deepcopy(optimizer)   # momentum/Adam: their first step, every time
            trial_optimizer.update(params, estimate, lr, estimator.backend, estimator.distribution)
            change = float(judge()) - base
            forwards += 1
            restore()
            curve.append(change if math.isfinite(change) else math.inf)
        best = min(range(len(GRID)), key=curve.__getitem__)
        optimum = _vertex(curve, best) if curve[best] < 0 else None   # None: no lr lowered this batch's loss
        # a fall no deeper than CLEAR × the loss changes of the three smallest steps (rounding noise:
        # bf16 compute) says nothing about lr; it counts only if no probe finds a clear one
        floor = max(abs(f) for f in curve[:NOISE_POINTS])
        if optimum is not None and not -curve[best] > CLEAR * floor:
            faint.append(optimum)
            optimum = None
        per_probe.append(optimum)
        if optimum is not None and run_steps > 0 and function_weights is None:   # LoRA's walk is simulated instead
            # u_p, the update's size per unit lr, taken at the run's scale FRACTION·lr*_p: large enough
            # not to drown in fp32 rounding as a step of 1e-8 would
            at = FRACTION * optimum
            copy.deepcopy(optimizer).update(params, estimate, at, estimator.backend, estimator.distribution)
            unit_moves.append(moved() / at)   # no forward: only the weights' distance
            restore()
    restore()
    found = [x for x in per_probe if x is not None] or faint   # faint falls only if no probe had a clear one

    def extra_estimate(i: int):   # for σ (LoRA) or u (full): the run's batch i, directions of its own
        nonlocal forwards
        estimate = estimator.estimate(params, train_loss(i), seeds(SIGMA_PROBE + i), step=i)
        estimate.extra.setdefault("conservative", -1)   # zo-sgd-cons: the step itself
        forwards += estimate.forwards
        restore()
        return estimate
    if not found:
        raise ZoftError(f"lr=auto: no trial step lowered the training loss at any lr in [{GRID[0]:g}, {GRID[-1]:g}] "
                        f"({len(per_probe)} probes, {forwards} forwards); raise eps or set lr explicitly")
    one_step = FRACTION * steady * 10 ** statistics.median(math.log10(x) for x in found)
    drift_cap = sigma = None
    if run_steps > 0 and function_weights is not None:   # LoRA: s·B·A's walk, simulated (docstring)
        # g is heavy-tailed: three draws of RMS 0.065 stood for a run whose g had RMS 0.84 (docstring)
        for i in range(max(0, SIGMA_DRAWS - len(projected))):
            estimate = extra_estimate(i)
            projected += [g for _, g in estimate.directions if math.isfinite(g)]
            if len(projected) >= SIGMA_DRAWS:
                break
        sigma = math.sqrt(statistics.fmean(g * g for g in projected))
        walk = _noise_walk(params, optimizer, estimator, template, sigma, seeds, moved, restore)
        reach = _solve_increasing(walk, FUNCTION_DRIFT * norm0)
        drift_cap = None if reach is None else reach / math.sqrt(run_steps)
    elif run_steps > 0:
        # u from three probes moved with the luck of their directions (g is heavy-tailed): the cap of
        # SmolLM2 on SST-2 was 3.11e-5 at seed 0 and 1.64e-5 at seed 1. More estimates, each on the
        # run's batch i with directions of its own, update sizes only: 2 forwards apiece for SPSA.
        at = one_step   # any scale above fp32's rounding: the update is linear in lr
        for i in range(max(0, DRIFT_DRAWS - len(unit_moves))):
            estimate = extra_estimate(i)
            if all(math.isfinite(g) for _, g in estimate.directions) and any(g for _, g in estimate.directions):
                copy.deepcopy(optimizer).update(params, estimate, at, estimator.backend, estimator.distribution)
                unit_moves.append(moved() / at)
                restore()
        # momentum's steady step is its first one / (1 − μ), and so is the walk it adds up to
        if statistics.median(unit_moves) > 0:
            drift_cap = DRIFT * steady * norm0 / (statistics.median(unit_moves) * math.sqrt(run_steps))
    lr = one_step if drift_cap is None else min(one_step, drift_cap)
    return AutoLR(lr=lr, forwards=forwards, per_probe=per_probe, one_step=one_step, drift_cap=drift_cap,
                  walk_sigma=sigma)


def _vertex(curve: Sequence[float], best: int) -> float:
    """The lr at the bottom of the parabola f(lr) = −a·lr + ½·b·lr² through f(0) = 0 (no step, no
    change), the grid's best point and the next one; ``GRID[best]`` where they make no such parabola.
    On a quadratic loss this is a ZO-SGD probe's exact optimum 1/zᵀHz; on a real one it takes the
    grid's √10 steps out of the choice. Kept within half a grid step of ``GRID[best]``."""
    if best + 1 >= len(curve) or not math.isfinite(curve[best + 1]):
        return GRID[best]
    (l1, f1), (l2, f2) = (GRID[best], curve[best]), (GRID[best + 1], curve[best + 1])
    half_b = (f2 / l2 - f1 / l1) / (l2 - l1)
    a = half_b * l1 - f1 / l1
    if half_b <= 0 or a <= 0:
        return GRID[best]
    step = math.sqrt(GRID[1] / GRID[0])   # half a grid step
    return min(max(a / (2 * half_b), GRID[best] / step), GRID[best] * step)


def _noise_walk(params, optimizer, estimator, template, sigma: float, seeds: Callable[[int], list[int]],
                moved: Callable[[], float], restore: Callable[[], None]) -> Callable[[float], float]:
    """``walk(x)``: how far WALK_STEPS updates of the run's optimizer at lr = x/√WALK_STEPS, each on
    pure noise (g ~ N(0, σ²) per direction, fresh seeds, as many directions as a step has), move
    the measured tensors; θ restored after. The same draws for every x, so walk(x) is a smooth
    function of x. No forward pass: the update regenerates z from its seed, as a step does."""
    draws = np.random.default_rng(seeds(WALK_PROBE)[0])
    steps = [[(seed, sigma * float(draws.standard_normal())) for seed in seeds(WALK_PROBE + 1 + t)]
             for t in range(WALK_STEPS)]

    def walk(x: float) -> float:
        trial_optimizer = copy.deepcopy(optimizer)
        for directions in steps:
            trial_optimizer.update(params, dataclasses.replace(template, directions=directions),
                                   x / math.sqrt(WALK_STEPS), estimator.backend, estimator.distribution)
        distance = moved()
        restore()
        return distance if math.isfinite(distance) else math.inf
    return walk


def _solve_increasing(f: Callable[[float], float], target: float, start: float = 1e-2,
                      halvings: int = 10) -> float | None:
    """The largest x (to 10^(1/2^halvings)) with f(x) ≤ target, f increasing: bracketed by decades
    from ``start``, then bisected in log x. None if no x in [1e-12, 1e6] brackets it."""
    if f(start) <= target:
        lo, hi = start, start * 10
        while f(hi) <= target:
            lo, hi = hi, hi * 10
            if hi > 1e6:
                return None
    else:
        lo, hi = start / 10, start
        while f(lo) > target:
            lo, hi = lo / 10, lo
            if lo < 1e-12:
                return None
    for _ in range(halvings):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) <= target else (lo, mid)
    return lo
