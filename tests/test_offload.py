"""CPU offload (ZO2-style streaming): the same passes on every tensor, so the same weights bitwise.

On a CPU "device" the uploads and write-backs are plain copies, so this runs the GPU code path
(hooks, queued passes, deferred restore/update, settle) without a GPU.
"""
import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.errors import ZoftError
from zoft.models import tiny_random_model
from zoft.offload import Offloader, find_blocks
from zoft.zo import SPSA, ZOSGD, TorchBackend
from zoft.zo.step import zo_step
from zoft.zo.trajectory import FILENAME, Trajectory


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(6, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
                                           for _ in range(4)])
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def train_stack(offload: bool, steps: int = 8):
    net = Stack()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    params = list(net.parameters())
    estimator, optimizer = SPSA(eps=1e-2, n_directions=2, backend=TorchBackend()), ZOSGD()
    offloader = Offloader(net, "cpu") if offload else None
    if offloader:
        estimator.backend = offloader.backend(estimator.backend, params)
    peak, losses = [0], []
    if offloader:
        for layer in net.layers:   # runs after the offloader's own pre-hook: the block has arrived
            layer.register_forward_pre_hook(lambda *a: peak.append(len(offloader.resident)))
    for step in range(steps):
        loss = lambda: torch.nn.functional.cross_entropy(net(x), y).item()   # noqa: E731
        e = zo_step(params, loss, [3 * step, 3 * step + 1], 0.1, estimator, optimizer)
        losses.append(e.directions)
    if offloader:
        lagging = [p.detach().clone() for p in net.layers.parameters()]
        offloader.settle()
        return net, losses, lagging, max(peak)
    return net, losses, None, 0


def test_offloaded_steps_equal_resident_steps_bitwise():
    ref, ref_dirs, _, _ = train_stack(offload=False)
    off, off_dirs, lagging, peak = train_stack(offload=True)
    assert off_dirs == ref_dirs                        # same losses, same g, every step
    for a, b in zip(ref.parameters(), off.parameters()):
        assert torch.equal(a, b)
    # the last restore/update waited in the queue until settle(): the CPU copies lagged behind
    assert not all(torch.equal(a, b) for a, b in zip(lagging, off.layers.parameters()))
    assert peak == 1                                  # blocks visit the device one at a time


def test_find_blocks_picks_the_decoder_layers():
    loaded = tiny_random_model("causal", seed=0)
    assert find_blocks(loaded.model) is loaded.model.model.layers


SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=16, batch_size=8, eval_batch_size=16, max_length=48,
             progress=False, method="mezo", model="tiny-llama", lr=1e-3, steps=4, eval_every=2)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_offloaded_mezo_run_equals_normal_run(tmp_path, mode):
    for offload in (False, True):   # the same plain 4-pass steps (offload does not fuse)
        api.train({**SMALL, "mode": mode, "offload": offload, "fused": False, "output_dir": str(tmp_path / str(offload))},
                  loaded=tiny_random_model("causal", seed=0))
    a = load_file(str(tmp_path / "False" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "True" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Trajectory.load(tmp_path / "False" / FILENAME).records == Trajectory.load(tmp_path / "True" / FILENAME).records


def test_offload_refuses_weight_decay():
    with pytest.raises(ZoftError, match="offload=true needs weight_decay=0"):
        api.train({**SMALL, "offload": True, "weight_decay": 0.1})


def test_device_map_placement_trains_like_the_plain_model(tmp_path):
    """device_map=auto goes through accelerate's dispatch; on a CPU-only machine every layer lands
    on the CPU, so this checks the path and that nothing in the step assumes an undispatched model
    (multi-GPU splits need several GPUs and are not tested here)."""
    for device_map in (None, "auto"):
        api.train({**SMALL, "device_map": device_map, "output_dir": str(tmp_path / str(device_map))})
    a = load_file(str(tmp_path / "None" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "auto" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

