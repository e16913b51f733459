"""The ZO optimizer family (as in ZO-Bench, Zhang et al. 2024): how an estimate moves θ.

Every optimizer has ``update(params, estimate, lr, backend, distribution, loss_fn=None)``; with
n directions (seed, g) the gradient estimate is ĝ = (1/n) Σᵢ gᵢ zᵢ, zᵢ regenerated from its seed.

| name              | update                                                   | extra memory (fp32)        |
|-------------------|----------------------------------------------------------|----------------------------|
| zo-sgd            | θ ← θ − lr·ĝ                                             | none (z never stored)      |
| zo-sgd-momentum   | m ← μ·m + ĝ;  θ ← θ − lr·m                               | 1 buffer: 4 bytes/param     |
| zo-sgd-sign       | θ ← θ − lr·sign(ĝ)                                       | none for n=1, else 1 tensor |
| zo-sgd-cons       | θ ← argmin over {θ, θ−lr·ĝ, θ+lr·ĝ} of the batch loss    | none; +3 forwards per step  |
| zo-adam           | Adam on ĝ (bias-corrected m, v)                          | 2 buffers: 8 bytes/param    |

Weight decay is decoupled, θ ← θ − lr·λ·θ, and skips biases and norm gains (as in nanoGPT).
Momentum and Adam materialise ĝ one tensor at a time (a scratch the size of the tensor), so
only their state is full-size; ZO-SGD keeps MeZO's zero-extra-memory path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from zoft.errors import ZoftError
from zoft.zo.estimator import Estimate
from zoft.zo.perturb import PerturbationBackend


def decay_mask(params: Sequence[torch.Tensor]) -> list[bool]:
    """Weight decay applies to matrices only, not to biases and norm gains (as in nanoGPT)."""
    return [p.dim() >= 2 for p in params]


def apply_weight_decay(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> None:
    if weight_decay:
        for p, decays in zip(params, decay_mask(params)):
            if decays:
                p.mul_(1 - lr * weight_decay)


def gradient_estimate(p: torch.Tensor, index: int, estimate: Estimate, backend: PerturbationBackend,
                      distribution: str) -> torch.Tensor:
    """ĝ = (1/n) Σᵢ gᵢ zᵢ for tensor ``index`` of the list, fresh, in float32 (float64 for float64 θ)."""
    n = len(estimate.directions)
    out = torch.zeros(p.shape, device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
    for seed, g in estimate.directions:
        out.add_(backend.direction(p, seed, index, distribution), alpha=g / n)
    return out


def apply_sgd(params: Sequence[torch.Tensor], estimate: Estimate, scale: float,
              backend: PerturbationBackend, distribution: str) -> None:
    """θ ← θ + scale·ĝ with one backend pass per direction and no extra memory."""
    n = len(estimate.directions)
    for seed, g in estimate.directions:
        backend.add_noise_(params, seed, scale * g / n, distribution)


def _add_(p: torch.Tensor, update: torch.Tensor, alpha: float) -> None:
    """p += alpha·update, computed in float32 and rounded once."""
    if p.dtype in (torch.float32, torch.float64):
        p.add_(update.to(p.dtype), alpha=alpha)
    else:
        p.copy_(p.float().add_(update, alpha=alpha))


@dataclass
class ZOSGD:
    """Plain MeZO update (ZO-SGD): θ ← θ − lr·ĝ, z regenerated, nothing stored."""

    weight_decay: float = 0.0

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], estimate: Estimate, lr: float,
               backend: PerturbationBackend, distribution: str, loss_fn: Callable[[], float] | None = None) -> None:
        apply_weight_decay(params, lr, self.weight_decay)
        apply_sgd(params, estimate, -lr, backend, distribution)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


@dataclass
class ZOSGDMomentum(ZOSGD):
    """ZO-SGD with heavy-ball momentum (torch.optim.SGD's convention, no dampening):

        m ← μ·m + ĝ,   θ ← θ − lr·m

    State: one float32 buffer per trainable tensor (4 bytes per trained parameter).
    """

    momentum: float = 0.9
    buffers: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def update(self, params, estimate, lr, backend, distribution, loss_fn=None) -> None:
        apply_weight_decay(params, lr, self.weight_decay)
        for i, p in enumerate(params):
            g = gradient_estimate(p, i, estimate, backend, distribution)
            m = self.buffers.get(i)
            m = self.buffers[i] = g if m is None else m.mul_(self.momentum).add_(g)
            _add_(p, m, -lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"momentum.{i}": m for i, m in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffers = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("momentum.")}


@dataclass
class ZOSGDSign(ZOSGD):
    """ZO-SGD-Sign: θ ← θ − lr·sign(ĝ), a step of exactly lr on every coordinate.

    With one direction sign(g·z) = sign(g)·sign(z), and sign(z) is the Rademacher direction of the
    same seed (for the torch backend, whose Rademacher draw is the sign of its Gaussian draw), so
    the update is one backend pass with no extra memory. With n > 1 ĝ is built tensor by tensor.
    """

    @torch.no_grad()
    def update(self, params, estimate, lr, backend, distribution, loss_fn=None) -> None:
        apply_weight_decay(params, lr, self.weight_decay)
        if len(estimate.directions) == 1 and (distribution == "rademacher" or backend.name == "torch"):
            seed, g = estimate.directions[0]
            sign = (g > 0) - (g < 0)
            backend.add_noise_(params, seed, -lr * sign, "rademacher")
            return
        for i, p in enumerate(params):
            _add_(p, gradient_estimate(p, i, estimate, backend, distribution).sign_(), -lr)


@dataclass
class ZOSGDConservative(ZOSGD):
    """ZO-SGD-Conservative: try the step both ways and keep the best of θ, θ − lr·ĝ, θ + lr·ĝ
    by the loss on the same batch (3 extra forwards per step: L(θ), L(θ − lr·ĝ), L(θ + lr·ĝ)).

    The choice s ∈ {0, −1, +1} (θ ← θ + s·lr·ĝ) is written to ``estimate.extra["conservative"]``;
    an estimate that already carries it (a replay) is applied without calling the loss.
    """

    @torch.no_grad()
    def update(self, params, estimate, lr, backend, distribution, loss_fn=None) -> None:
        apply_weight_decay(params, lr, self.weight_decay)
        if "conservative" in estimate.extra:
            apply_sgd(params, estimate, estimate.extra["conservative"] * lr, backend, distribution)
            return
        if loss_fn is None:
            raise ZoftError("zo-sgd-cons needs the batch loss to choose its step (pass loss_fn)")
        loss0 = float(loss_fn())
        apply_sgd(params, estimate, -lr, backend, distribution)       # θ − lr·ĝ
        loss_minus = float(loss_fn())
        apply_sgd(params, estimate, 2 * lr, backend, distribution)    # θ + lr·ĝ
        loss_plus = float(loss_fn())
        choice = min((loss0, 0), (loss_minus, -1), (loss_plus, 1))[1]   # ties keep the smaller s
        if choice != 1:
            apply_sgd(params, estimate, (choice - 1) * lr, backend, distribution)
        estimate.extra["conservative"] = choice
        estimate.forwards += 3


@dataclass
class ZOAdam(ZOSGD):
    """ZO-Adam: Adam (decoupled weight decay, as AdamW) fed with the ZO estimate ĝ:

        m ← β₁m + (1−β₁)ĝ,  v ← β₂v + (1−β₂)ĝ²,  θ ← θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + δ)

    State: two float32 buffers per trainable tensor (8 bytes per trained parameter: 3× the
    weights' memory in fp32 full fine-tuning, negligible with LoRA or prefix).
    """

    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    t: int = 0
    m: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    v: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def update(self, params, estimate, lr, backend, distribution, loss_fn=None) -> None:
        apply_weight_decay(params, lr, self.weight_decay)
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for i, p in enumerate(params):
            g = gradient_estimate(p, i, estimate, backend, distribution)
            m = self.m.setdefault(i, torch.zeros_like(g)).mul_(b1).add_(g, alpha=1 - b1)
            v = self.v.setdefault(i, torch.zeros_like(g)).mul_(b2).addcmul_(g, g, value=1 - b2)
            _add_(p, (m / c1).div_((v / c2).sqrt_().add_(self.adam_eps)), -lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"t": torch.tensor(self.t), **{f"m.{i}": x for i, x in self.m.items()},
                **{f"v.{i}": x for i, x in self.v.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.t = int(state["t"]) if "t" in state else 0
        self.m = {int(k[2:]): x for k, x in state.items() if k.startswith("m.")}
        self.v = {int(k[2:]): x for k, x in state.items() if k.startswith("v.")}


OPTIMIZERS = {"zo-sgd": ZOSGD, "zo-sgd-momentum": ZOSGDMomentum, "zo-sgd-sign": ZOSGDSign,
              "zo-sgd-cons": ZOSGDConservative, "zo-adam": ZOAdam}


def build_optimizer(name: str, **options) -> ZOSGD:
    """The optimizer ``name`` with the options it takes (others, e.g. ``betas`` for SGD, are ignored)."""
    if name not in OPTIMIZERS:
        raise ZoftError(f"unknown ZO optimizer '{name}'; choose from {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in options.items() if k in accepted})
