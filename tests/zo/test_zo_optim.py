"""The ZO optimizer family and the newer estimators against explicit float64 formulas."""
import math

import pytest
import torch

from zoft.zo import (FZOO, LOZO, OPTIMIZERS, SPSA, LowRankBackend, TorchBackend, ZOAdam,
                     ZOSGDConservative, ZOSGDMomentum, ZOSGDSign, build_optimizer, spsa)

A = torch.linspace(0.5, 3.0, 40, dtype=torch.float64)     # L(θ) = ½ Σ aᵢθᵢ² − bᵀθ, two tensors of 30 + 10


def quadratic():
    torch.manual_seed(0)
    b = torch.randn(40, dtype=torch.float64)
    params = [torch.randn(5, 6, dtype=torch.float64), torch.randn(10, dtype=torch.float64)]

    def loss_of(ps):
        flat = torch.cat([p.reshape(-1) for p in ps])
        return (0.5 * (A * flat * flat).sum() - (b * flat).sum()).item()
    return params, (lambda: loss_of(params)), loss_of


def zs(params, seed, distribution="gaussian", backend=None):
    backend = backend or TorchBackend()
    return [backend.direction(p, seed, i, distribution).double() for i, p in enumerate(params)]


def explicit_ghat(params, loss_of, seeds, eps, distribution="gaussian"):
    """Two-sided n-SPSA estimate (1/n) Σ gᵢzᵢ from explicit copies of θ ± εz (nothing in place)."""
    ghat = [torch.zeros_like(p) for p in params]
    for s in seeds:
        z = zs(params, s, distribution)
        g = (loss_of([p + eps * zi for p, zi in zip(params, z)])
             - loss_of([p - eps * zi for p, zi in zip(params, z)])) / (2 * eps)
        ghat = [h + g * zi / len(seeds) for h, zi in zip(ghat, z)]
    return ghat


def step(opt, est, params, loss_fn, seeds, lr):
    e = est.estimate(params, loss_fn, seeds)
    opt.update(params, e, lr, est.backend, est.distribution, loss_fn=loss_fn)
    return e


def close(actual, expected, tol=1e-10):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def test_registry_and_config_agree():
    """The config takes its allowed optimizers and estimators from the registries: every registered
    name is accepted, an unregistered one is refused with the registered names listed."""
    import pytest

    from zoft.config import load_config
    from zoft.errors import ZoftError
    from zoft.zo import ESTIMATORS
    for name in OPTIMIZERS:
        assert load_config(overrides={"optimizer": name}).optimizer == name
    for name in ESTIMATORS:
        assert load_config(overrides={"estimator": name, "n_directions": 2}).estimator == name
    with pytest.raises(ZoftError, match="unknown optimizer 'sgd'; choose from " + ", ".join(OPTIMIZERS)):
        load_config(overrides={"optimizer": "sgd"})
    assert isinstance(build_optimizer("zo-adam", momentum=0.5, betas=(0.8, 0.9)), ZOAdam)


def test_momentum_two_steps_match_formula():
    params, loss_fn, loss_of = quadratic()
    eps, lr, mu = 1e-4, 0.05, 0.8
    theta = [p.clone() for p in params]
    g1 = explicit_ghat(theta, loss_of, [1, 2], eps)
    m = g1
    theta = [t - lr * mi for t, mi in zip(theta, m)]
    g2 = explicit_ghat(theta, loss_of, [3, 4], eps)
    m = [mu * mi + gi for mi, gi in zip(m, g2)]
    theta = [t - lr * mi for t, mi in zip(theta, m)]

    est, opt = SPSA(eps=eps, n_directions=2), ZOSGDMomentum(momentum=mu)
    step(opt, est, params, loss_fn, [1, 2], lr)
    step(opt, est, params, loss_fn, [3, 4], lr)
    close(params, theta, 1e-8)
    assert set(opt.state_dict()) == {"momentum.0", "momentum.1"}


@pytest.mark.parametrize("n", [1, 2])
def test_sign_moves_every_coordinate_by_lr_against_the_estimate(n):
    params, loss_fn, loss_of = quadratic()
    eps, lr = 1e-4, 0.01
    ghat = explicit_ghat(params, loss_of, list(range(n)), eps)
    expected = [p - lr * torch.sign(g) for p, g in zip(params, ghat)]
    step(ZOSGDSign(), SPSA(eps=eps, n_directions=n), params, loss_fn, list(range(n)), lr)
    close(params, expected, 1e-12)


