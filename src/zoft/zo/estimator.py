"""Zeroth-order gradient estimators: SPSA (two- or one-sided, n-SPSA), FZOO, LOZO and Sparse MeZO.

For a direction z ~ N(0, I) (or Rademacher) and a small ε, SPSA estimates the
directional derivative of the loss L at θ:

    two-sided:  g = (L(θ + εz) − L(θ − εz)) / 2ε   ≈ zᵀ∇L(θ)   (2 forwards per direction)
    one-sided:  g = (L(θ + εz) − L(θ)) / ε         ≈ zᵀ∇L(θ)   (1 forward per direction, +1 for L(θ))

and the gradient estimate is ĝ = g·z. n-SPSA averages n such estimates. Only the scalar
``g`` and the seed of z are kept: an :class:`Estimate` is a list of (seed, g) pairs plus the
few scalars an optimizer or backend needs to replay the step exactly (``extra``).

Every estimator has ``estimate(params, loss_fn, seeds, step=0) -> Estimate`` and the
attributes ``backend`` and ``distribution`` that the optimizer must use to regenerate z.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from zoft.zo import cpu_kernels
from zoft.zo.perturb import PerturbationBackend, TorchBackend, _unround_add, tensor_seed

LossFn = Callable[[], float]


@dataclass(frozen=True)
class Objective:
    """What a ZO step minimises, ``loss(*batch)``, and optionally ``pair(*batch) -> (L(θ+εz), L(θ−εz))``
    from one forward over the batch stacked on itself (offload's ``dual_probe``). :meth:`on` binds a batch."""

    loss: Callable[..., float]
    pair: Callable[..., tuple[float, float]] | None = None

    def __call__(self, *batch) -> float:
        return self.loss(*batch)

    def on(self, *batch) -> "Objective":
        return Objective(functools.partial(self.loss, *batch), self.pair and functools.partial(self.pair, *batch))


@dataclass
class Estimate:
    """Outcome of one estimator call.

    Attributes:
        loss: the loss reported for the step (mean of the probed losses, or L(θ) when measured).
        directions: one (seed, g) per direction; the update is θ ← θ − lr·(1/n)·Σ gᵢ zᵢ.
        forwards: forward passes this estimate spent (the budget unit of bench/convergence.py).
        extra: JSON-able scalars needed to replay the update from a record (e.g. the
            conservative optimizer's choice, LOZO's V seed).
    """

    loss: float
    directions: list[tuple[int, float]] = field(default_factory=list)
    forwards: int = 0
    extra: dict[str, float | int] = field(default_factory=dict)


@torch.no_grad()
def spsa(params: Sequence[torch.Tensor], loss_fn: LossFn, seed: int, eps: float,
         backend: PerturbationBackend, distribution: str = "gaussian") -> tuple[float, float]:
    """One two-sided SPSA probe, in place. Returns ``(L(θ+εz), L(θ−εz))``.

    The parameters are back at θ afterwards: exactly in bf16/fp16 (the backend inverts its own
    rounding, see ``undo``), within a few ulp per step in fp32.

    A backend with ``dual_probe`` (CPU offload) and a loss with ``pair()`` (both losses from one
    forward over the batch stacked on itself) make the same passes inside that one forward.
    """
    dual, pair = getattr(backend, "dual_probe", None), getattr(loss_fn, "pair", None)
    if dual is not None and pair is not None:   # offload: both forwards in one stream of the weights
        return dual(params, pair, seed, eps, distribution)
    backend.add_noise_(params, seed, +eps, distribution)              # θ + εz
    loss_plus = float(loss_fn())
    backend.add_noise_(params, seed, -eps, distribution, undo=+eps)   # θ − εz
    loss_minus = float(loss_fn())
    backend.add_noise_(params, seed, 0.0, distribution, undo=-eps)    # back to θ
    return loss_plus, loss_minus


@torch.no_grad()
def probe(params: Sequence[torch.Tensor], loss_fn: LossFn, seed: int, eps: float,
          backend: PerturbationBackend, distribution: str = "gaussian") -> float:
    """One one-sided probe, in place: returns ``L(θ+εz)`` and leaves θ restored."""
    backend.add_noise_(params, seed, +eps, distribution)              # θ + εz
    loss = float(loss_fn())
    backend.add_noise_(params, seed, 0.0, distribution, undo=+eps)    # back to θ
    return loss


@dataclass
class SPSA:
    """n-SPSA (MeZO): ``n_directions`` probes at the same θ, each with its own seed.

    Args:
        eps: perturbation scale ε (MeZO default 1e-3).
        n_directions: number of directions n averaged per step (MeZO's n-SPSA).
        distribution: "gaussian" (MeZO) or "rademacher".
        backend: the perturbation backend.
        one_sided: measure L(θ) once and use (L(θ+εzᵢ) − L(θ))/ε: n+1 forwards instead of 2n,
            at the price of an O(ε) bias and a noisier g for n = 1.
    """

    eps: float = 1e-3
    n_directions: int = 1
    distribution: str = "gaussian"
    backend: PerturbationBackend = field(default_factory=TorchBackend)
    one_sided: bool = False

    def estimate(self, params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int],
                 step: int = 0) -> Estimate:
        assert len(seeds) == self.n_directions, "one seed per direction"
        if self.one_sided:
            loss0 = float(loss_fn())
            directions = [(s, (probe(params, loss_fn, s, self.eps, self.backend, self.distribution) - loss0) / self.eps)
                          for s in seeds]
            return Estimate(loss=loss0, directions=directions, forwards=len(seeds) + 1)
        losses, directions = [], []
        for seed in seeds:
            loss_plus, loss_minus = spsa(params, loss_fn, seed, self.eps, self.backend, self.distribution)
            losses += [loss_plus, loss_minus]
            directions.append((seed, (loss_plus - loss_minus) / (2 * self.eps)))
        return Estimate(loss=sum(losses) / len(losses), directions=directions, forwards=len(losses))


