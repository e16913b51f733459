"""lr=auto: the probe's rule against a hand computation on a quadratic, and on tiny-llama: a finite
lr, the same for the same seed, weights left as they were, and a loss that falls."""
import math
import statistics

import pytest
import torch

from zoft.zo import SPSA, build_optimizer
from zoft.zo.auto_lr import DRIFT, DRIFT_DRAWS, FRACTION, GRID, SIGMA_PROBE, probe_lr, probe_seed

from test_zo_optim import A, quadratic, tiny_step, zs


def probe_quadratic(optimizer_name="zo-sgd", calls=None, run_steps=0.0):
    params, loss_fn, _ = quadratic()

    def counted():
        if calls is not None:
            calls.append(1)
        return loss_fn()
    result = probe_lr(params, SPSA(eps=1e-4), build_optimizer(optimizer_name, momentum=0.9),
                      train_loss=lambda p: counted, measure=lambda p: counted, seeds=lambda p: [probe_seed(0, p)],
                      run_steps=run_steps)
    return result, params


def quadratic_optima(probes=range(3)):
    """Each probe's exact one-step optimum on the quadratic, by hand: 1/zᵀAz (module docstring of auto_lr)."""
    params, _, _ = quadratic()
    return [1 / float((A * torch.cat([zi.reshape(-1) for zi in zs(params, probe_seed(0, p))]) ** 2).sum())
            for p in probes]


def test_zo_sgd_on_a_quadratic_finds_one_over_the_curvature_along_z():
    """L = ½ Σ aᵢθᵢ² − bᵀθ is exactly quadratic along any line: a step −lr·g·z changes it by
    −g²·lr + ½·g²·(zᵀAz)·lr², so the parabola through f(0) = 0 and two grid points has its bottom
    at each probe's exact optimum 1/zᵀAz, off the grid, and the choice is FRACTION × their geometric median."""
    result, _ = probe_quadratic()
    expected = quadratic_optima()
    assert result.per_probe == pytest.approx(expected, rel=1e-6)
    assert not any(x in GRID for x in result.per_probe)   # refined off the grid, not its nearest point
    assert result.lr == pytest.approx(FRACTION * sorted(expected)[1], rel=1e-6)
    assert 0.1 / float(A.sum()) < sorted(expected)[1] < 10 / float(A.sum())   # ≈ 1/tr(A): the scale-free rule


def test_the_run_length_caps_the_lr_where_its_random_walk_would_outgrow_the_weights():
    """Over T steps the updates' noise adds up to about lr·u·√T, u = |g·z| per unit lr: the lr is
    capped at DRIFT·|θ₀| / (u·√T), u the median over DRIFT_DRAWS estimates (the 3 probes' directions,
    then directions SIGMA_PROBE + i), computed here by hand. On a quadratic SPSA's g is exactly
    zᵀ∇L(θ₀), so u = |zᵀ∇L|·|z| with ∇L = Aθ₀ − b."""
    params, _, _ = quadratic()
    flat = torch.cat([p.reshape(-1) for p in params])
    torch.manual_seed(0)
    b = torch.randn(40, dtype=torch.float64)   # quadratic()'s own b: the same seed, drawn first
    grad = A * flat - b
    seeds = [probe_seed(0, p) for p in range(3)] + [probe_seed(0, SIGMA_PROBE + i) for i in range(DRIFT_DRAWS - 3)]
    moves = []
    for seed in seeds:
        z = torch.cat([zi.reshape(-1) for zi in zs(params, seed)])
        moves.append(abs(float(z @ grad)) * float(z.norm()))
    cap_one_step = DRIFT * float(flat.norm()) / statistics.median(moves)
    probes_only = DRIFT * float(flat.norm()) / sorted(moves[:3])[1]   # the rule before the extra draws
    assert not cap_one_step == pytest.approx(probes_only, rel=1e-3)    # so this test tells them apart

    short, _ = probe_quadratic(run_steps=1e-6)   # a cap far above the one-step choice: it does not bind
    assert short.lr == short.one_step and short.drift_cap == pytest.approx(cap_one_step / 1e-3, rel=1e-6)
    long, _ = probe_quadratic(run_steps=1e8)
    assert long.per_probe == short.per_probe and long.one_step == short.one_step
    # each extra estimate costs SPSA's 2 forwards; a probe without a run length spends none on them
    assert long.forwards == short.forwards == probe_quadratic()[0].forwards + 2 * (DRIFT_DRAWS - 3)
    assert long.lr == long.drift_cap == pytest.approx(cap_one_step / 1e4, rel=1e-6) and long.lr < long.one_step
    quarter, _ = probe_quadratic(run_steps=4e8)   # 4× the steps: half the lr
    assert quarter.lr == pytest.approx(long.lr / 2, rel=1e-12)
    momentum, _ = probe_quadratic("zo-sgd-momentum", run_steps=1e8)   # its walk is ĝ/(1 − μ) a step
    assert momentum.lr == pytest.approx(0.1 * long.lr, rel=1e-12)
    none, _ = probe_quadratic()
    assert none.drift_cap is None and none.lr == none.one_step
    assert {"one_step", "drift_cap"} <= set(long.record())