def test_conservative_keeps_the_best_of_three_and_replays_its_choice():
    params, loss_fn, loss_of = quadratic()
    eps = 1e-4
    for lr, seed in [(0.01, 5), (50.0, 6)]:     # a sane step, then one so long both ± overshoot
        theta = [p.clone() for p in params]
        ghat = explicit_ghat(theta, loss_of, [seed], eps)
        candidates = {s: [t + s * lr * g for t, g in zip(theta, ghat)] for s in (0, -1, 1)}
        best = min(candidates, key=lambda s: loss_of(candidates[s]))
        e = step(ZOSGDConservative(), SPSA(eps=eps), params, loss_fn, [seed], lr)
        assert e.extra["conservative"] == best and e.forwards == 5
        close(params, candidates[best], 1e-9)
        replay = [t.clone() for t in theta]   # a recorded estimate re-applies without the loss
        ZOSGDConservative().update(replay, e, lr, TorchBackend(), "gaussian")
        close(replay, params, 1e-9)
    assert best == 0   # the overshooting step was rejected: θ stayed


def test_adam_two_steps_match_formula():
    params, loss_fn, loss_of = quadratic()
    eps, lr, (b1, b2), delta = 1e-4, 0.01, (0.9, 0.99), 1e-8
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, seed in enumerate([7, 8], start=1):
        g = explicit_ghat(theta, loss_of, [seed], eps)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        theta = [th - lr * (mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + delta)
                 for th, mi, vi in zip(theta, m, v)]
    opt, est = ZOAdam(betas=(b1, b2)), SPSA(eps=eps)
    step(opt, est, params, loss_fn, [7], lr)
    step(opt, est, params, loss_fn, [8], lr)
    close(params, theta, 1e-8)
    state = opt.state_dict()
    assert int(state["t"]) == 2 and state["m.0"].shape == (5, 6) and state["v.1"].shape == (10,)


def test_one_sided_spsa_formula_and_forward_count():
    params, loss_fn, loss_of = quadratic()
    eps, seeds = 1e-4, [3, 4, 5]
    l0 = loss_of(params)
    expected = [(s, (loss_of([p + eps * z for p, z in zip(params, zs(params, s))]) - l0) / eps) for s in seeds]
    before = [p.clone() for p in params]
    e = SPSA(eps=eps, n_directions=3, one_sided=True).estimate(params, loss_fn, seeds)
    assert e.forwards == 4 and e.loss == l0
    for (s, g), (s2, g2) in zip(e.directions, expected):
        assert s == s2 and g == pytest.approx(g2, rel=1e-8)
    close(params, before, 1e-12)   # restored


def test_fzoo_step_matches_paper_formula():
    params, loss_fn, loss_of = quadratic()
    eps, lr, seeds = 1e-3, 0.1, [10, 11, 12, 13]
    l0 = loss_of(params)
    us = [zs(params, s, "rademacher") for s in seeds]
    ls = [loss_of([p + eps * u for p, u in zip(params, ui)]) for ui in us]
    mean = sum(ls) / 4
    sigma = math.sqrt(sum((x - mean) ** 2 for x in ls) / 3)
    expected = [p.clone() for p in params]
    for li, ui in zip(ls, us):
        expected = [e - lr / (4 * sigma) * (li - l0) * u for e, u in zip(expected, ui)]
    est = FZOO(eps=eps, n_directions=4)
    e = step(OPTIMIZERS["zo-sgd"](), est, params, loss_fn, seeds, lr)
    assert e.forwards == 5 and e.extra["sigma"] == pytest.approx(sigma, rel=1e-9)
    close(params, expected, 1e-9)


