"""Seconds per perturbation pass on a CPU: torch vs cpu-fast backend, Gaussian and Rademacher z.

    python bench/directions.py [--numel 135000000] [--reps 3] [--threads 2] [--model smollm2-135m]

Rows: one ``add_noise_`` pass (θ += ε·z) and one 3-term ``combine_`` pass (the fused MeZO
step's second pass: undo −εz, apply −lr·g·z, then +εz' of the next step), each timed on one
fp32 tensor of ``--numel`` elements (135M: SmolLM2-135M's size) and, with ``--model``, on that
model's real parameter list (hundreds of tensors). Every row runs in this one process, best of
``--reps`` after a warm-up, interleaved backend by backend so that load from other processes
hits all rows alike. ``torch-whole`` is the torch backend's whole-tensor pass (a full-size z
drawn into scratch, then added), its CPU path before the blocked passes; the ratio column is
its time over this row's (``torch`` now runs blocked with the same z, ``cpu-fast`` also
draws Rademacher z from hashed bits). ``cpu-fast-1w`` is cpu-fast on one thread: the passes
before they ran whole tensors on one worker per thread, so on a parameter list (``--model``)
its time over cpu-fast's is what the workers buy (one big tensor is one worker's either way).
``cpu-fast-blocks`` is cpu-fast with its C sweep off (``zoft.zo.cpu_kernels``: the Rademacher
passes of fp32 tensors, all of a pass's tensors in one call), the block path it replaces bit for bit.
"""
from __future__ import annotations

import argparse
import time

import torch

from zoft.zo.cpu_backend import CPUFastBackend, blocked_combine_
from zoft.zo.perturb import get_backend

# torch-whole: the torch backend's whole-tensor CPU passes (before blocking), the baseline
ROWS = [(name, dist) for dist in ("gaussian", "rademacher")
        for name in ("torch-whole", "torch", "cpu-fast-1w", "cpu-fast-blocks", "cpu-fast")
        if name != "cpu-fast-blocks" or dist == "rademacher"]   # the sweeps are Rademacher-only


class BlocksOnly(CPUFastBackend):
    """cpu-fast without the C sweep."""

    def combine_(self, params, terms=(), distribution="gaussian", undo=None, then=None):
        blocked_combine_(params, terms, distribution, undo, then, bits=True, kernels=False)


def backend(name: str):
    if name == "cpu-fast-blocks":
        return BlocksOnly()
    if name != "torch-whole":
        return get_backend(name.removesuffix("-1w"))
    whole = get_backend("torch")
    whole.blocked_cpu = False
    return whole


def passes(b, params, distribution):
    return {"add_noise_": lambda: b.add_noise_(params, 1, 1e-3, distribution),
            "combine_ x3": lambda: b.combine_(params, [(1, -1e-4)], distribution, undo=(1, -1e-3),
                                                    then=(2, 1e-3))}


def on_one_thread(fn):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return run


def bench(params, reps: int) -> dict:
    """Best seconds per (backend, distribution, pass), rounds interleaved across rows."""
    cases = {(name, dist, op): on_one_thread(fn) if name.endswith("-1w") else fn for name, dist in ROWS
             for op, fn in passes(backend(name), params, dist).items()}
    best = {}
    for rnd in range(reps + 1):   # round 0 warms up (scratch buffers, page faults)
        for key, fn in cases.items():
            start = time.perf_counter()
            fn()
            if rnd:
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    return best


def report(title: str, best: dict) -> None:
    print(f"\n{title}")
    print(f"{'backend':<15} {'z':<11} {'pass':<12} {'s/pass':>8} {'vs whole':>9}")
    for (name, dist, op), t in best.items():
        print(f"{name:<15} {dist:<11} {op:<12} {t:8.3f} {best[('torch-whole', dist, op)] / t:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=135_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default=None, help="also time a real parameter list, e.g. smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    report(f"one fp32 tensor of {args.numel:,} elements", bench([torch.zeros(args.numel)], args.reps))
    if args.model:
        from zoft.models import load_model
        params = [p.data for p in load_model(args.model).model.parameters()]
        report(f"{args.model}: {len(params)} tensors, {sum(p.numel() for p in params):,} elements",
               bench(params, args.reps))


if __name__ == "__main__":
    main()
