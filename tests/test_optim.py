"""zoft.optim.MeZO against zoft's own MeZO step (bit for bit), explicit formulas, and its own resume."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.methods.mezo import build_step
from zoft.models import tiny_random_model
from zoft.optim import MeZO
from zoft.training import batch_indices
from zoft.zo import Objective, TorchBackend

N_TRAIN, BATCH = 8, 4


def tiny_lm():
    return tiny_random_model("causal", seed=0).model.eval()


def token_batch(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (N_TRAIN, 10), generator=torch.Generator().manual_seed(3))


def lm_loss(model, ids: torch.Tensor, idx) -> float:
    return model(input_ids=ids[idx], labels=ids[idx]).loss


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def mezo_loop(model, opt: MeZO, steps, seed=0, start=0):
    """The user's loop: zoft's batches (batch_indices), one closure per step."""
    ids = token_batch(model)
    for step in range(start, start + steps):
        idx = batch_indices(N_TRAIN, BATCH, seed, step)
        opt.step(lambda: lm_loss(model, ids, idx))


CASES = {   # zoft config overrides; MeZO takes the same settings
    "mezo": {},
    "mezo-fused": {"fused": True},
    "one-sided-momentum": {"one_sided": True, "optimizer": "zo-sgd-momentum", "momentum": 0.8},
    "fzoo-sign": {"estimator": "fzoo", "n_directions": 3, "distribution": "rademacher", "optimizer": "zo-sgd-sign"},
    "lozo-adam-decay": {"estimator": "lozo", "lozo_rank": 2, "lozo_nu": 2, "optimizer": "zo-adam",
                        "weight_decay": 0.1},
    "nspsa-cons": {"n_directions": 2, "optimizer": "zo-sgd-cons"},
}


def mezo_kwargs(over: dict) -> dict:
    kw = {k: v for k, v in over.items() if k not in ("adam_beta1", "adam_beta2")}
    return {"fused": False, **kw}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_equals_zoft_mezo_step_bit_for_bit(case, mode):
    """Three MeZO.step calls leave the weights bit for bit where three steps of `zoft train`'s
    MeZO step function (methods.mezo.build_step, same config) leave them, on a tiny Llama, full or LoRA."""
    over = CASES[case]
    model = tiny_lm()
    if mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ours, theirs = model, copy.deepcopy(model)
    before = weights(ours)
    ids = token_batch(ours)
    cfg = load_config(overrides={"model": "tiny-llama", "lr": 1e-2, "eps": 1e-2, "batch_size": BATCH,
                                 "steps": 1000, "fused": False,
                                 "distribution": "gaussian", **over})   # MeZO's own default z
    zoft_step = build_step(cfg, theirs, Objective(lambda idx: lm_loss(theirs, ids, idx).item()), N_TRAIN)
    for step in range(3):
        zoft_step.step_fn(step)
    zoft_step.stepper.settle()

    opt = MeZO(ours.parameters(), lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, **mezo_kwargs(over))
    mezo_loop(ours, opt, 3, seed=cfg.seed)
    opt.settle()

    after = weights(ours)
    assert_same(after, weights(theirs))
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert moved == trained   # every trained tensor moved, and nothing else (LoRA: the base stays put)
    assert all(p.grad is None for p in ours.parameters())


def test_one_step_is_the_explicit_mezo_update():
    """θ' = θ − lr·g·z with g = (L(θ+εz) − L(θ−εz))/2ε, computed on copies in float64."""
    torch.manual_seed(0)
    a = torch.randn(6, 5, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    loss_of = lambda w_, b_: ((a @ w_ + b_) ** 2).mean()   # noqa: E731
    theta = [w.detach().clone(), b.detach().clone()]
    lr, eps = 0.05, 1e-4
    opt = MeZO([w, b], lr=lr, eps=eps, backend="torch", seed=7)
    opt.step(lambda: loss_of(w, b))

    from zoft.zo import direction_seed
    seed = direction_seed(7, 0)
    z = [TorchBackend().direction(p, seed, i).double() for i, p in enumerate(theta)]
    g = (loss_of(*(t + eps * zi for t, zi in zip(theta, z))) - loss_of(*(t - eps * zi for t, zi in zip(theta, z)))) / (2 * eps)
    for p, t, zi in zip((w, b), theta, z):
        torch.testing.assert_close(p.detach(), t - lr * g * zi, rtol=1e-9, atol=1e-9)
    assert opt.step_count == 1 and opt.last_estimate.directions[0][0] == seed


@pytest.mark.parametrize("over", [{}, {"optimizer": "zo-sgd-momentum"}, {"optimizer": "zo-adam"},
                                  {"estimator": "lozo", "lozo_nu": 2}, {"fused": True}],
                         ids=["sgd", "momentum", "adam", "lozo", "fused"])
def test_state_dict_round_trip_resumes_exactly(tmp_path, over):
    """3 + 3 steps through torch.save / torch.load(weights_only=True) into a fresh model and a fresh
    optimizer (constructed with another seed: the saved one wins) equal 6 uninterrupted steps that
    saved at step 3 (saving settles a fused step's pending +εz, which is not bit-exact in fp32)."""
    settings = {"lr": 1e-2, "eps": 1e-2, "seed": 5, **over}
    straight = tiny_lm()
    opt = MeZO(straight.parameters(), **settings)
    mezo_loop(straight, opt, 3, seed=5)
    opt.state_dict()
    mezo_loop(straight, opt, 3, seed=5, start=3)
    opt.settle()

    first = tiny_lm()
    opt = MeZO(first.parameters(), **settings)
    mezo_loop(first, opt, 3, seed=5)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")   # settles a fused step: weights are θ now
    torch.save(first.state_dict(), tmp_path / "model.pt")

    resumed = tiny_lm()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = MeZO(resumed.parameters(), **{**settings, "seed": 99})
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert opt.step_count == 3
    mezo_loop(resumed, opt, 3, seed=5, start=3)
    opt.settle()
    assert_same(weights(resumed), weights(straight))

    # without the optimizer state the continuation differs (step 0's directions again, no momentum)
    fresh = tiny_lm()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    mezo_loop(fresh, MeZO(fresh.parameters(), **settings), 3, seed=5, start=3)
    assert not torch.equal(fresh.lm_head.weight, straight.lm_head.weight)


@pytest.mark.parametrize("bad, match", [({"estimator": "spsa2"}, "unknown estimator 'spsa2'"),
                                        ({"optimizer": "adam"}, "unknown ZO optimizer 'adam'"),
                                        ({"distribution": "uniform"}, "unknown distribution"),
                                        ({"eps": 0.0}, "eps > 0")])
def test_refuses_unknown_settings_at_construction(bad, match):
    with pytest.raises(ZoftError, match=match):
        MeZO(tiny_lm().parameters(), **bad)


def test_load_refuses_other_settings_and_foreign_dicts():
    model = tiny_lm()
    saved = MeZO(model.parameters(), optimizer="zo-adam").state_dict()
    with pytest.raises(ZoftError, match="optimizer='zo-adam'"):
        MeZO(model.parameters(), optimizer="zo-sgd").load_state_dict(saved)
    with pytest.raises(ZoftError, match="not a MeZO state dict"):
        MeZO(model.parameters()).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-sgd-momentum"])
def test_two_groups_with_equal_settings_update_as_one(optimizer):
    """Groups only split the update: z of each tensor follows its place in the list of all groups'
    tensors, so two groups (matrices, then vectors) equal one group in that order, bit for bit."""
    def split(model):
        return ([p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2])
    one, two = tiny_lm(), tiny_lm()
    matrices, vectors = split(one)
    mezo_loop(one, MeZO(matrices + vectors, lr=1e-2, eps=1e-2, weight_decay=0.1, optimizer=optimizer), 2)
    matrices, vectors = split(two)
    groups = [{"params": matrices}, {"params": vectors}]
    mezo_loop(two, MeZO(groups, lr=1e-2, eps=1e-2, weight_decay=0.1, optimizer=optimizer), 2)
    assert_same(weights(two), weights(one))


def test_group_lr_moves_only_its_group():
    """A group at lr 0 gets no update (only the fp32 rounding of the ±εz round trip, ~1e-9); the
    other moves exactly as the one-group step moves it."""
    one, two = tiny_lm(), tiny_lm()
    before = weights(two)
    mezo_loop(one, MeZO(one.parameters(), lr=1e-2, eps=1e-2), 1)
    head = [two.lm_head.weight]
    rest = [p for p in two.parameters() if p is not two.lm_head.weight]
    mezo_loop(two, MeZO([{"params": rest}, {"params": head, "lr": 0.0}], lr=1e-2, eps=1e-2), 1)
    after, expected = weights(two), weights(one)
    for name in after:
        if name == "lm_head.weight":
            torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-7)
            assert not torch.allclose(expected[name], before[name], rtol=0, atol=1e-5)   # lr 1e-2 moves it
        else:
            assert torch.equal(after[name], expected[name]), name


def test_closure_contract_frozen_tensors_and_nan():
    model = tiny_lm()
    ids = token_batch(model)
    model.lm_head.weight.requires_grad_(False)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-2)
    before = weights(model)
    with pytest.raises(ZoftError, match="needs a closure"):
        opt.step()
    assert MeZO(model.parameters(), ignore_step_without_closure=True).step() is None
    assert_same(weights(model), before)

    loss = opt.step(lambda: lm_loss(model, ids, [0, 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    after = weights(model)
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])        # requires_grad=False: untouched
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert all(p.grad is None for p in model.parameters())

    with pytest.raises(ZoftError, match="non-finite"):
        opt.step(lambda: torch.tensor(float("nan")))
    for name, value in weights(model).items():   # probed and restored (fp32 rounding), no update
        torch.testing.assert_close(value, after[name], rtol=1e-6, atol=1e-7)
    assert opt.step_count == 1