def test_fzoo_and_every_optimizer_descend_on_the_quadratic():
    lrs = {"zo-sgd": 0.02, "zo-sgd-momentum": 0.008, "zo-sgd-sign": 0.05, "zo-sgd-cons": 0.02, "zo-adam": 0.05}
    for name, lr in lrs.items():
        for est in (SPSA(eps=1e-4), FZOO(eps=1e-4, n_directions=4)):
            params, loss_fn, loss_of = quadratic()
            torch.manual_seed(0)
            b = torch.randn(40, dtype=torch.float64)
            optimum = loss_of([(b / A)[:30].view(5, 6), (b / A)[30:]])
            start = loss_fn()
            opt = build_optimizer(name, momentum=0.5)
            for s in range(150):
                step(opt, est, params, loss_fn, [100 * s + k for k in range(est.n_directions)], lr)
            assert loss_fn() - optimum < 0.5 * (start - optimum), (name, type(est).__name__)


def test_lozo_directions_are_low_rank_lazy_and_exact():
    torch.manual_seed(0)
    w, bias = torch.randn(12, 9, dtype=torch.float64, requires_grad=True), torch.randn(9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 12, dtype=torch.float64)
    loss = lambda: torch.tanh(x @ w + bias).pow(2).sum()   # noqa: E731
    est = LOZO(eps=1e-5, rank=2, nu=3, seed=1)
    z_at = {}
    for step_ in (0, 2, 3):
        est.backend.v_seed = 0
        e = est.estimate([w.detach(), bias.detach()], lambda: loss().item(), [step_ + 100], step=step_)
        z = est.backend.direction(w, step_ + 100, 0)
        z_at[step_] = z
        assert torch.linalg.matrix_rank(z).item() == 2      # a rank-r matrix direction
        assert est.backend.direction(bias, step_ + 100, 1).shape == (9,)   # vectors: dense z
        # projected gradient = directional derivative along the very z LOZO used
        grads = torch.autograd.grad(loss(), [w, bias])
        true = (grads[0] * z).sum() + (grads[1] * est.backend.direction(bias, step_ + 100, 1)).sum()
        assert e.directions[0][1] == pytest.approx(true.item(), rel=1e-6)
        assert e.extra["v_seed"] == est.backend.v_seed
    # lazy V: steps 0 and 2 share the row space (same V), step 3 starts a new window
    def row_space(z):
        return torch.linalg.svd(z)[2][:2]
    same = lambda a, b: torch.linalg.matrix_rank(torch.cat([row_space(a), row_space(b)])).item()   # noqa: E731
    assert same(z_at[0], z_at[2]) == 2 and same(z_at[0], z_at[3]) == 4


def test_lowrank_backend_restores_fp32_and_bf16():
    backend = LowRankBackend(rank=2)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ps = [torch.randn(64, 32).to(dtype), torch.randn(32).to(dtype)]
        before = [p.clone() for p in ps]
        spsa(ps, lambda: 0.0, 3, 1e-3, backend)
        for p, p0 in zip(ps, before):
            if dtype == torch.float32:
                torch.testing.assert_close(p, p0, rtol=1e-6, atol=1e-6)
            else:   # the exact undo: bit-exact except where θ+εz crossed a binade (README, drift)
                assert (p == p0).float().mean().item() > 0.95
                assert ((p.float() - p0.float()).abs() <= p0.float().abs() * 2 ** -7).all()


# ----------------------------------------------------------------------------- on tiny-llama
def tiny_step(**overrides):
    """A configured MeZO step on tiny-llama and SST-2 (as the recipe builds it), plus its pieces."""
    from zoft.config import load_config
    from zoft.methods.common import prepare
    from zoft.methods.mezo import build_step, make_objective
    from zoft.models import tiny_random_model
    cfg = load_config(overrides={"method": "mezo", "model": "tiny-llama", "task": "sst2", "n_train": 32, "n_dev": 8,
                                 "n_eval": 8, "batch_size": 8, "max_length": 48, "steps": 20, "eps": 1e-2,
                                 "progress": False, **overrides})
    setup = prepare(cfg, tiny_random_model("causal", seed=0))
    model = setup.with_mode()
    scorer = setup.scorer(model)
    enc = scorer.encode(setup.data.train)
    objective = make_objective(setup, scorer, enc, setup.data.train)
    return build_step(cfg, model, objective, len(enc)), objective, cfg


