"""From settings to the pieces of a ZO step: estimator, optimizer, trained tensors and stepper.

Training, resume and replay all build here, so a trajectory replays through the very step that
recorded it. ``cfg`` is any object with the attributes read here (estimator, eps, n_directions,
distribution, one_sided, backend, lozo_rank, lozo_nu, smezo_fraction, optimizer, weight_decay, momentum,
adam_beta1, adam_beta2, flat_params, fused, seed, steps): a ``zoft.config.Config``; zo/ reads no config itself.
"""
from __future__ import annotations

import torch

from zoft.zo.estimator import FZOO, LOZO, SPSA, LowRankBackend, SparseBackend, SparseMeZO
from zoft.zo.flat import flatten_
from zoft.zo.fused import FusedZOSGD
from zoft.zo.optim import build_optimizer
from zoft.zo.perturb import get_backend
from zoft.zo.schedule import direction_seed
from zoft.zo.step import Check, FusedStep, PlainStep, Stepper


def build_components(cfg, device: torch.device | str):
    """The estimator (on the settings' perturbation backend for ``device``) and the optimizer."""
    backend = get_backend(cfg.backend, device, cfg.distribution)
    if cfg.estimator == "fzoo":
        estimator = FZOO(eps=cfg.eps, n_directions=cfg.n_directions, backend=backend)
    elif cfg.estimator == "lozo":
        estimator = LOZO(eps=cfg.eps, n_directions=cfg.n_directions, rank=cfg.lozo_rank, nu=cfg.lozo_nu,
                         seed=cfg.seed, backend=LowRankBackend(cfg.lozo_rank, dense=backend))
    elif cfg.estimator == "smezo":
        estimator = SparseMeZO(eps=cfg.eps, n_directions=cfg.n_directions, fraction=cfg.smezo_fraction,
                               distribution=cfg.distribution, backend=SparseBackend(backend))
    else:
        estimator = SPSA(eps=cfg.eps, n_directions=cfg.n_directions, distribution=cfg.distribution,
                         backend=backend, one_sided=cfg.one_sided)
    optimizer = build_optimizer(cfg.optimizer, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))
    return estimator, optimizer


def trained_params(cfg, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What the backend perturbs: the trained tensors, or (``flat_params``) one flat buffer per
    dtype. z's layout follows this list. (``Config.validate`` refuses what a flat buffer cannot serve.)"""
    return flatten_(list(named.values())) if cfg.flat_params else list(named.values())


def build_stepper(cfg, params: list[torch.Tensor], estimator, optimizer, *, fuse: bool = True,
                  check: Check | None = None) -> Stepper:
    """The fused 2-pass step where it computes the same update as the plain one (one two-sided SPSA
    direction, ZO-SGD without weight decay, a backend with ``combine_``, ``fused=true``), else the
    plain step. ``fuse=False`` where the caller cannot use it: several processes, offload, or the
    replay of a run that did not fuse."""
    if not (fuse and cfg.fused and cfg.estimator == "spsa" and not cfg.one_sided and cfg.n_directions == 1
            and cfg.optimizer == "zo-sgd" and not cfg.weight_decay and hasattr(estimator.backend, "combine_")):
        return PlainStep(params, estimator, optimizer, check)

    def next_seed(step: int) -> int | None:   # the direction left pending after ``step`` (none after the last)
        return direction_seed(cfg.seed, step + 1) if step + 1 < cfg.steps else None
    return FusedStep(FusedZOSGD(params, estimator.backend, cfg.eps, cfg.distribution), next_seed, check)