@dataclass
class FZOO:
    """FZOO (Dang et al. 2025, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language
    Models towards Adam-Scale Speed", arXiv:2506.09034).

    N one-sided Rademacher probes uᵢ around the same θ, and a step normalised by the spread of
    the perturbed losses lᵢ = L(θ + εuᵢ):

        θ ← θ − η/(N·σ) · Σᵢ (lᵢ − l₀) uᵢ,    l₀ = L(θ),  σ = std(l₁ … l_N)

    Since lᵢ − l₀ ≈ ε uᵢᵀ∇L and std over uᵢ of uᵢᵀ∇L is ‖∇L‖, ε cancels and the step is a
    zeroth-order normalised-SGD step of length ≈ η (the paper's Adam-like adaptivity). Here it
    is an estimate gᵢ = (lᵢ − l₀)/σ that plain ZO-SGD applies as θ ← θ − η·(1/N)·Σ gᵢ uᵢ, so it
    composes with every optimizer. N+1 forwards per step; no extra memory. The paper batches the
    N perturbed forwards into one; here they run one after another (same count of forwards).
    """

    eps: float = 1e-3
    n_directions: int = 8
    backend: PerturbationBackend = field(default_factory=TorchBackend)
    distribution: str = "rademacher"

    def estimate(self, params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int],
                 step: int = 0) -> Estimate:
        assert len(seeds) == self.n_directions >= 2, "FZOO needs N >= 2 directions (σ of the losses)"
        loss0 = float(loss_fn())
        losses = [probe(params, loss_fn, s, self.eps, self.backend, self.distribution) for s in seeds]
        sigma = statistics_std(losses)
        # all probes equal (e.g. an accuracy objective on a small batch): no information, no step
        directions = [(s, (l - loss0) / sigma if sigma > 0 else 0.0) for s, l in zip(seeds, losses)]
        return Estimate(loss=loss0, directions=directions, forwards=len(seeds) + 1, extra={"sigma": sigma})


def statistics_std(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1 in the denominator)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


