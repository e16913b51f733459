"""Does bf16 compute change MeZO's estimate? Projected gradients with fp32 and bf16 compute, side by side.

    .venv/bin/python bench/bf16_estimate.py [--model smollm2-135m] [--task sst2] [--directions 24]
        [--eps 1e-3] [--batch 16] [--max-length 64] [--distribution gaussian] [--out DIR]

At fixed weights θ and for the same (direction seed, training batch) pairs, it computes MeZO's
projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε twice: with fp32 compute and with
``compute_dtype=bf16`` (autocast over the fp32 weights; ±εz stays fp32). If bf16's rounding
noise swamped the finite difference, the two g's would disagree in sign and scale; if bf16 is
a faithful estimate, they fall on the diagonal. It prints their Pearson correlation, how often
their signs agree, the relative RMS difference, and the same g computed twice in fp32 as the
reference for run-to-run noise (0 on a CPU: forwards are deterministic). Every batch is a real
training batch (the same sampling as ``zoft train``), and the direction seeds are those of steps
1..N of a run with seed 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--directions", type=int, default=24)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--distribution", default="gaussian")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from zoft.lm import CandidateScorer
    from zoft.models import load_model
    from zoft.tasks import load_task
    from zoft.training import batch_indices
    from zoft.zo import get_backend
    from zoft.zo.estimator import spsa
    from zoft.zo.schedule import direction_seed

    loaded = load_model(args.model)
    task = load_task(args.task)
    data = task.get_data(n_train=1000, n_dev=100, n_eval=100, seed=0)
    scorers = {dtype: CandidateScorer(loaded.model, loaded.tokenizer, task.kind, loaded.is_masked_lm,
                                      args.max_length, task.target_delimiter, compute_dtype=dtype)
               for dtype in ("fp32", "bf16")}
    enc = scorers["fp32"].encode(data.train)
    params = [p for p in loaded.model.parameters()]
    backend = get_backend(args.backend)
    loaded.model.eval()

    def g(dtype: str, step: int) -> float:
        idx = batch_indices(len(enc), args.batch, 0, step)
        with torch.no_grad():
            plus, minus = spsa(params, lambda: scorers[dtype].loss(enc, idx).item(),
                               direction_seed(0, step, 0), args.eps, backend, args.distribution)
        return (plus - minus) / (2 * args.eps)

    rows = []
    for step in range(1, args.directions + 1):
        row = {"step": step, "fp32": g("fp32", step), "fp32_again": g("fp32", step), "bf16": g("bf16", step)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def corr(a, b):
        return statistics.correlation(a, b) if statistics.pstdev(a) and statistics.pstdev(b) else float("nan")

    f32, again, b16 = ([r[k] for r in rows] for k in ("fp32", "fp32_again", "bf16"))
    rms = lambda xs: (sum(x * x for x in xs) / len(xs)) ** 0.5   # noqa: E731
    summary = {
        "model": args.model, "task": args.task, "directions": args.directions, "eps": args.eps,
        "batch": args.batch, "max_length": args.max_length, "distribution": args.distribution,
        "threads": torch.get_num_threads(), "cpu": os.uname().machine,
        "pearson_fp32_bf16": corr(f32, b16),
        "sign_agreement": sum((a > 0) == (b > 0) for a, b in zip(f32, b16)) / len(rows),
        "relative_rms_difference": rms([a - b for a, b in zip(f32, b16)]) / rms(f32),
        "fp32_repeat_max_abs_difference": max(abs(a - b) for a, b in zip(f32, again)),
        "rms_g_fp32": rms(f32), "rms_g_bf16": rms(b16),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bf16_estimate.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
