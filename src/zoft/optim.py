"""MeZO as a ``torch.optim.Optimizer``: zoft's ZO step in your own training loop.

    opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
    model.eval()                                    # no dropout: L(θ+εz) and L(θ−εz) must see one function
    for batch in loader:
        loss = opt.step(lambda: model(**batch).loss)   # the closure returns the loss and calls no backward

One ``step(closure)`` is one step of ``zoft train method=mezo``: the estimator, the ZO optimizer
and the stepper come from :mod:`zoft.zo.build` with the same settings, and the directions of
step t are seeded with ``direction_seed(seed, t, k)``. The step count and the seed live in the
optimizer's state, so ``state_dict()`` / ``load_state_dict()`` resume on the very same
directions; the momentum and Adam buffers go through the same dict, as plain tensors (it loads
with ``torch.load(weights_only=True)``).

The closure is called under ``torch.no_grad()`` (several times a step: twice for two-sided SPSA),
so no ``.grad`` is ever made. Tensors with ``requires_grad=False`` are left alone (as zoft's own
MeZO does, and as torch's optimizers skip tensors without a gradient), so ``model.parameters()``
of a PEFT model trains the adapters only.

Parameter groups carry ``lr``, ``weight_decay`` (decoupled, matrices only, as zoft's ZO
optimizers apply it), ``momentum`` and ``betas``; a LR scheduler may change them between steps.
All groups share one perturbation: the estimator probes every trained tensor at once, then each
group's update moves its own tensors with its own lr. z of a tensor depends on its place in the
list of all trained tensors, so a group's update is handed that whole list with the other groups'
tensors replaced by empty placeholders; with equal hyperparameters, two groups update bit for bit
as one.

``fused=True`` uses zoft's 2-pass step (:mod:`zoft.zo.fused`) where it computes the same update
(one group, one two-sided SPSA direction, ZO-SGD, no weight decay). It is off by default because
between fused steps the weights hold θ + εz of the next step: call :meth:`MeZO.settle` before
anything reads them (an eval, ``model.state_dict()``); ``state_dict()`` settles by itself.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Callable, Iterable

import torch

from zoft.errors import ZoftError
from zoft.zo.build import build_components, build_stepper
from zoft.zo.estimator import ESTIMATORS, Estimate, Objective
from zoft.zo.optim import ZOSGD, ZOSGDConservative, build_optimizer
from zoft.zo.perturb import BACKEND_NAMES, DISTRIBUTIONS
from zoft.zo.schedule import direction_seed
from zoft.zo.step import Stepper, zo_step

__all__ = ["MeZO"]


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The attributes :mod:`zoft.zo.build` reads, as a zoft ``Config`` would give them."""

    estimator: str
    eps: float
    n_directions: int
    distribution: str
    one_sided: bool
    backend: str
    lozo_rank: int
    lozo_nu: int
    optimizer: str
    fused: bool
    seed: int
    weight_decay: float = 0.0     # of the one group the fused step may serve
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    flat_params: bool = False
    steps: int = sys.maxsize      # no last step: a fused step always leaves the next +εz (settle() removes it)


# what every saved state must agree on to resume exactly (seed is state: a resume adopts it)
_IDENTITY = ("estimator", "eps", "n_directions", "distribution", "one_sided", "backend", "lozo_rank", "lozo_nu",
             "optimizer", "fused")


