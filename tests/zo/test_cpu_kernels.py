"""The C sweep must give the block path's weights bit for bit, or not run at all."""
from pathlib import Path

import pytest
import torch

from zoft.zo import cpu_backend, cpu_kernels
from zoft.zo.cpu_backend import CPUFastBackend

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler builds the sweep here")

# (terms, undo, then): the fused step's two passes, a plain update, several seeds, an undo alone
PASSES = [
    ([], (5, 1e-3), (5, -1e-3)),                       # θ+εz → θ−εz: one direction twice
    ([(5, -3e-7)], (5, -1e-3), (6, 1e-3)),             # update and the next step's +εz
    ([(1, 0.3), (4, -5e-3)], (2, 1e-2), (3, 1e-3)),
    ([(1, 0.1), (2, 0.2), (3, 0.3)], None, None),      # an odd number of terms
    ([], (9, 0.5), None),                              # a settle
]


def start_tensors():
    torch.manual_seed(0)
    sizes = [1 << 16, (1 << 16) + 37, 3 * cpu_backend.BLOCK + 5, 100, 70_001, 64, 5, 1]
    return [torch.randn(n) for n in sizes] + [torch.randn(400, 300).t(), torch.randn(200_000).bfloat16()]


def run(kernels: bool, terms, undo, then, threads: int = 2):
    ps = [p.clone() if p.is_contiguous() else p.t().contiguous().t() for p in start_tensors()]
    for p in ps:
        p.requires_grad_(True)   # as in full-mode training: the passes must not need autograd
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_backend.blocked_combine_(ps, terms, "rademacher", undo, then, bits=True, kernels=kernels)
    finally:
        torch.set_num_threads(before)
    assert not ps[-2].is_contiguous()
    return [p.detach() for p in ps]


@needs_kernels
@pytest.mark.parametrize("terms,undo,then", PASSES)
def test_compiled_sweeps_equal_the_block_path_bitwise(terms, undo, then):
    block_path = run(False, terms, undo, then)
    for threads in (1, 2, 3):   # 3: shares of unequal sizes
        compiled = run(True, terms, undo, then, threads)
        for a, b, s in zip(block_path, compiled, start_tensors()):
            assert torch.equal(a, b)
            assert not torch.equal(a, s)   # every tensor, tails and the bf16 one included, was changed


@needs_kernels
def test_a_fused_mezo_round_trip_through_the_backend_is_the_same_with_and_without_kernels(monkeypatch):
    """The backend's own entry point (what training calls) takes the sweep by default."""
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(cpu_kernels, "available", lambda enabled=enabled: enabled)
        ps = [p.clone() for p in start_tensors()]
        backend = CPUFastBackend()
        backend.combine_(ps, [], "rademacher", then=(11, 1e-3))
        backend.combine_(ps, [], "rademacher", undo=(11, 1e-3), then=(11, -1e-3))
        backend.combine_(ps, [(11, -2e-6)], "rademacher", undo=(11, -1e-3), then=(12, 1e-3))
        backend.combine_(ps, [], "rademacher", undo=(12, 1e-3))
        results.append(ps)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_only_fp32_cpu_tensors_are_swept():
    assert cpu_kernels.takes(torch.zeros(3))
    assert not cpu_kernels.takes(torch.zeros(3, dtype=torch.bfloat16))
    assert not cpu_kernels.takes(torch.zeros(3, dtype=torch.float64))


@needs_kernels
def test_more_terms_than_one_call_takes_are_applied_in_order():
    terms = [(s, (-1) ** s * 10.0 ** -s) for s in range(1, cpu_kernels.MAX_TERMS + 4)]
    block_path, swept = run(False, terms, (50, 1e-3), (51, 2e-3)), run(True, terms, (50, 1e-3), (51, 2e-3))
    assert all(torch.equal(a, b) for a, b in zip(block_path, swept))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ZOFT_CPU_KERNELS", "0")
    cpu_kernels.available.cache_clear()
    try:
        assert cpu_kernels.available() is False
    finally:
        cpu_kernels.available.cache_clear()


def test_a_compiler_that_fails_leaves_the_block_path_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")   # a "compiler" that fails every build
    monkeypatch.setenv("ZOFT_CACHE_DIR", str(tmp_path))
    cpu_kernels._library.cache_clear()
    cpu_kernels.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiled CPU passes unavailable.*could not build"):
            assert cpu_kernels.available() is False
        ps, expected = start_tensors(), start_tensors()
        cpu_backend.blocked_combine_(ps, [(1, 0.5)], "rademacher", None, None, bits=True)   # kernels=None: auto
        cpu_backend.blocked_combine_(expected, [(1, 0.5)], "rademacher", None, None, bits=True, kernels=False)
        assert all(torch.equal(a, b) for a, b in zip(ps, expected))
        assert not list(tmp_path.glob("*.so"))   # nothing half-built is left to be loaded later
    finally:
        cpu_kernels._library.cache_clear()
        cpu_kernels.available.cache_clear()


