"""Small-model MeZO step time: eager vs CUDA-graph vs compiled forward × per-tensor vs flat-buffer perturbation.

    python bench/small_step.py --out OUT [--device cuda] [--steps 30]     # SmolLM2-135M architecture
    python bench/small_step.py --out OUT --smoke                          # tiny config on CPU, seconds

The model is the SmolLM2-135M architecture (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) with random weights: timing does not need the
trained weights. bf16 on CUDA, fp32 on CPU; a batch of B=16 rows of T=64 tokens scored as
classification at the last position (zoft's fixed-shape loss, ``zoft.compile.FixedShapeLoss``).
Each MeZO step is zoft's own step (``zoft.methods.mezo.build_step``): ZO-SGD, two-sided SPSA,
4 perturbation passes + 2 forwards. All rows run in one process, side by side; the ratio column
divides by one forward of the same kind (eager, CUDA graph or compiled). On CUDA the modes are
eager, ``cuda-graph`` (the eager forward captured, no compiler) and ``reduce-overhead``
(inductor, minutes to compile), in that order, so a time limit cuts the slowest row first.
Writes OUT/small_step.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from zoft.compile import FixedShapeLoss
from zoft.config import load_config
from zoft.lm import CandidateScorer, Encoded
from zoft.methods.mezo import build_step

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=256)


def build_model(arch: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch, attn_implementation="sdpa")).to(device=device, dtype=dtype)
    return model.eval().requires_grad_(True)


def fixed_batch_data(vocab: int, n: int, seq: int) -> Encoded:
    """n random rows of ``seq`` tokens, two single-token label words: what a pre-tokenised split looks like."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(10, vocab, (n, seq), generator=g).tolist()
    return Encoded(context_ids=rows, choice_ids=[[[5], [6]]] * n, targets=torch.randint(0, 2, (n,), generator=g),
                   label_ids=torch.tensor([5, 6]))


def timed(fn, steps: int, device: str) -> float:
    """Median wall time of ``fn(i)`` in ms (after the caller's warm-up)."""
    times = []
    for i in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def measure_row(model, scorer, enc, cfg, layout: str, mode: str, batch: list[int], steps: int, device: str,
                seq: int) -> dict:
    """Forward and MeZO step time for one layout (per-tensor / flat) and one compile mode."""
    current: dict = {}
    # the step first: flat_params rebinds the weights, which must happen before a graph captures them
    zo = build_step(cfg, model, lambda idx: current["loss"](idx), len(enc))
    objective = current["loss"] = FixedShapeLoss(scorer, enc, width=seq, compile=mode)
    t0 = time.perf_counter()
    objective(batch)                                   # compile / capture happens here
    setup_s = time.perf_counter() - t0
    forward_ms = timed(lambda i: objective(batch), steps, device)
    zo.step_fn(0)                                      # warm-up: scratch buffers, graph replays
    step_ms = timed(lambda i: zo.step_fn(i + 1), steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    kind = {"cuda-graph": "CUDA graph"}.get(mode, "compiled")
    return {"forward": kind if objective.compiled else ("eager" if mode == "off" else "eager (fallback)"),
            "perturbation": layout, "tensors_per_pass": len(zo.params), "forward_ms": forward_ms,
            "step_ms": step_ms, "step_over_forward": step_ms / forward_ms, "setup_s": setup_s,
            "peak_cuda_mib_so_far": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30 GPU, 3 CPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--modes", default="off,cuda-graph,reduce-overhead",
                        help="forward modes, in order (compile= values; inductor's reduce-overhead takes minutes)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only (CPU inductor compiles slowly)")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: same code path in seconds")
    args = parser.parse_args()
    device = "cpu" if args.smoke else args.device
    arch = TINY if args.smoke else SMOLLM2_135M
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = args.steps or (30 if device == "cuda" else 3)
    model = build_model(arch, device, dtype)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    scorer = CandidateScorer(model, tokenizer, "classification", max_length=args.seq)
    enc = fixed_batch_data(arch["vocab_size"], 4 * args.batch, args.seq)
    batch = list(range(args.batch))
    compile_modes = ["off"] if args.no_compile else [m for m in args.modes.split(",")
                                                     if device == "cuda" or m != "cuda-graph"]
    n_params = sum(p.numel() for p in model.parameters())

    rows = []
    for layout in ("per-tensor", "flat"):      # flat last: flattening rebinds the weights for good
        cfg = load_config(overrides=dict(method="mezo", steps=10**6, batch_size=args.batch, lr=1e-7, eps=1e-3,
                                         seed=0, flat_params=layout == "flat", progress=False))
        for mode in compile_modes:
            try:
                rows.append(measure_row(model, scorer, enc, cfg, layout, mode, batch, steps, device, args.seq))
            except Exception as e:   # noqa: BLE001 - one failed row (e.g. out of memory) must not lose the others
                print(f"  {layout} / {mode} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            print(f"  measured {layout} / {rows[-1]['forward']}", flush=True)

    base = next((r for r in rows if r["forward"] == "eager" and r["perturbation"] == "per-tensor"), rows[0])
    where = (torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}, "
             f"{torch.get_num_threads()} threads")
    print(f"\n{'tiny smoke config' if args.smoke else 'SmolLM2-135M architecture'} ({n_params / 1e6:.1f}M params, random "
          f"weights), {str(dtype).split('.')[-1]}, B={args.batch}, T={args.seq}, {where}, torch {torch.__version__}, "
          f"median of {steps}\n")
    print("| forward | perturbation | tensors/pass | forward ms | MeZO step ms | step / forward | "
          "step vs eager per-tensor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['forward']} | {r['perturbation']} | {r['tensors_per_pass']} | {r['forward_ms']:.1f} | "
              f"{r['step_ms']:.1f} | {r['step_over_forward']:.2f} | {base['step_ms'] / r['step_ms']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "small_step.json").write_text(json.dumps(
        {"device": where, "dtype": str(dtype), "batch": args.batch, "seq": args.seq, "params": n_params,
         "steps": steps, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
