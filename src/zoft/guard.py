"""The divergence guard: notice a run going bad, beyond a NaN, while it can still be saved.

Three signs, checked by the training loop (:mod:`zoft.training`):

- the loss: a fast exponential moving average (β = 0.9: about the last 10 steps) climbs above
  ``best + (factor − 1)·|best|`` (for a positive loss: factor × best; for minus a metric, e.g.
  −accuracy, the same margin), where ``best`` is the lowest value of a slow EMA (β = 0.99: about
  100 steps) after the first 20 steps. A MeZO batch loss is noisy (±35% from batch to batch on
  SST-2): the fast EMA cuts that to about ±8%, and the slow one keeps ``best`` from being the
  luckiest dip of the noise, which the minimum of a fast EMA would be (tests/test_guard.py feeds
  2000 such steps without a rollback). Both EMAs are bias-corrected (as Adam's moments are);
- a loss (or projected gradient) that is NaN or inf, or an update that overflows the weights;
- the weights, every 10 steps and at every eval or checkpoint: non-finite, or an L2 norm more
  than 10× the initial (a loss behind RMSNorm can stay finite while lr=1e30 blows the weights up).

A climbing loss EMA can also be a run of hard batches: a MeZO run started from a good point
(LP-MeZO) sits at a low loss, where the noise of a few batches crosses 1.5× its best, and after a
rollback the same batches come back in the same order and fire again. So where the method gives
the loop a ``reference`` loss (the loss on ``REFERENCE_BATCHES`` fixed training batches), a climb
of the EMA is judged on it before anything is undone: the reference is measured at every good
state (the start and each checkpoint) and again when the EMA fires, and judged against its lowest
value at any good state (so a drift too slow to climb by the factor between two checkpoints is
still caught once it adds up to it). After the first ``WARMUP`` steps the same limit is checked
before each checkpoint is written, so a checkpoint is a good state: a slow climb under the EMA's
rule is rolled back there. If the reference has not climbed by the factor when the EMA fires, the
alarm was the batches, not the weights: the loop logs
``{"event": "guard_check", "verdict": "no climb", ...}`` and goes on, the loss rule's best
becomes the slow EMA's current level (the reference vouched for the weights at it), and the rule
stays quiet for ``QUIET`` steps before it may fire (and be judged) again. The reference costs
``REFERENCE_BATCHES`` forwards per checkpoint and per check. NaN and weight signs are not judged.

The loop then rolls back to the last good state, halves the lr for the rest of the run, logs
``{"step": N, "event": "rollback", ...}`` in metrics.jsonl and a console line, and after
``max_rollbacks`` rollbacks stops with one line. Everything here is a pure function of the
losses seen, and :class:`GuardState` is saved in trainer_state.json, so a resumed run takes the
same decisions at the same steps as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

FAST, SLOW = 0.9, 0.99   # EMA decays of the training loss: averages over about 1/(1 − β) = 10 and 100 steps
WARMUP = 20         # steps before the slow EMA counts as a "best" (its first values average few batches)
NORM_FACTOR = 10.0  # weights whose norm grew this much beyond the start have blown up
WEIGHT_CHECK_EVERY = 10   # steps between weight checks (and at every eval and checkpoint): one read pass
REFERENCE_BATCHES = 4     # fixed training batches a suspected climb is judged on
QUIET = 20                # steps the loss rule stays quiet after a climb the reference did not confirm


@dataclass
class GuardState:
    """What the guard knows at a step; JSON-able, stored in trainer_state.json."""

    fast: float = 0.0           # uncorrected fast EMA of the loss
    slow: float = 0.0           # uncorrected slow EMA
    seen: int = 0               # losses in the EMAs
    best: float | None = None   # lowest bias-corrected slow EMA after WARMUP steps
    norm0: float | None = None  # L2 norm of the trained weights at the start
    lr_scale: float = 1.0       # 0.5 per rollback, for the rest of the run
    rollbacks: int = 0
    reference: float | None = None   # the reference batches' lowest loss at a good state
    quiet_until: int = 0        # ``seen`` up to which the loss rule is quiet (after a false alarm)
    false_alarms: int = 0
    last_check: dict | None = None   # the numbers of the last unconfirmed climb, for the log

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Guard:
    """The guard's settings (config ``guard_factor``, ``guard_max_rollbacks``)."""

    factor: float = 1.5
    max_rollbacks: int = 3

    def limit(self, good: float) -> float:
        """How far a value may climb from ``good`` (a loss, or minus a metric) before it counts as a climb."""
        return good + (self.factor - 1) * abs(good)

    def observe(self, state: GuardState, loss: float, reference: Callable[[], float] | None = None) -> str | None:
        """Add a step's loss to the EMA; the reason to roll back, or None. With ``reference`` (the
        loss on the fixed reference batches, measured now), a climb of the EMA is judged on it."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        state.seen += 1
        state.fast = FAST * state.fast + (1 - FAST) * loss
        state.slow = SLOW * state.slow + (1 - SLOW) * loss
        smoothed, level = state.fast / (1 - FAST ** state.seen), state.slow / (1 - SLOW ** state.seen)
        if state.seen < WARMUP:
            return None
        state.best = level if state.best is None else min(state.best, level)
        limit = self.limit(state.best)
        if smoothed <= limit or state.seen <= state.quiet_until:
            return None
        reason = f"loss EMA {smoothed:.4g} > {limit:.4g} ({self.factor:g}× its best, {state.best:.4g})"
        if reference is None or state.reference is None:
            return reason
        now, good = reference(), state.reference
        allowed = self.limit(good)
        if not math.isfinite(now) or now > allowed:
            return f"{reason}, and the reference batches' loss {now:.4g} > {allowed:.4g} ({self.factor:g}× {good:.4g})"
        # the reference vouches for the weights at this loss level: the loss rule measures from it
        # now (else a run that settles at a higher training loss is checked every QUIET steps)
        state.best = level
        state.quiet_until, state.false_alarms = state.seen + QUIET, state.false_alarms + 1
        state.last_check = {"loss_ema": smoothed, "limit": limit, "reference": now, "reference_good": good,
                            "reference_limit": allowed}
        return None

    def check_reference(self, state: GuardState, loss: float) -> str | None:
        """The reference batches' loss where a checkpoint is due: the reason the weights there are
        not a good state, or None. A climb slow enough that the loss EMA never crosses its limit
        (the limit follows the EMA's level after each unconfirmed alarm) would otherwise be saved as
        the last good state, and a rollback would land on it. Like the loss rule, it judges nothing
        in the first ``WARMUP`` steps, where a run from a fitted head (LP-FT, LP-MeZO) may move the
        loss a lot at first."""
        if state.reference is None or state.seen < WARMUP:
            return None
        allowed = self.limit(state.reference)
        if not math.isfinite(loss) or loss > allowed:
            return (f"at a checkpoint the reference batches' loss {loss:.4g} > {allowed:.4g} "
                    f"({self.factor:g}× {state.reference:.4g})")
        return None

    def record_reference(self, state: GuardState, loss: float) -> None:
        """The reference batches' loss at a good state (the start, a checkpoint): the climb it is
        judged against is from the lowest such loss, not the latest, so a slow drift adds up."""
        state.reference = loss if state.reference is None else min(state.reference, loss)

    def check_weights(self, state: GuardState, tensors: Iterable[torch.Tensor]) -> str | None:
        """The weights' L2 norm (recorded as ``norm0`` on the first call); the reason to roll back, or None."""
        norm = weight_norm(tensors)
        if not math.isfinite(norm):
            return f"the weights hold {norm}"
        if state.norm0 is None:
            state.norm0 = norm
        elif state.norm0 > 0 and norm > NORM_FACTOR * state.norm0:
            return f"weight norm {norm:.4g} > {NORM_FACTOR:g}× its initial {state.norm0:.4g}"
        return None


@torch.no_grad()
def weight_norm(tensors: Iterable[torch.Tensor]) -> float:
    """L2 norm over all tensors, accumulated in float64 (inf or NaN if any entry is)."""
    total = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors)
    return math.sqrt(total)
