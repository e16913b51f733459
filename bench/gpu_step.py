"""GPU MeZO step benchmark: forward vs reference-style step vs zoft's fused Triton step.

    python bench/gpu_step.py --out DIR [--shapes 125m,1.3b,13b,30b] [--batch 16] [--seq 256] [--repeats 5]
    python bench/gpu_step.py --smoke --out DIR      # tiny shape on CPU (Triton interpreter), seconds

For random OPT-shaped models in fp16 (built on the meta device, then ``to_empty`` on the GPU
and a cheap normal init; one shape at a time, memory freed in between), all in one run:

* forward: one forward pass with the LM loss, as a MeZO step computes it (ms, CUDA events,
  median of ``--repeats`` after warm-up);
* reference step: MeZO as the reference code does it (``torch.manual_seed`` + one
  ``torch.normal`` per tensor, ``p.data = p.data + scale·z``, 4 passes: +ε, −2ε, +ε, update);
* zoft step: ``FusedZOSGD`` on the precise Triton backend (``backend=triton``), 2 passes per
  step (update fused with the next +εz); the same with ``fast_math`` (``backend=triton-fast``,
  approximate log/sin/cos in Box-Muller: what ``backend=auto`` uses on CUDA; a failure is
  reported, not fatal); and zoft unfused: the precise kernels as 4 separate passes;
* each step over the forward time, and the floor 2 forwards + one read+write of the weights at
  copy bandwidth;
* peak memory of each step over the inference peak (``max_memory_allocated``);
* effective bandwidth of one pass (2·weight bytes / time) over a device-to-device copy's, for
  the 1-direction pass (−2ε flip) and the fused 2-direction pass.

Writes ``DIR/gpu_step.json`` and ``DIR/gpu_step.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = {   # OPT family: hidden, layers, FFN, heads (vocab 50272, 2048 positions)
    "125m": (768, 12, 3072, 12),
    "1.3b": (2048, 24, 8192, 32),
    "13b": (5120, 40, 20480, 40),
    "30b": (7168, 48, 28672, 56),
    "tiny": (32, 1, 64, 4),   # --smoke
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_step.json and gpu_step.md")
    parser.add_argument("--shapes", default="125m,1.3b,13b,30b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, batch 2 x 16, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.batch, args.seq, args.repeats = "tiny", 2, 16, 1
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]}; choose from {', '.join(SHAPES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("gpu_step.py needs a CUDA GPU (or --smoke for a CPU check)")
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    from transformers import OPTConfig, OPTForCausalLM

    from zoft.zo.fused import FusedZOSGD
    from zoft.zo.triton_backend import TritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32   # CPU smoke: fp32 matmuls, same code path

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, repeats: int, warmup: int = 1) -> float:
        """Median wall time of ``fn`` in ms (CUDA events on the GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); fn(); end.record(); end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter(); fn(); times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    def peak(fn) -> int:
        """Peak bytes allocated while ``fn`` runs (0 on CPU)."""
        if not cuda:
            fn(); return 0
        sync(); torch.cuda.reset_peak_memory_stats(); fn(); sync()
        return torch.cuda.max_memory_allocated()

    # copy bandwidth, measured once before any model is resident
    copy_bytes = (2 << 30) if cuda else (16 << 20)
    src = torch.empty(copy_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), max(args.repeats, 5), warmup=2)
    copy_gbs = 2 * copy_bytes / copy_ms / 1e6      # read + write
    src = dst = None   # free before any model is built

    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, Triton interpreter)"
    meta = {"device": device_name, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "dtype": str(dtype).split(".")[-1], "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
            "eps": args.eps, "copy_GBps": round(copy_gbs, 1)}
    print(f"{device_name}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}, batch {args.batch} x "
          f"{args.seq}; device-to-device copy {copy_gbs:.0f} GB/s", file=sys.stderr, flush=True)

    rows = []
    for shape in args.shapes.split(","):
        hidden, layers, ffn, heads = SHAPES[shape]
        vocab, positions = (50272, 2048) if shape != "tiny" else (256, 64)
        config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
                           vocab_size=vocab, max_position_embeddings=positions, word_embed_proj_dim=hidden)
        row = {"shape": shape}
        model = None
        try:
            t0 = time.perf_counter()
            with torch.device("meta"):
                model = OPTForCausalLM(config).to(dtype)
            model.to_empty(device=device)
            with torch.no_grad():   # a cheap init: weights N(0, 0.02), norm gains 1, biases 0
                for name, p in model.named_parameters():
                    if p.dim() >= 2:
                        p.normal_(0, 0.02)
                    else:
                        p.fill_(1.0 if "layer_norm.weight" in name else 0.0)
            model.eval()
            params = [p for p in model.parameters() if p.requires_grad]
            weight_bytes = sum(p.numel() * p.element_size() for p in params)
            row.update(params=sum(p.numel() for p in params), weight_GB=round(weight_bytes / 1e9, 2),
                       build_s=round(time.perf_counter() - t0, 1))
            ids = torch.randint(0, vocab, (args.batch, args.seq), device=device,
                                generator=torch.Generator(device).manual_seed(0))

            @torch.no_grad()
            def loss() -> float:
                return model(input_ids=ids, labels=ids).loss.item()

            row["forward_ms"] = timed(loss, args.repeats, warmup=2 if cuda else 1)
            row["inference_peak_GB"] = peak(loss) / 1e9
            lr, eps = 1e-7, args.eps

            @torch.no_grad()
            def reference_step(seed: int = 0) -> None:
                # large_models/trainer.py of the MeZO repo: zo_perturb_parameters, zo_step, zo_update
                def perturb(scale: float) -> None:
                    torch.manual_seed(seed)
                    for p in params:
                        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
                        p.data = p.data + scale * z * eps
                perturb(1); loss_plus = loss(); perturb(-2); loss_minus = loss(); perturb(1)
                g = (loss_plus - loss_minus) / (2 * eps)
                torch.manual_seed(seed)
                for p in params:
                    z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
                    p.data = p.data - lr * g * z

            row["reference_ms"] = timed(reference_step, args.repeats)
            row["reference_peak_GB"] = peak(reference_step) / 1e9
            params = [p for p in model.parameters() if p.requires_grad]   # p.data was rebound above

            backend = TritonBackend()
            fused = FusedZOSGD(params, backend, eps)
            counter = iter(range(1, 1 << 30))

            def zoft_step() -> None:
                seed = next(counter)
                fused.step(loss, seed, lr, next_seed=seed + 1)

            row["zoft_ms"] = timed(zoft_step, args.repeats, warmup=2 if cuda else 1)   # compiles every variant
            row["zoft_peak_GB"] = peak(zoft_step) / 1e9
            fused.settle()

            @torch.no_grad()
            def unfused_step() -> None:
                seed = next(counter)
                backend.combine_(params, then=(seed, eps))
                loss_plus = loss()
                backend.combine_(params, undo=(seed, eps), then=(seed, -eps))
                loss_minus = loss()
                backend.combine_(params, undo=(seed, -eps))
                backend.combine_(params, [(seed, -lr * (loss_plus - loss_minus) / (2 * eps))])

            row["zoft_unfused_ms"] = timed(unfused_step, args.repeats)

            if cuda:   # the same fused step with the GPU's approximate log/sin/cos in Box-Muller
                try:
                    fast = FusedZOSGD(params, TritonBackend(fast_math=True), eps)

                    def fast_step() -> None:
                        seed = next(counter)
                        fast.step(loss, seed, lr, next_seed=seed + 1)
                    row["zoft_fast_ms"] = timed(fast_step, args.repeats, warmup=2)
                    fast.settle()
                except Exception as e:   # an experiment: report it, keep the other columns
                    row["zoft_fast_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

            # Rademacher z: 128 signs per Philox call instead of Box-Muller's log/sin/cos per pair of
            # normals, so it shows how close the passes get to memory speed when z is cheap
            rademacher = FusedZOSGD(params, backend, eps, distribution="rademacher")

            def rademacher_step() -> None:
                seed = next(counter)
                rademacher.step(loss, seed, lr, next_seed=seed + 1)
            row["zoft_rademacher_ms"] = timed(rademacher_step, args.repeats, warmup=2 if cuda else 1)
            rademacher.settle()

            def flip() -> None:      # the −2ε pass: one direction
                seed = next(counter)
                backend.combine_(params, undo=(seed, eps), then=(seed, -eps))

            def fused_pass() -> None:   # update + next perturbation: two directions
                seed = next(counter)
                backend.combine_(params, [(seed, -1e-9)], undo=(seed, -eps), then=(seed + 1, eps))

            row["pass_ms"] = timed(flip, args.repeats)
            row["fused_pass_ms"] = timed(fused_pass, args.repeats)
            pass_gbs = 2 * weight_bytes / row["pass_ms"] / 1e6
            row.update(pass_GBps=round(pass_gbs, 1), pass_vs_copy=pass_gbs / copy_gbs,
                       fused_pass_vs_copy=2 * weight_bytes / row["fused_pass_ms"] / 1e6 / copy_gbs,
                       floor_ms=2 * row["forward_ms"] + 2 * weight_bytes / copy_gbs / 1e6)
        except torch.OutOfMemoryError as e:
            row["skipped"] = f"out of GPU memory ({str(e).splitlines()[0][:120]})"
        finally:
            model = params = fused = backend = rademacher = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {shape}: {row}", file=sys.stderr, flush=True)

    table = markdown(rows, meta)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "gpu_step.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    atomic_write(out / "gpu_step.md", table)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; random OPT shapes, "
             f"{meta['dtype']}, batch {meta['batch']} x {meta['seq']} tokens, median of {meta['repeats']}; "
             f"device-to-device copy {meta['copy_GBps']:.0f} GB/s", "",
             "| shape | params | forward ms | reference step (× fwd) | zoft step (× fwd) | zoft fast math (× fwd) "
             "| zoft 4-pass (× fwd) | zoft Rademacher (× fwd) | floor (× fwd) | peak ref / inference "
             "| peak zoft / inference | pass / copy BW | fused pass / copy BW |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "pass_ms" not in r:
            lines.append(f"| {r['shape']} | {r.get('params', '')} | skipped: {r.get('skipped', 'incomplete')} "
                         "| | | | | | | | | | |")
            continue
        f = r["forward_ms"]

        def ratio(key: str) -> str:
            return f"{r[key]:.1f} ms ({r[key] / f:.2f}×)" if key in r else r.get("zoft_fast_error", "n/a")

        def mem(key: str) -> str:
            return f"{r[key] / r['inference_peak_GB']:.3f}" if r["inference_peak_GB"] else "n/a"
        size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.2f}M"
        lines.append(f"| {r['shape']} | {size} | {f:.1f} | {ratio('reference_ms')} | "
                     f"{ratio('zoft_ms')} | {ratio('zoft_fast_ms')} | {ratio('zoft_unfused_ms')} | "
                     f"{ratio('zoft_rademacher_ms')} | {r['floor_ms'] / f:.2f}× | "
                     f"{mem('reference_peak_GB')} | {mem('zoft_peak_GB')} | {100 * r['pass_vs_copy']:.0f}% | "
                     f"{100 * r['fused_pass_vs_copy']:.0f}% |")
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
