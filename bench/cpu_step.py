"""CPU step benchmark: forward vs MeZO step vs FT step, fp32 and bf16 compute, time and peak memory.

    .venv/bin/python bench/cpu_step.py [--model smollm2-135m] [--batch 16] [--seq 64] [--repeats 3]
        [--backend torch,cpu-fast] [--compile]

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to that
measurement alone: inference (forward passes), a MeZO step (2 forwards + perturbation
passes), and an FT step (forward + backward + AdamW), each in fp32 and with bf16 compute
(``torch.autocast`` over the fp32 weights, as zoft's ``compute_dtype=bf16``; the weights,
MeZO's perturbation and update, and AdamW stay fp32). The MeZO step is timed for every
perturbation backend named by ``--backend`` (names zoft.zo.get_backend does not know are
skipped with a note) and for a plain-torch reference of the same algorithm written the way
the MeZO reference code does it (torch.manual_seed + one torch.normal per tensor, fp32).
The backend name ``cpu-fast-blocks`` is cpu-fast with its C sweep switched off
(``ZOFT_CPU_KERNELS=0``: the block path, bit-identical and slower), for a row beside cpu-fast.
``--compile`` adds forwards of the model compiled by torch.compile (inductor, CPU), and the
fused MeZO step of each backend on that compiled forward (zoft's ``compile=default``), bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time


def measure(kind: str, model_name: str, batch: int, seq: int, repeats: int) -> dict:
    """``kind`` is ``forward:DTYPE``, ``forward-compiled:DTYPE``, ``mezo:BACKEND:DTYPE``,
    ``mezo-fused:BACKEND:DTYPE``, ``mezo-fused-compiled:BACKEND:DTYPE``, ``mezo-reference:fp32`` or
    ``ft:DTYPE``, with DTYPE fp32 or bf16 (the compute dtype)."""
    import torch

    from zoft.models import load_model
    from zoft.zo import SPSA, ZOSGD, get_backend
    from zoft.zo.fused import FusedZOSGD

    what, *rest = kind.split(":")
    dtype = rest[-1]
    loaded = load_model(model_name)
    model = loaded.model
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(min(100, vocab // 2), min(20000, vocab), (batch, seq))
    mask = torch.ones_like(ids)
    labels = ids.clone()

    def compute():   # what CandidateScorer.compute() does for compute_dtype=bf16
        return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    compiled = what.endswith("-compiled")
    what = what.removesuffix("-compiled")
    forward = torch.compile(model) if compiled else model   # inductor; its first call compiles (untimed)

    def loss() -> float:
        with compute():
            return forward(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    params = [p for p in model.parameters()]
    times = []
    if what == "forward":
        model.eval()
        with torch.no_grad():
            loss()
            for _ in range(repeats):
                t = time.perf_counter(); loss(); times.append(time.perf_counter() - t)
    elif what in ("mezo", "mezo-fused", "mezo-reference"):   # also mezo-fused-compiled
        model.eval()
        # a MeZO row names BACKEND or BACKEND/DISTRIBUTION, e.g. cpu-fast/rademacher
        backend, _, distribution = (rest[0] if what != "mezo-reference" else "torch").partition("/")
        backend = backend.removesuffix("-blocks")   # the env var was set by main()
        distribution = distribution or "gaussian"
        est = SPSA(eps=1e-3, distribution=distribution, backend=get_backend(backend))
        opt = ZOSGD()

        @torch.no_grad()
        def zoft_step(step: int) -> None:
            e = est.estimate(params, loss, [step])
            opt.update(params, e, 1e-7, est.backend, distribution)

        @torch.no_grad()
        def reference_step(step: int) -> None:
            # MeZO reference (large_models/trainer.py): reseed the global RNG, one torch.normal per tensor
            def perturb(scale):
                torch.manual_seed(step)
                for p in params:
                    z = torch.normal(0, 1, size=p.size(), dtype=p.dtype)
                    p.data = p.data + scale * 1e-3 * z
            perturb(1); lp = loss(); perturb(-2); lm = loss(); perturb(1)
            g = (lp - lm) / 2e-3
            torch.manual_seed(step)
            for p in params:
                z = torch.normal(0, 1, size=p.size(), dtype=p.dtype)
                p.data = p.data - 1e-7 * g * z

        # the 2-pass step training takes by default (zo/fused.py): this update fused with the next +εz
        fused = FusedZOSGD(params, est.backend, 1e-3, distribution)

        def fused_step(step: int) -> None:
            fused.step(loss, step, 1e-7, step + 1)

        step_fn = {"mezo": zoft_step, "mezo-fused": fused_step, "mezo-reference": reference_step}[what]
        step_fn(0)
        for i in range(repeats):
            t = time.perf_counter(); step_fn(i + 1); times.append(time.perf_counter() - t)
    elif what == "ft":
        model.train()
        optim = torch.optim.AdamW(params, lr=1e-7)

        def ft_step() -> None:
            with compute():   # backward runs outside autocast, as torch recommends
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        ft_step()
        for _ in range(repeats):
            t = time.perf_counter(); ft_step(); times.append(time.perf_counter() - t)
    assert all(p.dtype == torch.float32 for p in params)   # bf16 compute never touches the weights' dtype
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "seconds": sorted(times)[len(times) // 2], "peak_rss_mib": peak_mib}


def known_backend(name: str) -> str | None:
    """None if zoft.zo can build backend ``name`` here, else why not (the row is skipped)."""
    from zoft.zo import get_backend
    try:
        get_backend(name.partition("/")[0].removesuffix("-blocks"))
        return None
    except Exception as e:   # noqa: BLE001 - unknown name or missing dependency: skip the row
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="torch",
                        help="comma list of zoft.zo backends for the MeZO rows, each BACKEND[/DISTRIBUTION]")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) forwards")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.batch, args.seq, args.repeats)))
        return
    dtypes = ("fp32", "bf16")
    kinds = [f"forward:{d}" for d in dtypes] + ([f"forward-compiled:{d}" for d in dtypes] if args.compile else [])
    notes = []
    for backend in [b.strip() for b in args.backend.split(",") if b.strip()]:
        why = known_backend(backend)
        if why:
            notes.append(f"MeZO backend '{backend}' skipped ({why})")
        else:
            kinds += [f"{step}:{backend}:{d}" for step in ("mezo", "mezo-fused") for d in dtypes]
            kinds += [f"mezo-fused-compiled:{backend}:bf16"] if args.compile else []
    kinds += ["mezo-reference:fp32"] + [f"ft:{d}" for d in dtypes]
    rows = {}
    for kind in kinds:
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--model", args.model, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)],
                             capture_output=True, text=True,
                             env={**os.environ, **({"ZOFT_CPU_KERNELS": "0"} if "-blocks" in kind else {})})
        if out.returncode != 0:
            notes.append(f"{kind} failed: {out.stderr.strip().splitlines()[-1][:160] if out.stderr.strip() else '?'}")
            continue
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  measured {kind}: {rows[kind]['seconds']:.3f} s", file=sys.stderr, flush=True)
    import torch
    if not any(k.startswith("forward") for k in rows):
        sys.exit("no forward measured:\n" + "\n".join(notes))
    fwd = {d: rows.get(f"forward:{d}") for d in dtypes}
    fastest_fwd = min((r for k, r in rows.items() if k.startswith("forward")), key=lambda r: r["seconds"])
    fts = [r for k, r in rows.items() if k.startswith("ft:")]
    fastest_ft = min(fts, key=lambda r: r["seconds"]) if fts else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"\n{args.model}, batch {args.batch} x {args.seq} tokens, fp32 weights, {cpu}, {os.cpu_count()} cores "
          f"({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}, "
          f"median of {args.repeats}\n")
    print("| measurement | compute | time (s) | × forward (same compute) | × fastest forward | × fastest FT step "
          "| peak RSS (MiB) | × inference RSS (same compute) |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"forward": "forward (inference)", "forward-compiled": "forward, torch.compile (inductor)",
             "mezo": "MeZO step, zoft {} backend, 4 passes", "mezo-fused": "MeZO step, zoft {} backend, fused 2 passes",
             "mezo-fused-compiled": "MeZO step, zoft {} backend, fused 2 passes, compiled forward",
             "mezo-reference": "MeZO step, reference-style torch",
             "ft": "FT step (backprop + AdamW)"}
    for kind, r in rows.items():
        what, *rest = kind.split(":")
        base = fwd[rest[-1]] or fastest_fwd
        ft = f"{r['seconds'] / fastest_ft['seconds']:.2f}" if fastest_ft else "-"
        print(f"| {names[what].format(*rest[:-1])} | {rest[-1]} | {r['seconds']:.3f} | "
              f"{r['seconds'] / base['seconds']:.2f} | {r['seconds'] / fastest_fwd['seconds']:.2f} | {ft} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} |")
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
