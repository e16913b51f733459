"""Trajectories written by earlier zoft versions still replay to the same bits.

The fixtures were written before the stepper refactor (format version 1, no per-step settle flags):
a fused 2-pass run (settled after steps 2, 3, 4, 6 and 7) and a plain run (2 directions, weight
decay). The hashes are those of the trained ``checkpoint-N/trainable.safetensors`` of each run.
"""
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft.methods.replay import rebuild
from zoft.zo.trajectory import Trajectory

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED_SHA = {
    "fused": "c2d56d0a6dcf55b0585c661e519b970541da6b569e44e2a61079cd21bca1b1d4",
    "plain": "ad4acb25affadc6d15214a99d075e708efd016792cfcff4e43c9b6c0850219f4",
}


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
