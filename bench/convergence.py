"""Convergence per forward pass: every ZO optimizer/estimator vs FT and zero-shot, SST-2 and RTE.

    python bench/convergence.py --model PATH_OR_NAME --data-dir DATA --out OUT        # GPU, ~8 min
    python bench/convergence.py --out OUT --smoke                                      # tiny-llama, CPU

For each task × method × seed it trains full-parameter from the same start within a budget of
forward passes (``--budget``, default 1000 per run: 500 MeZO steps), evaluating dev every
``--eval-every`` forwards, and records:
  * forwards and wall seconds (training only, evals excluded) to first reach ``--target`` dev acc;
  * best dev accuracy, and validation accuracy at the best-dev weights (zoft's load_best rule).
FT (AdamW backprop, counted as 3 forwards per step) and zero-shot rows sit beside them.

The step is zoft's own (``zoft.methods.mezo.build_step``: the estimator/optimizer registries, flat
buffer, LR schedule) on zoft's fixed-shape loss (``zoft.compile.FixedShapeLoss``, captured as a
CUDA graph on a GPU), so the overhead per step is the library's. Data sampling follows
``zoft.methods.common.prepare`` (n_train / n_dev from the training split, n_eval from validation).

Resumable: each finished run is appended to OUT/runs.jsonl as it ends and skipped on a rerun;
``--time-limit`` stops starting new runs (seed 0 of every method runs first), and the summary
table (OUT/summary.md, OUT/summary.json) is rebuilt from whatever rows exist. Time to target is
recomputed from each run's logged dev curve, so rerunning with the same OUT and another
``--target`` re-summarises without training (short CPU runs rarely reach the GPU targets).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from zoft.adapters import named_trainable
from zoft.compile import FixedShapeLoss
from zoft.config import load_config
from zoft.lm import Encoded
from zoft.methods.common import prepare
from zoft.methods.finetune import adamw_step, make_optimizer
from zoft.methods.mezo import auto_lr, build_step
from zoft.zo import Objective
from zoft.zo.flat import flatten_

# name: (config overrides, forwards per step). lr values are starting points for SmolLM2-135M in
# fp32 (MeZO's 3e-5 from the issue; the others scaled by their step size), not tuned here.
METHODS = {
    "mezo":          dict(optimizer="zo-sgd", lr=3e-5),
    "mezo-auto":     dict(optimizer="zo-sgd", lr="auto"),   # zoft's default: the probe's forwards count
    "mezo-1sided":   dict(optimizer="zo-sgd", one_sided=True, lr=3e-5),
    "mezo-rademacher": dict(optimizer="zo-sgd", distribution="rademacher", lr=3e-5),   # cheap z on a GPU
    "zo-momentum":   dict(optimizer="zo-sgd-momentum", momentum=0.9, lr=3e-6),
    "zo-sign":       dict(optimizer="zo-sgd-sign", lr=1e-5),
    "zo-cons":       dict(optimizer="zo-sgd-cons", lr=1e-4),
    "zo-adam":       dict(optimizer="zo-adam", lr=1e-5),
    "fzoo":          dict(estimator="fzoo", n_directions=4, lr=1e-4),
    "lozo":          dict(estimator="lozo", lozo_rank=2, lozo_nu=50, lr=3e-5),
    "smezo":         dict(estimator="smezo", smezo_fraction=0.25, lr=3e-5),
}
TARGETS = {"sst2": 0.80, "rte": 0.55}


def forwards_per_step(cfg) -> int:
    """Forward passes of one ZO step of this config (the README's estimator and optimizer tables)."""
    n = cfg.n_directions
    per_step = n + 1 if cfg.estimator == "fzoo" or cfg.one_sided else 2 * n
    return per_step + (3 if cfg.optimizer == "zo-sgd-cons" else 0)


def concat(*encs: Encoded) -> tuple[Encoded, list[range]]:
    """One Encoded holding several splits (one fixed width, one compiled graph), and each split's rows."""
    rows, spans, start = Encoded([], [], torch.zeros(0, dtype=torch.long), encs[0].label_ids), [], 0
    for e in encs:
        rows.context_ids += e.context_ids
        rows.choice_ids += e.choice_ids
        rows.targets = torch.cat([rows.targets, e.targets])
        spans.append(range(start, start + len(e)))
        start += len(e)
    return rows, spans


def accuracy(loss: FixedShapeLoss, span: range, targets: torch.Tensor, batch: int) -> float:
    """Accuracy over ``span`` in fixed-size batches (the last one padded by repeating rows)."""
    idx, preds = list(span), []
    for i in range(0, len(idx), batch):
        chunk = idx[i:i + batch]
        preds += loss.predict(chunk + [chunk[-1]] * (batch - len(chunk)))[:len(chunk)]
    return sum(int(p == int(targets[j])) for p, j in zip(preds, idx)) / len(idx)


class Bench:
    """One task's data, model, compiled loss and initial weights; runs one method/seed at a time."""

    def __init__(self, args, task: str, loaded):
        self.args = args
        self.cfg = load_config(overrides=dict(
            method="mezo", task=task, model=args.model, data_dir=args.data_dir, dtype=args.dtype, device=args.device,
            n_train=args.n_train, n_dev=args.n_dev, n_eval=args.n_eval, max_length=args.max_length,
            batch_size=args.batch, eps=1e-3, progress=False))
        self.setup = prepare(self.cfg, loaded)
        self.model = self.setup.loaded.model.eval()
        self.named = named_trainable(self.setup.with_mode(self.model))   # full mode
        self.flat = flatten_(list(self.named.values()))                   # once, before any graph
        self.initial = [b.clone() for b in self.flat]
        scorer = self.setup.scorer(self.model)
        data = self.setup.data
        enc, (self.train, self.dev, self.val) = concat(scorer.encode(data.train), scorer.encode(data.dev),
                                                       scorer.encode(data.eval))
        self.targets = enc.targets
        self.loss = FixedShapeLoss(scorer, enc, compile=args.compile)
        t = time.perf_counter()
        self.loss(list(range(args.batch)))
        self.compile_s = time.perf_counter() - t

    def reset(self) -> None:
        with torch.no_grad():
            for b, b0 in zip(self.flat, self.initial):
                b.copy_(b0)    # in place: the views and the captured graph stay valid

    def evaluate(self, span) -> float:
        return accuracy(self.loss, span, self.targets, self.args.batch)

    def run(self, method: str, seed: int) -> dict:
        """Train one method from the initial weights; returns its row."""
        self.reset()
        args, task = self.args, self.cfg.task
        budget, target = args.budget, args.target.get(task, TARGETS.get(task, 0.8))
        train_ids = list(self.train)
        objective = Objective(lambda idx: self.loss([train_ids[i] for i in idx]))
        if method == "ft":
            cfg = load_config(overrides={**self.cfg.to_dict(), "method": "ft", "seed": seed, "lr": args.ft_lr,
                                         "steps": budget // 3})
            params = list(self.named.values())
            opt = make_optimizer(params, cfg.lr, 0.0)
            step_fn = lambda s: adamw_step(s, cfg, self.model, opt, params,   # noqa: E731
                                           lambda: self.loss.loss_tensor([train_ids[i] for i in batch_of(s)]),
                                           self.model.device)
            from zoft.training import batch_indices
            batch_of = lambda s: batch_indices(len(train_ids), cfg.batch_size, seed, s)   # noqa: E731
            per_step = 3
        else:
            overrides = {**self.cfg.to_dict(), **METHODS[method], "seed": seed, "flat_params": method != "lozo",
                         **args.lr.get(method, {})}
            # LOZO perturbs matrices by their shapes: it gets the per-tensor views of the same buffer.
            # `steps` is what the budget buys: lr=auto's run-length cap scales as 1/√steps, and 10⁹
            # steps once made it choose 9.4e-8 for Sparse MeZO, which then never moved.
            cfg = load_config(overrides=overrides)
            cfg.steps = max(1, -(-budget // forwards_per_step(cfg)))   # ceil: the loop's last step may pass the budget
            zo = build_step(cfg, self.model, objective, len(train_ids))
            step_fn, per_step = zo.step_fn, None
        probe_forwards, probe_s = 0, 0.0
        if cfg.lr == "auto":   # the probe's forwards count against the run's budget
            t = time.perf_counter()
            chosen = auto_lr(cfg, zo, objective)
            cfg.lr, probe_forwards, probe_s = chosen.lr, chosen.forwards, time.perf_counter() - t
        forwards, train_s, step, curve = probe_forwards, probe_s, 0, []
        best_dev, best_state = -1.0, None
        next_eval = args.eval_every
        while forwards < budget:
            t = time.perf_counter()
            record = step_fn(step)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t
            self.model.eval()
            forwards += per_step or record["forwards"]
            step += 1
            if forwards >= next_eval or forwards >= budget:
                next_eval += args.eval_every
                dev = self.evaluate(self.dev)
                curve.append((forwards, round(train_s, 3), dev, record["loss"]))
                if dev > best_dev:
                    best_dev, best_state = dev, [b.clone() for b in self.flat]
        if best_state is not None:
            with torch.no_grad():
                for b, s in zip(self.flat, best_state):
                    b.copy_(s)
        val = self.evaluate(self.val)
        reached = first_reach({"curve": curve, "best_dev": best_dev}, target)   # no curve: the probe took the budget
        return {"task": task, "method": method, "seed": seed, "lr": cfg.lr, "budget": budget, "steps": step,
                "forwards": forwards, "probe_forwards": probe_forwards,
                "train_s": round(train_s, 2), "ms_per_step": round(1e3 * train_s / max(step, 1), 2),
                "best_dev": best_dev, "val_at_best_dev": val, "target": target,
                "forwards_to_target": reached[0] if reached else None,
                "seconds_to_target": round(reached[1], 2) if reached else None, "curve": curve}

    def zero_shot(self) -> dict:
        self.reset()
        return {"task": self.cfg.task, "method": "zero-shot", "seed": 0, "budget": self.args.budget, "steps": 0, "forwards": 0,
                "train_s": 0.0, "best_dev": self.evaluate(self.dev), "val_at_best_dev": self.evaluate(self.val),
                "forwards_to_target": None, "seconds_to_target": None}


def first_reach(row: dict, target: float) -> tuple[int, float] | None:
    """(forwards, training seconds) at the first dev eval at or above ``target``, from the row's curve.

    Recomputed rather than read from the row, so a summary can use another target than the run did.
    """
    curve = row.get("curve") or [(0, 0.0, row["best_dev"], None)]     # zero-shot: one eval, no training
    for forwards, train_s, dev, _loss in curve:
        if dev >= target:
            return forwards, train_s
    return None


def summarise(rows: list[dict], methods: list[str], targets: dict[str, float]) -> str:
    """Markdown table: mean ± sd over seeds per task × method."""
    def cell(values, fmt="{:.1f}", scale=1.0):
        values = [v * scale for v in values if v is not None]
        if not values:
            return "–"
        text = fmt.format(statistics.mean(values))
        return text + (f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")
    lines = ["| task | method | lr | seeds | best dev % | val % @ best dev | reached target | forwards to target "
             "| s to target | ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in ["zero-shot", *methods]:
            rs = [r for r in rows if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            reach = [first_reach(r, targets[task]) for r in rs]
            hit = [x for x in reach if x is not None]
            lrs = sorted({r["lr"] for r in rs if r.get("lr") is not None})   # rows from before lr was logged: blank
            lines.append(f"| {task} | {method} | {', '.join(f'{lr:g}' for lr in lrs)} | {len(rs)} | "
                         f"{cell([r['best_dev'] for r in rs if r['best_dev'] >= 0], scale=100)} | "   # <0: the probe took the budget
                         f"{cell([r['val_at_best_dev'] for r in rs], scale=100)} | {len(hit)}/{len(rs)} | "
                         f"{cell([x[0] for x in hit], '{:.0f}')} | {cell([x[1] for x in hit])} | "
                         f"{cell([r.get('ms_per_step') for r in rs if r['method'] != 'zero-shot'], '{:.1f}')} |")
    return "\n".join(lines)


def parse_pairs(items: list[str], cast=float) -> dict:
    out = {}
    for item in items or []:
        key, value = item.split("=", 1)
        out[key] = cast(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m", help="anything zoft.models.load_model takes (name, HF dir, .gguf)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 recommended: bf16 weights drop most ZO updates (README)")
    p.add_argument("--tasks", default="sst2,rte")
    p.add_argument("--methods", default=",".join([*METHODS, "ft"]))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=1000, help="forward passes per run")
    p.add_argument("--eval-every", type=int, default=100, help="forward passes between dev evals")
    p.add_argument("--target", nargs="*", default=[], help="task=acc, e.g. sst2=0.8 (defaults: sst2 0.8, rte 0.55)")
    p.add_argument("--lr", nargs="*", default=[], help="method=lr overrides, e.g. zo-adam=3e-5 or mezo=auto")
    p.add_argument("--auto-lr", action="store_true", help="lr=auto for every ZO method (probe forwards count)")
    p.add_argument("--ft-lr", type=float, default=1e-5)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", default="cuda-graph", choices=["off", "default", "reduce-overhead", "cuda-graph"],
                   help="how the fixed-shape loss runs (cuda-graph: captured in seconds; eager on a CPU)")
    p.add_argument("--time-limit", type=float, default=400, help="seconds; no new run starts after this")
    p.add_argument("--smoke", action="store_true", help="tiny-llama on CPU, tiny budget: the same code path")
    args = p.parse_args()
    if args.smoke:
        args.model, args.device, args.compile = "tiny-llama", "cpu", "off"
        args.budget, args.eval_every, args.n_train, args.n_dev, args.n_eval = 40, 20, 64, 32, 32
        args.max_length, args.seeds = 48, "0,1"
    args.target = parse_pairs(args.target)
    args.lr = {k: {"lr": v} for k, v in parse_pairs(args.lr, lambda v: v if v == "auto" else float(v)).items()}
    if args.auto_lr:
        args.lr = {m: {"lr": "auto"} for m in METHODS} | args.lr
    methods = args.methods.split(",")
    if args.smoke and any({**METHODS.get(m, {}), **args.lr.get(m, {})}.get("lr") == "auto" for m in methods):
        args.budget += 80   # room for lr=auto's probe, whose forwards count against the budget
    unknown = [m for m in methods if m not in METHODS and m != "ft"]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {[*METHODS, 'ft']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    rows = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []
    rows = [r for r in rows if r.get("budget") == args.budget]      # other budgets: other experiments
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    started = time.perf_counter()

    from zoft.models import load_model, tiny_random_model
    loaded = (tiny_random_model("causal", seed=0) if args.model == "tiny-llama"
              else load_model(args.model, dtype=args.dtype, device=args.device))
    tasks = args.tasks.split(",")
    benches = {}
    for task in tasks:    # one model shared by the tasks (each resets it), one compiled graph per task
        benches[task] = Bench(args, task, loaded)
        print(f"[{task}] ready; first loss call (compile) {benches[task].compile_s:.1f}s", flush=True)
    # seed-major order: if time runs out, every task and method has its first seeds
    jobs = [(t, "zero-shot", 0) for t in tasks] + [(t, m, int(s)) for s in args.seeds.split(",")
                                                    for t in tasks for m in methods]
    for task, method, seed in jobs:
        if (task, method, seed) in done:
            continue
        if time.perf_counter() - started > args.time_limit:
            print(f"time limit {args.time_limit:.0f}s reached; rerun with the same --out to continue", flush=True)
            break
        bench = benches[task]
        row = bench.zero_shot() if method == "zero-shot" else bench.run(method, seed)
        rows.append(row)
        with runs_file.open("a") as f:      # one line per finished run: a kill keeps every row so far
            f.write(json.dumps(row) + "\n")
        print(f"[{task}] {method} seed {seed}: best dev {row['best_dev']:.3f}, val {row['val_at_best_dev']:.3f}, "
              f"{row['forwards']} forwards, {row['train_s']}s, to target: {row['forwards_to_target']}", flush=True)
    targets = {**TARGETS, **args.target}
    table = summarise(rows, methods, targets)
    any_cfg = next(iter(benches.values())).cfg
    header = (f"model {args.model}, {args.dtype} weights, compute_dtype {any_cfg.compute_dtype}, z {any_cfg.distribution}, "
              f"device {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}; budget {args.budget} "
              f"forwards per run; dev every {args.eval_every} forwards; n_train {args.n_train}, n_dev {args.n_dev}, "
              f"n_eval {args.n_eval}; targets {targets}; FT counted as 3 forwards per step\n")
    print("\n" + header + "\n" + table)
    (out / "summary.md").write_text(header + "\n" + table + "\n")
    (out / "summary.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