def probe_mapped(gain: float, norm: float, run_steps: float = 1e4):
    """The quadratic's probe with function weights gain·θ against a norm: a linear map."""
    from zoft.zo.auto_lr import FunctionWeights
    params, loss_fn, _ = quadratic()
    return probe_lr(params, SPSA(eps=1e-4), build_optimizer("zo-sgd"), train_loss=lambda p: loss_fn,
                    measure=lambda p: loss_fn, seeds=lambda p: [probe_seed(0, p)], run_steps=run_steps,
                    function_weights=FunctionWeights(changes=lambda: [gain * q for q in params], norm=norm))


def test_function_weights_cap_where_their_simulated_walk_reaches_the_drift():
    """A linear map's walk is linear in lr·√T, so the cap is proportional to the norm, inversely to
    the map's gain, and to 1/√T (to the bisection's 10^(1/1024)); the one-step rule is unchanged."""
    plain, _ = probe_quadratic(run_steps=1e4)
    base = probe_mapped(3.0, 5.0)
    assert base.per_probe == plain.per_probe and base.one_step == plain.one_step
    assert base.walk_sigma is not None and plain.walk_sigma is None
    step = 10 ** (1 / 1024)
    assert probe_mapped(3.0, 10.0).drift_cap / base.drift_cap == pytest.approx(2, rel=step - 1)
    assert probe_mapped(6.0, 5.0).drift_cap / base.drift_cap == pytest.approx(0.5, rel=step - 1)
    assert probe_mapped(3.0, 5.0, run_steps=4e4).drift_cap == pytest.approx(base.drift_cap / 2, rel=1e-12)


