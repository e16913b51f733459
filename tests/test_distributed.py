"""Data- and direction-parallel MeZO under torchrun (gloo, 2 CPU processes) against single-process runs.

Why the comparisons are tight but not bitwise: a rank's loss is the fp32 mean over its shard of
the batch, and the ranks combine the shard means in float64, while the single process takes one
fp32 mean over the whole batch. The two agree to about 1 ulp of fp32 (~6e-8 relative), and
g = (L+ − L−)/2ε divides that difference by ε (here 1e-3), so g agrees to ~1e-5 relative and
the weights after 4 steps to ~1e-7 absolute, while the steps themselves move them by ~1e-2.
Direction-parallel differs from n-SPSA by the same kind of rounding: in one process direction
2 is probed after direction 1's ±ε round trip, which is exact only to an ulp in fp32.
"""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.distributed import shard
from zoft.methods.replay import rebuild
from zoft.models import tiny_random_model
from zoft.zo.trajectory import FILENAME, Trajectory

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import SMALL  # noqa: E402  (the options the torchrun workers train with)

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """One torchrun launch (2 ranks) that trains a data-parallel and a direction-parallel run."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_worker.py"), str(out), "data", "direction"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def g_tolerance(record) -> float:
    """A few fp32 ulps of the loss, divided by 2ε as g = (L+ − L−)/2ε divides them."""
    return 4 * torch.finfo(torch.float32).eps * max(record.losses) / (2 * 1e-3)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint-4" / "trainable.safetensors"))


def single(tmp_path, **kw) -> Path:
    out = tmp_path / "single"
    api.train({**SMALL, **kw, "output_dir": str(out)}, loaded=tiny_random_model("causal", seed=0))
    return out


def test_shards_cover_the_batch_in_order():
    idx = list(range(10, 21))
    parts = [shard(idx, r, 3) for r in range(3)]
    assert sum(parts, []) == idx and sorted(len(p) for p in parts) == [3, 4, 4]


def test_two_rank_data_parallel_equals_one_rank_on_the_whole_batch(parallel_runs, tmp_path):
    ref = single(tmp_path)
    dp, one = Trajectory.load(parallel_runs / "data"), Trajectory.load(ref)
    assert [r.seeds for r in dp.records] == [r.seeds for r in one.records]      # same directions
    for a, b in zip(dp.records, one.records):
        assert a.losses == pytest.approx(b.losses, rel=1e-6, abs=0)            # L± of the concatenated batch
        assert a.grads == pytest.approx(b.grads, abs=g_tolerance(b))
    a, b, start = weights(parallel_runs / "data"), weights(ref), tiny_random_model("causal", 0).model.state_dict()
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)


def test_data_parallel_trajectory_replays_bitwise(parallel_runs, tmp_path):
    out = rebuild("tiny-llama", parallel_runs / "data" / FILENAME, tmp_path / "replayed", progress=False)
    a, b = weights(parallel_runs / "data"), load_file(str(out / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_direction_parallel_equals_two_direction_spsa(parallel_runs, tmp_path):
    ref = single(tmp_path, n_directions=2)
    par, one = Trajectory.load(parallel_runs / "direction"), Trajectory.load(ref)
    assert par.header["n_probed"] == 1 and len(par.records[0].seeds) == 2
    assert [r.seeds for r in par.records] == [r.seeds for r in one.records]    # rank r's seed = direction r
    for a, b in zip(par.records, one.records):
        assert a.grads == pytest.approx(b.grads, abs=g_tolerance(b))
    a, b = weights(parallel_runs / "direction"), weights(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5
    # rank 0's own rounding is in its trajectory: replay rebuilds rank 0's weights exactly
    out = rebuild("tiny-llama", parallel_runs / "direction" / FILENAME, tmp_path / "replayed", progress=False)
    c = load_file(str(out / "trainable.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_killed_rank_makes_the_other_fail_clearly_not_hang(tmp_path):
    """Ranks started by hand (the env torchrun would set), so that torchrun's agent, which kills
    the survivors itself, cannot hide a hang: rank 0 must notice on its own. Rank 1 kills itself
    after step 3 (ZOFT_FAULT), so the kill point does not depend on the machine's speed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = [f"{k}={v}" for k, v in {**SMALL, "steps": 100000, "eval_every": 100000, "dist_timeout": 20,
                                    "parallel": "data", "output_dir": tmp_path / "run"}.items()]
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} | ({"ZOFT_FAULT": "kill:step=3"} if rank else {})
        procs.append(subprocess.Popen([sys.executable, "-m", "zoft", "train", *opts], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert procs[1].wait(timeout=300) == -signal.SIGKILL, procs[1].stdout.read()
    try:   # a hang guard, not a timing: dist_timeout (20 s) is what rank 0 waits before failing
        code = procs[0].wait(timeout=300)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung after rank 1 died")
    output = procs[0].stdout.read()
    assert code == 2, output[-2000:]
    assert "zoft: error: rank 0: lost the other ranks at step" in output
