"""Trajectory format versions: files written by earlier zoft still replay to the same bits, and
each step's settle is recorded (version 2), so replay never re-derives the training loop's schedule.

The version-1 fixtures were written before the stepper refactor: a fused 2-pass run (steps=7,
eval_every=3, save_every=2: settled after steps 2, 3, 4, 6 and 7) and a plain run (2 directions,
weight decay). The hashes are those of each run's ``checkpoint-N/trainable.safetensors``.
"""
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.methods.replay import rebuild
from zoft.models import tiny_random_model
from zoft.zo import Estimate
from zoft.zo.trajectory import FILENAME, VERSION, Trajectory, replay_through

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED_SHA = {
    "fused": "c2d56d0a6dcf55b0585c661e519b970541da6b569e44e2a61079cd21bca1b1d4",
    "plain": "ad4acb25affadc6d15214a99d075e708efd016792cfcff4e43c9b6c0850219f4",
}
SETTLED_AFTER = [False, True, True, True, False, True, True]   # steps 1..7 with eval_every=3, save_every=2


def sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["fused", "plain"])
def test_version_1_trajectory_replays_bit_for_bit(tmp_path, name):
    path = FIXTURES / f"trajectory_v1_{name}.safetensors"
    header = Trajectory.load(path).header
    assert header["version"] == 1 and header["fused"] == (name == "fused")
    out = rebuild("tiny-llama", path, tmp_path / "replayed", progress=False)
    assert sha256(load_file(str(out / "trainable.safetensors"))) == TRAINED_SHA[name]


def test_version_1_settles_where_that_versions_training_loop_did():
    traj = Trajectory.load(FIXTURES / "trajectory_v1_fused.safetensors")
    assert [r.settled for r in traj.records] == SETTLED_AFTER


def test_training_records_each_settle_and_replay_follows_the_record(tmp_path):
    cfg = dict(task="sst2", n_train=32, n_dev=8, n_eval=8, batch_size=8, eval_batch_size=16, max_length=48,
               progress=False, method="mezo", model="tiny-llama", lr=1e-3, eps=1e-2, seed=3,
               steps=7, eval_every=3, save_every=2, output_dir=str(tmp_path / "run"))
    api.train(cfg, loaded=tiny_random_model("causal", seed=0))
    path = tmp_path / "run" / FILENAME
    traj = Trajectory.load(path)
    assert traj.header["version"] == VERSION == 2 and traj.header["fused"]
    assert [r.settled for r in traj.records] == SETTLED_AFTER
    # the config no longer implies those settles: replay must not care
    traj.header["config"].update(eval_every=100, save_every=None)
    traj.save(path)
    assert [r.settled for r in Trajectory.load(path).records] == SETTLED_AFTER
    out = rebuild("tiny-llama", path, tmp_path / "replayed", progress=False)
    trained = load_file(str(tmp_path / "run" / "checkpoint-7" / "trainable.safetensors"))
    assert sha256(load_file(str(out / "trainable.safetensors"))) == sha256(trained)


def test_replay_settles_exactly_where_the_records_say(tmp_path):
    traj = Trajectory({"n_probed": 1})
    for t in range(5):
        traj.append([t], [0.5], 0.1, [2.0, 1.0])
    traj.records[1].settled = traj.records[3].settled = True
    events = []

    class Spy:   # a stepper that logs its calls; g = (L+ − L−) / 2 from the tape
        fused = True

        def step(self, t, objective, seeds, lr, exchange=None):
            exchange(Estimate(0.0, [(seeds[0], (objective() - objective()) / 2)]))
            events.append(t)

        def settle(self):
            events.append("settle")
    replay_through(Spy(), Trajectory.load(traj.save(tmp_path / FILENAME)))
    assert events == [0, 1, "settle", 2, 3, "settle", 4, "settle"]   # and settled at the end
