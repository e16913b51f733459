"""How much lr=auto's choice moves with the seed: the probe alone, over many seeds, on one model and task.

    python bench/auto_lr_spread.py --seeds 0-7 [--draws 3,16] [--drift 0.1] [key=value ...]   # any `zoft train` keys

lr=auto (zoft.zo.auto_lr) is a pure function of the seed, but the seed picks the probes' batches and
directions, and a projected gradient g = zᵀ∇L is heavy-tailed. For each seed and each number of
draws behind the run-length cap (``DRIFT_DRAWS``; until 2026-11-29 the rule was 3, the probes' own
directions only, with DRIFT 0.1 where it is now 0.15: ``--draws 3 --drift 0.1`` is that rule) this
runs zoft's own probe (``zoft.methods.mezo.auto_lr``) on the config the keys describe, and prints
each probe's optimum, the one-step choice, the cap, the chosen lr and the probe's forwards. No step
is taken: the probe leaves the weights exactly as loaded. The spread of the chosen lr over seeds is
the number to read (max/min); the default keys are the README's 2,000-step SST-2 run.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

from zoft.config import load_config
from zoft.methods.common import prepare
from zoft.methods.mezo import auto_lr, build_step, make_objective
from zoft.zo import auto_lr as auto_lr_module

DEFAULTS = dict(method="mezo", model="smollm2-135m", task="sst2", n_train=10000, n_dev=200, n_eval=32,
                max_length=64, batch_size=16, steps=2000, eps=1e-3, lr="auto", progress=False)


def seed_list(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def load_run(overrides: list[str]):
    """The config (the defaults above, then ``key=value`` overrides), its model in eval mode, the
    encoded training rows and the training objective, as a run would build them."""
    cfg = load_config(overrides=dict(DEFAULTS, **dict(kv.split("=", 1) for kv in overrides)))
    setup = prepare(cfg)
    setup.pin_compute_dtype()
    model = setup.with_mode()
    model.eval()
    scorer = setup.scorer(model)
    enc_train = scorer.encode(setup.data.train)
    return cfg, setup, model, enc_train, make_objective(setup, scorer, enc_train, setup.data.train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--draws", default="3,16", help="values of DRIFT_DRAWS to compare (3: the old rule)")
    p.add_argument("--drift", type=float, default=auto_lr_module.DRIFT, help="DRIFT, the cap's share of |θ₀|")
    p.add_argument("overrides", nargs="*", help="key=value config keys over the defaults above")
    args = p.parse_args()
    cfg, setup, model, enc_train, objective = load_run(args.overrides)
    print(f"{cfg.model}, {cfg.task}, mode {cfg.mode}, estimator {cfg.estimator}, optimizer {cfg.optimizer}, "
          f"steps {cfg.steps} ({cfg.lr_schedule}), compute {setup.compute_dtype}, {len(enc_train)} train rows, "
          f"DRIFT {args.drift}")
    print("| draws | seed | probes' optima | one-step lr | run-length cap | chosen lr | probe forwards | probe s |")
    print("|---|---|---|---|---|---|---|---|")
    auto_lr_module.DRIFT = args.drift
    chosen_by_draws: dict[int, list[float]] = {}
    for draws in [int(d) for d in args.draws.split(",")]:
        auto_lr_module.DRIFT_DRAWS = draws
        for seed in seed_list(args.seeds):
            cfg.seed, cfg.lr = seed, "auto"
            zo = build_step(cfg, model, objective, len(enc_train))
            t = time.perf_counter()
            chosen = auto_lr(cfg, zo, objective)
            seconds = time.perf_counter() - t
            chosen_by_draws.setdefault(draws, []).append(chosen.lr)
            cap = "-" if chosen.drift_cap is None else f"{chosen.drift_cap:.3g}"
            optima = ", ".join("-" if x is None else f"{x:.3g}" for x in chosen.per_probe)
            print(f"| {draws} | {seed} | {optima} | {chosen.one_step:.3g} | {cap} | {chosen.lr:.3g} | {chosen.forwards} "
                  f"| {seconds:.1f} |", flush=True)
    for draws, lrs in chosen_by_draws.items():
        spread = max(lrs) / min(lrs)
        geo = 10 ** statistics.fmean(math.log10(x) for x in lrs)
        sd = statistics.pstdev(math.log10(x) for x in lrs)
        print(f"draws {draws}: chosen lr geometric mean {geo:.3g}, max/min {spread:.2f}, "
              f"sd of log10 {sd:.3f} over {len(lrs)} seeds")


if __name__ == "__main__":
    main()
