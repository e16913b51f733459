"""Triton perturbation backend: z regenerated in registers, many tensors per launch, fp32 math.

The direction of element ``e`` of tensor ``i`` for seed ``s`` is a pure function of
``(s, i, e)``: Philox4x32-10 keyed by the 64-bit seed, with the counter
``(i << 40) | c``. One Philox call gives four 32-bit words, hence

* Gaussian: four normals (two Box-Muller pairs, ``tl.randn4x``) per counter;
* Rademacher: 128 signs (32 bits of each of the four words) per counter.

Elements are dealt to counters in fixed blocks of ``Z_BLOCK`` = 4096 elements, so z does not
depend on how the work is split into launches or programs. z is *not* the torch backend's z
(a different generator), and GPU z differs from interpreter z in the last bits (fast
``log``/``cos``/``sin``): the backend (and device) is part of a run's identity, like its seed.

One launch covers every tensor of one dtype: the host builds, once per parameter list, a
table of tensor base addresses and a table of work chunks (tensor slot, first element), and
each program handles one chunk of up to ``BLOCKS_PER_PROGRAM`` z-blocks. Hundreds of small
tensors (norm gains, biases) then cost one launch, not one each. Math is done in fp32 in
registers with FMA contraction disabled, so every backend pass is plain IEEE arithmetic and
the exact inverse of an earlier add (``unround``) can be found, in fp32 as well as bf16/fp16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from zoft.errors import ZoftError
from zoft.zo.perturb import DISTRIBUTIONS, Term, plan_launches, register_backend

ROWS = 32                          # bits per Philox word: one Rademacher word covers 32 rows
COLS = 32                          # counters per row block
Z_BLOCK = 4 * ROWS * COLS          # elements per z-block: 4 lanes x [ROWS, COLS] tile = 4096
BLOCKS_PER_PROGRAM = 8             # z-blocks per program (32K elements)
COUNTER_BITS = 40                  # counter = (tensor index << 40) | counter within the tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TL_BITS = {torch.float32: tl.int32, torch.bfloat16: tl.int16, torch.float16: tl.int16}


@triton.jit
def _normal_pair(i1, i2, FAST_MATH: tl.constexpr):
    """Box-Muller, as ``tl.randn4x`` does it; FAST_MATH swaps in the GPU's approximate
    log/sin/cos (MUFU), which the interpreter lacks, to keep the pass memory-bound."""
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
    th = 6.283185307179586 * tl.uint_to_uniform_float(i2)
    if FAST_MATH:
        r = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _lane_directions(seed, tensor_index, block, RADEMACHER: tl.constexpr, FAST_MATH: tl.constexpr):
    """The four [ROWS, COLS] lanes of z for one z-block; element (k, r, c) sits at
    offset ``k·ROWS·COLS + r·COLS + c`` of the block."""
    rows = tl.arange(0, 32)[:, None]
    cols = tl.arange(0, 32)[None, :]
    base = tensor_index.to(tl.int64) << 40
    if RADEMACHER:
        # counter per column; row r takes bit r of each of the four words
        counter = base | (block * 32 + cols).to(tl.int64)
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        shift = rows.to(tl.uint32)
        z0 = 1.0 - 2.0 * ((w0 >> shift) & 1).to(tl.float32)
        z1 = 1.0 - 2.0 * ((w1 >> shift) & 1).to(tl.float32)
        z2 = 1.0 - 2.0 * ((w2 >> shift) & 1).to(tl.float32)
        z3 = 1.0 - 2.0 * ((w3 >> shift) & 1).to(tl.float32)
    else:
        counter = base | (block * 1024 + rows * 32 + cols).to(tl.int64)
        i0, i1, i2, i3 = tl.randint4x(seed, counter)
        z0, z1 = _normal_pair(i0, i1, FAST_MATH)
        z2, z3 = _normal_pair(i2, i3, FAST_MATH)
    return z0, z1, z2, z3


@triton.jit
def _widen(p, DTYPE: tl.constexpr):
    """A parameter value as fp32 (exact)."""
    if DTYPE == tl.bfloat16:
        return ((p.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return p.to(tl.float32)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 → DTYPE, round to nearest even. bf16 is rounded with integer arithmetic because the
    Triton interpreter truncates fp32 → bf16; this way CPU tests and GPU agree bit for bit."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16     # ties to even; carries into the exponent
        kept = tl.where(x != x, bits >> 16, rounded)              # NaN stays NaN
        return kept.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _unround(p, x, step, DTYPE: tl.constexpr, BITS: tl.constexpr):
    """θ (fp32) with ``round(θ + step) == p``: the exact inverse of an earlier rounded add.

    The guess ``round(p − step)`` is off by at most an ulp, so θ is the guess or one of its
    neighbours (bit pattern ±1); take the first that adds back to ``p``. Where none does
    (a move across a binade merged two values) the guess is kept: an ulp of error remains.
    """
    guess = _round(x - step, DTYPE)
    bits = guess.to(BITS, bitcast=True)
    up = (bits + 1).to(DTYPE, bitcast=True)
    down = (bits - 1).to(DTYPE, bitcast=True)
    hit_guess = _round(_widen(guess, DTYPE) + step, DTYPE) == p
    hit_up = _round(_widen(up, DTYPE) + step, DTYPE) == p
    hit_down = _round(_widen(down, DTYPE) + step, DTYPE) == p
    best = tl.where(hit_down, down, guess)
    best = tl.where(hit_up, up, best)
    best = tl.where(hit_guess, guess, best)
    return _widen(best, DTYPE)


@triton.jit
def _combine_lane(ptr, offs, n, za, zb, undo_a, coef_a, coef_b,
                  DTYPE: tl.constexpr, BITS: tl.constexpr, HAS_UNDO: tl.constexpr, HAS_B: tl.constexpr,
                  ROUND_MID: tl.constexpr):
    mask = offs < n
    p = tl.load(ptr + offs, mask=mask)
    x = _widen(p, DTYPE)
    if HAS_UNDO:
        x = _unround(p, x, undo_a * za, DTYPE, BITS)
    x = x + coef_a * za
    if HAS_B:
        if ROUND_MID:
            x = _widen(_round(x, DTYPE), DTYPE)   # the updated θ is a stored value, as with separate passes
        x = x + coef_b * zb
    tl.store(ptr + offs, _round(x, DTYPE), mask=mask)


@triton.jit
def _combine_kernel(addr_ptr, numel_ptr, index_ptr, chunk_slot_ptr, chunk_start_ptr,
                    seed_a, undo_a, coef_a, seed_b, coef_b,
                    DTYPE: tl.constexpr, BITS: tl.constexpr, HAS_UNDO: tl.constexpr, HAS_B: tl.constexpr,
                    B_IS_A: tl.constexpr, ROUND_MID: tl.constexpr, RADEMACHER: tl.constexpr,
                    FAST_MATH: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    """p ← round([round](unround(p, undo_a·z_a) + coef_a·z_a) + coef_b·z_b), per element."""
    pid = tl.program_id(0)
    slot = tl.load(chunk_slot_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    ptr = tl.load(addr_ptr + slot).to(tl.pointer_type(DTYPE))
    n = tl.load(numel_ptr + slot)
    tensor_index = tl.load(index_ptr + slot)
    tile = (tl.arange(0, 32)[:, None] * 32 + tl.arange(0, 32)[None, :]).to(tl.int64)
    for i in range(BLOCKS_PER_PROGRAM):
        first = start + i * 4096
        if first < n:
            block = first // 4096
            a0, a1, a2, a3 = _lane_directions(seed_a, tensor_index, block, RADEMACHER, FAST_MATH)
            b0, b1, b2, b3 = a0, a1, a2, a3
            if HAS_B and not B_IS_A:
                b0, b1, b2, b3 = _lane_directions(seed_b, tensor_index, block, RADEMACHER, FAST_MATH)
            _combine_lane(ptr, first + tile, n, a0, b0, undo_a, coef_a, coef_b,
                          DTYPE, BITS, HAS_UNDO, HAS_B, ROUND_MID)
            _combine_lane(ptr, first + 1024 + tile, n, a1, b1, undo_a, coef_a, coef_b,
                          DTYPE, BITS, HAS_UNDO, HAS_B, ROUND_MID)
            _combine_lane(ptr, first + 2048 + tile, n, a2, b2, undo_a, coef_a, coef_b,
                          DTYPE, BITS, HAS_UNDO, HAS_B, ROUND_MID)
            _combine_lane(ptr, first + 3072 + tile, n, a3, b3, undo_a, coef_a, coef_b,
                          DTYPE, BITS, HAS_UNDO, HAS_B, ROUND_MID)


@dataclass
class _Group:
    """Device tables for the tensors of one dtype: one launch covers all of them."""

    dtype: torch.dtype
    addr: torch.Tensor         # int64 [tensors]: base address of each tensor
    numel: torch.Tensor        # int64 [tensors]
    index: torch.Tensor        # int32 [tensors]: position in the parameter list (keys z)
    chunk_slot: torch.Tensor   # int32 [chunks]: which tensor a program works on
    chunk_start: torch.Tensor  # int64 [chunks]: its first element


def _build_groups(params: Sequence[torch.Tensor], indices: Sequence[int]) -> list[_Group]:
    chunk = Z_BLOCK * BLOCKS_PER_PROGRAM
    by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, int]]] = {}
    for p, i in zip(params, indices):
        if p.dtype not in _TL_DTYPES:
            raise ZoftError(f"triton backend: unsupported dtype {p.dtype} (fp32, bf16 or fp16)")
        if not p.is_contiguous():
            raise ZoftError(f"triton backend: tensor {i} is not contiguous")
        if p.numel():
            by_dtype.setdefault(p.dtype, []).append((p, i))
    groups = []
    for dtype, members in by_dtype.items():
        device = members[0][0].device
        slots, starts = [], []
        for slot, (p, _) in enumerate(members):
            n_chunks = triton.cdiv(p.numel(), chunk)
            slots += [slot] * n_chunks
            starts += range(0, n_chunks * chunk, chunk)
        groups.append(_Group(
            dtype=dtype,
            addr=_to_device([p.data_ptr() for p, _ in members], torch.int64, device),
            numel=_to_device([p.numel() for p, _ in members], torch.int64, device),
            index=_to_device([i for _, i in members], torch.int32, device),
            chunk_slot=_to_device(slots, torch.int32, device),
            chunk_start=_to_device(starts, torch.int64, device)))
    return groups


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table on ``device`` without a host-device sync: offload rebuilds tables for every
    block it uploads (new addresses), and a blocking copy there would stall the transfer pipeline.
    (Pinned staging memory is kept alive by PyTorch's host allocator until the copy is done.)"""
    table = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _seed_key(seed: int) -> int:
    """Philox takes a 64-bit key; keep it a non-negative int64 for the launch."""
    return int(seed) & ((1 << 63) - 1)


