"""Zeroth-order optimisation: perturbation backends, estimators, optimizers, schedules, the step.

Config-free: :mod:`zoft.zo.build` turns any object with the needed attributes into a stepper.
"""
from zoft.zo.cpu_backend import CPUFastBackend
from zoft.zo.estimator import (ESTIMATORS, FZOO, LOZO, SPSA, Estimate, LowRankBackend, Objective, SparseBackend,
                               SparseMeZO, spsa)
from zoft.zo.optim import (OPTIMIZERS, ZOSGD, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign,
                           build_optimizer, decay_mask)
from zoft.zo.perturb import (BACKEND_NAMES, BACKENDS, DISTRIBUTIONS, TorchBackend, get_backend, register_backend,
                             tensor_seed)
from zoft.zo.schedule import SCHEDULES, direction_seed, learning_rate

__all__ = ["ESTIMATORS", "SPSA", "FZOO", "LOZO", "LowRankBackend", "SparseMeZO", "SparseBackend", "Estimate", "Objective", "spsa",
           "OPTIMIZERS", "ZOSGD", "ZOSGDMomentum", "ZOSGDSign", "ZOSGDConservative", "ZOAdam",
           "build_optimizer", "decay_mask",
           "BACKEND_NAMES", "BACKENDS", "DISTRIBUTIONS", "TorchBackend", "CPUFastBackend", "get_backend", "register_backend",
           "tensor_seed",
           "SCHEDULES", "direction_seed", "learning_rate"]
