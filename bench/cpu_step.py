"""CPU step benchmark: forward vs MeZO step vs FT step, time and peak memory, side by side.

    .venv/bin/python bench/cpu_step.py [--model smollm2-135m] [--batch 16] [--seq 64] [--repeats 3]

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to that
measurement alone: inference (forward passes), a MeZO step (2 forwards + perturbation
passes), and an FT step (forward + backward + AdamW). The MeZO step is timed for both
zoft's torch backend and a plain-torch reference of the same algorithm written the way
the MeZO reference code does it (torch.manual_seed + one torch.normal per tensor).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def measure(kind: str, model_name: str, batch: int, seq: int, repeats: int) -> dict:
    import torch

    from zoft.models import load_model
    from zoft.zo import SPSA, ZOSGD, TorchBackend

    loaded = load_model(model_name)
    model = loaded.model
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (batch, seq))
    mask = torch.ones_like(ids)
    labels = ids.clone()

    def loss() -> float:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    params = [p for p in model.parameters()]
    times = []
    if kind == "forward":
        model.eval()
        with torch.no_grad():
            loss()
            for _ in range(repeats):
                t = time.perf_counter(); loss(); times.append(time.perf_counter() - t)
    elif kind in ("mezo", "mezo-reference"):
        model.eval()
        est, opt = SPSA(eps=1e-3, backend=TorchBackend()), ZOSGD()

        @torch.no_grad()
        def zoft_step(step: int) -> None:
            e = est.estimate(params, loss, [step])
            opt.update(params, e, 1e-7, est.backend, "gaussian")

        @torch.no_grad()
        def reference_step(step: int) -> None:
            # MeZO reference (large_models/trainer.py): reseed the global RNG, one torch.normal per tensor
            def perturb(scale):
                torch.manual_seed(step)
                for p in params:
                    z = torch.normal(0, 1, size=p.size(), dtype=p.dtype)
                    p.data = p.data + scale * 1e-3 * z
            perturb(1); lp = loss(); perturb(-2); lm = loss(); perturb(1)
            g = (lp - lm) / 2e-3
            torch.manual_seed(step)
            for p in params:
                z = torch.normal(0, 1, size=p.size(), dtype=p.dtype)
                p.data = p.data - 1e-7 * g * z

        step_fn = zoft_step if kind == "mezo" else reference_step
        step_fn(0)
        for i in range(repeats):
            t = time.perf_counter(); step_fn(i + 1); times.append(time.perf_counter() - t)
    elif kind == "ft":
        model.train()
        optim = torch.optim.AdamW(params, lr=1e-7)

        def ft_step() -> None:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        ft_step()
        for _ in range(repeats):
            t = time.perf_counter(); ft_step(); times.append(time.perf_counter() - t)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "seconds": sorted(times)[len(times) // 2], "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.batch, args.seq, args.repeats)))
        return
    rows = {}
    for kind in ("forward", "mezo", "mezo-reference", "ft"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--model", args.model, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  measured {kind}", file=sys.stderr, flush=True)
    fwd = rows["forward"]
    print(f"\n{args.model}, batch {args.batch} x {args.seq} tokens, fp32, {os.cpu_count()} CPU cores "
          f"({platform.machine()}), torch threads {__import__('torch').get_num_threads()}, median of {args.repeats}\n")
    print("| measurement | time (s) | × forward | peak RSS (MiB) | × inference RSS |")
    print("|---|---|---|---|---|")
    names = {"forward": "forward (inference)", "mezo": "MeZO step, zoft torch backend",
             "mezo-reference": "MeZO step, reference-style torch", "ft": "FT step (backprop + AdamW)"}
    for kind, r in rows.items():
        print(f"| {names[kind]} | {r['seconds']:.3f} | {r['seconds'] / fwd['seconds']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / fwd['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