class TritonBackend:
    """Fused Triton passes: one launch per dtype over all tensors, z never stored.

    Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).

    Args:
        fast_math: Gaussian z through the GPU's approximate log/sin/cos (CUDA only). Changes z
            in the last bits, so it is part of a run's identity too; off by default until measured.
    """

    name = "triton"

    def __init__(self, fast_math: bool = False) -> None:
        if fast_math and os.environ.get("TRITON_INTERPRET") == "1":
            raise ZoftError("triton backend: fast_math needs a CUDA GPU (the interpreter has no approximate math)")
        self._groups: dict[tuple, list[_Group]] = {}
        self.fast_math = fast_math
        self.name = "triton-fast" if fast_math else "triton"   # z differs in the last bits: runs record which

    def _tables(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> list[_Group]:
        # The tables hold only addresses and sizes, which is exactly the key: a tensor freed and
        # another allocated at the same address with the same size and dtype reuses them safely.
        key = tuple((p.data_ptr(), p.numel(), p.dtype, p.device, i) for p, i in zip(params, indices))
        groups = self._groups.get(key)
        if groups is None:
            if len(self._groups) > 16:   # parameter lists come and go (tests, direction()): bound the cache
                self._groups.clear()
            _check_device(params)
            groups = self._groups[key] = _build_groups(params, indices)
        return groups

    def _launch(self, params: Sequence[torch.Tensor], indices: Sequence[int], distribution: str,
                a: tuple[int, float, float], b: tuple[int, float, bool] | None) -> None:
        """One pass: ``a = (seed, undo, coef)``, ``b = (seed, coef, round_before)`` or None."""
        if distribution not in DISTRIBUTIONS:
            raise ZoftError(f"unknown distribution '{distribution}'; choose from {DISTRIBUTIONS}")
        seed_a, undo_a, coef_a = a
        seed_b, coef_b, round_mid = b if b is not None else (seed_a, 0.0, False)
        for g in self._tables(params, indices):
            _combine_kernel[(g.chunk_slot.numel(),)](
                g.addr, g.numel, g.index, g.chunk_slot, g.chunk_start,
                _seed_key(seed_a), float(undo_a), float(coef_a), _seed_key(seed_b), float(coef_b),
                DTYPE=_TL_DTYPES[g.dtype], BITS=_TL_BITS[g.dtype], HAS_UNDO=bool(undo_a),
                HAS_B=b is not None, B_IS_A=b is not None and seed_b == seed_a, ROUND_MID=bool(round_mid),
                RADEMACHER=distribution == "rademacher", FAST_MATH=self.fast_math,
                BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
                num_warps=4, enable_fp_fusion=False)

    @torch.no_grad()
    def combine_(self, params: Sequence[torch.Tensor], terms: Sequence[Term] = (),
                 distribution: str = "gaussian", undo: Term | None = None, then: Term | None = None) -> None:
        indices = range(len(params))
        for a, b in plan_launches(terms, undo, then):
            self._launch(params, indices, distribution, a, b)

    @torch.no_grad()
    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        self._launch(params, range(len(params)), distribution, (seed, undo, scale), None)

    def direction(self, param: torch.Tensor, seed: int, index: int, distribution: str = "gaussian",
                  out: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.zeros(param.shape, device=param.device) if out is None else out.zero_()
        self._launch([z], [index], distribution, (seed, 0.0, 1.0), None)   # 0 + 1·z is exactly z
        return z


def _check_device(params: Sequence[torch.Tensor]) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for p in params:   # empty placeholders (offload's views of one block) hold nothing to launch on
        if p.numel() and p.device.type != "cuda" and not (interpreted and p.device.type == "cpu"):
            raise ZoftError(f"triton backend needs CUDA tensors (got {p.device}); "
                            "use backend=torch, or TRITON_INTERPRET=1 for CPU tests")


register_backend("triton", TritonBackend)
register_backend("triton-fast", lambda: TritonBackend(fast_math=True))
