"""A C sweep for the cpu-fast backend's fp32 passes with hashed-bit Rademacher z.

The block path (``cpu_backend._combine_block``) expands every z to a float32 block with a table
lookup and then adds it, a dozen torch ops per 1 MiB block: on SmolLM2-135M a pass spends more
time making z than moving the weights (a single-term pass 0.18 s, where an add of a ready block
over the same 540 MB takes 0.05 s). Here one C loop does a whole pass over every fp32 tensor in
one call: per 64 elements it hashes each term's 64-bit word (``tensor_seed`` and ``mix64``, the
rule of ``cpu_backend``), then reads θ, adds each term's ±c in order and writes θ. So a pass
moves the weights once, and costs one call, not one per tensor (a compiled torch kernel per
tensor left ~40 µs of dispatch per call, 0.02 s per pass over SmolLM2's 272 tensors).

**Bit-identical to the block path**, so nothing about a run changes but its speed (no config
key, no trajectory field): z = ±1, so c·z is ±c exactly (here: c with its sign bit flipped) and
each term's add rounds once, exactly as ``block.add_(z, alpha=c)`` does; the terms are applied
in the block path's order. The source is compiled without fast-math, so the compiler may not
reassociate the adds. ``tests/zo/test_cpu_kernels.py`` checks this, and :func:`available`
checks it again on a probe tensor before the first use, so a missing C compiler or a result
that differs leaves the block path in charge, with one warning. ``ZOFT_CPU_KERNELS=0`` turns
the sweep off.

The library is built once per machine with the system C compiler (``$CC``, else ``cc``; well
under a second) into ``$ZOFT_CACHE_DIR`` (default ``~/.cache/zoft``), named by a hash of the
source, the flags and the CPU's feature flags: ``-march=native`` code must not run on another
CPU of a cluster sharing one home directory. The cores are used by calling it from one Python
thread per intra-op thread, each on its share of every tensor's words (ctypes releases the GIL);
no OpenMP runtime is loaded beside torch's.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

MAX_TERMS = 8   # a pass has at most 3 (undo, update, next +εz); more go in several calls

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix64(uint64_t x) {   /* splitmix64's finaliser */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* a table, not 1u << e: a lane-wise AND with constants vectorises even without -march=native */
static const uint32_t BIT[32] = {1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7, 1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

/* theta[i] += c[k] * z(seeds[k], index[i]) for every term k in order, on the words
   [words*part/parts, words*(part+1)/parts) of every tensor i (element e of a tensor takes
   bit e%64 of its word e/64; bit 0 gives +1, bit 1 gives -1, so c*z is c or -c exactly).
   With masks[i] (one byte per element, or masks NULL), only elements whose byte is nonzero move.
   With thresholds too, the masks are outputs: masks[i] = |theta| <= thresholds[i], from theta before
   this pass's terms (Sparse MeZO's mask, made in the pass that reads theta anyway). */
void zoft_sweep(int64_t n_tensors, float *const *theta, const int64_t *numel, const int64_t *index,
                int64_t n_terms, const uint64_t *seeds, const float *coeff, int64_t part, int64_t parts,
                uint8_t *const *masks, const float *thresholds) {
    for (int64_t i = 0; i < n_tensors; i++) {
        uint64_t key[8];
        for (int64_t k = 0; k < n_terms; k++)   /* perturb.tensor_seed */
            key[k] = mix64(seeds[k] * GOLDEN + (uint64_t)index[i] + 1) >> 1;
        uint8_t *mask = masks ? masks[i] : 0;
        int64_t n = numel[i], words = (n + 63) / 64;
        for (int64_t j = words * part / parts; j < words * (part + 1) / parts; j++) {
            float *row = theta[i] + 64 * j, buf[64] = {0};   /* 64 elements, one word per term */
            int64_t m = n - 64 * j < 64 ? n - 64 * j : 64;
            uint8_t moves[64] = {0};
            memcpy(buf, row, (size_t)m * sizeof(float));
            if (mask && thresholds) {
                for (int e = 0; e < 64; e++) moves[e] = fabsf(buf[e]) <= thresholds[i];
                memcpy(mask + 64 * j, moves, (size_t)m);
            } else if (mask) {
                memcpy(moves, mask + 64 * j, (size_t)m);
            }
            for (int64_t k = 0; k < n_terms; k++) {
                uint64_t w = mix64(key[k] + (uint64_t)(j + 1) * GOLDEN);
                uint32_t low = (uint32_t)w, high = (uint32_t)(w >> 32);
                float plus = coeff[k], minus = -coeff[k];
                if (!mask) {
                    for (int e = 0; e < 32; e++) buf[e] += (low & BIT[e]) ? minus : plus;
                    for (int e = 0; e < 32; e++) buf[32 + e] += (high & BIT[e]) ? minus : plus;
                } else {   /* a masked element keeps its value (no +0.0, which would turn -0.0 into +0.0) */
                    for (int e = 0; e < 32; e++) buf[e] = moves[e] ? buf[e] + ((low & BIT[e]) ? minus : plus) : buf[e];
                    for (int e = 0; e < 32; e++)
                        buf[32 + e] = moves[32 + e] ? buf[32 + e] + ((high & BIT[e]) ? minus : plus) : buf[32 + e];
                }
            }
            memcpy(row, buf, (size_t)m * sizeof(float));
        }
    }
}
"""


def _cpu_flags() -> str:
    """What ``-march=native`` code depends on: the CPU's feature flags (Linux), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    """Where the built library is kept: ``$ZOFT_CACHE_DIR``, else ``~/.cache/zoft``; where that
    cannot be written (a read-only home), a fresh private temporary folder, so this process
    builds its own (a shared one in /tmp could hold another user's library)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zoft"
    folder = Path(os.environ.get("ZOFT_CACHE_DIR", default))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="zoft-sweep-"))