def test_sign_moves_every_weight_by_exactly_lr_on_tiny_llama():
    zo, _, _ = tiny_step(optimizer="zo-sgd-sign", lr=1e-3)
    before = [p.detach().clone() for p in zo.params]
    zo.step_fn(0)
    for p, p0 in zip(zo.params, before):
        torch.testing.assert_close((p - p0).abs(), torch.full_like(p, 1e-3), rtol=1e-3, atol=1e-6)


def test_conservative_never_raises_the_batch_loss_on_tiny_llama():
    from zoft.training import batch_indices
    zo, objective, cfg = tiny_step(optimizer="zo-sgd-cons", lr=3e-2)
    choices = []
    for step_ in range(6):
        idx = batch_indices(32, cfg.batch_size, cfg.seed, step_)
        before = objective(idx)
        record = zo.step_fn(step_)
        assert objective(idx) <= before + 1e-6         # the kept point is the best of three on this batch
        assert record["forwards"] == 5
        choices.append(record["conservative"])
    assert set(choices) <= {-1, 0, 1} and any(c != 0 for c in choices)


def test_adam_first_step_is_lr_per_weight_and_state_survives_resume(tmp_path):
    zo, _, _ = tiny_step(optimizer="zo-adam", lr=1e-3)
    before = [p.detach().clone() for p in zo.params]
    zo.step_fn(0)
    for p, p0 in zip(zo.params, before):   # t=1: m̂/√v̂ = ĝ/|ĝ| = ±1 wherever ĝ ≠ 0
        moved = (p - p0).abs()
        assert torch.allclose(moved[moved > 0], torch.tensor(1e-3), rtol=1e-3)
        assert (moved > 0).float().mean() > 0.99

    from zoft import api
    from zoft.models import tiny_random_model
    from safetensors.torch import load_file
    small = dict(method="mezo", model="tiny-llama", task="sst2", n_train=32, n_dev=8, n_eval=8, batch_size=8,
                 max_length=48, eps=1e-2, lr=1e-3, optimizer="zo-adam", eval_every=2, progress=False)
    api.train(small, loaded=tiny_random_model("causal", seed=0), steps=4, output_dir=str(tmp_path / "straight"))
    api.train(small, loaded=tiny_random_model("causal", seed=0), steps=2, output_dir=str(tmp_path / "cut"))
    api.train(resume=tmp_path / "cut", loaded=tiny_random_model("causal", seed=0), steps=4)
    opt = load_file(str(tmp_path / "cut" / "checkpoint-4" / "optimizer.safetensors"))
    assert int(opt["t"]) == 4
    a = load_file(str(tmp_path / "straight" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-4" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # m, v and t came back from the checkpoint


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
@pytest.mark.parametrize("choice", [dict(optimizer="zo-sgd-momentum"), dict(optimizer="zo-sgd-sign"),
                                    dict(optimizer="zo-sgd-cons"), dict(optimizer="zo-adam"),
                                    dict(one_sided=True), dict(estimator="fzoo", n_directions=3),
                                    dict(estimator="lozo", lozo_nu=2), dict(estimator="smezo")])
def test_every_optimizer_and_estimator_trains_in_every_mode(mode, choice):
    zo, _, _ = tiny_step(mode=mode, lr=1e-3, **choice)
    before = [p.detach().clone() for p in zo.params]
    for step_ in range(2):
        record = zo.step_fn(step_)
    assert math.isfinite(record["loss"])
    assert all(not torch.equal(p, p0) for p, p0 in zip(zo.params, before))


def test_bad_optimizer_settings_are_one_line_errors():
    from zoft.config import load_config
    from zoft.errors import ZoftError
    with pytest.raises(ZoftError, match="unknown optimizer 'adam'"):
        load_config(overrides={"optimizer": "adam"})
    with pytest.raises(ZoftError, match="fzoo needs n_directions >= 2"):
        load_config(overrides={"estimator": "fzoo"})
    with pytest.raises(ZoftError, match="LOZO"):
        tiny_step(estimator="lozo", flat_params=True)
    with pytest.raises(ZoftError, match="weight_decay"):
        tiny_step(flat_params=True, weight_decay=0.1)


def test_sparse_mezo_step_matches_hand_derived_update_on_the_quadratic():
    """Sparse MeZO by hand: the mask of the 25% smallest |θ| per tensor (from θ before the step),
    z' = m ⊙ z, g from explicit copies θ ± εz', θ ← θ − lr·g·z'; the other weights do not move."""
    from zoft.zo import SparseMeZO
    params, loss_fn, loss_of = quadratic()
    eps, lr, seed = 1e-4, 0.05, 77
    masks = []
    for p in params:   # independent: sort |θ| and keep the ceil(25%) smallest
        flat = p.abs().reshape(-1)
        k = math.ceil(0.25 * flat.numel())
        masks.append((flat <= flat.sort().values[k - 1]).reshape(p.shape))
    z = [zi * m for zi, m in zip(zs(params, seed), masks)]
    g = (loss_of([p + eps * zi for p, zi in zip(params, z)])
         - loss_of([p - eps * zi for p, zi in zip(params, z)])) / (2 * eps)
    expected = [p - lr * g * zi for p, zi in zip(params, z)]
    before = [p.clone() for p in params]
    est = SparseMeZO(eps=eps, fraction=0.25)
    e = step(OPTIMIZERS["zo-sgd"](), est, params, loss_fn, [seed], lr)
    assert e.forwards == 2 and e.directions[0][1] == pytest.approx(g, rel=1e-8)
    assert e.extra["perturbed"] == pytest.approx(sum(int(m.sum()) for m in masks) / 40)
    close(params, expected, 1e-10)
    for p, p0, m in zip(params, before, masks):
        assert torch.equal(p[~m], p0[~m])   # large weights untouched, to the bit
    # and it descends: many steps shrink the loss on the quadratic
    params, loss_fn, _ = quadratic()
    start = loss_fn()
    for s in range(300):
        step(OPTIMIZERS["zo-sgd"](), SparseMeZO(eps=1e-4, fraction=0.5), params, loss_fn, [s], 0.02)
    assert loss_fn() < 0.7 * start


def test_sparse_mezo_mask_of_a_large_tensor_keeps_its_fraction_across_columns():
    """Above SAMPLE entries the threshold comes from a sample. Rows of 256 whose even columns are
    100x larger: a sample with stride 4 (numel / SAMPLE) would read only large columns and mask
    about 62% of the tensor; fixed random positions keep it at 25%, as a threshold, the same on a copy."""
    from zoft.zo.estimator import SAMPLE, small_magnitude_mask
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(4 * SAMPLE // 256, 256, generator=gen)
    p[:, ::2] *= 100
    mask = small_magnitude_mask(p, 0.25)
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    assert p.abs()[mask].max() < p.abs()[~mask].min()   # the smallest entries, not some of them
    assert torch.equal(mask, small_magnitude_mask(p.clone(), 0.25))   # a function of θ: replay rebuilds it
    out, scratch = torch.ones_like(mask), torch.full((p.numel() + 5,), float("nan"))   # stale buffers, as reused
    assert small_magnitude_mask(p, 0.25, out=out, scratch=scratch) is out and torch.equal(out, mask)
    bf16 = small_magnitude_mask(p.bfloat16(), 0.25)
    assert abs(bf16.float().mean().item() - 0.25) < 0.01


def test_sparse_mezo_trajectory_replays_bitwise(tmp_path):
    """The mask is a function of θ at each step, so replaying the trajectory rebuilds the weights exactly."""
    zo, objective, cfg = tiny_step(estimator="smezo", lr=1e-3, fused=False)
    from zoft.zo.build import build_components, build_stepper
    from zoft.zo.trajectory import Trajectory, replay_through
    start = [p.detach().clone() for p in zo.params]
    traj = Trajectory({"n_probed": 1})
    for s in range(4):
        zo.step_fn(s)
        traj.records.append(zo.stepper.last)
    trained = [p.detach().clone() for p in zo.params]
    with torch.no_grad():
        for p, s0 in zip(zo.params, start):
            p.copy_(s0)
    estimator, optimizer = build_components(cfg, "cpu")
    replay_through(build_stepper(cfg, zo.params, estimator, optimizer, fuse=False), traj)
    assert all(torch.equal(p, t) for p, t in zip(zo.params, trained))
    assert not all(torch.equal(p, s0) for p, s0 in zip(zo.params, start))
