"""What each lr=auto probe sees: its projected gradient g and its whole loss curve f(lr) on the grid,
and the optimum the old rule (the grid's argmin) and the current one (zoft.zo.auto_lr: the parabola
through f(0) = 0 and the best two grid points; a fall within the noise of the three smallest steps
skipped) take from it.

    python bench/auto_lr_curves.py --seeds 0-7 [--probes 3] [--save FILE.jsonl] [key=value ...]   # any `zoft train` keys
    python bench/auto_lr_curves.py --load FILE.jsonl                                              # the table again, no model

The curve is measured past the probe's own stop (until the loss has doubled), each point from θ
restored exactly, on probe p's batch with probe p's direction, as the probe does. The number to
read is the spread of the per-probe optima (sd of log10) under each rule: the probe's choice is the
median of three of them. The default keys are bench/auto_lr_spread.py's (the README's 2,000-step
SST-2 run); add `compute_dtype=bf16` for the rounding noise that the noise gate is for.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics

from auto_lr_spread import load_run, seed_list   # its neighbour in bench/: the same run's keys and set-up

from zoft.zo.auto_lr import CLEAR, GRID, NOISE_POINTS, RISE, _vertex, probe_seed


def record_curves(seeds: list[int], probes: int, overrides: list[str]):
    import torch

    from zoft.methods.mezo import build_components, build_step
    from zoft.training import batch_indices
    cfg, setup, model, enc, objective = load_run(overrides)
    print(f"{cfg.model}, {cfg.task}, mode {cfg.mode}, compute {setup.compute_dtype}, {len(enc)} train rows", flush=True)
    with torch.no_grad():
        for seed in seeds:
            cfg.seed = seed
            zo = build_step(cfg, model, objective, len(enc))
            saved = [p.detach().clone() for p in zo.params]

            def restore():
                for p, s in zip(zo.params, saved):
                    p.copy_(s)
            estimator, optimizer = build_components(cfg, zo.params[0].device)
            for p in range(probes):
                batch = batch_indices(zo.n_train, cfg.batch_size, cfg.seed, p)
                judge = objective.on(batch)
                base = float(judge())
                estimate = estimator.estimate(zo.params, objective.on(batch),
                                              [probe_seed(seed, p, k) for k in range(cfg.n_directions)], step=p)
                restore()
                curve = []
                for lr in GRID:
                    copy.deepcopy(optimizer).update(zo.params, estimate, lr, estimator.backend, estimator.distribution)
                    change = float(judge()) - base
                    restore()
                    curve.append(change if math.isfinite(change) else math.inf)
                    if change > abs(base):
                        break
                yield dict(seed=seed, probe=p, g=estimate.directions[0][1], base=base, curve=curve)


def as_scanned(record: dict) -> list[float]:
    """The part of the curve the probe itself measures: it stops after a clear overshoot (auto_lr)."""
    out, base = [], abs(record["base"])
    for f in record["curve"]:
        if out and (out[-1] > RISE * base and min(out) < 0 or out[-1] > base):
            break
        out.append(f)
    return out


def optima(record: dict) -> tuple[float | None, float | None]:
    """(old rule, current rule) for one probe; None: the rule skips it."""
    curve = as_scanned(record)
    best = min(range(len(curve)), key=curve.__getitem__)
    if curve[best] >= 0:
        return None, None
    clear = -curve[best] > CLEAR * max(abs(f) for f in curve[:NOISE_POINTS])
    return GRID[best], _vertex(curve, best) if clear else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--save", help="write each probe's record (JSON lines) here as it comes")
    p.add_argument("--load", help="read the records from a --save file instead of measuring")
    p.add_argument("overrides", nargs="*", help="key=value config keys over the defaults above")
    args = p.parse_args()
    if args.load:
        with open(args.load) as f:
            records = [json.loads(line) for line in f]
    else:
        records, sink = [], open(args.save, "w") if args.save else None
        for record in record_curves(seed_list(args.seeds), args.probes, args.overrides):
            records.append(record)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    print("| seed | probe | g | L_B(θ) | noise: max |f| at the 3 smallest lrs | deepest fall | grid argmin (old) | current rule |")
    print("|---|---|---|---|---|---|---|---|")
    by_rule: dict[str, list[float]] = {"old": [], "current": []}
    for r in records:
        old, new = optima(r)
        curve = as_scanned(r)
        by_rule["old"] += [] if old is None else [math.log10(old)]
        by_rule["current"] += [] if new is None else [math.log10(new)]
        print(f"| {r['seed']} | {r['probe']} | {r['g']:.3g} | {r['base']:.3f} | {max(abs(f) for f in curve[:NOISE_POINTS]):.2g} "
              f"| {min(curve):.2g} | {'-' if old is None else f'{old:.3g}'} | {'skipped' if new is None else f'{new:.3g}'} |")
    for rule, logs in by_rule.items():
        if len(logs) > 1:
            print(f"{rule} rule: {len(logs)} of {len(records)} probes counted; log10 optimum mean {statistics.fmean(logs):.2f}, "
                  f"sd {statistics.pstdev(logs):.3f}, geometric range {10 ** (max(logs) - min(logs)):.3g}×")


if __name__ == "__main__":
    main()
