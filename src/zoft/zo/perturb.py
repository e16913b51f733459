"""Perturbation backends: ``p += scale * z`` in place, with z regenerated from a seed.

z is never stored. Every pass regenerates it from ``(seed, tensor index)``, so the +εz,
−2εz, +εz passes and the update all see the same direction while training memory stays
at inference memory. Backends register by name; the torch backend is the reference and
the CPU path.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")

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


class TorchBackend:
    """Reference backend: one seeded ``torch.Generator`` draw per tensor.

    z is drawn in float32 into a reused scratch buffer (allocating a fresh z per tensor
    costs page faults that tripled the pass time on a CPU) and the add is done in float32
    with a single rounding to the parameter's dtype, so bf16/fp16 weights pick up one
    rounding error per pass instead of two (see README, "Round-trip drift").
    Rademacher signs are the signs of the same Gaussian draw.
    """

    name = "torch"

    def __init__(self) -> None:
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def _buffer(self, param: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(param.device)
        if buf is None or buf.numel() < param.numel():
            buf = self._scratch[param.device] = torch.empty(param.numel(), device=param.device)
        return buf[:param.numel()].view(param.shape)

    def direction(self, param: torch.Tensor, seed: int, index: int,
                  distribution: str = "gaussian", out: torch.Tensor | None = None) -> torch.Tensor:
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
        for index, p in enumerate(params):
            z = self.direction(p, seed, index, distribution, out=self._buffer(p))
            if p.dtype in (torch.float32, torch.float64):
                # rounding here is below 1 ulp of fp32 per pass: ~2e-6 relative after 1000 steps
                p.add_(z.to(p.dtype), alpha=scale - undo)
            else:
                theta = _unround_add(p, z, undo) if undo else p.float()
                p.copy_(theta.add_(z, alpha=scale))   # add in float32, round once


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


BACKENDS: dict[str, Callable[[], PerturbationBackend]] = {"torch": TorchBackend}


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> PerturbationBackend:
    """Backend by name; "auto" picks the fastest one available for ``device``."""
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        from zoft.errors import ZoftError
        raise ZoftError(f"unknown perturbation backend '{name}'; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]()
