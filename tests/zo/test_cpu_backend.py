"""The cpu-fast backend: its z rule, z statistics, exact regeneration, pass arithmetic, MeZO runs."""
import math

import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.methods.replay import rebuild
from zoft.models import tiny_random_model
from zoft.zo import cpu_backend
from zoft.zo.cpu_backend import BLOCK, CPUFastBackend
from zoft.zo.perturb import BACKEND_NAMES, TorchBackend, _unround_add, get_backend, tensor_seed
from zoft.zo.trajectory import FILENAME, Trajectory

M64 = (1 << 64) - 1
N_BIG = 1 << 22   # 4M elements: statistics to ~5e-4, 16 blocks


def word(key, j):
    """The Rademacher rule's word j, in plain Python integers (splitmix64)."""
    x = (key + (j + 1) * 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_registered_and_auto_stays_torch_on_cpu():
    assert "cpu-fast" in BACKEND_NAMES and get_backend("cpu-fast").name == "cpu-fast"
    assert get_backend("auto", "cpu").name == "torch"   # old "auto" runs resume with the same z


def test_rademacher_follows_the_documented_rule():
    backend, key = CPUFastBackend(), tensor_seed(9, 3)
    z = backend.direction(torch.zeros(BLOCK + 300), 9, 3, "rademacher")
    for e in [0, 1, 63, 64, 200, BLOCK - 1, BLOCK, BLOCK + 299]:
        assert z[e].item() == (1.0 if (word(key, e // 64) >> (e % 64)) & 1 == 0 else -1.0), e


def test_rademacher_does_not_depend_on_the_block_size(monkeypatch):
    p = torch.zeros(3 * 4096 + 77)
    z = CPUFastBackend().direction(p, 5, 1, "rademacher")
    monkeypatch.setattr(cpu_backend, "BLOCK", 4096)
    assert torch.equal(CPUFastBackend().direction(p, 5, 1, "rademacher"), z)


@pytest.mark.parametrize("n", [1, 15, 16, 1000, BLOCK, BLOCK + 5, BLOCK + 16, 2 * BLOCK + 40])
def test_gaussian_is_the_torch_backends_z_bitwise(n):
    """Blocks of a multiple of 16 drawn in order from one generator equal torch's whole draw."""
    p = torch.zeros(n)
    assert torch.equal(CPUFastBackend().direction(p, 7, 2), TorchBackend().direction(p, 7, 2))


def test_z_statistics_on_a_large_tensor():
    backend, p = CPUFastBackend(), torch.zeros(N_BIG)
    tol = 5 / math.sqrt(N_BIG)   # 5 sigma
    r = backend.direction(p, 1, 0, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.double().mean().item()) < tol
    g = backend.direction(p, 1, 0).double()
    assert abs(g.mean().item()) < tol and abs(g.var().item() - 1) < 5 * math.sqrt(2 / N_BIG)
    assert abs((g ** 4).mean().item() - 3) < 0.05   # Gaussian kurtosis, not merely unit variance


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_are_uncorrelated_across_seeds_and_tensors(distribution):
    backend, p, tol = CPUFastBackend(), torch.zeros(N_BIG), 5 / math.sqrt(N_BIG)
    z = backend.direction(p, 11, 0, distribution).double()
    for seed, index in [(12, 0), (11, 1), (10, 1)]:   # (10, 1) vs (11, 0): no seed+index aliasing
        other = backend.direction(p, seed, index, distribution).double()
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < tol


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_same_seed_and_index_regenerate_bitwise(distribution):
    backend, p = CPUFastBackend(), torch.zeros(BLOCK + 1234)
    z = backend.direction(p, 3, 4, distribution)
    backend.direction(p, 99, 0, distribution)
    backend.add_noise_([p.clone(), p.clone()], 5, 1.0, distribution)
    assert torch.equal(backend.direction(p, 3, 4, distribution), z)
    assert torch.equal(CPUFastBackend().direction(p, 3, 4, distribution), z)


def params(dtype, seed=0):
    """Tensors across block boundaries, one of them non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in [(BLOCK + 70,), (37, 11), (3,)]]
    ps.append(torch.randn(20, 30, generator=gen).to(dtype).T)
    return ps


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_then_undo_restores(distribution, dtype):
    backend, ps = CPUFastBackend(), params(dtype)
    before = [p.clone() for p in ps]
    backend.add_noise_(ps, 8, 1e-2, distribution)
    assert not torch.equal(ps[0], before[0])
    backend.add_noise_(ps, 8, 0.0, distribution, undo=1e-2)
    # bf16: exact except where the add crossed a binade (θ near 0), fp32: within an ulp of the step
    exact = sum((p == p0).sum().item() for p, p0 in zip(ps, before)) / sum(p.numel() for p in ps)
    assert exact > (0.97 if dtype == torch.bfloat16 else 0.5)
    for p, p0 in zip(ps, before):
        torch.testing.assert_close(p, p0, rtol=2 * torch.finfo(dtype).eps, atol=1e-2 * 5 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_combine_equals_terms_one_by_one(distribution):
    backend, terms = CPUFastBackend(), [(1, 0.3), (2, -0.02), (1, 0.1), (4, 5e-3)]
    ps = params(torch.float32)
    ref64 = [p.double() for p in ps]
    one_by_one = [p.clone() for p in ps]
    backend.combine_(ps, terms, distribution, undo=(2, 1e-2), then=(3, 1e-3))
    backend.add_noise_(one_by_one, 2, 0.0, distribution, undo=1e-2)
    for seed, c in terms + [(3, 1e-3)]:
        backend.add_noise_(one_by_one, seed, c, distribution)
    for i, (r, p, q) in enumerate(zip(ref64, ps, one_by_one)):
        z = {s: backend.direction(p, s, i, distribution).double() for s in (1, 2, 3, 4)}
        r = r - 1e-2 * z[2] + sum(c * z[s] for s, c in terms) + 1e-3 * z[3]
        torch.testing.assert_close(p.double(), r, rtol=0, atol=1e-5)
        torch.testing.assert_close(p, q, rtol=0, atol=4e-6)   # a few fp32 roundings of |θ| ≲ 5 apart


@pytest.mark.parametrize("backend", [CPUFastBackend(), TorchBackend()])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_passes_are_bitwise_the_same_on_any_number_of_threads(backend, distribution, dtype):
    """The blocked passes run whole tensors on parallel workers (one per intra-op thread): the
    weights may not depend on how many there are, and torch's thread count is left as it was."""
    threads = torch.get_num_threads()
    sizes = [BLOCK + 300, 7, 3 * BLOCK, 1000, 64, BLOCK // 2]
    torch.manual_seed(0)
    start = [torch.randn(n).to(dtype) for n in sizes] + [torch.randn(300, 40).to(dtype).t()]   # non-contiguous last
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ps = [p.clone() for p in start[:-1]] + [start[-1].clone().t().contiguous().t()]
            for p in ps:
                p.requires_grad_(True)   # as in full-mode training: the passes must not need autograd
            backend.combine_(ps, [(1, 0.3), (4, -5e-3)], distribution, undo=(2, 1e-2), then=(3, 1e-3))
            assert torch.get_num_threads() == n
            results.append([p.detach() for p in ps])
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(results[0][0], start[0])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_tensor_shares_cover_every_tensor_once_and_balance_the_elements():
    sizes = [28_000_000, 576] + [884_736] * 90 + [576] * 60
    groups = cpu_backend.shares(sizes, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(sizes) // 2 and all(g == sorted(g) for g in groups)
    assert cpu_backend.shares([5, 3], 4) == [[0], [1]]   # no empty shares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_passes_equal_the_torch_backend_bitwise(dtype):
    """Same z, same arithmetic per element: the blocked passes change the speed, not the weights."""
    fast, ref = params(dtype), params(dtype)
    for backend, ps in [(CPUFastBackend(), fast), (TorchBackend(), ref)]:
        backend.add_noise_(ps, 1, 1e-2)
        backend.combine_(ps, undo=(1, 1e-2), then=(1, -1e-2))
        backend.combine_(ps, [(1, -0.05), (5, 0.01)], undo=(1, -1e-2), then=(2, 1e-2))
        backend.add_noise_(ps, 2, 0.0, undo=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backends_blocked_cpu_passes_equal_whole_tensor_passes(distribution, dtype):
    """The torch backend runs its CPU passes in blocks; the weights are those of whole-tensor z
    (``direction``) with its documented arithmetic, bit for bit."""
    backend, ps = TorchBackend(), params(dtype)
    ref = [p.clone() for p in ps]
    passes = [(1, 1e-2, 0.0), (1, -1e-2, 1e-2), (1, -0.03, -1e-2), (2, 1e-2, 0.0)]   # (seed, scale, undo)
    for seed, scale, undo in passes:
        backend.add_noise_(ps, seed, scale, distribution, undo=undo)
        for i, p in enumerate(ref):
            z = backend.direction(p, seed, i, distribution)
            if dtype == torch.float32:
                p.add_(z, alpha=scale - undo)
            else:
                p.copy_((_unround_add(p, z, undo) if undo else p.float()).add_(z, alpha=scale))
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))
    if dtype == torch.float32:   # and one fused pass: undo, a term and the next perturbation
        backend.combine_(ps, [(2, -0.05), (3, 0.01)], distribution, undo=(2, 1e-2), then=(4, 1e-2))
        for i, p in enumerate(ref):
            for seed, alpha in [(2, -0.05 - 1e-2), (3, 0.01), (4, 1e-2)]:
                p.add_(backend.direction(p, seed, i, distribution), alpha=alpha)
        assert all(torch.equal(a, b) for a, b in zip(ps, ref))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backends_blocked_and_whole_tensor_paths_agree_bitwise(distribution, dtype):
    blocked, whole = TorchBackend(), TorchBackend()
    whole.blocked_cpu = False
    a, b = params(dtype), params(dtype)
    for backend, ps in [(blocked, a), (whole, b)]:
        backend.combine_(ps, then=(1, 1e-2), distribution=distribution)
        backend.combine_(ps, undo=(1, 1e-2), then=(1, -1e-2), distribution=distribution)
        backend.combine_(ps, [(1, -0.05), (5, 0.01)], distribution, undo=(1, -1e-2), then=(2, 1e-2))
        backend.add_noise_(ps, 2, 0.0, distribution, undo=1e-2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=32, batch_size=8, eval_batch_size=16, max_length=48,
             progress=False, method="mezo", model="tiny-llama", lr=1e-3, backend="cpu-fast",
             distribution="rademacher", compute_dtype="fp32")   # fp32: the checks below count fp32 roundings


def train(tmp_path, name, loaded=None, **kw):
    return api.train({**SMALL, "steps": 6, "eval_every": 3, "output_dir": str(tmp_path / name), **kw},
                     loaded=loaded or tiny_random_model("causal", seed=0))


@pytest.mark.parametrize("fused", [True, False])
def test_mezo_run_replays_bitwise(tmp_path, fused):
    train(tmp_path, "run", fused=fused)
    traj = Trajectory.load(tmp_path / "run" / FILENAME)
    assert traj.header["backend"] == "cpu-fast" and bool(traj.header.get("fused")) == fused
    trained = load_file(str(tmp_path / "run" / "checkpoint-6" / "trainable.safetensors"))
    replayed = load_file(str(rebuild("tiny-llama", tmp_path / "run" / FILENAME, tmp_path / "rb",
                                     progress=False) / "trainable.safetensors"))
    assert replayed.keys() == trained.keys() and all(torch.equal(replayed[k], trained[k]) for k in trained)


def test_fused_and_plain_runs_agree(tmp_path):
    """Same losses and weights, up to the fp32 roundings in which the two step orders differ."""
    fused, plain = tiny_random_model("causal", seed=0), tiny_random_model("causal", seed=0)
    train(tmp_path, "fused", loaded=fused, fused=True)
    train(tmp_path, "plain", loaded=plain, fused=False)
    a, b = Trajectory.load(tmp_path / "fused" / FILENAME), Trajectory.load(tmp_path / "plain" / FILENAME)
    assert [r.seeds for r in a.records] == [r.seeds for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    sa, sb = fused.model.state_dict(), plain.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_resume_from_trajectory_equals_uninterrupted(tmp_path):
    opts = dict(save_every=2, save_weights=False, load_best=False, eval_every=4)
    full, resumed = tiny_random_model("causal", seed=0), tiny_random_model("causal", seed=0)
    train(tmp_path, "full", loaded=full, **opts)
    train(tmp_path, "cut", steps=4, loaded=tiny_random_model("causal", seed=0), **opts)
    api.train(resume=tmp_path / "cut", loaded=resumed, steps=6)
    assert Trajectory.load(tmp_path / "full" / FILENAME).records == Trajectory.load(tmp_path / "cut" / FILENAME).records
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
