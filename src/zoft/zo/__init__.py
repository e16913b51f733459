"""Zeroth-order optimisation: perturbation backends, estimators, optimizers, schedules."""
from zoft.zo.estimator import ESTIMATORS, SPSA, Estimate, spsa
from zoft.zo.optim import OPTIMIZERS, ZOSGD, decay_mask
from zoft.zo.perturb import BACKENDS, DISTRIBUTIONS, TorchBackend, get_backend, tensor_seed
from zoft.zo.schedule import SCHEDULES, learning_rate

__all__ = ["ESTIMATORS", "SPSA", "Estimate", "spsa", "OPTIMIZERS", "ZOSGD", "decay_mask",
           "BACKENDS", "DISTRIBUTIONS", "TorchBackend", "get_backend", "tensor_seed",
           "SCHEDULES", "learning_rate"]
