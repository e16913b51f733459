"""Weight drift over the ±ε round trip (lr = 0): how far MeZO's in-place restore wanders.

    python bench/drift.py [--steps 1000] [--layers 1] [--eps 1e-3] [--backends torch,triton]
                          [--dtypes float32,bfloat16] [--weights smollm2|random] [--numel N] [--out DIR]

With lr = 0 a MeZO step should leave θ unchanged: +εz, −2εz, +εz. In floating point each
pass rounds, so θ drifts. This runs the real perturbation passes of each backend on real
SmolLM2-135M weights of the first ``--layers`` decoder layers (or, where the model cannot be
loaded, e.g. the GPU image without ``gguf``, random N(0, 0.02) weights of an OPT-13B-sized
layer), and reports the drift at 10, 100 and ``--steps`` steps. Drift is element-wise, so a
layer is representative; ``--numel`` keeps only the first N values of each tensor (needed for
the Triton interpreter on a CPU, which runs about 10⁵ values a second).

Paths: ``passes`` is the estimator's ±ε round trip (``spsa``: +εz, −2εz, restore), ``fused``
is zoft's two-pass step (``FusedZOSGD`` with lr = 0, settled at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def load_weights(kind: str, layers: int, device: str) -> tuple[str, list[torch.Tensor]]:
    if kind == "smollm2":
        from zoft.models import load_model
        model = load_model("smollm2-135m").model
        prefixes = tuple(f"model.layers.{i}." for i in range(layers))
        weights = [p.detach() for n, p in model.named_parameters() if n.startswith(prefixes)]
        return f"SmolLM2-135M, first {layers} decoder layer(s)", [w.to(device) for w in weights]
    gen = torch.Generator(device).manual_seed(0)
    shapes = [(5120, 5120)] * 4 + [(20480, 5120), (5120, 20480), (5120,), (5120,)]
    weights = [torch.randn(s, generator=gen, device=device) * 0.02 for s in shapes[:4 * layers]]
    return f"random N(0, 0.02), OPT-13B attention block shapes x {layers}", weights


def drift_table(weights: list[torch.Tensor], dtype: torch.dtype, steps: int, eps: float,
                backend, path: str = "passes") -> list[dict]:
    from zoft.zo import spsa
    from zoft.zo.fused import FusedZOSGD
    params = [w.to(dtype).clone() for w in weights]
    start = [p.clone() for p in params]
    fused, rows = FusedZOSGD(params, backend, eps), []
    for step in range(1, steps + 1):
        if path == "fused":
            fused.step(lambda: 0.0, step, 0.0, next_seed=step + 1)
        else:
            spsa(params, lambda: 0.0, step, eps, backend)
        if step in (10, 100, steps):
            fused.settle()
            diff = torch.cat([(p.double() - s.double()).flatten() for p, s in zip(params, start)])
            ref = torch.cat([s.double().flatten() for s in start])
            rows.append({"steps": step, "changed": (diff != 0).double().mean().item(),
                         "max_abs": diff.abs().max().item(),
                         "rel_rms": (diff.norm() / ref.norm()).item(),
                         "eps_rel": eps * (sum(p.numel() for p in params) ** 0.5) / ref.norm().item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--weights", choices=["smollm2", "random"], default=None,
                        help="default: smollm2 on CPU, random on CUDA")
    parser.add_argument("--numel", type=int, default=None, help="keep the first N values of each tensor")
    parser.add_argument("--out", default=None, help="directory for drift.json and drift.md")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    from zoft.zo import get_backend
    what, weights = load_weights(args.weights or ("smollm2" if device == "cpu" else "random"), args.layers, device)
    if args.numel:
        weights = [w.flatten()[:args.numel] for w in weights]
    n = sum(w.numel() for w in weights)
    lines = [f"{what}, {n / 1e6:.3f}M weights on {device}, eps {args.eps}, lr 0", "",
             "| backend | path | dtype | steps | elements changed | max abs drift | drift ‖Δθ‖/‖θ‖ | one perturbation ‖εz‖/‖θ‖ |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = []
    for name in args.backends.split(","):
        for path in ("passes", "fused"):
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                t = time.perf_counter()
                for r in drift_table(weights, dtype, args.steps, args.eps, get_backend(name, device), path):
                    r.update(backend=name, path=path, dtype=str(dtype).split(".")[-1])
                    results.append(r)
                    lines.append(f"| {name} | {path} | {r['dtype']} | {r['steps']} | {100 * r['changed']:.1f}% | "
                                 f"{r['max_abs']:.2e} | {r['rel_rms']:.2e} | {r['eps_rel']:.2e} |")
                    print(lines[-1], flush=True)
                print(f"<!-- {name} {path} {dtype}: {time.perf_counter() - t:.0f}s -->", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for file, text in (("drift.json", json.dumps({"weights": what, "numel": n, "device": device,
                                                      "eps": args.eps, "rows": results}, indent=2)),
                           ("drift.md", "\n".join(lines) + "\n")):
            tmp = out / (file + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out / file)


if __name__ == "__main__":
    main()
