"""The "cpu-fast" perturbation backend: z generated and consumed in cache-sized blocks.

On a CPU the step is bound by making z, not by adding it: ``normal_`` costs ~15 adds. This
backend walks each tensor in blocks of ``BLOCK`` elements; every direction a pass needs
produces its block of z into a small reused buffer, and all of the pass's terms are applied to
that block of θ while both are still in cache. No full-size scratch tensor is allocated. The
tensors of a pass are shared out to one worker thread per intra-op thread (``_over_tensors``).

The exact rule (``k = tensor_seed(seed, index)``, elements of a tensor in flattened order):

* Rademacher: element ``e`` takes bit ``e mod 64`` of the 64-bit word
  ``w_j = mix64(k + (j + 1)·0x9E3779B97F4A7C15 mod 2^64)`` with ``j = e // 64`` (``mix64``: the
  splitmix64 finaliser, as in ``tensor_seed``); bit 0 gives +1, bit 1 gives −1. z is a pure
  function of (seed, index, e), made of integer arithmetic only, so it does not depend on the
  block size, the thread count or the torch version. It is *not* the torch backend's
  Rademacher z (the signs of its Gaussian draw).
* Gaussian: one ``torch.Generator`` seeded with ``k`` draws ``normal_`` block after block in
  order. Torch's CPU ``normal_`` fills uniforms serially and transforms them 16 at a time
  (re-drawing the last 16 of a draw whose size is not a multiple of 16), so with blocks that
  are multiples of 16 and a last block of at least 16 elements (``spans``) the blocked draw
  is bit-identical to the torch backend's whole-tensor draw. A counter-based Box–Muller in
  torch ops measured ~20× slower than ``normal_``, so the Gaussian gain here is only the
  blocking (no scratch tensor to write and re-read per term).

The arithmetic per element is the torch backend's (fp32 ``add_`` per term; bf16/fp16 through
an fp32 θ with the exact ``_unround_add`` undo). The torch backend runs its own CPU passes
through ``blocked_combine_`` too, with its Rademacher rule (signs of the Gaussian draw), so
for Gaussian z the two backends give the same weights bit for bit. The backend name is still
part of a run's identity: the Rademacher z differ.

On a CPU, ``backend=auto`` picks this backend for Rademacher z (``distribution=auto``, the CPU
default, resolves to Rademacher), where it is ~6x faster per pass than torch's whole-tensor pass,
and ``torch`` for Gaussian z. A run records the resolved name in its trajectory; an old run made
with ``auto`` and Rademacher z (then torch's signs) is refused on resume with a line naming
``backend=torch``, rather than silently continuing on other directions.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

from zoft.zo import cpu_kernels
from zoft.zo.perturb import DISTRIBUTIONS, Term, _merge, _unround_add, register_backend, tensor_seed

BLOCK = 1 << 18   # elements per block: 1 MiB of fp32 z plus the θ block fit a core's L2

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); products wrap mod 2^64
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1, _M2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)
# row b holds the eight ±1 of byte b, low bit first
_SIGNS = 1.0 - 2.0 * ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float()


@contextlib.contextmanager
def _one_thread():
    """Run block ops on one intra-op thread. Each block op is a few µs of work, so with two
    intra-op threads every op ends at a barrier; on a shared (or oversubscribed) CPU the second
    thread is often descheduled and each barrier then waits a time slice: measured 2-5x slower
    passes on the 2-core dev box under load. One thread keeps a block in one core's cache too.
    The cores are used instead by :func:`_over_tensors`: whole tensors per worker, no barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shares(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Tensor indices split into ``workers`` lists of about equal element counts (largest first,
    each to the least loaded list), each list in index order."""
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = loads.index(min(loads))
        out[w].append(i)
        loads[w] += sizes[i]
    return [sorted(share) for share in out if share]


def _over_tensors(params: Sequence[torch.Tensor], one_tensor) -> None:
    """``one_tensor(index, p)`` for every tensor, on as many worker threads as torch has intra-op
    threads, each worker's ops on one thread (:func:`_one_thread`).

    A tensor's result depends only on (seed, index, its own elements), never on which worker ran
    it or when, so the weights are bit-identical for any thread count. torch ops release the
    GIL, so the workers run in parallel; grad mode is thread-local, hence ``no_grad`` per worker.
    """
    workers = min(torch.get_num_threads(), len(params))

    def run(share: list[int]) -> None:
        with torch.no_grad():
            for i in share:
                one_tensor(i, params[i])

    with _one_thread():
        groups = shares([p.numel() for p in params], workers) if workers > 1 else [list(range(len(params)))]
        if len(groups) == 1:
            return run(groups[0])
        with ThreadPoolExecutor(len(groups)) as pool:
            for done in [pool.submit(run, group) for group in groups]:
                done.result()   # a worker's exception is raised here


def spans(n: int) -> Iterator[tuple[int, int]]:
    """Block bounds of an n-element tensor: BLOCK each; a tail shorter than 16 joins the last block."""
    start = 0
    while start < n:
        stop = n if n - start < BLOCK + 16 else start + BLOCK
        yield start, stop
        start = stop


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64, in place; ``(x >> s) & mask`` is the logical shift."""
    x.bitwise_xor_((x >> 30) & ((1 << 34) - 1)).mul_(_M1)
    x.bitwise_xor_((x >> 27) & ((1 << 37) - 1)).mul_(_M2)
    return x.bitwise_xor_((x >> 31) & ((1 << 33) - 1))


def sign_words(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words ``w_first .. w_(first+count-1)`` of the Rademacher rule, as int64."""
    j = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    return _mix64_(j.mul_(_GOLDEN).add_(key))


class _Stream:
    """z of one (seed, tensor), block by block, into a reused buffer (call in ``spans`` order)."""

    def __init__(self, seed: int, index: int, distribution: str, device: torch.device, bits: bool) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution '{distribution}'; choose from {DISTRIBUTIONS}")
        self.key, self.bits = tensor_seed(seed, index), distribution == "rademacher" and bits
        self.sign = distribution == "rademacher" and not bits   # the torch backend's rule: signs of its draw
        self.buf = torch.empty(0, device=device)
        if not self.bits:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.key)

    def block(self, start: int, stop: int) -> torch.Tensor:
        n, n_words = stop - start, -(-(stop - start) // 64)
        if self.buf.numel() < 64 * n_words:
            self.buf = torch.empty(64 * n_words, device=self.buf.device)
        if not self.bits:
            z = self.buf[:n].normal_(generator=self.gen)
            return z.sign_() if self.sign else z
        # spans start at multiples of BLOCK (of 64), so the block starts on a word boundary;
        # a table lookup per byte (8 signs) measured faster than shifting bits out one by one
        words = sign_words(self.key, start // 64, n_words, self.buf.device)
        signs = self.buf[:64 * n_words].view(-1, 8)
        torch.index_select(_SIGNS.to(words.device), 0, words.view(torch.uint8).int(), out=signs)
        return self.buf[:n]


class CPUFastBackend:
    """Blocked perturbation passes with bit-based Rademacher z (see the module docstring)."""

    name = "cpu-fast"

    def direction(self, param: torch.Tensor, seed: int, index: int,
                  distribution: str = "gaussian", out: torch.Tensor | None = None) -> torch.Tensor:
        """z for tensor ``index`` as float32 (into ``out`` if given)."""
        z = torch.empty(param.shape, device=param.device) if out is None else out
        stream, flat = _Stream(seed, index, distribution, param.device, bits=True), z.view(-1)
        with _one_thread():
            for start, stop in spans(flat.numel()):
                flat[start:stop] = stream.block(start, stop)
        return z

    @torch.no_grad()
    def add_noise_(self, params: Sequence[torch.Tensor], seed: int, scale: float,
                   distribution: str = "gaussian", undo: float = 0.0) -> None:
        self.combine_(params, [(seed, scale)], distribution, undo=(seed, undo) if undo else None)

    @torch.no_grad()
    def combine_(self, params: Sequence[torch.Tensor], terms: Sequence[Term] = (),
                 distribution: str = "gaussian", undo: Term | None = None, then: Term | None = None) -> None:
        """See ``PerturbationBackend.combine_``: the torch backend's arithmetic, one block at a time."""
        blocked_combine_(params, terms, distribution, undo, then, bits=True)


@torch.no_grad()
def blocked_combine_(params: Sequence[torch.Tensor], terms: Sequence[Term], distribution: str,
                     undo: Term | None, then: Term | None, bits: bool, kernels: bool | None = None) -> None:
    """``combine_`` in blocks, with Rademacher z from hashed bits (``bits``) or, as in the torch
    backend, the signs of the Gaussian draw (which the torch backend runs its CPU passes through).

    With hashed bits, fp32 CPU tensors take the C sweep of :mod:`zoft.zo.cpu_kernels` instead
    (bit-identical; ``kernels=None`` uses it where ``cpu_kernels.available()``)."""
    coeffs = _merge(terms)
    if undo is not None:   # the undo seed's direction comes first, as in the torch backend
        coeffs = {undo[0]: coeffs.pop(undo[0], 0.0), **coeffs}

    def streams_of(index: int, p: torch.Tensor):
        streams = [(_Stream(s, index, distribution, p.device, bits), c) for s, c in coeffs.items()]
        tail = (_Stream(then[0], index, distribution, p.device, bits), then[1]) if then is not None else None
        return streams, tail

    def one_tensor(index: int, p: torch.Tensor) -> None:
        flat = p.view(-1) if p.is_contiguous() else p.flatten()   # a copy, written back below
        streams, tail = streams_of(index, p)
        for start, stop in spans(flat.numel()):   # every direction's block made once, all terms applied
            _combine_block(flat[start:stop], streams, tail, start, stop, undo)
        if flat.data_ptr() != p.data_ptr():
            p.copy_(flat.view(p.shape))

    # the C sweep's terms in the block path's order (its fp32 branch of _combine_block):
    # the undo folded into the first direction's coefficient, the pending ``then`` term last
    order = [(s, c - undo[1] if k == 0 and undo is not None else c) for k, (s, c) in enumerate(coeffs.items())]
    order += [then] if then is not None else []
    if bits and distribution == "rademacher" and (kernels if kernels is not None else cpu_kernels.available()):
        swept = [i for i, p in enumerate(params) if cpu_kernels.takes(p)]
        cpu_kernels.sweep_([params[i] for i in swept], swept, order)   # one call, every core
        rest = sorted(set(range(len(params))) - set(swept))
        _over_tensors([params[i] for i in rest], lambda k, p: one_tensor(rest[k], p))
        return
    _over_tensors(params, one_tensor)


def _combine_block(block: torch.Tensor, streams, tail, start: int, stop: int, undo: Term | None) -> None:
    """One block of ``combine_``; ``streams[0]`` is the undo seed's when ``undo`` is given."""
    if block.dtype in (torch.float32, torch.float64):
        for k, (stream, coeff) in enumerate(streams):   # the undo is within a few ulp, as in torch's fp32
            alpha = coeff - undo[1] if k == 0 and undo is not None else coeff
            block.add_(stream.block(start, stop).to(block.dtype), alpha=alpha)
        if tail is not None:
            block.add_(tail[0].block(start, stop).to(block.dtype), alpha=tail[1])
        return
    theta = None
    for k, (stream, coeff) in enumerate(streams):
        z = stream.block(start, stop)
        if k == 0:
            theta = _unround_add(block, z, undo[1]) if undo is not None else block.float()
        theta.add_(z, alpha=coeff)
    if theta is None:
        theta = block.float()
    if tail is not None:
        theta = theta.to(block.dtype).float()   # θ' is a stored value
        theta.add_(tail[0].block(start, stop), alpha=tail[1])
    block.copy_(theta)


register_backend("cpu-fast", CPUFastBackend)
