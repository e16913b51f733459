"""Perturbation backends: ``p += scale * z`` in place, with z regenerated from a seed.

z is never stored. Every pass regenerates it from ``(seed, tensor index)``, so the +εz,
−2εz, +εz passes and the update all see the same direction while training memory stays
at inference memory. Backends register by name; the torch backend is the reference and
the CPU path.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from typing import Callable, Protocol, Sequence

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")

Term = tuple[int, float]   # (seed, coefficient): the term coefficient·z(seed)

_MASK64 = (1 << 64) - 1


def tensor_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for tensor ``index`` of direction ``seed`` (splitmix64).

    Mixing instead of ``seed + index`` keeps directions of nearby seeds unrelated:
    with plain addition, tensor 1 of seed s would reuse tensor 0 of seed s+1.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class PerturbationBackend(Protocol):
    """Adds ``scale * z(seed)`` to a list of tensors, in place."""

    name: str

    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        """``p ← p − undo·z + scale·z``, where the ``−undo·z`` part exactly reverses an earlier
        ``add_noise_(..., undo)`` with the same seed, even where that add rounded (bf16/fp16)."""
        ...

    def direction(self, param: torch.Tensor, seed: int, index: int, distribution: str = "gaussian",
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """z for tensor ``index`` as a float32 tensor (into ``out`` if given)."""
        ...

    def combine_(self, params: Sequence[torch.Tensor], terms: Sequence[Term] = (),
                 distribution: str = "gaussian", undo: Term | None = None, then: Term | None = None) -> None:
        """The multi-term pass, per element, with ``rnd`` the rounding to the parameter's dtype:

            θ  = unround(p, undo)                      exact inverse of an earlier add of undo
            θ' = rnd(θ + Σ_(s,c) ∈ terms c·z(s))       the new stored point
            p ← rnd(θ' + c_then·z(s_then))             a pending perturbation on top of it

        With ``then`` absent, ``p ← θ'``. The sums are done in fp32. This is what fuses the
        end of one MeZO step with the start of the next (see ``zoft.zo.fused``): because θ'
        is rounded before ``then`` is added, one fused pass equals the two separate passes.
        """
        ...


class TorchBackend:
    """Reference backend: one seeded ``torch.Generator`` draw per tensor.

    z is drawn in float32 into a reused scratch buffer (allocating a fresh z per tensor
    costs page faults that tripled the pass time on a CPU) and the add is done in float32
    with a single rounding to the parameter's dtype, so bf16/fp16 weights pick up one
    rounding error per pass instead of two (see README, "Round-trip drift").
    Rademacher signs are the signs of the same Gaussian draw.

    On CPU the passes run in cache-sized blocks (``zoft.zo.cpu_backend.blocked_combine_``):
    the same z, drawn block after block from the same generator, and the same arithmetic per
    element, so the weights are bit for bit those of a whole-tensor pass, without the
    full-size scratch z (measured 1.5-3.7x faster passes on a 2-core EPYC).
    """

    name = "torch"
    blocked_cpu = True   # False: whole-tensor passes on CPU too (the benchmarks' baseline)

    def __init__(self) -> None:
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def _buffer(self, param: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(param.device)
        if buf is None or buf.numel() < param.numel():
            buf = self._scratch[param.device] = torch.empty(param.numel(), device=param.device)
        return buf[:param.numel()].view(param.shape)

    def direction(self, param: torch.Tensor, seed: int, index: int,
                  distribution: str = "gaussian", out: torch.Tensor | None = None) -> torch.Tensor:
        """z for tensor ``index``, drawn in float32 (into ``out`` if given)."""
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution '{distribution}'; choose from {DISTRIBUTIONS}")
        gen = torch.Generator(device=param.device)
        gen.manual_seed(tensor_seed(seed, index))
        z = torch.empty(param.shape, device=param.device) if out is None else out
        torch.randn(param.shape, generator=gen, out=z)
        return z.sign_() if distribution == "rademacher" else z

    @torch.no_grad()
    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        if self.blocked_cpu and _on_cpu(params):
            self.combine_(params, [(seed, scale)], distribution, undo=(seed, undo) if undo else None)
            return
        for index, p in enumerate(params):
            z = self.direction(p, seed, index, distribution, out=self._buffer(p))
            if p.dtype in (torch.float32, torch.float64):
                # rounding here is below 1 ulp of fp32 per pass: ~2e-6 relative after 1000 steps
                p.add_(z.to(p.dtype), alpha=scale - undo)
            else:
                theta = _unround_add(p, z, undo) if undo else p.float()
                p.copy_(theta.add_(z, alpha=scale))   # add in float32, round once

    @torch.no_grad()
    def combine_(self, params: Sequence[torch.Tensor], terms: Sequence[Term] = (),
                 distribution: str = "gaussian", undo: Term | None = None, then: Term | None = None) -> None:
        """See ``PerturbationBackend.combine_``. One z draw per distinct seed and tensor.

        fp32 tensors are updated in place, one ``add_`` per seed (undo included, as in
        ``add_noise_``: a few ulp per step); bf16/fp16 go through a float32 copy, so their
        undo is exact and their terms round once.
        """
        if self.blocked_cpu and _on_cpu(params):
            from zoft.zo.cpu_backend import blocked_combine_   # imports this module: not at the top
            blocked_combine_(params, terms, distribution, undo, then, bits=False)
            return
        coeffs = _merge(terms)
        for index, p in enumerate(params):
            buf = self._buffer(p)
            if p.dtype in (torch.float32, torch.float64):
                if undo is not None:
                    z = self.direction(p, undo[0], index, distribution, out=buf)
                    p.add_(z.to(p.dtype), alpha=coeffs.get(undo[0], 0.0) - undo[1])
                for seed, coeff in coeffs.items():
                    if undo is None or seed != undo[0]:
                        p.add_(self.direction(p, seed, index, distribution, out=buf).to(p.dtype), alpha=coeff)
                if then is not None:
                    p.add_(self.direction(p, then[0], index, distribution, out=buf).to(p.dtype), alpha=then[1])
                continue
            theta = p.float()
            if undo is not None:
                z = self.direction(p, undo[0], index, distribution, out=buf)
                theta = _unround_add(p, z, undo[1]).add_(z, alpha=coeffs.get(undo[0], 0.0))
            for seed, coeff in coeffs.items():
                if undo is None or seed != undo[0]:
                    theta.add_(self.direction(p, seed, index, distribution, out=buf), alpha=coeff)
            if then is not None:
                theta = theta.to(p.dtype).float()   # θ' is a stored value
                theta.add_(self.direction(p, then[0], index, distribution, out=buf), alpha=then[1])
            p.copy_(theta)


def _on_cpu(params: Sequence[torch.Tensor]) -> bool:
    """Whether the blocked passes apply: on CUDA a blocked Philox draw is not the whole draw."""
    return all(p.device.type == "cpu" for p in params)


def _merge(terms: Sequence[Term]) -> dict[int, float]:
    """Coefficients summed per seed, in first-seen order."""
    coeffs: dict[int, float] = {}
    for seed, coeff in terms:
        coeffs[seed] = coeffs.get(seed, 0.0) + coeff
    return coeffs


Launch = tuple[tuple[int, float, float], "tuple[int, float, bool] | None"]


def plan_launches(terms: Sequence[Term], undo: Term | None, then: Term | None) -> list[Launch]:
    """Split a ``combine_`` into passes that each regenerate at most two directions.

    A pass is ``(a, b)``: ``a = (seed, undo, coeff)`` is undone then added, ``b = (seed, coeff,
    round_first)`` is added too, after rounding θ' if ``round_first`` (it is ``then``), or None.
    Up to two distinct seeds (a MeZO step, fused or not) make one pass, exactly as specified;
    more seeds (n-SPSA updates) make more passes, each rounding its result.
    """
    coeffs = _merge(terms)
    if undo is not None:
        a = (undo[0], undo[1], coeffs.pop(undo[0], 0.0))
    elif coeffs:
        seed = next(iter(coeffs))
        a = (seed, 0.0, coeffs.pop(seed))
    elif then is not None:
        return [((then[0], 0.0, then[1]), None)]
    else:
        return []
    launches: list[Launch] = []
    b = None
    for seed, coeff in coeffs.items():
        if b is None:
            b = (seed, coeff, False)
        else:
            launches.append((a, b))
            a, b = (seed, 0.0, coeff), None
    if then is not None:
        if b is None:
            b = (then[0], then[1], True)
        else:
            launches.append((a, b))
            a, b = (then[0], 0.0, then[1]), None
    launches.append((a, b))
    return launches


def _unround_add(p: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """The θ (as float32) with ``round(θ + scale·z) == p``: the exact inverse of a low-precision add.

    In bf16 the plain inverse ``p − scale·z`` lands up to an ulp away from θ, and those errors
    accumulate over the ±ε round trips of every step (11% relative drift after 1000 steps on
    SmolLM2 weights). θ is one of the neighbours of ``round(p − scale·z)``, so it is found by
    checking which of them adds back to ``p``; only where none does (a move across a binade
    that rounded two values to one) does an ulp of error remain.
    """
    step = z * scale
    guess = (p.float() - step).to(p.dtype)
    best = guess
    for direction in (float("inf"), float("-inf")):
        neighbour = torch.nextafter(guess, torch.full_like(guess, direction))
        hits = (neighbour.float() + step).to(p.dtype) == p
        best = torch.where(hits, neighbour, best)
    exact = (guess.float() + step).to(p.dtype) == p
    return torch.where(exact, guess, best).float()


# Backends by name. Each backend module registers its own names when imported (the Triton one
# needs triton and a GPU or the interpreter), so this registry never imports a subclass itself:
# get_backend imports the module a name lives in the first time that name is asked for.
# triton-fast: the GPU's approximate log/sin/cos; cpu-fast: blocked passes, Rademacher z from random bits
BACKEND_NAMES = ("auto", "torch", "triton", "triton-fast", "cpu-fast")
BACKENDS: dict[str, Callable[[], PerturbationBackend]] = {"torch": TorchBackend}
_MODULES = {"triton": "zoft.zo.triton_backend", "triton-fast": "zoft.zo.triton_backend",
            "cpu-fast": "zoft.zo.cpu_backend"}


def register_backend(name: str, factory: Callable[[], PerturbationBackend]) -> None:
    """Make ``get_backend(name)`` build backends with ``factory`` (a module calls this on import)."""
    BACKENDS[name] = factory


@functools.lru_cache(maxsize=None)
def _fast_math_runs(device: str) -> bool:
    """Whether the fast-math kernel compiles and runs here (one tiny launch, once per device)."""
    try:
        get_backend("triton-fast").direction(torch.zeros(1, device=device), seed=0, index=0)
        return True
    except Exception as e:   # noqa: BLE001 - any failure means: use the precise kernel
        warnings.warn(f"triton fast math unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                      "using backend=triton")
        return False


def get_backend(name: str = "auto", device: torch.device | str = "cpu",
                distribution: str = "gaussian") -> PerturbationBackend:
    """Backend by name. "auto" picks triton-fast on CUDA when Triton is installed (measured 15%
    faster than precise triton on an OPT-13B step; precise triton where fast math fails to
    build); on a CPU, cpu-fast for Rademacher z (from random bits, ~6x faster per pass) and torch
    for Gaussian z (the two draw the same Gaussian z bit for bit, so old "auto" runs keep their
    backend's name and resume). A run records the resolved name; a resume that would draw other
    directions is refused (zoft.zo.trajectory)."""
    from zoft.errors import ZoftError
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            name = "triton-fast" if _fast_math_runs(str(device)) else "triton"
        else:
            name = "cpu-fast" if device.type == "cpu" and distribution == "rademacher" else "torch"
    if name not in BACKENDS and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])   # registers its names
        except ImportError as e:
            raise ZoftError(f"the triton backend needs triton ({e}); use backend=torch") from None
    if name not in BACKENDS:
        raise ZoftError(f"unknown perturbation backend '{name}'; choose from {', '.join(BACKEND_NAMES)}")
    return BACKENDS[name]()