def test_lora_cap_is_where_a_hand_simulated_noise_walk_of_s_b_a_reaches_the_drift():
    """A toy LoRA layer (B = 0, A random, W = W₀ + s·B·A) under a quadratic loss in W. The probe's σ
    is the RMS of SIGMA_DRAWS directions' projected gradients (the probes' and extra ones), checked
    against autograd's directional derivatives zᵀ∇L in float64. Its cap is checked by an independent
    walk: run_steps real steps θ ← θ − lr·g·z at lr = the cap (g ~ N(0, σ²), z ~ N(0, I), torch's own
    generator, not zoft's backend), averaged over 40 walks, move s·B·A by FUNCTION_DRIFT·|W₀|: the
    probe's 100 simulated steps stand for 400, since the walk depends on lr·√T alone."""
    from zoft.zo.auto_lr import FUNCTION_DRIFT, SIGMA_DRAWS, SIGMA_PROBE, FunctionWeights
    torch.manual_seed(0)
    s, steps = 2.0, 400
    w0, goal = torch.randn(30, 20, dtype=torch.float64), torch.randn(30, 20, dtype=torch.float64)
    params = [torch.zeros(30, 4, dtype=torch.float64), 0.2 * torch.randn(4, 20, dtype=torch.float64)]

    def loss_of(b, a):
        return 0.5 * ((w0 + s * b @ a - goal) ** 2).sum()
    result = probe_lr(params, SPSA(eps=1e-4), build_optimizer("zo-sgd"), train_loss=lambda p: lambda: float(loss_of(*params)),
                      measure=lambda p: lambda: float(loss_of(*params)), seeds=lambda p: [probe_seed(0, p)],
                      run_steps=steps, function_weights=FunctionWeights(lambda: [s * params[0] @ params[1]],
                                                                       float(w0.norm())))
    leaves = [q.clone().requires_grad_() for q in params]
    grads = torch.autograd.grad(loss_of(*leaves), leaves)
    # σ is over SIGMA_DRAWS directions: the probes' own, then seeds(SIGMA_PROBE + i)
    probes = [probe_seed(0, p) for p in range(len(result.per_probe))]
    extra = [probe_seed(0, SIGMA_PROBE + i) for i in range(SIGMA_DRAWS - len(probes))]
    directional = [sum(float((z * g).sum()) for z, g in zip(zs(params, seed), grads)) for seed in probes + extra]
    assert len(directional) == SIGMA_DRAWS
    assert result.walk_sigma == pytest.approx(math.sqrt(sum(d * d for d in directional) / len(directional)), rel=1e-6)

    gen, walks = torch.Generator().manual_seed(1), []
    for _ in range(40):
        b, a = params[0].clone(), params[1].clone()
        for _ in range(steps):
            g = result.walk_sigma * float(torch.randn((), generator=gen, dtype=torch.float64))
            b -= result.drift_cap * g * torch.randn(b.shape, generator=gen, dtype=torch.float64)
            a -= result.drift_cap * g * torch.randn(a.shape, generator=gen, dtype=torch.float64)
        walks.append(float((s * b @ a).norm()))
    assert sum(walks) / len(walks) == pytest.approx(FUNCTION_DRIFT * float(w0.norm()), rel=0.25)
    assert result.lr == min(result.one_step, result.drift_cap)


def test_lora_changes_are_peft_scaling_times_b_times_a_against_the_base_weights():
    """The LoRA cap's yardstick, computed by hand: each adapted matrix changes by s·B·A (zero while
    B = 0) and is added to its base weight, whose norm is the scale."""
    from zoft.adapters import apply_mode, lora_changes
    from zoft.models import tiny_random_model
    model = apply_mode(tiny_random_model("causal", seed=0).model, "lora", lora_r=4, lora_alpha=8,
                       lora_targets=["q_proj", "v_proj"])
    changes, norm = lora_changes(model)
    assert all(not c.any() for c in changes())   # B = 0 at init
    torch.manual_seed(1)
    expected, base_sq = [], 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_()
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                expected.append((8 / 4) * b @ a)   # s = alpha / r
                base_sq += float(module.base_layer.weight.square().sum())
    assert len(changes()) == len(expected) > 0
    for got, want in zip(changes(), expected):
        torch.testing.assert_close(got, want)
    assert norm == pytest.approx(math.sqrt(base_sq), rel=1e-9)
    assert lora_changes(apply_mode(tiny_random_model("causal", seed=0).model, "prefix")) is None


def test_loss_noise_at_tiny_steps_does_not_end_the_scan():
    """bf16 compute makes the loss of a 1e-8 step a tiny random change either way. Noise that falls
    at the first lr and rises at the second must not stop the scan there (it once chose lr 3e-9 on
    SmolLM2): each probe still finds the quadratic's own optimum, as without noise."""
    clean, _ = probe_quadratic()
    params, loss_fn, _ = quadratic()
    calls = []

    def noisy():   # ∓1e-4 on alternate calls: above the real change of steps up to ~1e-6, far below lr*'s
        calls.append(1)
        return loss_fn() + (1e-4 if len(calls) % 2 else -1e-4)
    result = probe_lr(params, SPSA(eps=1e-4), build_optimizer("zo-sgd"), train_loss=lambda p: lambda: loss_fn(),
                      measure=lambda p: noisy, seeds=lambda p: [probe_seed(0, p)])
    assert result.per_probe == pytest.approx(clean.per_probe, rel=0.02)   # the noise moves the parabola a little
    assert min(result.per_probe) > 100 * GRID[0]


