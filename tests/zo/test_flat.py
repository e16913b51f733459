"""Flat parameter buffer: views stay tied to the model through save/load and peft, and a flat
MeZO step equals the explicit formula with z drawn over the whole buffer."""
import torch
from safetensors.torch import load_file

from zoft.adapters import apply_mode, named_trainable
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.training import Trainable
from zoft.zo import SPSA, ZOSGD, TorchBackend
from zoft.zo.flat import flatten_, is_view_of


def logits(model):
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_flatten_keeps_values_and_ties_every_parameter():
    model = tiny_random_model("causal", seed=0).model
    expected = logits(model)
    params = list(named_trainable(model).values())
    before = [p.detach().clone() for p in params]
    (flat,) = flatten_(params)
    assert flat.numel() == sum(p.numel() for p in params)
    assert all(is_view_of(p, flat) for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    (again,) = flatten_(params)     # idempotent: flattening twice keeps the same buffer
    assert again.data_ptr() == flat.data_ptr() and all(is_view_of(p, flat) for p in params)
    flat.zero_()     # one write to the buffer is a write to every weight of the model
    assert all(p.abs().sum() == 0 for p in model.parameters())


def test_views_survive_save_and_load(tmp_path):
    loaded = tiny_random_model("causal", seed=0)
    named = named_trainable(loaded.model)
    (flat,) = flatten_(list(named.values()))
    flat.mul_(1.5)    # make the saved weights differ from a fresh model's
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(1, named, {"step": 1})     # safetensors: the views are written as separate tensors
    saved = load_file(str(tmp_path / "run" / "checkpoint-1" / "trainable.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in named.items())

    fresh = tiny_random_model("causal", seed=0).model
    fresh_named = named_trainable(fresh)
    (fresh_flat,) = flatten_(list(fresh_named.values()))
    Trainable(fresh_named).load(run.load_checkpoint(run.checkpoints()[-1])[0])     # the recipe's path
    fresh.load_state_dict(saved, strict=False)                                      # and torch's
    assert all(is_view_of(p, fresh_flat) for p in fresh_named.values())
    torch.testing.assert_close(fresh_flat, flat, rtol=0, atol=0)
    torch.testing.assert_close(logits(fresh), logits(loaded.model), rtol=0, atol=0)


def test_views_survive_lora_injection_and_lora_params_flatten():
    base = tiny_random_model("causal", seed=0).model
    base_named = named_trainable(base)
    (base_flat,) = flatten_(list(base_named.values()))
    model = apply_mode(base, "lora", lora_r=4, lora_alpha=8)            # peft wraps the flattened base
    assert all(is_view_of(p, base_flat) for p in base_named.values())
    lora = named_trainable(model)
    assert lora and all("lora_" in k for k in lora)
    (lora_flat,) = flatten_(list(lora.values()))
    assert all(is_view_of(p, lora_flat) for p in lora.values())
    out = logits(model)
    lora_flat.add_(0.1)                                                   # moves the adapters
    assert not torch.allclose(logits(model), out)


def test_flat_mezo_step_equals_explicit_formula_with_buffer_z():
    # z over the buffer is one stream, so it is not the per-tensor z; what must hold is the MeZO
    # formula with z = the buffer's direction split into the tensors' slices.
    model = tiny_random_model("causal", seed=0).model.double()
    named = named_trainable(model)
    params = list(named.values())
    flat_buffers = flatten_(params)
    theta0 = flat_buffers[0].clone()
    backend, eps, lr, seed = TorchBackend(), 1e-5, 1e-2, 42
    z = backend.direction(flat_buffers[0], seed, 0).double()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])

    def loss():
        return model(input_ids=ids, labels=ids).loss.item()
    with torch.no_grad():
        flat_buffers[0].copy_(theta0 + eps * z); lp = loss()
        flat_buffers[0].copy_(theta0 - eps * z); lm = loss()
        flat_buffers[0].copy_(theta0)
    expected = theta0 - lr * (lp - lm) / (2 * eps) * z

    est = SPSA(eps=eps, backend=backend)
    with torch.no_grad():
        e = est.estimate(flat_buffers, loss, [seed])
        ZOSGD().update(flat_buffers, e, lr, backend, "gaussian")
    torch.testing.assert_close(flat_buffers[0], expected, rtol=1e-9, atol=1e-12)
    # the model's own parameters moved by exactly their slice of that step
    offset = 0
    for p in params:
        n = p.numel()
        torch.testing.assert_close(p.reshape(-1), expected[offset:offset + n], rtol=1e-9, atol=1e-12)
        offset += n


def test_flat_training_run_matches_its_invariants(tmp_path):
    # end to end: a flat run trains, its checkpoints load into an unflattened model, and a flat
    # run replays bit-identically (same seeds, same buffer layout)
    from zoft import api
    small = dict(method="mezo", model="tiny-llama", task="sst2", n_train=32, n_dev=8, n_eval=8, batch_size=8,
                 max_length=48, eps=1e-2, lr=1e-3, steps=3, eval_every=3, progress=False, flat_params=True)
    r1 = api.train(small, loaded=tiny_random_model("causal", seed=0), output_dir=str(tmp_path / "a"))
    r2 = api.train(small, loaded=tiny_random_model("causal", seed=0), output_dir=str(tmp_path / "b"))
    a = load_file(str(tmp_path / "a" / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-3" / "trainable.safetensors"))
    start = named_trainable(tiny_random_model("causal", seed=0).model)
    assert a.keys() == start.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], start[k]) for k in a)
    assert r1["eval"] == r2["eval"]