@needs_kernels
def test_an_unwritable_cache_folder_builds_in_a_private_temporary_one(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")   # a file where the folder should be: mkdir fails
    monkeypatch.setenv("ZOFT_CACHE_DIR", str(blocked / "zoft"))
    cpu_kernels._library.cache_clear()
    try:
        path = Path(cpu_kernels._library()._name)
        assert path.exists() and path.parent.name.startswith("zoft-sweep-") and path.parent.stat().st_mode & 0o077 == 0
    finally:
        cpu_kernels._library.cache_clear()


@needs_kernels
def test_the_library_is_built_per_cpu(monkeypatch, tmp_path):
    """-march=native code must not be loaded on another CPU that shares the cache directory."""
    monkeypatch.setenv("ZOFT_CACHE_DIR", str(tmp_path))
    built = []
    for flags in ("flags : avx2", "flags : avx2 avx512f"):
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda flags=flags: flags)
        cpu_kernels._library.cache_clear()
        cpu_kernels._library()
        built.append(sorted(p.name for p in tmp_path.glob("*.so")))
    cpu_kernels._library.cache_clear()
    assert len(built[0]) == 1 and len(built[1]) == 2


@needs_kernels
def test_sparse_mezo_passes_on_cpu_fast_take_the_masked_c_loop_and_give_the_same_bits(monkeypatch):
    """Sparse MeZO's z ⊙ m through the C loop equals its generic path (cpu-fast's z, masked, added),
    including weights that are exactly ±0 and a tensor without a mask."""
    from zoft.zo.estimator import SparseBackend, small_magnitude_mask
    torch.manual_seed(1)
    start = [torch.randn(70_001), torch.randn(33, 65), torch.randn(5)]
    start[0][:100] = 0.0
    start[0][100:200] = -0.0
    results, calls = [], []
    real = cpu_kernels.sweep_
    monkeypatch.setattr(cpu_kernels, "sweep_", lambda *a, **k: (calls.append(k.get("masks")), real(*a, **k)))
    for enabled in (False, True):
        monkeypatch.setattr(cpu_kernels, "available", lambda enabled=enabled: enabled)
        ps = [p.clone() for p in start]
        backend = SparseBackend(CPUFastBackend())
        backend.masks = [small_magnitude_mask(ps[0], 0.25), None, small_magnitude_mask(ps[2], 0.5)]
        backend.add_noise_(ps, 7, 1e-3, "rademacher")
        backend.add_noise_(ps, 7, -1e-3, "rademacher", undo=1e-3)
        backend.add_noise_(ps, 7, -2e-4, "rademacher", undo=-1e-3)
        results.append(ps)
    assert len(calls) == 3 and all(m is not None for m in calls)   # the enabled round took the C loop
    for a, b in zip(*results):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    moved = results[1][0] != start[0]
    assert moved.float().mean().item() == pytest.approx(0.25, abs=0.01)   # only the masked-in quarter moved


@needs_kernels
def test_sparse_mezo_masks_written_in_the_first_pass_equal_the_torch_masks(monkeypatch):
    """With the C loop, Sparse MeZO's masks are written by the step's first pass (|θ| ≤ threshold,
    no pass of their own). Steps must give the torch path's masks and weights bit for bit: a tensor
    above SAMPLE (sampled threshold), exact ±0 weights, ties at the threshold, a non-contiguous tensor
    (swept in a copy, in the mask's element order), and a bf16 tensor the C loop does not take."""
    from zoft.zo import SparseMeZO
    from zoft.zo.estimator import SAMPLE, SparseBackend
    torch.manual_seed(2)
    start = [torch.randn(SAMPLE + 4097), torch.randn(40, 65), torch.randn(300, 200).t(), torch.randn(999).bfloat16()]
    start[0][:64] = 0.0
    start[0][64:128] = -0.0
    start[1][:, :10] = 0.5                                # ties at whatever threshold falls on them
    results, calls = [], []
    real = cpu_kernels.sweep_
    monkeypatch.setattr(cpu_kernels, "sweep_", lambda *a, **k: (calls.append(k.get("thresholds")), real(*a, **k)))
    for enabled in (False, True):
        monkeypatch.setattr(cpu_kernels, "available", lambda enabled=enabled: enabled)
        ps = [p.clone() for p in start]
        estimator = SparseMeZO(eps=1e-3, fraction=0.25, distribution="rademacher",
                               backend=SparseBackend(CPUFastBackend()))
        masks = []
        for step, seed in enumerate((11, 12, 13)):
            loss = lambda: float(sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(ps)))   # noqa: E731
            e = estimator.estimate(ps, loss, [seed], step=step)
            estimator.backend.add_noise_(ps, seed, -0.01 * e.directions[0][1], "rademacher")   # the ZO-SGD update
            masks.append([m.clone() for m in estimator.backend.masks])
            assert not estimator.backend.thresholds   # every mask was made within the step
        results.append((ps, masks, e.extra["perturbed"]))
    (plain, plain_masks, plain_share), (swept, swept_masks, swept_share) = results
    assert calls and calls[0] is not None and len(calls[0]) == 3   # the fp32 tensors, not the bf16 one
    assert sum(c is not None for c in calls) == 3                  # once per step: the first probe's pass
    for a, b in zip(plain, swept):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    for step_a, step_b in zip(plain_masks, swept_masks):
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
    assert swept_share == plain_share and 0.24 < swept_share < 0.3
