"""The lm-cls training step with and without the speed keys, side by side in one run.

    python bench/cls_step.py --out OUT                       # Gemma-3-270M, ASAP set 10, 6 rounds
    python bench/cls_step.py --out OUT --model tiny-llama --rounds 2      # a smoke run, seconds

The step is the recommended scorer's LM member (configs/scoring.yaml): ``lm-cls`` in full mode with
frozen input embeddings, bf16 compute over fp32 weights, batch 16, responses up to 128 tokens.
Copies of the same classifier train side by side, one per variant:

* ``plain``: shuffled batches, each run whole, torch's default AdamW (a loop of per-op kernels);
* ``grouped``: ``group_by_length=true``, batches of similar length (transformers' length-grouped order);
* ``fused``: ``adamw_fused=true``, torch's fused AdamW kernel;
* ``micro2``, ``micro4``, ``micro8``: ``micro_batch_size=8/4/2``, the shuffled batch sorted by length
  and run in 2, 4 or 8 pieces (the same gradient as ``plain``);
* ``micro4+fused``: what configs/scoring.yaml set until 2026-11-28;
* ``micro4+fused+freeze6``, ``micro4+fused+freeze9``: with ``freeze_layers=6/9`` too, the first 6 or 9
  blocks kept as pretrained, so the backward pass stops above them (configs/scoring.yaml: 6).

The variants take turns, one step each per round, so a machine that slows down during the run
slows every variant alike. Each step is zoft's own (``zoft.methods.finetune.adamw_step``: forward,
backward, finite checks, AdamW) on the batch zoft's loop would give it at that step. Also reported,
over one whole epoch without the model: the tokens a batch runs (padded) against its real tokens.
Writes OUT/cls_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from zoft.config import load_config
from zoft.methods.common import prepare
from zoft.methods.encoder_classifier import head_classes
from zoft.methods.finetune import adamw_step, backward_in_micro_batches, make_optimizer
from zoft.methods.lm_classifier import LMClassifierScorer, classifier_from_lm, with_mode
from zoft.adapters import named_trainable
from zoft.training import batch_indices

VARIANTS = {   # name: (group_by_length, adamw_fused, micro_batch_size, freeze_layers)
    "plain": (False, False, None, 0), "grouped": (True, False, None, 0), "fused": (False, True, None, 0),
    "micro2": (False, False, 8, 0), "micro4": (False, False, 4, 0), "micro8": (False, False, 2, 0),
    "micro4+fused": (False, True, 4, 0), "micro4+fused+freeze6": (False, True, 4, 6),
    "micro4+fused+freeze9": (False, True, 4, 9)}


def tokens_run(lengths: list[int], idx: list[int], micro: int | None) -> int:
    """Tokens the model runs for the batch ``idx`` (padding included), as backward_in_micro_batches cuts it."""
    ordered = sorted(idx, key=lambda i: lengths[i]) if micro else idx
    size = micro or len(idx)
    return sum(len(c) * max(lengths[i] for i in c) for c in (ordered[j:j + size] for j in range(0, len(idx), size)))


def padded_tokens(lengths: list[int], batch_size: int, seed: int, grouped: bool, micro: int | None) -> tuple[int, int]:
    """(tokens run, real tokens) over one epoch of zoft's batches."""
    run = real = 0
    for step in range(len(lengths) // batch_size):
        idx = batch_indices(len(lengths), batch_size, seed, step, lengths if grouped else None)
        run += tokens_run(lengths, idx, micro)
        real += sum(lengths[i] for i in idx)
    return run, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="asap-10")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " (the first is the speed-up's base)")
    args = parser.parse_args()
    chosen = args.variants.split(",")
    if unknown := sorted(set(chosen) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}")

    cfg = load_config(overrides={"method": "lm-cls", "model": args.model, "task": args.task, "mode": "full",
                                 "compute_dtype": "bf16", "freeze_embeddings": True, "n_train": -1, "n_dev": 100,
                                 "n_eval": 1, "max_length": 128, "batch_size": 16, "lr": 5e-5, "steps": 300,
                                 "warmup_steps": 10, "lr_schedule": "linear", "progress": False})
    setup = prepare(cfg)
    n_classes = head_classes(setup.task, setup.data, "lm-cls")
    runs = {}
    for name in chosen:
        grouped, fused, micro, frozen = VARIANTS[name]
        cfg.freeze_layers = frozen
        model = with_mode(classifier_from_lm(setup.loaded.model, n_classes, seed=cfg.seed), cfg)
        scorer = LMClassifierScorer(model, setup.loaded.tokenizer, setup.task, cfg.max_length, compute_dtype="bf16")
        params = list(named_trainable(model).values())
        runs[name] = (grouped, micro, scorer, params, make_optimizer(params, cfg.lr, cfg.weight_decay, fused=fused))
    setup.loaded.model = None   # the LM's body lives on in each classifier
    enc = runs[chosen[0]][2].encode(setup.data.train)
    lengths = [len(ids) for ids in enc.input_ids]

    seconds = {name: [] for name in chosen}
    tokens = {name: [] for name in chosen}
    for step in range(args.rounds + 1):   # step 0 warms each variant up (allocations, first AdamW state)
        for name, (grouped, micro, scorer, params, optimizer) in runs.items():
            idx = batch_indices(len(enc), cfg.batch_size, cfg.seed, step, lengths if grouped else None)
            start = time.perf_counter()
            adamw_step(step, cfg, scorer.model, optimizer, params,
                       lambda: backward_in_micro_batches(lambda chunk: scorer.loss(enc, chunk), idx, lengths, micro),
                       scorer.device)
            if step:
                seconds[name].append(time.perf_counter() - start)
                tokens[name].append(tokens_run(lengths, idx, micro))
        print(f"round {step}: " + "  ".join(f"{n} {seconds[n][-1]:.2f}s" for n in chosen if seconds[n]), flush=True)

    rows = {}
    for name, (grouped, micro, _, _, _) in runs.items():
        run, real = padded_tokens(lengths, cfg.batch_size, cfg.seed, grouped, micro)
        rows[name] = {"median_step_s": statistics.median(seconds[name]), "steps_s": seconds[name],
                      "tokens_run_per_step": statistics.mean(tokens[name]),
                      "epoch_tokens_run": run, "epoch_real_tokens": real, "epoch_padding": 1 - real / run}
    base = rows[chosen[0]]["median_step_s"]
    print(f"\n{args.model}, {args.task}, {len(enc)} training responses, batch 16, {args.rounds} timed rounds, "
          f"{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})")
    print(f"{'variant':<21} {'median step':>12} {'speed-up':>9} {'tokens run/step':>16} {'epoch padding':>14}")
    for name, row in rows.items():
        print(f"{name:<21} {row['median_step_s']:>11.2f}s {base / row['median_step_s']:>8.2f}x "
              f"{row['tokens_run_per_step']:>16.0f} {row['epoch_padding']:>13.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cls_step.json").write_text(json.dumps({
        "model": args.model, "task": args.task, "n_train": len(enc), "rounds": args.rounds,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