def test_a_fall_within_the_noise_of_the_smallest_steps_is_not_an_optimum():
    """bf16 rounding once gave a probe its deepest point at lr 1e-7, 10⁴× below its neighbours'
    optima. A probe whose fall is no deeper than CLEAR × |f| at the three smallest lrs is skipped and
    another batch probed. Here probe 0's loss dips at lr 1e-7 by twice the quadratic's whole possible
    fall (L(θ) − min L), so the grid's argmin is 1e-7 and only the rule can refuse it."""
    params, loss_fn, _ = quadratic()
    torch.manual_seed(0)
    b = torch.randn(40, dtype=torch.float64)   # quadratic()'s own b: the same seed, drawn first
    whole_fall = loss_fn() - float(-0.5 * (b * b / A).sum())   # L(θ) − min L = L(θ) + ½ Σ bᵢ²/aᵢ

    def judge(p):
        calls = []

        def measure():   # call 1 is L_B(θ), then one call per grid lr from GRID[0]
            calls.append(1)
            dip = p == 0 and len(calls) - 2 == GRID.index(1e-7)
            return loss_fn() - (2 * whole_fall if dip else 0.0)
        return measure
    result = probe_lr(params, SPSA(eps=1e-4), build_optimizer("zo-sgd"), train_loss=lambda p: lambda: loss_fn(),
                      measure=judge, seeds=lambda p: [probe_seed(0, p)])
    assert result.per_probe[0] is None and len(result.per_probe) == 4   # skipped; a fourth batch probed
    assert result.per_probe[1:] == pytest.approx(quadratic_optima(range(1, 4)), rel=1e-6)


def test_probe_counts_every_forward_and_leaves_the_weights_exactly():
    calls = []
    result, params = probe_quadratic(calls=calls)
    assert result.forwards == len(calls) > 3 * 3
    before, _, _ = quadratic()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_momentum_takes_the_steady_state_share_of_the_sgd_lr():
    sgd, _ = probe_quadratic("zo-sgd")
    momentum, _ = probe_quadratic("zo-sgd-momentum")   # μ = 0.9: the steady step is ĝ/(1 − μ)
    assert momentum.lr == pytest.approx(0.1 * sgd.lr, rel=1e-12)
    assert momentum.per_probe == pytest.approx(sgd.per_probe, rel=1e-12)   # its first step is the SGD step


def train_loss_mean(zo, objective) -> float:
    return sum(objective(list(range(i, i + 8))) for i in range(0, 32, 8)) / 4


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tiny_llama_lr_auto_is_finite_seeded_and_lowers_the_loss(mode):
    from zoft.methods.mezo import auto_lr
    zo, objective, cfg = tiny_step(mode=mode, lr="auto", steps=40)
    start = [p.detach().clone() for p in zo.params]
    first = auto_lr(cfg, zo, objective)
    assert all(torch.equal(p, s) for p, s in zip(zo.params, start))   # the probe restored θ to the bit
    again = auto_lr(cfg, zo, objective)
    assert (again.lr, again.forwards, again.per_probe) == (first.lr, first.forwards, first.per_probe)
    assert math.isfinite(first.lr) and GRID[0] * FRACTION <= first.lr <= GRID[-1] * FRACTION
    # both capped: full mode by the weights' norm, LoRA by that of the matrices it adapts
    assert first.drift_cap is not None and first.lr == min(first.one_step, first.drift_cap)
    assert (zo.function_weights is None) == (mode == "full")
    other_seed = auto_lr(type(cfg)(**{**cfg.to_dict(), "seed": 1}), zo, objective)
    assert other_seed.per_probe != first.per_probe or other_seed.forwards != first.forwards   # seeds matter

    cfg.lr = first.lr
    before = train_loss_mean(zo, objective)
    for step in range(40):
        zo.step_fn(step)
    zo.stepper.settle()
    assert train_loss_mean(zo, objective) < before


