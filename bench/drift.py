"""Weight drift over the ±ε round trip (lr = 0): how far MeZO's in-place restore wanders.

    .venv/bin/python bench/drift.py [--steps 1000] [--layers 1] [--eps 1e-3]

With lr = 0 a MeZO step should leave θ unchanged: +εz, −2εz, +εz. In floating point each
pass rounds, so θ drifts. This runs the real perturbation passes of zoft's torch backend on
the real SmolLM2-135M weights of the first ``--layers`` decoder layers (drift is
element-wise, so a layer is representative and keeps the CPU run short) and reports the
drift at 10, 100 and ``--steps`` steps, in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import time

import torch


def drift_table(weights: list[torch.Tensor], dtype: torch.dtype, steps: int, eps: float) -> list[dict]:
    from zoft.zo import TorchBackend, spsa
    params = [w.to(dtype).clone() for w in weights]
    start = [p.clone() for p in params]
    backend, rows = TorchBackend(), []
    for step in range(1, steps + 1):
        spsa(params, lambda: 0.0, step, eps, backend)
        if step in (10, 100, steps):
            diff = torch.cat([(p.double() - s.double()).flatten() for p, s in zip(params, start)])
            ref = torch.cat([s.double().flatten() for s in start])
            rows.append({"steps": step, "changed": (diff != 0).double().mean().item(),
                         "max_abs": diff.abs().max().item(),
                         "rel_rms": (diff.norm() / ref.norm()).item(),
                         "eps_rel": eps * (sum(p.numel() for p in params) ** 0.5) / ref.norm().item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--eps", type=float, default=1e-3)
    args = parser.parse_args()
    from zoft.models import load_model
    model = load_model(args.model).model
    prefixes = tuple(f"model.layers.{i}." for i in range(args.layers))
    weights = [p.detach() for n, p in model.named_parameters() if n.startswith(prefixes)]
    n = sum(w.numel() for w in weights)
    print(f"{args.model}: first {args.layers} decoder layer(s), {n / 1e6:.2f}M weights, eps {args.eps}, lr 0\n")
    print("| dtype | steps | elements changed | max abs drift | drift ‖Δθ‖/‖θ‖ | one perturbation ‖εz‖/‖θ‖ |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        t = time.perf_counter()
        for r in drift_table(weights, dtype, args.steps, args.eps):
            print(f"| {str(dtype).split('.')[-1]} | {r['steps']} | {100 * r['changed']:.1f}% | {r['max_abs']:.2e} | "
                  f"{r['rel_rms']:.2e} | {r['eps_rel']:.2e} |", flush=True)
        print(f"<!-- {dtype}: {time.perf_counter() - t:.0f}s -->")


if __name__ == "__main__":
    main()
