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
             progress=False, method="mezo", model="tiny-llama", lr=1e-3, steps=4, eval_every=2,
             compute_dtype="fp32", distribution="gaussian")   # offload's backend draws torch's Gaussian z


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



def tied_llama():
    """A tiny Llama whose head is its input embedding: one tensor used at both ends of the model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)).eval()


def train_llama(offload: bool, dual: bool = True, steps: int = 4, backend: str = "torch"):
    from zoft.zo.perturb import get_backend
    model = tied_llama()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    params = list(dict.fromkeys(model.parameters()))
    estimator, optimizer = SPSA(eps=1e-2, backend=get_backend(backend)), ZOSGD()
    offloader = Offloader(model, "cpu", dual=dual) if offload else None
    if offloader:
        estimator.backend = offloader.backend(estimator.backend, params)

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    def loss() -> float:
        return nll(model(input_ids=ids, use_cache=False).logits)
    loss.pair = lambda: tuple(nll(h) for h in model(input_ids=torch.cat([ids, ids]), use_cache=False).logits.chunk(2))
    records = [zo_step(params, loss, [step], 1e-2, estimator, optimizer).directions for step in range(steps)]
    uploads = offloader.uploads if offloader else 0
    if offloader:
        offloader.settle()
    return model, records, uploads


@pytest.mark.parametrize("dual", [True, False])
def test_dual_forward_streams_each_block_once_per_step_and_changes_no_bit(dual):
    """One forward over the stacked batch serves L+ and L−: each of the 3 blocks is uploaded once per
    step (plus the prefetch of the next step's first), where two forwards upload it twice. Every
    module computes its two halves apart and the tied embedding/head uses a θ−εz copy for the
    second half, so losses, g and the weights equal the resident step's to the bit."""
    ref, ref_records, _ = train_llama(offload=False)
    off, off_records, uploads = train_llama(offload=True, dual=dual)
    assert off_records == ref_records
    assert off.lm_head.weight is off.model.embed_tokens.weight        # still tied
    for (name, a), b in zip(ref.named_parameters(), off.parameters()):
        assert torch.equal(a, b), name
    assert uploads == (4 * 3 + 1 if dual else 2 * 4 * 3 + 1)


def test_dual_forward_through_the_triton_backend_changes_no_bit():
    """The same through the Triton kernels (the GPU default; here the interpreter): per-block views
    full of empty placeholders, launch tables rebuilt for every uploaded block."""
    ref, ref_records, _ = train_llama(offload=False, steps=1, backend="triton")
    off, off_records, uploads = train_llama(offload=True, steps=1, backend="triton")
    assert off_records == ref_records and uploads == 3 + 1
    for (name, a), b in zip(ref.named_parameters(), off.parameters()):
        assert torch.equal(a, b), name


def test_offload_with_prefix_streams_twice_and_trains_like_the_resident_run(tmp_path):
    """Prefix tuning hands the layers a KV cache the dual forward cannot split: it falls back."""
    for offload in (False, True):
        api.train({**SMALL, "mode": "prefix", "offload": offload, "fused": False, "output_dir": str(tmp_path / str(offload))},
                  loaded=tiny_random_model("causal", seed=0))
    a = load_file(str(tmp_path / "False" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "True" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dual_offload_run_resumes_and_replays_bitwise(tmp_path):
    """The last update waits in the offloader's queue until settled: checkpoints must settle it,
    so a resumed run ends on the same weights as an uninterrupted one, and the trajectory of a
    dual-forward run replays without offload to the same weights."""
    from zoft.methods.replay import rebuild
    base = {**SMALL, "offload": True, "fused": False, "save_every": 2, "eval_every": 2, "load_best": False}
    api.train({**base, "steps": 6, "output_dir": str(tmp_path / "full")}, loaded=tiny_random_model("causal", seed=0))
    api.train({**base, "steps": 4, "output_dir": str(tmp_path / "cut")}, loaded=tiny_random_model("causal", seed=0))
    api.train(resume=tmp_path / "cut", loaded=tiny_random_model("causal", seed=0), steps=6)
    full = load_file(str(tmp_path / "full" / "checkpoint-6" / "trainable.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "checkpoint-6" / "trainable.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    out = rebuild("tiny-llama", tmp_path / "full" / FILENAME, tmp_path / "replayed", progress=False)
    replayed = load_file(str(out / "trainable.safetensors"))
    assert all(torch.equal(replayed[k], full[k]) for k in full)
    start = tiny_random_model("causal", seed=0).model.state_dict()
    assert any(not torch.equal(start[k], full[k]) for k in full if k in start)   # it did train
