"""Learning rates and directions as plain functions of the step (stateless, so resume is exact)."""
from __future__ import annotations

import numpy as np


def direction_seed(seed: int, step: int, k: int = 0) -> int:
    """Seed of the k-th random direction of ``step``."""
    return int(np.random.default_rng([seed, step, k, 0x2E0]).integers(0, 2**62))


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str = "constant",
                  warmup_steps: int = 0) -> float:
    """LR at 0-based ``step``: optional linear warm-up, then constant or linear decay to 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        remaining = max(total_steps - step, 0) / max(total_steps - warmup_steps, 1)
        return base_lr * min(remaining, 1.0)
    raise ValueError(f"unknown lr schedule '{schedule}'; choose from constant, linear")


SCHEDULES = ("constant", "linear")
