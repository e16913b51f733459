"""Compiled CPU sweeps for the cpu-fast backend's fp32 passes with hashed-bit Rademacher z.

The block path (``cpu_backend._combine_block``) expands every z to a float32 block with a table
lookup and then adds it, a dozen torch ops per 1 MiB block: on SmolLM2-135M a pass spends more
time making z than moving the weights (a single-term pass 0.18 s, where an add of a ready block
over the same 540 MB takes 0.05 s). Here inductor (``torch.compile``, CPU) fuses the whole sweep
into one vectorised, OpenMP-parallel loop: read θ, take each term's sign bit from its 32-bit word,
``θ ← θ + c·z`` term after term, write θ. Only the words (1/32 of the tensor's bytes) are made
in eager torch, by ``cpu_backend.sign_words``.

**Bit-identical to the block path**, so nothing about a run changes but its speed (no config
key, no trajectory field): z = ±1, so c·z is exact and each term's add rounds once, with or
without an FMA, exactly as ``block.add_(z, alpha=c)`` does; the terms are applied in the block
path's order. ``tests/zo/test_cpu_kernels.py`` checks this, and :func:`available` checks it again
on a probe tensor before the first use, so a compiler that is missing or disagrees (or a
big-endian CPU: the 64-bit words are read as two 32-bit halves, low half first) leaves the block
path in charge, with one warning. ``ZOFT_CPU_KERNELS=0`` turns the sweeps off.

Tensors below ``MIN_ELEMENTS`` stay on the block path, where a compiled call's fixed cost
(guards, argument checks: tens of µs) would be more than their work.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Sequence

import torch

MIN_ELEMENTS = 1 << 16
_BITS = torch.arange(32, dtype=torch.int32)   # bit b of a 32-bit word gives z of its element b


def _z(words: torch.Tensor) -> torch.Tensor:
    """(rows, 32) float32 z from (rows,) int32 words: bit 0 gives +1, bit 1 gives −1."""
    return 1.0 - 2.0 * ((words.view(-1, 1) >> _BITS) & 1).to(torch.float32)


def _one(theta, w1, c1):
    theta.copy_(theta + c1 * _z(w1))


def _two(theta, w1, c1, w2, c2):
    theta.copy_((theta + c1 * _z(w1)) + c2 * _z(w2))


def _two_same(theta, w1, c1, c2):   # both terms on one direction (the fused step's θ+εz → θ−εz)
    z = _z(w1)
    theta.copy_((theta + c1 * z) + c2 * z)


@functools.cache
def _compiled():
    compile = functools.partial(torch.compile, dynamic=True, fullgraph=True)
    return compile(_one), compile(_two), compile(_two_same)


def sweep_(theta: torch.Tensor, terms: Sequence[tuple[torch.Tensor, float]]) -> None:
    """``θ ← θ + c·z(words)`` for each ``(words, c)`` in order, on a contiguous fp32 tensor whose
    element count is a multiple of 64; ``words`` holds its 64-bit words as int64."""
    one, two, two_same = _compiled()
    rows = theta.view(-1, 32)
    for k in range(0, len(terms), 2):
        (w1, c1), *rest = terms[k:k + 2]
        if not rest:
            one(rows, w1.view(torch.int32), coeff(c1))
        elif rest[0][0] is w1:
            two_same(rows, w1.view(torch.int32), coeff(c1), coeff(rest[0][1]))
        else:
            two(rows, w1.view(torch.int32), coeff(c1), rest[0][0].view(torch.int32), coeff(rest[0][1]))


@functools.lru_cache(maxsize=64)
def coeff(c: float) -> torch.Tensor:
    """c as a 0-d fp32 tensor (a tensor, so that a new c is not a recompile), made once per value:
    a pass applies the same coefficients to every tensor."""
    return torch.tensor(c, dtype=torch.float32)


@functools.cache
def available() -> bool:
    """Whether the compiled sweeps run here and equal the block path bit for bit (checked once,
    on a probe tensor, against :func:`zoft.zo.cpu_backend.blocked_combine_` without them)."""
    if os.environ.get("ZOFT_CPU_KERNELS", "1") == "0" or sys.byteorder != "little":
        return False
    from zoft.zo import cpu_backend
    probe = torch.randn(MIN_ELEMENTS + 64, generator=torch.Generator().manual_seed(0))
    expected, got = probe.clone(), probe.clone()
    terms, undo, then = [(7, 0.25), (8, -1e-3), (9, 3e-2)], (7, 1e-2), (7, -1e-2)
    try:
        cpu_backend.blocked_combine_([expected], terms, "rademacher", undo, then, bits=True, kernels=False)
        cpu_backend.blocked_combine_([got], terms, "rademacher", undo, then, bits=True, kernels=True)
    except Exception as e:   # no C++ compiler, an inductor error: the block path does the same work
        warnings.warn(f"zoft: compiled CPU passes unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the slower block path")
        return False
    if not torch.equal(expected, got):
        warnings.warn("zoft: compiled CPU passes differ from the block path here; using the block path")
        return False
    return True


def takes(p: torch.Tensor) -> bool:
    """Whether a tensor's pass can run compiled (fp32 on the CPU, big enough to pay)."""
    return p.dtype == torch.float32 and p.device.type == "cpu" and p.numel() >= MIN_ELEMENTS
