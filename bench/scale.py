"""Scaling benchmark: data-parallel MeZO step time on CPU processes, and CPU offload on a GPU.

    python bench/scale.py --out DIR                 # DP step time, 1/2/4 CPU processes (torchrun, gloo)
    python bench/scale.py --gpu --out DIR           # offload vs resident, OPT 1.3B/6.7B/13B/30B shapes, fp16
    python bench/scale.py --gpu --smoke --out DIR   # the GPU code path on a tiny OPT shape on the CPU

Data-parallel part: a small random Llama (hidden 256, 4 layers, vocab 8192), a fixed global
batch (16 x 64 tokens) sharded over N ranks by zoft.distributed, the same zo_step as training.
Each rank gets cores/N threads (or --threads) so every row uses the same cores. Speedup = t(1) / t(N).
On a machine shared with other jobs, multi-threaded ranks suffer most from the contention (every
op waits for its slowest thread): compare with --threads 1 before reading much into a speedup.

GPU part: random-weight OPT-shaped models in fp16 built on the GPU (meta device, to_empty, a
normal(0, 0.02) init), batch 8 x 256 tokens. For each shape: the resident MeZO step (the whole
model on the GPU) and the offloaded step (decoder layers in pinned CPU memory, streamed by
zoft.offload) in its two forms (the default dual forward, where each layer streams once per step,
and two separate forwards, twice per step), each with its step time (median of 3 after a warm-up),
peak GPU memory (torch.cuda.max_memory_allocated) and block uploads per step. A row that does
not fit is reported as skipped with the reason (CUDA OOM, or not enough host RAM for the pinned
copy). Shapes run smallest first; the largest row that ran is the largest trainable shape in
that mode. Results: a printed table and DIR/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPT_SHAPES = {  # hidden, layers, heads, ffn (the OPT paper's table 1)
    "tiny": (64, 4, 4, 256), "1.3b": (2048, 24, 32, 8192), "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480), "30b": (7168, 48, 56, 28672),
}


# ----------------------------------------------------------------------------- data-parallel, CPU
def dp_worker(out: Path, steps: int, threads: int) -> None:
    """One rank of the DP measurement (run under torchrun)."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoft.distributed import Parallel
    from zoft.zo import SPSA, ZOSGD, TorchBackend
    from zoft.zo.step import zo_step

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 8192, (16, 64))
    par = Parallel("data", rank, world, torch.device("cpu"))
    params = list(model.parameters())
    est, opt = SPSA(eps=1e-3, backend=TorchBackend()), ZOSGD()

    def objective(idx: list[int]) -> float:
        return model(input_ids=ids[idx], labels=ids[idx]).loss.item()

    times = []
    with torch.no_grad():
        for step in range(steps + 1):
            par.all_gather([0.0])   # line up the ranks before timing
            t = time.perf_counter()
            zo_step(params, par.loss_fn(objective, list(range(16)), step), par.seeds(0, step, 1), 1e-4, est, opt)
            times.append(time.perf_counter() - t)
    if rank == 0:
        (out / f"dp-{world}.json").write_text(json.dumps({"procs": world, "step_s": statistics.median(times[1:]),
                                                           "threads_per_rank": torch.get_num_threads()}))
    dist.destroy_process_group()


def dp_table(out: Path, procs: list[int], steps: int, threads: int) -> list[dict]:
    rows = []
    for n in procs:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               __file__, "--dp-worker", "--out", str(out), "--steps", str(steps), "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{n} processes failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads((out / f"dp-{n}.json").read_text()))
    base = rows[0]["step_s"]
    for r in rows:
        r["speedup"] = base / r["step_s"]
    print(f"\nData-parallel MeZO step, small Llama (hidden 256, 4 layers), batch 16 x 64, "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}):\n")
    print("| processes | threads/rank | step (s) | speedup vs 1 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['threads_per_rank']} | {r['step_s']:.3f} | {r['speedup']:.2f} |")
    return rows


# ----------------------------------------------------------------------------- offload, GPU
# resident: the whole model on the GPU; offload: zoft's default (L+ and L− in one forward, each
# layer streamed once per step); offload-2stream: two forwards, each layer streamed twice
MODES = ("resident", "offload", "offload-2stream")


def build_opt(shape: str, device, dtype):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn = OPT_SHAPES[shape]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048)
    with torch.device("meta"):
        model = OPTForCausalLM(config).to(dtype)   # fp16 before any memory exists: 30B is 60 GB, not 120
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():   # matrices N(0, 0.02), biases 0, LayerNorm gains 1
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
    return model.eval()


