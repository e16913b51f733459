"""The fused two-pass MeZO step: same math as the plain step, settled weights, exact resume."""
import pytest
import torch

pytest.importorskip("triton")
from zoft.models import tiny_random_model  # noqa: E402
from zoft.runs import RunDir  # noqa: E402
from zoft.training import Trainable, train_loop  # noqa: E402
from zoft.zo.cpu_backend import CPUFastBackend  # noqa: E402
from zoft.zo.fused import FusedZOSGD  # noqa: E402
from zoft.zo.perturb import TorchBackend  # noqa: E402
from zoft.zo.triton_backend import TritonBackend  # noqa: E402

BACKENDS = {"torch": TorchBackend, "triton": TritonBackend, "cpu-fast": CPUFastBackend}


def tiny_mlp(dtype, device, seed=0):
    """Two weight matrices (no biases): each tensor costs a program in the interpreter."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype) * 0.5) for s in [(8, 6), (3, 8)]]


def mlp_loss(params, x, y):
    w1, w2 = (p.double() for p in params)
    return torch.nn.functional.cross_entropy(torch.tanh(x @ w1.T) @ w2.T, y).item()


def batch(device, step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64).to(device), torch.randint(0, 3, (16,), generator=gen).to(device)


def test_fused_steps_follow_the_zo_sgd_formula_float64():
    """Independent computation: explicit z, explicit losses at θ ± εz, θ ← θ − lr·g·z (float64)."""
    params, backend, eps, lr = tiny_mlp(torch.float64, "cpu"), TorchBackend(), 1e-4, 0.05
    theta = [p.detach().clone() for p in params]
    fused = FusedZOSGD(params, backend, eps)
    for step in range(4):
        x, y = batch("cpu", step)
        fused.step(lambda: mlp_loss(params, x, y), seed=step, lr=lr, next_seed=step + 1)
        z = [backend.direction(t, step, i).double() for i, t in enumerate(theta)]
        g = (mlp_loss([t + eps * zi for t, zi in zip(theta, z)], x, y)
             - mlp_loss([t - eps * zi for t, zi in zip(theta, z)], x, y)) / (2 * eps)
        theta = [t - lr * g * zi for t, zi in zip(theta, z)]
    fused.settle()
    for p, t in zip(params, theta):
        torch.testing.assert_close(p.detach(), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cpu-fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_plain_passes_bitwise(device, backend_name, dtype):
    """Two passes per step (fused) and four (perturb, flip, restore+update separately) give the
    same weights bit for bit; settle() then removes the pending +εz."""
    backend, eps, lr = BACKENDS[backend_name](), 1e-2, 0.05
    fused_params, plain = tiny_mlp(dtype, device), tiny_mlp(dtype, device)
    fused = FusedZOSGD(fused_params, backend, eps)
    for step in range(2):
        x, y = batch(device, step)
        lp, lm, g = fused.step(lambda: mlp_loss(fused_params, x, y), seed=step, lr=lr, next_seed=step + 1)
        backend.combine_(plain, then=(step, eps))
        plain_lp = mlp_loss(plain, x, y)
        backend.combine_(plain, undo=(step, eps), then=(step, -eps))
        plain_lm = mlp_loss(plain, x, y)
        plain_g = (plain_lp - plain_lm) / (2 * eps)
        backend.combine_(plain, [(step, -lr * plain_g)], undo=(step, -eps))
        assert (lp, lm, g) == (plain_lp, plain_lm, plain_g)
    perturbed = [p.clone() for p in plain]
    backend.combine_(perturbed, then=(2, eps))       # what the fused step leaves pending
    for a, b in zip(fused_params, perturbed):
        assert torch.equal(a, b)
    fused.settle()
    for a, b in zip(fused_params, plain):   # exact unless an undo was inexact (fp32 torch, binade crossings)
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_non_finite_projected_grad_is_not_applied(device):
    params = tiny_mlp(torch.float32, device)
    theta = [p.detach().clone() for p in params]
    fused = FusedZOSGD(params, TritonBackend(), 1e-3)
    losses = iter([1.0, float("nan")])
    _, _, g = fused.step(lambda: next(losses), seed=1, lr=0.1, next_seed=2)
    assert g != g and fused.offset is None
    for p, t in zip(params, theta):
        torch.testing.assert_close(p, t, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


class Stop(Exception):
    pass


def fused_training(tmp_path, name, device, stop_at=None, resume=False):
    """A train_loop run of 5 fused MeZO steps (eval and save every 2): the final weights."""
    params = tiny_mlp(torch.float32, device, seed=1)
    fused = FusedZOSGD(params, TritonBackend(), 1e-2)

    def step_fn(step):
        if step == stop_at:
            raise Stop   # a crash after the checkpoint at step 2
        x, y = batch(device, step)
        lp, lm, g = fused.step(lambda: mlp_loss(params, x, y), seed=7 + step, lr=0.05,
                               next_seed=8 + step if step + 1 < 5 else None)
        return {"loss": (lp + lm) / 2}

    def dev_fn():
        assert fused.offset is None, "eval must see settled weights"
        return -mlp_loss(params, *batch(device, 99))

    trainable = Trainable({f"p{i}": p for i, p in enumerate(params)}, settle=fused.settle)
    run = RunDir(tmp_path / name)
    train_loop(run, steps=5, eval_every=2, save_every=2, step_fn=step_fn, dev_fn=dev_fn,
               trainable=trainable, resume=resume, progress=False)
    return run, params


def test_checkpoints_hold_theta_and_resume_is_exact(tmp_path, device):
    _, final = fused_training(tmp_path, "whole", device)
    with pytest.raises(Stop):
        fused_training(tmp_path, "crashed", device, stop_at=3)
    # the checkpoint left by the crash is θ_2 as the plain passes compute it, not θ_2 + εz_3
    backend, plain = TritonBackend(), tiny_mlp(torch.float32, device, seed=1)
    for step in range(2):
        x, y = batch(device, step)
        backend.combine_(plain, then=(7 + step, 1e-2))
        lp = mlp_loss(plain, x, y)
        backend.combine_(plain, undo=(7 + step, 1e-2), then=(7 + step, -1e-2))
        g = (lp - mlp_loss(plain, x, y)) / 2e-2
        backend.combine_(plain, [(7 + step, -0.05 * g)], undo=(7 + step, -1e-2))
    crashed = RunDir(tmp_path / "crashed")
    saved, state, _ = crashed.load_checkpoint(crashed.checkpoints()[-1])
    assert state["step"] == 2
    for i, p in enumerate(plain):
        torch.testing.assert_close(saved[f"p{i}"].to(device), p.detach(), rtol=2e-7, atol=0)
    # resuming from it replays steps 3..5 exactly
    _, resumed = fused_training(tmp_path, "crashed", device, resume=True)
    for a, b in zip(final, resumed):
        assert torch.equal(a, b)


def test_triton_trains_tiny_llama_like_torch(device):
    """Loss decrease of ZO-SGD on tiny-llama's LM head over 6 fused steps: the Triton run falls
    inside the spread of 20 torch-backend runs (different z streams, same distribution).
    Only the head rows of tokens 0..63 train (the targets are all among them): one z-block."""
    ids = torch.randint(5, 60, (8, 12), generator=torch.Generator().manual_seed(0)).to(device)
    model = tiny_random_model("causal", seed=0).model.to(device)
    head = model.lm_head.weight
    head0 = head.detach().clone()
    with torch.no_grad():   # only the head trains, so the hidden states below it are fixed
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, head.shape[1])
        full_loss = model(input_ids=ids, labels=ids).loss.item()

    def loss():
        return torch.nn.functional.cross_entropy(hidden @ head.T, ids[:, 1:].reshape(-1)).item()
    assert loss() == pytest.approx(full_loss, rel=1e-5)

    @torch.no_grad()
    def decrease(backend, seed):
        head.copy_(head0)
        fused = FusedZOSGD([head[:64]], backend, 1e-3)   # a contiguous view: updated in place
        for step in range(6):
            fused.step(loss, seed=1000 * seed + step, lr=1e-2, next_seed=1000 * seed + step + 1)
        fused.settle()
        return full_loss - loss()

    reference = torch.tensor([decrease(TorchBackend(), seed) for seed in range(20)])
    mean, std = reference.mean().item(), reference.std().item()
    assert mean > 3 * std / 20 ** 0.5                    # the torch runs do train
    triton = decrease(TritonBackend(), 0)
    print(f"loss decrease: torch {mean:.4f} ± {std:.4f} (20 runs), triton {triton:.4f}")
    assert triton > 0 and abs(triton - mean) < 4 * std


def test_mezo_recipe_with_triton_backend(tmp_path, device):
    """The recipe end to end on the Triton backend (prefix mode: one tensor, cheap in the
    interpreter): it trains, and the checkpoint is the settled θ the final eval used."""
    from zoft import api
    from safetensors.torch import load_file
    cfg = dict(task="sst2", n_train=16, n_dev=8, n_eval=8, batch_size=4, eval_batch_size=8, max_length=32,
               progress=False, method="mezo", model="tiny-llama", mode="prefix", steps=3, eval_every=3,
               lr=1e-2, backend="triton", device=device, load_best=False, output_dir=str(tmp_path / "run"))
    loaded = tiny_random_model("causal", seed=0)
    loaded.model.to(device)
    result = api.train(cfg, loaded=loaded)
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "trainable.safetensors"))
    best = load_file(str(tmp_path / "run" / "best" / "trainable.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert 0.0 <= result["eval"]["acc"] <= 1.0