class MeZO(torch.optim.Optimizer):
    """Zeroth-order fine-tuning (MeZO, Malladi et al. 2023) and its relatives as a torch optimizer.

    Args:
        params: tensors or parameter groups (dicts with ``params`` and any of the per-group options).
        lr: learning rate (per group).
        eps: perturbation scale ε.
        weight_decay: decoupled weight decay λ, θ ← θ − lr·λ·θ, on matrices only (per group).
        estimator: ``spsa`` (MeZO), ``fzoo`` or ``lozo`` (see :mod:`zoft.zo.estimator`).
        optimizer: ``zo-sgd`` (MeZO), ``zo-sgd-momentum``, ``zo-sgd-sign``, ``zo-sgd-cons`` or ``zo-adam``.
        n_directions: directions averaged per step (n-SPSA; FZOO needs ≥ 2).
        distribution: ``gaussian`` or ``rademacher`` z.
        one_sided: SPSA with (L(θ+εz) − L(θ))/ε.
        backend: perturbation backend (``auto``, ``torch``, ``cpu-fast``, ``triton``, ``triton-fast``).
        momentum, betas: for ``zo-sgd-momentum`` and ``zo-adam`` (per group).
        lozo_rank, lozo_nu: LOZO's rank and how many steps share one V.
        seed: seeds every direction, ``direction_seed(seed, step, k)``.
        fused: the 2-pass step where it applies (see the module docstring: call ``settle()``).
        ignore_step_without_closure: make ``step()`` without a closure a no-op instead of an error,
            for frameworks that call it after a training step that already stepped (``ZOTrainer``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 estimator: str = "spsa", optimizer: str = "zo-sgd", n_directions: int = 1,
                 distribution: str = "gaussian", one_sided: bool = False, backend: str = "auto",
                 momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), lozo_rank: int = 2,
                 lozo_nu: int = 50, seed: int = 0, fused: bool = False,
                 ignore_step_without_closure: bool = False) -> None:
        if not (lr >= 0 and eps > 0 and n_directions >= 1):
            raise ZoftError(f"MeZO needs lr >= 0, eps > 0 and n_directions >= 1 (got lr={lr}, eps={eps}, "
                            f"n_directions={n_directions})")
        self._settings = _Settings(estimator, eps, n_directions, distribution, one_sided, backend, lozo_rank,
                                   lozo_nu, optimizer, fused, seed)
        build_optimizer(optimizer)   # unknown names fail here, not at the first step
        for what, name, known in (("estimator", estimator, ESTIMATORS), ("distribution", distribution, DISTRIBUTIONS),
                                  ("backend", backend, BACKEND_NAMES)):
            if name not in known:
                raise ZoftError(f"unknown {what} '{name}'; choose from {', '.join(known)}")
        self.ignore_step_without_closure = ignore_step_without_closure
        self._group_optimizers: list[ZOSGD] = []   # one per group, in param_groups order: holds its state
        self._step_count = 0
        self._built: tuple[object, Stepper | None] | None = None   # (estimator, one-group stepper), built lazily
        self.last_estimate: Estimate | None = None   # the last step's (seed, g) pairs, loss and forwards, for logs
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=tuple(betas)))

    @property
    def step_count(self) -> int:
        """Steps taken (and restored by ``load_state_dict``): step t probes ``direction_seed(seed, t, k)``."""
        return self._step_count

    def add_param_group(self, param_group: dict) -> None:
        self.settle()   # the fused stepper is rebuilt for the new list of tensors
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._group_optimizers.append(build_optimizer(self._settings.optimizer, **_group_options(group)))
        self._built = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor | None:
        """One ZO step: probe with ``closure()`` (the loss, no backward), then update in place.

        Returns the step's loss (the mean of its probes, or L(θ) for one-sided and FZOO) as a tensor.
        A non-finite loss or projected gradient raises :class:`ZoftError` before any update (the
        probes' ±εz round trip is undone, exactly in bf16/fp16, to a few ulp in fp32).
        """
        if closure is None:
            if self.ignore_step_without_closure:
                return None
            raise ZoftError("MeZO.step needs a closure that returns the loss (and calls no backward): "
                            "opt.step(lambda: model(**batch).loss)")
        step, settings = self._step_count, self._settings
        objective = Objective(lambda: float(closure()))
        seeds = [direction_seed(settings.seed, step, k) for k in range(settings.n_directions)]
        for group, optimizer in zip(self.param_groups, self._group_optimizers):
            _set_group_options(optimizer, group)
        estimator, stepper = self._components()
        if stepper is not None:   # one group: zoft's own stepper, as `zoft train` builds it
            estimate = stepper.step(step, objective, seeds, self.param_groups[0]["lr"]).estimate
        else:
            estimate = zo_step(_trained(self.param_groups), objective, seeds, 1.0, estimator,
                               _GroupedUpdate(self.param_groups, self._group_optimizers), step=step,
                               check=functools.partial(_check_finite, step))
        self._step_count += 1
        self.last_estimate = estimate
        return torch.tensor(estimate.loss)

    def settle(self) -> None:
        """Remove a fused step's pending +εz, so that the weights are θ (a no-op for the plain step)."""
        if self._built is not None and self._built[1] is not None:
            self._built[1].settle()

    def state_dict(self) -> dict:
        """torch's ``state`` / ``param_groups``, plus ``zo``: the step count, seed, settings and each
        group's ZO-optimizer tensors (the live buffers, as torch's optimizers return them).
        Settles a fused step first."""
        self.settle()
        state = super().state_dict()
        state["zo"] = {"step": self._step_count, "seed": self._settings.seed,
                       "settings": {k: getattr(self._settings, k) for k in _IDENTITY},
                       # without the empty buffers of other groups' placeholders (lossless: an empty
                       # buffer and a missing one update alike)
                       "groups": [{k: v for k, v in opt.state_dict().items() if v.numel()}
                                  for opt in self._group_optimizers]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``; the next step continues its run exactly. The weights are taken to
        be θ as saved (a pending fused perturbation of this optimizer is dropped, not undone)."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ZoftError("not a MeZO state dict: it has no 'zo' entry (step count, seed, ZO state)")
        mine = {k: getattr(self._settings, k) for k in _IDENTITY}
        differ = [f"{k}={zo['settings'].get(k)!r} (here {v!r})" for k, v in mine.items()
                  if zo["settings"].get(k) != v]
        if differ:
            raise ZoftError("the MeZO state was saved with other settings: " + ", ".join(differ))
        if len(zo["groups"]) != len(self._group_optimizers):
            raise ZoftError(f"the MeZO state has {len(zo['groups'])} parameter groups, this optimizer "
                            f"{len(self._group_optimizers)}")
        super().load_state_dict(state_dict)   # checks the groups' sizes; restores lr, weight decay, ...
        params = _trained(self.param_groups)
        for optimizer, saved in zip(self._group_optimizers, zo["groups"]):
            optimizer.load_state_dict({k: _to_param_device(k, v, params) for k, v in saved.items()})
        self._step_count = int(zo["step"])
        self._settings = dataclasses.replace(self._settings, seed=int(zo["seed"]))
        self._built = None   # LOZO's V and the fused step's next direction follow the restored seed

    def _components(self) -> tuple[object, Stepper | None]:
        """The estimator, and zoft's stepper when there is one group (else the grouped update runs)."""
        params = _trained(self.param_groups)
        if not params:
            raise ZoftError("MeZO has no tensor to train (none of its parameters requires grad)")
        if self._built is None:
            group = self.param_groups[0]
            settings = dataclasses.replace(self._settings, **_settings_options(group))
            estimator, optimizer = build_components(settings, params[0].device)
            if len(self.param_groups) > 1:
                if isinstance(optimizer, ZOSGDConservative):
                    raise ZoftError("zo-sgd-cons chooses one step for all tensors: use one parameter group")
                self._built = (estimator, None)
            else:
                optimizer = self._group_optimizers[0]   # the group's, with its state
                self._built = (estimator, build_stepper(settings, params, estimator, optimizer, fuse=settings.fused,
                                                        check=_check_finite))
        stepper = self._built[1]
        if stepper is not None and stepper.fused and self.param_groups[0]["weight_decay"]:
            raise ZoftError("the fused step has no weight decay: set weight_decay=0 or fused=False")
        return self._built


class _GroupedUpdate:
    """Several groups as one ZO optimizer: each group's own optimizer moves its tensors with
    ``lr × group lr`` (MeZO passes 1.0), z indexed by the tensor's place in the whole list."""

    def __init__(self, groups: list[dict], optimizers: list[ZOSGD]) -> None:
        self.groups, self.optimizers = groups, optimizers

    def update(self, params, estimate, lr, backend, distribution, loss_fn=None) -> None:
        for group, optimizer in zip(self.groups, self.optimizers):
            own = {id(p) for p in group["params"]}
            # another group's tensor becomes an empty placeholder: it draws and moves nothing
            view = [p if id(p) in own else p.new_empty(0) for p in params]
            optimizer.update(view, estimate, lr * group["lr"], backend, distribution, loss_fn=loss_fn)


def _trained(groups: list[dict]) -> list[torch.Tensor]:
    """The tensors a step perturbs, in group order: those that require grad (zoft's ``named_trainable``)."""
    return [p for group in groups for p in group["params"] if p.requires_grad]


def _group_options(group: dict) -> dict:
    return {"weight_decay": group["weight_decay"], "momentum": group["momentum"], "betas": tuple(group["betas"])}


def _settings_options(group: dict) -> dict:
    beta1, beta2 = group["betas"]
    return {"weight_decay": group["weight_decay"], "momentum": group["momentum"],
            "adam_beta1": beta1, "adam_beta2": beta2}


def _set_group_options(optimizer: ZOSGD, group: dict) -> None:
    """Carry the group's current hyperparameters (a scheduler may have changed them) to its ZO optimizer."""
    fields = {f.name for f in dataclasses.fields(optimizer)}
    for name, value in _group_options(group).items():
        if name in fields:
            setattr(optimizer, name, value)


def _check_finite(step: int, estimate: Estimate) -> None:
    """Before any update: a NaN or inf step raises, and nothing is applied."""
    values = [estimate.loss, *(g for _, g in estimate.directions)]
    if not all(math.isfinite(v) for v in values):
        raise ZoftError(f"MeZO step {step}: non-finite loss or projected gradient {values}; no update was "
                        "applied (lower lr or eps, or check the closure)")


def _to_param_device(key: str, value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """A copy of a saved ZO-optimizer tensor on the device of the tensor it belongs to: the ZO
    optimizers key per-tensor state as ``<name>.<index in the trained list>``; others stay put."""
    index = key.rpartition(".")[2]
    device = params[int(index)].device if index.isdigit() and int(index) < len(params) else value.device
    return value.to(device, copy=True)
