"""Does ε matter? MeZO's finite difference at several ε against autograd's directional derivative.

    .venv/bin/python bench/eps_sweep.py [--model smollm2-135m] [--task sst2] [--mode full|lora]
        [--eps 1e-5,1e-4,1e-3,1e-2,1e-1] [--directions 8] [--batch 16] [--max-length 64]
        [--distribution rademacher] [--out DIR]

At the pretrained θ, for N (training batch, direction z) pairs, it takes the true directional
derivative d = ∇L(θ)·z from autograd (fp32 compute, summed in float64) and MeZO's two-sided
difference g(ε) = (L(θ+εz) − L(θ−εz)) / 2ε with fp32 and with bf16 compute (autocast over the fp32
weights, as the CPU default runs), for every ε. Too small an ε and g is rounding noise (bf16 has 8
bits of mantissa); too large and it is the slope of a secant, not of the tangent. For each
(compute, ε) it prints the relative RMS error |g − d| / |d| over the pairs, their Pearson correlation
and how often their signs agree.

How to read it: SPSA's own noise is the spread of d over directions (a random z carries little of
the gradient), so a relative error e adds about e² to the estimate's variance. ε matters where e
approaches 1, and an ``eps=auto`` would matter only if the default ε sat there for some model or mode.
The batches and direction seeds are those of steps 1..N of a ``zoft train`` run with seed 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--eps", default="1e-5,1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--distribution", default="rademacher")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    eps_grid = [float(e) for e in args.eps.split(",")]

    import torch

    from zoft.adapters import apply_mode, named_trainable
    from zoft.lm import CandidateScorer
    from zoft.models import load_model
    from zoft.tasks import load_task
    from zoft.training import batch_indices
    from zoft.zo import get_backend
    from zoft.zo.estimator import spsa
    from zoft.zo.schedule import direction_seed

    loaded = load_model(args.model)
    model = apply_mode(loaded.model, args.mode, is_masked_lm=loaded.is_masked_lm)
    task = load_task(args.task)
    data = task.get_data(n_train=1000, n_dev=100, n_eval=100, seed=0)
    scorers = {dtype: CandidateScorer(model, loaded.tokenizer, task.kind, loaded.is_masked_lm,
                                      args.max_length, task.target_delimiter, compute_dtype=dtype)
               for dtype in ("fp32", "bf16")}
    enc = scorers["fp32"].encode(data.train)
    params = list(named_trainable(model).values())
    backend = get_backend("auto", "cpu", args.distribution)
    model.eval()

    def direction(seed: int) -> list[torch.Tensor]:
        """z as the backend draws it for this seed: θ + 1·z − θ (z is ±1 or Gaussian; fp32 keeps it)."""
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            backend.add_noise_(params, seed, 1.0, args.distribution)
            z = [p.detach() - b for p, b in zip(params, before)]
            for p, b in zip(params, before):
                p.copy_(b)
        return z

    rows = []
    for step in range(1, args.directions + 1):
        idx, seed = batch_indices(len(enc), args.batch, 0, step), direction_seed(0, step, 0)
        loss = scorers["fp32"].loss(enc, idx)
        grads = torch.autograd.grad(loss, params)
        loss = loss.detach()
        d = sum(float((g.double() * z.double()).sum()) for g, z in zip(grads, direction(seed)))
        row = {"step": step, "loss": loss.item(), "d": d}
        for dtype, scorer in scorers.items():
            for eps in eps_grid:
                with torch.no_grad():
                    plus, minus = spsa(params, lambda: scorer.loss(enc, idx).item(), seed, eps, backend,
                                       args.distribution)
                row[f"{dtype}@{eps:g}"] = (plus - minus) / (2 * eps)
        rows.append(row)
        print(json.dumps(row), flush=True)

    d = [r["d"] for r in rows]
    rms = lambda xs: math.sqrt(sum(x * x for x in xs) / len(xs))   # noqa: E731
    table = []
    for dtype in scorers:
        for eps in eps_grid:
            g = [r[f"{dtype}@{eps:g}"] for r in rows]
            table.append({"compute": dtype, "eps": eps,
                          "relative_rms_error": rms([a - b for a, b in zip(g, d)]) / rms(d),
                          "pearson": statistics.correlation(g, d) if statistics.pstdev(g) else float("nan"),
                          "sign_agreement": sum((a > 0) == (b > 0) for a, b in zip(g, d)) / len(d)})
    print(f"\n{args.model}, {args.task}, mode {args.mode}, {args.distribution} z, {len(d)} (batch, z) pairs of "
          f"{args.batch} x {args.max_length} tokens, RMS d = {rms(d):.3g}, {torch.get_num_threads()} threads")
    print("| compute | eps | |g - d| / |d| (RMS) | Pearson r | signs agree |\n|---|---|---|---|---|")
    for t in table:
        print(f"| {t['compute']} | {t['eps']:g} | {t['relative_rms_error']:.3f} | {t['pearson']:.3f} "
              f"| {t['sign_agreement']:.2f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        summary = {k: getattr(args, k) for k in ("model", "task", "mode", "directions", "batch", "max_length",
                                                  "distribution")} | {"cpu": os.uname().machine}
        Path(args.out, "eps_sweep.json").write_text(json.dumps({"summary": summary, "table": table, "rows": rows},
                                                               indent=1))


if __name__ == "__main__":
    main()