def test_the_cap_follows_the_runs_schedule():
    """T_eff = Σ_t (lr_t / lr)²: a linear decay to 0 adds up to about T/3, so its cap is about √3× the
    constant schedule's over the same steps, and 4× the steps halve it."""
    from zoft.methods.mezo import auto_lr
    caps = {}
    for schedule, steps in [("constant", 300), ("linear", 300), ("constant", 1200)]:
        zo, objective, cfg = tiny_step(lr="auto", steps=steps, lr_schedule=schedule)
        caps[schedule, steps] = auto_lr(cfg, zo, objective).drift_cap
    assert caps["linear", 300] / caps["constant", 300] == pytest.approx(math.sqrt(3), rel=0.01)
    assert caps["constant", 1200] == pytest.approx(caps["constant", 300] / 2, rel=1e-9)


@pytest.mark.parametrize("choice", [dict(mode="prefix"), dict(optimizer="zo-adam"), dict(optimizer="zo-sgd-sign"),
                                    dict(optimizer="zo-sgd-cons"), dict(estimator="fzoo", n_directions=3),
                                    dict(estimator="lozo", lozo_nu=2), dict(estimator="smezo")])
def test_every_mode_optimizer_and_estimator_gets_a_finite_lr(choice):
    from zoft.methods.mezo import auto_lr
    zo, objective, cfg = tiny_step(lr="auto", **choice)
    result = auto_lr(cfg, zo, objective)
    assert math.isfinite(result.lr) and result.lr > 0 and result.forwards > 0


def test_lr_auto_is_mezos_default_recorded_as_a_number_and_refused_elsewhere(tmp_path):
    from zoft import api
    from zoft.config import load_config
    from zoft.errors import ZoftError
    from zoft.models import tiny_random_model
    from zoft.runs import RunDir
    from zoft.zo.trajectory import Trajectory
    assert load_config(overrides={"method": "mezo"}).lr == "auto"
    assert load_config(overrides={"method": "ft"}).lr == 1e-6
    assert load_config(overrides={"method": "mezo", "lr": "3e-5"}).lr == 3e-5
    with pytest.raises(ZoftError, match="lr must be a number, got 'auto'"):
        load_config(overrides={"method": "ft", "lr": "auto"})
    with pytest.raises(ZoftError, match="'lr' expects a number or auto, got 'fast'"):
        load_config(overrides={"method": "mezo", "lr": "fast"})
    out = tmp_path / "run"
    api.train(dict(method="mezo", model="tiny-llama", task="sst2", n_train=32, n_dev=8, n_eval=8, batch_size=8,
                   max_length=48, steps=4, eval_every=2, eps=1e-2, progress=False, output_dir=str(out)),
              loaded=tiny_random_model("causal", seed=0))
    saved = RunDir(out).read_config()["lr"]
    first = RunDir(out).read_metrics()[0]
    assert isinstance(saved, float) and first["event"] == "lr_auto" and first["lr"] == saved
    assert first["step"] == 0 and first["forwards"] > 0
    assert {r["lr"] for r in RunDir(out).read_metrics()[1:]} == {saved}
    assert Trajectory.load(out).header["config"]["lr"] == saved   # replay reads a number too

    # a metric objective: its step is judged by the LM loss on the probe's batch
    acc = tmp_path / "acc"
    api.train(dict(method="mezo", model="tiny-llama", task="sst2", n_train=32, n_dev=8, n_eval=8, batch_size=8,
                   max_length=48, steps=2, eval_every=2, eps=0.1, objective="acc", progress=False,
                   output_dir=str(acc)), loaded=tiny_random_model("causal", seed=0))
    assert isinstance(RunDir(acc).read_config()["lr"], float)