def time_steps(model, device, batch: int, seq: int, steps: int, offloader=None) -> tuple[float, int]:
    import torch

    from zoft.zo import SPSA, ZOSGD, TorchBackend
    from zoft.zo.step import zo_step

    cuda = torch.device(device).type == "cuda"
    ids = torch.randint(0, 50272, (batch, seq), device=device)
    params = list(model.parameters())
    est, opt = SPSA(eps=1e-3, backend=TorchBackend()), ZOSGD()
    if offloader is not None:
        est.backend = offloader.backend(est.backend, params)

    def nll(logits) -> float:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()

    def loss() -> float:
        return nll(model(input_ids=ids, use_cache=False).logits)
    if offloader is not None and offloader.halves:   # the dual forward: L+ and L− from one stream
        stacked = torch.cat([ids, ids])
        loss.pair = lambda: tuple(nll(h) for h in model(input_ids=stacked, use_cache=False).logits.chunk(2))

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for step in range(steps + 1):
            t = time.perf_counter()
            zo_step(params, loss, [step], 1e-7, est, opt)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return statistics.median(times[1:]), peak


def gpu_table(out: Path, shapes: list[str], smoke: bool, budget_s: float) -> list[dict]:
    import gc

    import torch

    from zoft.offload import Offloader

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.float16
    batch, seq, steps = (2, 16, 2) if smoke else (8, 256, 3)
    start, rows = time.perf_counter(), []
    for shape in shapes:
        hidden, layers, heads, ffn = OPT_SHAPES[shape]
        n_params = layers * (4 * hidden * hidden + 2 * hidden * ffn) + 50272 * hidden
        row = {"shape": shape, "params_b": n_params / 1e9, "weights_gib": n_params * 2 / 2**30}
        for mode in MODES:
            if time.perf_counter() - start > budget_s:
                row[mode] = {"skipped": "time budget"}
                continue
            model = None
            try:
                if mode != "resident" and not smoke:
                    free_host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                    if free_host < 1.2 * n_params * 2:
                        row[mode] = {"skipped": f"host RAM {free_host / 2**30:.0f} GiB < pinned copy"}
                        continue
                model = build_opt(shape, device, dtype)
                offloader = Offloader(model, device, dual=mode == "offload") if mode != "resident" else None
                if device == "cuda":
                    torch.cuda.empty_cache()
                uploads = offloader.uploads if offloader else 0
                step_s, peak = time_steps(model, device, batch, seq, steps, offloader)
                row[mode] = {"step_s": step_s, "peak_gib": peak / 2**30}
                if offloader:   # block uploads per step (the warm-up and timed steps)
                    row[mode]["uploads_per_step"] = (offloader.uploads - uploads) / (steps + 1) / layers
            except torch.OutOfMemoryError:
                row[mode] = {"skipped": "CUDA out of memory"}
            finally:
                del model
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {shape}: {row}", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    print(f"\nMeZO step, OPT shapes (random weights, {str(dtype).split('.')[-1]}), batch {batch} x {seq}, on {name}:\n")
    print("| shape | params (B) | weights (GiB) | resident step (s) | resident peak (GiB) | "
          "offload step (s) | offload peak (GiB) | offload/resident time | peak ratio | "
          "2-stream offload step (s) | 2-stream peak (GiB) | streams per step (1-stream / 2-stream) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(d, k, fmt):
        return format(d[k], fmt) if k in d else d.get("skipped", "-")
    for r in rows:
        res, off, two = r.get("resident", {}), r.get("offload", {}), r.get("offload-2stream", {})
        time_ratio = f"{off['step_s'] / res['step_s']:.2f}" if "step_s" in res and "step_s" in off else "-"
        peak_ratio = f"{off['peak_gib'] / res['peak_gib']:.3f}" if res.get("peak_gib") and "peak_gib" in off else "-"
        print(f"| {r['shape']} | {r['params_b']:.2f} | {r['weights_gib']:.1f} | {cell(res, 'step_s', '.3f')} | "
              f"{cell(res, 'peak_gib', '.2f')} | {cell(off, 'step_s', '.3f')} | {cell(off, 'peak_gib', '.2f')} | "
              f"{time_ratio} | {peak_ratio} | {cell(two, 'step_s', '.3f')} | {cell(two, 'peak_gib', '.2f')} | "
              f"{cell(off, 'uploads_per_step', '.2f')} / {cell(two, 'uploads_per_step', '.2f')} |")
    for mode in MODES:
        ran = [r["shape"] for r in rows if "step_s" in r.get(mode, {})]
        print(f"largest shape trained ({mode}): {ran[-1] if ran else 'none'}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-scale")
    ap.add_argument("--gpu", action="store_true", help="the offload part (needs CUDA unless --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code path")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--shapes", default="1.3b,6.7b,13b,30b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new rows after this long")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / processes)")
    ap.add_argument("--dp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))
    if args.dp_worker:
        return dp_worker(out, args.steps, args.threads)
    if args.gpu:
        shapes = ["tiny"] if args.smoke else args.shapes.split(",")
        result = {"part": "offload", "rows": gpu_table(out, shapes, args.smoke, args.budget_s)}
    else:
        procs = [int(p) for p in args.procs.split(",")]
        result = {"part": "data-parallel", "rows": dp_table(out, procs, 2 if args.smoke else args.steps, args.threads)}
    import torch
    result |= {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {out / 'scale.json'}")


if __name__ == "__main__":
    main()
