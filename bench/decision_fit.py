"""Would fitting an ensemble's decision on dev help? Cut points and member weights, fitted and tested.

    .venv/bin/python bench/decision_fit.py RUN_DIR [RUN_DIR ...] [--cache DIR]

For each finished two-member ensemble run (e.g. ``zoft train configs/scoring.yaml task=asap-N``) it
scores the dev split with each member's best weights (the run's own dev rows, from its config.yaml),
reads each member's stored eval probabilities from its eval.json, and compares on the eval split:
- ``shipped``: equal weights, the level nearest the expected score (``decision=expected``);
- ``dev cuts``: cut points on the expected score chosen to maximise dev QWK (coordinate search);
- ``dev weight``: the first member's weight w in 0, 0.1, ... 1 chosen by dev QWK, cut points as shipped.

Dev is what a run also selects its best step on; a rule fitted to it helps only if it outlives that
noise on the eval split. With ``--cache DIR`` each run's dev probabilities are kept as JSON there and
reused (scoring dev with Gemma takes minutes on a CPU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from zoft.tasks.decision import decide
from zoft.tasks.metrics import quadratic_weighted_kappa


def qwk(gold, pred) -> float:
    return quadratic_weighted_kappa(list(gold), list(pred))


def shipped_levels(probabilities: np.ndarray) -> list[int]:
    """The run's own rule (``decision=expected``): the level nearest the expected score."""
    return decide(torch.from_numpy(probabilities), "expected")


def levels_from(expected: np.ndarray, cuts) -> np.ndarray:
    """Level = how many cut points lie below the expected score."""
    return np.searchsorted(np.asarray(cuts), expected)


def fit_cuts(expected: np.ndarray, gold: np.ndarray, n_levels: int, rounds: int = 3) -> list[float]:
    """Coordinate search: move one cut point at a time within its neighbours, keep what raises QWK."""
    cuts = list(np.arange(n_levels - 1) + 0.5)
    best = qwk(gold, levels_from(expected, cuts))
    for _ in range(rounds):
        for j in range(n_levels - 1):
            low = cuts[j - 1] if j else -0.5
            high = cuts[j + 1] if j + 1 < n_levels - 1 else n_levels - 0.5
            for value in np.linspace(low + 0.01, high - 0.01, 60):
                trial = cuts.copy()
                trial[j] = value
                score = qwk(gold, levels_from(expected, trial))
                if score > best + 1e-9:
                    best, cuts = score, trial
    return cuts


def dev_probabilities(run: Path, cache: Path | None) -> dict:
    """Each member's dev probabilities and the dev gold levels, scored live or read from the cache."""
    cached = cache / (run.resolve().as_posix().strip("/").replace("/", "_") + ".json") if cache else None
    if cached and cached.is_file():
        return json.loads(cached.read_text())
    from zoft.methods.registry import load_run
    setup, scorer = load_run(run)
    dev = setup.data.dev
    encoded = scorer.encode(dev)
    members = []
    with torch.no_grad():
        for member, enc in zip(scorer.scorers, encoded.per_member):
            rows = []
            for start in range(0, len(dev), 16):
                idx = list(range(start, min(start + 16, len(dev))))
                rows += member.candidate_logprobs(enc, idx)[0].double().softmax(-1).tolist()
            members.append(rows)
    result = {"targets": [ex.target for ex in dev], "members": members}
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    print("| run | shipped | dev cuts | Δ | cuts | dev weight w | Δ |")
    print("|---|---|---|---|---|---|---|")
    deltas = {"cuts": [], "weight": []}
    for run in args.runs:
        dev = dev_probabilities(run, args.cache)
        dev_members = [np.array(m) for m in dev["members"]]
        member_dirs = sorted(p for p in (run / "members").iterdir() if (p / "eval.json").is_file())
        eval_members = [np.array(json.loads((m / "eval.json").read_text())["eval_outputs"]["probabilities"])
                        for m in member_dirs]
        if len(dev_members) != 2 or len(eval_members) != 2:
            raise SystemExit(f"{run}: this benchmark compares two-member ensembles")
        gold_dev = np.array(dev["targets"])
        gold_eval = np.array(json.loads((run / "eval.json").read_text())["eval_outputs"]["targets"])
        n_levels = dev_members[0].shape[1]
        scale = np.arange(n_levels)
        shipped = qwk(gold_eval, shipped_levels(sum(eval_members) / 2))
        cuts = fit_cuts((sum(dev_members) / 2) @ scale, gold_dev, n_levels)
        with_cuts = qwk(gold_eval, levels_from((sum(eval_members) / 2) @ scale, cuts))
        weights = np.linspace(0, 1, 11)
        on_dev = [qwk(gold_dev, shipped_levels(w * dev_members[0] + (1 - w) * dev_members[1])) for w in weights]
        w = weights[int(np.argmax(on_dev))]
        with_weight = qwk(gold_eval, shipped_levels(w * eval_members[0] + (1 - w) * eval_members[1]))
        deltas["cuts"].append(with_cuts - shipped)
        deltas["weight"].append(with_weight - shipped)
        print(f"| {run} | {shipped:.4f} | {with_cuts:.4f} | {with_cuts - shipped:+.4f} | "
              f"{', '.join(f'{c:.2f}' for c in cuts)} | {w:.1f}: {with_weight:.4f} | {with_weight - shipped:+.4f} |",
              flush=True)
    for name, values in deltas.items():
        print(f"dev {name}: mean Δ QWK {np.mean(values):+.4f}, lower on {sum(v < 0 for v in values)} "
              f"of {len(values)} runs, higher on {sum(v > 0 for v in values)}")


if __name__ == "__main__":
    main()
