"""What Sparse MeZO's per-step mask costs: zoft's rule against the exact-quantile rule it replaced, on one model.

    python bench/smezo_mask.py [--repeats 5] [--fraction 0.25] [key=value ...]   # any `zoft train` keys

Sparse MeZO (``estimator=smezo``) moves only the ``fraction`` smallest-magnitude weights of each
tensor, and takes that mask from θ at every step. Until 2026-11-29 zoft selected the threshold from
up to 2²⁰ strided values of each tensor (the exact quantile below that size); it now takes it from
2¹⁶ fixed random positions (``zoft.zo.estimator.small_magnitude_mask``), into the last step's mask
and scratch buffers. All three are timed here on the weights a run trains, side by side in one
process, with the share of weights whose mask the two rules disagree on and the range of the
fraction each masks.

Then a whole step's work on the weights, without its forwards (the loss is a random number): Sparse
MeZO's step as training takes it (since 2026-11-29 evening the C loop writes the masks in the step's
first pass, from thresholds of 2¹⁶ sampled weights, instead of a mask pass of their own), beside
plain MeZO's fused two-pass step on the same weights. A step's forwards, for scale, are most of the
README's MeZO step (1.26-1.5 s for SmolLM2-135M at batch 16 × 64 tokens, bf16, 2 cores).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from zoft.adapters import named_trainable
from zoft.config import load_config
from zoft.methods.common import prepare
from zoft.zo.build import build_components, build_stepper, trained_params
from zoft.zo.estimator import small_magnitude_mask
from zoft.zo.schedule import direction_seed

DEFAULTS = dict(method="mezo", estimator="smezo", model="smollm2-135m", task="sst2", n_train=16, n_dev=1,
                n_eval=1, progress=False)


def previous_mask(p: torch.Tensor, fraction: float, sample_size: int = 1 << 20) -> torch.Tensor:
    """The rule before 2026-11-29, as a reference: the quantile of a strided sample of up to 2²⁰ |θ|."""
    flat = p.detach().reshape(-1).abs()
    sample = flat[::max(1, flat.numel() // sample_size)].float()
    k = max(1, min(sample.numel(), math.ceil(fraction * sample.numel())))
    threshold = torch.tensor(np.partition(sample.numpy(), k - 1)[k - 1])
    return flat.le(threshold.to(flat.dtype)).reshape(p.shape)


def timed(rule, params, fraction: float, repeats: int) -> tuple[float, list[torch.Tensor]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        masks = [rule(p, fraction) for p in params]
        times.append(time.perf_counter() - t)
    return statistics.median(times), masks


def step_seconds(cfg, params: list[torch.Tensor], repeats: int) -> float:
    """Median seconds of one step's weight passes (``cfg``'s estimator and stepper, as training
    builds them), the forwards replaced by a random loss."""
    estimator, optimizer = build_components(cfg, "cpu")
    stepper = build_stepper(cfg, params, estimator, optimizer)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(repeats + 1):   # the first builds buffers (and the C loop): not timed
        t = time.perf_counter()
        stepper.step(step, lambda: float(torch.rand((), generator=gen)), [direction_seed(cfg.seed, step)], 1e-9)
        times.append(time.perf_counter() - t)
    stepper.settle()
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("overrides", nargs="*", help="key=value config keys over the defaults above")
    args = p.parse_args()
    cfg = load_config(overrides=dict(DEFAULTS, **dict(kv.split("=", 1) for kv in args.overrides)))
    model = prepare(cfg).with_mode()
    params = trained_params(cfg, named_trainable(model))
    n = sum(p.numel() for p in params)
    print(f"{cfg.model}, mode {cfg.mode}: {len(params)} tensors, {n / 1e6:.1f}M trained weights, "
          f"fraction {args.fraction}, {torch.get_num_threads()} threads, median of {args.repeats}")
    old_s, old = timed(previous_mask, params, args.fraction, args.repeats)
    new_s, new = timed(small_magnitude_mask, params, args.fraction, args.repeats)
    # as SparseMeZO.estimate calls it: into the last step's masks, |θ| in one scratch buffer
    outs = {id(p): torch.empty(p.shape, dtype=torch.bool) for p in params}
    scratch = torch.empty(max(p.numel() for p in params), dtype=params[0].dtype)
    reused_s, reused = timed(lambda p, f: small_magnitude_mask(p, f, out=outs[id(p)], scratch=scratch),
                             params, args.fraction, args.repeats)
    assert all(torch.equal(a, b) for a, b in zip(new, reused))
    differ = sum(int((a != b).sum()) for a, b in zip(old, new)) / n
    print("| rule | mask s per step | fraction masked, min-max over tensors | speed-up |")
    print("|---|---|---|---|")
    for name, seconds, masks in (("exact / strided 2^20 (before)", old_s, old), ("2^16 random positions", new_s, new),
                                 ("2^16 random positions, reused buffers (zoft's step)", reused_s, reused)):
        fractions = [m.float().mean().item() for m in masks]
        print(f"| {name} | {seconds:.3f} | {min(fractions):.4f}-{max(fractions):.4f} | {old_s / seconds:.2f}x |")
    print(f"masks differ on {differ:.4%} of the weights")
    print("\n| a step's weight passes, no forwards | s per step |")
    print("|---|---|")
    for name, estimator in (("Sparse MeZO (plain step: masks, 3 probe passes, 1 update pass)", "smezo"),
                            ("MeZO (fused step: 2 passes)", "spsa")):
        step_cfg = load_config(overrides=dict(DEFAULTS, **dict(kv.split("=", 1) for kv in args.overrides),
                                              estimator=estimator, smezo_fraction=args.fraction))
        print(f"| {name} | {step_seconds(step_cfg, params, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
