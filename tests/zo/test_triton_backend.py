"""The Triton perturbation backend against independent computations.

Without a GPU these run the same kernels through ``TRITON_INTERPRET=1`` (set in conftest) on
small CPU tensors; with one they run compiled on CUDA.
"""
import os
import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from zoft.errors import ZoftError  # noqa: E402
from zoft.zo.cpu_backend import CPUFastBackend  # noqa: E402
from zoft.zo.perturb import TorchBackend, get_backend, plan_launches  # noqa: E402
from zoft.zo.triton_backend import TritonBackend  # noqa: E402

BACKENDS = {"torch": TorchBackend, "triton": TritonBackend, "cpu-fast": CPUFastBackend}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def philox_reference(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """Philox4x32-10 in numpy, written from the Salmon et al. (2011) round function:
    key = (seed lo, seed hi), counter = (c lo, c hi, 0, 0); four uint32 words per counter."""
    m32 = np.uint64(0xFFFFFFFF)
    c = [counters.astype(np.uint64) & m32, counters.astype(np.uint64) >> np.uint64(32),
         np.zeros_like(counters, np.uint64), np.zeros_like(counters, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_a, prod_b = c[0] * mul_a, c[2] * mul_b    # < 2^64: exact in uint64
        c = [(prod_b >> np.uint64(32)) ^ c[1] ^ k0, prod_b & m32,
             (prod_a >> np.uint64(32)) ^ c[3] ^ k1, prod_a & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def reference_z(seed: int, index: int, numel: int, distribution: str) -> np.ndarray:
    """z as the triton_backend docstring specifies it, computed independently in float64."""
    e = np.arange(numel)
    block, within = e // 4096, e % 4096
    lane, row, col = within // 1024, (within % 1024) // 32, within % 32
    if distribution == "rademacher":
        words = philox_reference(seed, (index << 40) | (block * 32 + col))
        word = np.choose(lane, words)
        return 1.0 - 2.0 * ((word >> row.astype(np.uint64)) & np.uint64(1)).astype(np.float64)
    words = philox_reference(seed, (index << 40) | (block * 1024 + row * 32 + col))
    signed = [w.astype(np.uint32).view(np.int32).astype(np.int64) for w in words]
    u = [np.where(s < 0, -s - 1, s) * 4.6566127342e-10 for s in signed]
    normals = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r = np.sqrt(-2.0 * np.log(np.maximum(u1, 1e-7)))
        normals += [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]
    return np.choose(lane, normals)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_z_is_the_specified_philox_stream(device, distribution):
    backend, numel = TritonBackend(), 4096 + 1500    # a full z-block and a partial one
    for seed, index in [(7, 0), (2**40 + 3, 5)]:
        z = backend.direction(torch.zeros(numel, device=device), seed, index, distribution).cpu().double().numpy()
        np.testing.assert_allclose(z, reference_z(seed, index, numel, distribution), atol=1e-4)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_z_statistics_and_independence(device, distribution):
    backend, n = TritonBackend(), 2 * 4096
    z = {(s, i): backend.direction(torch.zeros(n, device=device), s, i, distribution).cpu().double()
         for s in (1, 2) for i in (0, 1)}
    bound = 5 / n ** 0.5      # five standard errors of a mean or a correlation of n values
    for v in z.values():
        assert abs(v.mean()) < bound
        assert abs(v.var() - 1) < 5 * (2 / n) ** 0.5    # the standard error of a normal variance
        # no structure from the lane/row/column layout or across z-blocks: lagged correlations
        for lag in (1, 32, 1024, 4096):
            assert abs((v[lag:] * v[:-lag]).mean()) < 5 / (n - lag) ** 0.5
    if distribution == "gaussian":
        g = torch.cat(list(z.values()))
        assert ((g.abs() < 1).double().mean() - 0.6827).abs() < 0.015    # normal, not just unit variance
        assert ((g ** 4).mean() - 3).abs() < 0.25
    else:
        assert set(torch.cat(list(z.values())).unique().tolist()) == {-1.0, 1.0}
    for a, b in [((1, 0), (1, 1)), ((1, 0), (2, 0)), ((1, 1), (2, 0))]:   # across tensors and seeds
        assert abs((z[a] * z[b]).mean()) < bound


def test_z_is_deterministic_and_keyed(device):
    backend, p = TritonBackend(), torch.zeros(5000, device=device)
    a = backend.direction(p, 11, 2)
    assert torch.equal(a, TritonBackend().direction(p, 11, 2))
    assert not torch.equal(a, backend.direction(p, 12, 2))
    assert not torch.equal(a, backend.direction(p, 11, 3))
    # z depends on (seed, index, offset) only, not on the tensor's size
    assert torch.equal(a[:100], backend.direction(torch.zeros(100, device=device), 11, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_launch_equals_per_tensor_formula(device, dtype):
    """One launch over tensors of mixed sizes (and a second dtype) == p + s·z per tensor,
    with z from single-tensor launches: the table of chunks addresses every element once."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4096 * 8 + 5,), (3, 7), (1,), (0,), (200,)]   # the first spans two programs
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    params.insert(2, torch.randn(50, generator=gen).to(device, torch.float32))   # a second dtype group
    before = [p.clone() for p in params]
    backend, scale = TritonBackend(), 0.01
    backend.combine_(params, then=(99, scale))
    for i, (p, p0) in enumerate(zip(params, before)):
        z = backend.direction(p, 99, i)
        assert torch.equal(p, (p0.float() + scale * z).to(p.dtype)), f"tensor {i}"


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cpu-fast"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_pass_equals_separate_passes(device, backend_name, dtype):
    """update + next perturbation in one pass == update pass, then perturbation pass, bit for bit."""
    backend = BACKENDS[backend_name]()
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen).to(device, dtype) for s in [(300,), (17, 9)]]
    eps, coeff = 1e-2, -3e-3
    fused, separate = [p.clone() for p in start], [p.clone() for p in start]
    backend.combine_(fused, [(5, coeff)], undo=(5, -eps), then=(6, eps))
    backend.combine_(separate, [(5, coeff)], undo=(5, -eps))
    backend.combine_(separate, then=(6, eps))
    for a, b in zip(fused, separate):
        assert torch.equal(a, b)
    # and it did something: θ moved by about coeff·z_5 + 2ε... i.e. it is not a no-op
    assert not torch.equal(fused[0], start[0])


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cpu-fast"])
def test_combine_matches_float64_formula(device, backend_name):
    """Three seeds (two passes in Triton) in fp32 against Σ c·z computed in float64."""
    backend = BACKENDS[backend_name]()
    p = torch.randn(2000, generator=torch.Generator().manual_seed(2)).to(device)
    p0 = p.double().clone()
    terms = [(1, 0.5), (2, -0.25), (1, 0.25), (3, 0.125)]
    backend.combine_([p], terms)
    expected = p0 + sum(c * backend.direction(p, s, 0).double() for s, c in terms)
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=5e-6)


def test_plan_launches_groups_at_most_two_seeds_per_pass():
    # the MeZO passes: one launch each, the fused one with two directions
    assert plan_launches([], None, (1, 0.1)) == [((1, 0.0, 0.1), None)]
    assert plan_launches([], (1, 0.1), (1, -0.1)) == [((1, 0.1, 0.0), (1, -0.1, True))]
    assert plan_launches([(1, -0.5)], (1, -0.1), (2, 0.1)) == [((1, -0.1, -0.5), (2, 0.1, True))]
    # n-SPSA update: same-seed terms merge, extra seeds spill into further passes
    assert plan_launches([(1, 1.0), (2, 2.0), (1, 1.0), (3, 3.0)], None, (4, 0.5)) == [
        ((1, 0.0, 2.0), (2, 2.0, False)), ((3, 0.0, 3.0), (4, 0.5, True))]
    assert plan_launches([], None, None) == []


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_round_trip_fp32_within_one_ulp(device, distribution):
    """+εz, then −εz (the MeZO passes) restore θ within 1 ulp, and bit-exactly almost everywhere:
    only where θ ± εz crossed into a coarser binade was a bit of θ rounded away."""
    backend, eps = TritonBackend(), 1e-3
    p = torch.randn(8192, generator=torch.Generator().manual_seed(3)).to(device)
    for seed in range(2):
        theta = p.clone()
        backend.combine_([p], then=(seed, eps))                     # θ + εz
        plus = p.clone()
        backend.combine_([p], undo=(seed, eps), then=(seed, -eps))  # θ − εz
        minus = p.clone()
        backend.combine_([p], undo=(seed, -eps))                    # θ
        largest = torch.maximum(theta.abs(), torch.maximum(plus.abs(), minus.abs()))
        assert torch.all((p - theta).abs() <= largest * torch.finfo(torch.float32).eps)
        assert (p == theta).double().mean() > 0.99
        assert not torch.equal(plus, theta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_low_precision_is_exact_almost_everywhere(device, dtype):
    """10 lr=0 MeZO steps in bf16/fp16: the exact undo keeps > 97% of weights bit-exact, where a
    naive ±ε round trip (three rounded adds, same z) changes most of them."""
    backend, eps = TritonBackend(), 1e-3
    p = torch.randn(4096, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    p0, naive = p.clone(), p.float().clone()
    for seed in range(10):
        backend.combine_([p], then=(seed, eps))
        backend.combine_([p], undo=(seed, eps), then=(seed, -eps))
        backend.combine_([p], undo=(seed, -eps))
        z = backend.direction(p, seed, 0)
        for scale in (eps, -2 * eps, eps):
            naive = (naive + scale * z).to(dtype).float()
    exact, naive_exact = (p == p0).double().mean().item(), (naive.to(dtype) == p0).double().mean().item()
    print(f"{dtype}: {exact:.4f} bit-exact after 10 steps, naive {naive_exact:.4f}")
    assert exact > 0.97
    assert naive_exact < 0.9


def test_backend_selection_and_bad_input(device, monkeypatch):
    assert get_backend("auto", "cpu").name == "torch"
    if not torch.cuda.is_available():   # fast math cannot build here: auto says so, takes precise triton
        from zoft.zo.perturb import _fast_math_runs
        _fast_math_runs.cache_clear()
        with pytest.warns(UserWarning, match="fast math unavailable"):
            assert get_backend("auto", "cuda").name == "triton"
    assert get_backend("triton").name == "triton"
    with pytest.raises(ZoftError, match="unknown perturbation backend"):
        get_backend("cuda")
    with pytest.raises(ZoftError, match="unsupported dtype"):
        TritonBackend().combine_([torch.zeros(4, dtype=torch.float64, device=device)], then=(1, 0.1))
    with pytest.raises(ZoftError, match="not contiguous"):
        TritonBackend().combine_([torch.zeros(4, 4, device=device).t()], then=(1, 0.1))
    if device == "cpu":
        with pytest.raises(ZoftError, match="fast_math needs a CUDA GPU"):
            TritonBackend(fast_math=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ZoftError, match="needs CUDA tensors"):
        TritonBackend().combine_([torch.zeros(4)], then=(1, 0.1))
    # offload passes lists with empty CPU placeholders for tensors of other blocks: nothing to check
    from zoft.zo.triton_backend import _check_device
    _check_device([torch.empty(0)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="approximate GPU math: CUDA only")
def test_fast_math_z_is_close_to_precise_z():
    p = torch.zeros(3 * 4096, device="cuda")
    precise, fast = TritonBackend().direction(p, 3, 1), TritonBackend(fast_math=True).direction(p, 3, 1)
    torch.testing.assert_close(fast, precise, rtol=0, atol=1e-4)


def test_auto_backend_is_torch_on_cpu_and_fast_triton_on_cuda():
    from zoft.zo.perturb import get_backend
    assert get_backend("auto", "cpu").name == "torch"
    if torch.cuda.is_available():   # measured 15% faster than precise triton on an OPT-13B step
        assert get_backend("auto", "cuda").name == "triton-fast"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ZoftError, match="fast_math needs a CUDA GPU"):
            get_backend("triton-fast", "cpu")