@functools.cache
def _library() -> ctypes.CDLL:
    """The compiled sweep, built on first use (see the module docstring); raises if no compiler
    builds it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (set CC)")
    errors, folder = [], _cache_dir()
    for flags in (["-O3", "-march=native"], ["-O3"]):   # the second where -march=native is unknown
        tag = hashlib.sha256("\0".join([SOURCE, compiler, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
        target = folder / f"sweep-{tag}.so"
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source, built = Path(tmp) / "sweep.c", Path(tmp) / "sweep.so"
                source.write_text(SOURCE)
                done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(source)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    errors.append(done.stderr.strip().splitlines()[-1:] or ["failed"])
                    continue
                os.replace(built, target)   # atomic: a concurrent process sees a whole file or none
        library = ctypes.CDLL(str(target))
        library.zoft_sweep.restype = None
        library.zoft_sweep.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                                       ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64),
                                       ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_int64,
                                       ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float)]
        return library
    raise RuntimeError(f"{compiler} could not build the sweep: {errors}")


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads for the sweep's other shares, per process: a forked child has none of its
    parent's threads, and a pool copied from the parent would wait for them forever."""
    return ThreadPoolExecutor(workers, thread_name_prefix="zoft-sweep")


def sweep_(params: Sequence[torch.Tensor], indices: Sequence[int], terms: Sequence[tuple[int, float]],
           masks: Sequence[torch.Tensor | None] | None = None, thresholds: Sequence[float] | None = None) -> None:
    """``θ ← θ + c·z(seed, index)`` for each ``(seed, c)`` of ``terms`` in order, on fp32 CPU
    tensors ``params`` whose direction indices are ``indices``: one call on every core. With
    ``masks`` (bool tensors shaped as the params, or None for "all"), only the masked-in elements
    move (Sparse MeZO's z ⊙ m). With ``thresholds`` (one per tensor, each with a contiguous mask),
    the masks are written first, ``m = |θ| ≤ threshold`` from θ before the terms: the same bytes as
    ``torch.le(θ.abs(), threshold)``, without a pass of its own."""
    if not params or not terms:
        return
    flats = [p.detach().view(-1) if p.is_contiguous() else p.detach().flatten() for p in params]
    n, sweep, parts = len(flats), _library().zoft_sweep, max(1, torch.get_num_threads())
    bytes_ = None if masks is None else [None if m is None else m.reshape(-1).contiguous().view(torch.uint8)
                                         for m in masks]
    tensors = ((ctypes.c_void_p * n)(*[f.data_ptr() for f in flats]),
               (ctypes.c_int64 * n)(*[f.numel() for f in flats]), (ctypes.c_int64 * n)(*indices))
    mask_ptrs = None if bytes_ is None else (ctypes.c_void_p * n)(*[None if b is None else b.data_ptr() for b in bytes_])
    if thresholds is not None:   # the masks are written, so each must be the tensor's own memory
        if bytes_ is None or any(b is None or b.data_ptr() != m.data_ptr() for b, m in zip(bytes_, masks)):
            raise ValueError("sweep_ with thresholds needs a contiguous mask per tensor")
        thresholds = (ctypes.c_float * n)(*[float(t) for t in thresholds])
    for k in range(0, len(terms), MAX_TERMS):   # each add rounds once, so chunks give the same bits
        chunk = terms[k:k + MAX_TERMS]
        args = (n, *tensors, len(chunk), (ctypes.c_uint64 * len(chunk))(*[s & 0xFFFFFFFFFFFFFFFF for s, _ in chunk]),
                (ctypes.c_float * len(chunk))(*[c for _, c in chunk]))
        build = thresholds if k == 0 else None   # the masks come from θ before the first term
        others = [_pool(parts - 1, os.getpid()).submit(sweep, *args, part, parts, mask_ptrs, build)
                  for part in range(1, parts)]
        sweep(*args, 0, parts, mask_ptrs, build)
        for other in others:
            other.result()
    for p, flat in zip(params, flats):   # a non-contiguous tensor was swept in a copy
        if flat.data_ptr() != p.data_ptr():
            p.detach().copy_(flat.view(p.shape))


@functools.cache
def available() -> bool:
    """Whether the sweep runs here and equals the block path bit for bit (checked once, on a
    probe, against :func:`zoft.zo.cpu_backend.blocked_combine_` without it)."""
    if os.environ.get("ZOFT_CPU_KERNELS", "1") == "0":
        return False
    from zoft.zo import cpu_backend
    gen = torch.Generator().manual_seed(0)
    probe = [torch.randn(n, generator=gen) for n in (100_003, 64, 5)]
    expected, got = [p.clone() for p in probe], [p.clone() for p in probe]
    terms, undo, then = [(7, 0.25), (8, -1e-3), (9, 3e-2)], (7, 1e-2), (7, -1e-2)
    try:
        cpu_backend.blocked_combine_(expected, terms, "rademacher", undo, then, bits=True, kernels=False)
        cpu_backend.blocked_combine_(got, terms, "rademacher", undo, then, bits=True, kernels=True)
    except Exception as e:   # no C compiler, a failed build: the block path does the same work
        warnings.warn(f"zoft: compiled CPU passes unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the slower block path")
        return False
    if not all(torch.equal(a, b) for a, b in zip(expected, got)):
        warnings.warn("zoft: compiled CPU passes differ from the block path here; using the block path")
        return False
    return True


def takes(p: torch.Tensor) -> bool:
    """Whether a tensor's pass can run in the sweep (fp32 on the CPU)."""
    return p.dtype == torch.float32 and p.device.type == "cpu"
