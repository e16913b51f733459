"""Shared-prefix scoring against the unshared path, side by side in one run, on real ASAP prompts.

    python bench/shared_prefix.py --out OUT                     # SmolLM2-135M, ASAP set 1, B=8, 2 repeats
    python bench/shared_prefix.py --out OUT --model tiny-llama --repeats 1    # a smoke run, seconds

Rows are real ASAP-SAS set 1 training responses (``task=asap-1``, ``max_length=512``): every prompt
is the item's header (item text, rubric: about 300 tokens with SmolLM2's tokenizer) and then a
response. Timed, with ``shared_prefix=off`` and ``on``, on the same batches and weights:

* **forward**: the training loss of a batch (no grad), what each of MeZO's forwards costs;
* **MeZO step**: zoft's own step (``zoft.methods.mezo.build_step``: ZO-SGD, two-sided SPSA, the
  fused 2-pass step), the header recomputed in each forward since the weights change between them;
* **scoring**: ``predictions`` over the whole sample in batches (``zoft eval``/``zoft score``'s path),
  where frozen weights let a header's keys and values serve every batch.

tokens/s counts the prompt tokens scored (header + response of every row, what the unshared path
reads); the "tokens run" column is what the model actually read. Also reports the largest
difference of the batch's label log-probs between the paths. Writes OUT/shared_prefix.json.
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
from zoft.lm import CandidateScorer
from zoft.methods.common import predictions
from zoft.methods.mezo import build_step
from zoft.models import load_model
from zoft.tasks import load_task
from zoft.zo import Objective


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="asap-1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-score", type=int, default=16, help="rows scored in the scoring row")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compute-dtype", default="fp32")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a CPU shared with other jobs, 1 stalls less than 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, dtype="fp32")
    model = loaded.model.eval()
    examples = load_task(args.task).get_data(n_train=max(args.n_score, args.batch), n_dev=1, n_eval=1, seed=0).train
    batch = list(range(args.batch))
    scorers = {share: CandidateScorer(model, loaded.tokenizer, "classification", max_length=args.max_length,
                                      compute_dtype=args.compute_dtype, shared_prefix=share)
               for share in ("off", "on")}
    encoded = {share: s.encode(examples) for share, s in scorers.items()}
    enc = encoded["on"]
    shared_rows = sum(g >= 0 for g in enc.header_groups)
    prompt_tokens = sum(len(enc.context_ids[i]) for i in batch)
    header = enc.header_lens[0]
    print(f"{args.model} on {args.task}: {len(examples)} rows, header {header} tokens, "
          f"rows {min(len(c) for c in enc.context_ids)}-{max(len(c) for c in enc.context_ids)} tokens, "
          f"{shared_rows}/{len(examples)} rows share it; B={args.batch}, compute {args.compute_dtype}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)

    with torch.no_grad():
        logprobs = {share: s.candidate_logprobs(encoded[share], batch)[0] for share, s in scorers.items()}
    max_diff = (logprobs["on"] - logprobs["off"]).abs().max().item()
    print(f"label log-probs, shared vs unshared: max |diff| {max_diff:.2e}", flush=True)

    cfg = load_config(overrides=dict(method="mezo", steps=10**6, batch_size=args.batch, lr=1e-7, eps=1e-3,
                                     progress=False))
    rows = []
    for share, scorer in scorers.items():
        enc_s = encoded[share]
        run = prompt_tokens if share == "off" else header + sum(len(enc_s.context_ids[i]) - header
                                                                for i in batch)

        def forward(_):
            with torch.no_grad():
                scorer.loss(enc_s, batch)
        fwd = median_seconds(forward, args.repeats)               # the log-prob check above was the warm-up

        objective = Objective(lambda idx, s=scorer, e=enc_s: s.loss(e, idx).item())
        zo = build_step(cfg, model, objective, args.batch)        # n_train = B: each step's batch is the same rows
        step = median_seconds(lambda i: zo.step_fn(i + 1), args.repeats)
        zo.stepper.settle()

        score_n = min(args.n_score, len(examples))
        sub = scorer.encode(examples[:score_n])
        task = load_task(args.task)
        score = median_seconds(lambda _: predictions(scorer, sub, task, args.batch), 1)
        score_tokens = sum(len(c) for c in sub.context_ids)
        rows.append({"shared_prefix": share, "forward_s": fwd, "forward_tokens_per_s": prompt_tokens / fwd,
                     "tokens_run": run, "mezo_step_s": step, "score_rows": score_n, "score_s": score,
                     "score_tokens_per_s": score_tokens / score})
        print(json.dumps(rows[-1]), flush=True)

    off, on = rows
    print(f"\n| shared_prefix | forward s | forward tokens/s | tokens run | MeZO step s "
          f"| scoring {on['score_rows']} rows s | scoring tokens/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shared_prefix']} | {r['forward_s']:.2f} | {r['forward_tokens_per_s']:.0f} | {r['tokens_run']} "
              f"| {r['mezo_step_s']:.2f} | {r['score_s']:.2f} | {r['score_tokens_per_s']:.0f} |")
    print(f"speed-up: forward {off['forward_s'] / on['forward_s']:.2f}x, MeZO step "
          f"{off['mezo_step_s'] / on['mezo_step_s']:.2f}x, scoring {off['score_s'] / on['score_s']:.2f}x; "
          f"load {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_prefix.json").write_text(json.dumps(
        {"model": args.model, "task": args.task, "batch": args.batch, "compute_dtype": args.compute_dtype,
         "header_tokens": header, "max_logprob_diff": max_diff, "rows": rows, "machine": platform.processor(),
         "threads": torch.get_num_threads(), "load_after": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