class LowRankBackend:
    """LOZO's perturbations: a weight matrix W (m×n) moves along z = U Vᵀ/√r, not a dense z.

    U (m×r) is drawn from the step's seed; V (n×r) from ``v_seed``, which the LOZO estimator
    changes only every ν steps (lazy sampling). Tensors that are not matrices, or whose smaller
    side is ≤ r, get a dense Gaussian z as in MeZO. The 1/√r makes E[z_ij²] = 1, so ε and lr
    are on MeZO's scale; the paper's ĝ = ΔL/(2ε)·UVᵀ/r is the same step with ε rescaled by √r.
    A pass draws (m+n)·r numbers per matrix instead of m·n and applies them with one addmm.
    """

    name = "lowrank"

    def __init__(self, rank: int = 2, dense: PerturbationBackend | None = None) -> None:
        self.rank, self.dense = rank, dense or TorchBackend()
        self.v_seed = 0

    def _factors(self, param: torch.Tensor, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = param.shape
        gen = torch.Generator(device=param.device)
        gen.manual_seed(tensor_seed(seed, index))
        u = torch.randn(m, self.rank, generator=gen, device=param.device)
        gen.manual_seed(tensor_seed(self.v_seed, index) ^ 0x5A5A)
        v = torch.randn(n, self.rank, generator=gen, device=param.device)
        return u / math.sqrt(self.rank), v

    def _is_lowrank(self, param: torch.Tensor) -> bool:
        return param.dim() == 2 and min(param.shape) > self.rank

    def direction(self, param: torch.Tensor, seed: int, index: int, distribution: str = "gaussian",
                  out: torch.Tensor | None = None) -> torch.Tensor:
        if not self._is_lowrank(param):
            return self.dense.direction(param, seed, index, distribution, out=out)
        u, v = self._factors(param, seed, index)
        return torch.mm(u, v.T, out=out) if out is not None else u @ v.T

    @torch.no_grad()
    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        for index, p in enumerate(params):
            if not self._is_lowrank(p):
                _dense_one(self.dense, p, seed, index, scale, distribution, undo)
                continue
            u, v = self._factors(p, seed, index)
            if p.dtype in (torch.float32, torch.float64):
                p.addmm_(u.to(p.dtype), v.T.to(p.dtype), alpha=scale - undo)
            else:   # round once, and invert the earlier rounding exactly (see TorchBackend)
                z = u @ v.T
                theta = _unround_add(p, z, undo) if undo else p.float()
                p.copy_(theta.add_(z, alpha=scale))


def _dense_one(backend: PerturbationBackend, p: torch.Tensor, seed: int, index: int, scale: float,
               distribution: str, undo: float) -> None:
    """Dense z for one tensor at its index in the full list (so replay matches the whole-list pass)."""
    z = backend.direction(p, seed, index, distribution)
    if p.dtype in (torch.float32, torch.float64):
        p.add_(z.to(p.dtype), alpha=scale - undo)
    else:
        theta = _unround_add(p, z, undo) if undo else p.float()
        p.copy_(theta.add_(z, alpha=scale))


@dataclass
class LOZO:
    """LOZO (Chen et al. 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with
    Low-rank Structures", arXiv:2410.07698): two-sided SPSA along low-rank directions.

    Each matrix W moves along z = UVᵀ/√r (see :class:`LowRankBackend`); V is resampled only every
    ``nu`` steps, so consecutive steps explore the same rank-r column space (lazy sampling):

        g = (L(θ + εz) − L(θ − εz)) / 2ε,    θ ← θ − lr·g·z

    2 forwards per direction, no extra memory. ``v_seed`` is recorded in ``Estimate.extra`` so a
    replay can set ``backend.v_seed`` before re-applying the update.
    """

    eps: float = 1e-3
    n_directions: int = 1
    rank: int = 2
    nu: int = 50
    seed: int = 0
    backend: LowRankBackend = field(default_factory=LowRankBackend)
    distribution: str = "gaussian"

    def __post_init__(self) -> None:
        self.backend.rank = self.rank

    def estimate(self, params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int],
                 step: int = 0) -> Estimate:
        # V is a pure function of (run seed, step // ν): resume replays the same lazy schedule
        self.backend.v_seed = tensor_seed(self.seed, step // self.nu)
        inner = SPSA(self.eps, len(seeds), self.distribution, self.backend).estimate(params, loss_fn, seeds)
        inner.extra["v_seed"] = self.backend.v_seed
        return inner


class SparseBackend:
    """Sparse MeZO's perturbations: z masked to the small-magnitude weights of each tensor.

    ``masks`` (one bool tensor per entry of the parameter list, or None for "all") is set by
    :class:`SparseMeZO` once per step, from θ before its first probe, and then serves every pass
    of that step (probes and update): θ moves by a few ulp during the probes, and a mask
    recomputed from that θ could flip at the threshold. Memory: 1 byte per trained weight.
    """

    name = "sparse"

    def __init__(self, dense: PerturbationBackend | None = None) -> None:
        self.dense = dense or TorchBackend()
        self.masks: list[torch.Tensor | None] = []
        # masks not yet written, by index: their |θ| thresholds. The C loop writes them in the step's
        # first pass, which reads θ anyway; elsewhere they are made before their first use.
        self.thresholds: dict[int, float] = {}

    def sweeps(self, param: torch.Tensor, distribution: str) -> bool:
        """Whether this tensor's passes run in cpu-fast's C loop (which can also write its mask)."""
        return (getattr(self.dense, "name", None) == "cpu-fast" and distribution == "rademacher"
                and cpu_kernels.available() and cpu_kernels.takes(param))

    def _make_mask(self, index: int, param: torch.Tensor) -> None:
        threshold = self.thresholds.pop(index)
        torch.le(param.detach().reshape(-1).abs(), threshold, out=self.masks[index].view(-1))

    def direction(self, param: torch.Tensor, seed: int, index: int, distribution: str = "gaussian",
                  out: torch.Tensor | None = None) -> torch.Tensor:
        if index in self.thresholds:
            self._make_mask(index, param)
        z = self.dense.direction(param, seed, index, distribution, out=out)
        mask = self.masks[index] if index < len(self.masks) else None
        return z if mask is None else z.mul_(mask)

    @torch.no_grad()
    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        # cpu-fast's z from the same hashed bits, masked in the C loop: no z tensor per pass, and
        # the same bits as below (a masked-out weight is nonzero, so θ + 0·c is θ either way)
        swept = {i for i, p in enumerate(params) if self.sweeps(p, distribution)}
        if swept:
            order = sorted(swept)
            masks = [self.masks[i] if i < len(self.masks) else None for i in order]
            thresholds = None
            if self.thresholds and all(i in self.thresholds for i in order):   # the step's first pass
                thresholds = [self.thresholds.pop(i) for i in order]
            else:
                for i in order:
                    if i in self.thresholds:
                        self._make_mask(i, params[i])
            cpu_kernels.sweep_([params[i] for i in order], order, [(seed, scale - undo)], masks=masks,
                               thresholds=thresholds)
        for index, p in enumerate(params):
            if index in swept:
                continue
            z = self.direction(p, seed, index, distribution)
            if p.dtype in (torch.float32, torch.float64):
                p.add_(z.to(p.dtype), alpha=scale - undo)
            else:   # round once, and invert the earlier rounding exactly (see TorchBackend)
                theta = _unround_add(p, z, undo) if undo else p.float()
                p.copy_(theta.add_(z, alpha=scale))


SAMPLE = 1 << 16   # |θ| values a larger tensor's threshold is estimated from
# names the rule in trajectories: replay rebuilds Sparse MeZO's weights only under the rule that drew
# its masks (the exact quantile of up to 2^20 strided values until 2026-11-29; unnamed in those files)
MASK_RULE = "quantile of 2^16 random positions"


@functools.lru_cache(maxsize=64)
def _sample_positions(numel: int) -> torch.Tensor:
    """``SAMPLE`` positions of a flat tensor of ``numel`` entries, uniform and fixed per size.

    Random, not strided: a stride that is a multiple of a row's length would read the same few
    columns of every row, and LLM weights have columns of outlier magnitude. Fixed: the mask is a
    function of θ alone, so resume and replay rebuild it. Cached: a model has a few distinct sizes."""
    gen = torch.Generator().manual_seed(numel)
    # sorted: the same sample (a quantile ignores order), read front to back, which made the gather
    # about 2x faster than in draw order (SmolLM2's 211 large tensors on 2 cores: 0.084 s -> 0.043 s)
    return torch.randint(numel, (SAMPLE,), generator=gen).sort().values


def magnitude_threshold(p: torch.Tensor, fraction: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The ``fraction`` quantile of |θ| (0-dim, ``p``'s dtype): exact for tensors of up to 2¹⁶
    entries, and from 2¹⁶ fixed random positions for larger ones (the fraction under it then has a
    standard deviation of 0.17% at 25%). Selecting the exact quantile of every large tensor was most
    of a Sparse MeZO step on a CPU (``bench/smezo_mask.py``). ``magnitude``: |θ| flat, where the
    caller has it."""
    flat = p.detach().reshape(-1)
    if flat.numel() <= SAMPLE:
        sample = flat.abs() if magnitude is None else magnitude
    else:   # gathered, then |·|: the same values as gathering |θ|
        sample = torch.index_select(flat, 0, _sample_positions(flat.numel()).to(flat.device)).abs()
    k = max(1, min(sample.numel(), math.ceil(fraction * sample.numel())))
    # kthvalue in float32 at least (none for bf16 on CPU); the threshold is one of the tensor's own
    # values, so it converts back to the tensor's dtype exactly
    sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
    if sample.device.type == "cpu":   # numpy's introselect (on a copy): 2-3x faster than kthvalue here
        threshold = torch.tensor(np.partition(sample.numpy(), k - 1)[k - 1])
    else:
        threshold = sample.kthvalue(k).values
    return threshold.to(flat.dtype)


def small_magnitude_mask(p: torch.Tensor, fraction: float, out: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """True for the ``fraction`` of ``p``'s entries smallest in magnitude (ties at the threshold
    included): |θ| ≤ :func:`magnitude_threshold`.

    ``out`` (bool, shaped as ``p``) receives the mask, and ``scratch`` (flat, ``p``'s dtype and
    device, at least its size) holds |θ|: Sparse MeZO passes the last step's, so a step does not
    allocate 5 bytes per weight afresh."""
    flat = p.detach().reshape(-1)
    magnitude = flat.abs() if scratch is None else torch.abs(flat, out=scratch[:flat.numel()])
    threshold = magnitude_threshold(p, fraction, magnitude)
    if out is None:
        return magnitude.le(threshold).reshape(p.shape)
    torch.le(magnitude, threshold, out=out.view(-1))
    return out


@dataclass
class SparseMeZO:
    """Sparse MeZO (Liu et al. 2024, "Sparse MeZO: Less Parameters for Better Performance in
    Zeroth-Order LLM Fine-Tuning", arXiv:2402.15751): two-sided SPSA along a direction that
    moves only the small-magnitude weights,

        m = |θ| ≤ q_f(|θ|) per tensor,   z' = m ⊙ z,   g = (L(θ + εz') − L(θ − εz')) / 2ε,   θ ← θ − lr·g·z'

    with q_f the ``fraction`` quantile of the tensor's |θ|. The mask is a function of θ at the
    step, so resume and replay (which rebuild that θ bit for bit) rebuild it too; nothing is
    carried between steps but buffers. 2 forwards per direction; 1 byte per weight for the step's
    mask, and a scratch copy of |θ| of the largest tensor whose mask torch makes. Where cpu-fast's C
    loop moves a tensor, only its threshold is computed here (from 2¹⁶ sampled weights), and the
    loop writes the mask in the step's first pass, which reads θ anyway.
    """

    eps: float = 1e-3
    n_directions: int = 1
    fraction: float = 0.25
    distribution: str = "gaussian"
    backend: SparseBackend = field(default_factory=SparseBackend)
    scratch: dict = field(default_factory=dict, repr=False)   # |θ| of the largest tensor, per dtype and device

    def estimate(self, params: Sequence[torch.Tensor], loss_fn: LossFn, seeds: Sequence[int],
                 step: int = 0) -> Estimate:
        last = self.backend.masks if len(self.backend.masks) == len(params) else [None] * len(params)
        masks, self.backend.thresholds = [], {}
        for index, (p, out) in enumerate(zip(params, last)):   # from θ, before any probe; into the last step's buffers
            if out is None or out.shape != p.shape or out.device != p.device:
                out = torch.empty(p.shape, dtype=torch.bool, device=p.device)
            if self.backend.sweeps(p, self.distribution):   # the C loop writes it in the first probe's pass
                self.backend.thresholds[index] = float(magnitude_threshold(p, self.fraction))
                masks.append(out)
                continue
            key = (p.dtype, p.device)
            if key not in self.scratch or self.scratch[key].numel() < p.numel():
                self.scratch[key] = torch.empty(max(q.numel() for q in params if (q.dtype, q.device) == key),
                                                dtype=p.dtype, device=p.device)
            masks.append(small_magnitude_mask(p, self.fraction, out=out, scratch=self.scratch[key]))
        self.backend.masks = masks
        inner = SPSA(self.eps, len(seeds), self.distribution, self.backend).estimate(params, loss_fn, seeds)
        # count_nonzero: summing a bool tensor widens it to int64 first, ~10x slower per step
        inner.extra["perturbed"] = round(sum(int(torch.count_nonzero(m)) for m in self.backend.masks)
                                         / max(1, sum(m.numel() for m in self.backend.masks)), 6)
        return inner


ESTIMATORS = {"spsa": SPSA, "fzoo": FZOO, "lozo": LOZO, "smezo": SparseMeZO}
