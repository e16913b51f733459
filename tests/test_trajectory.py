"""Trajectory checkpoints: replay is bit-identical, files are small, wrong bases are refused, resume works."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.cli import main as cli_main
from zoft.errors import ZoftError
from zoft.methods.replay import rebuild
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.zo import SPSA, ZOSGD, Estimate, TorchBackend
from zoft.zo.step import zo_step
from zoft.zo.trajectory import FILENAME, Trajectory, replay

SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=32, batch_size=8, eval_batch_size=16,
             max_length=48, progress=False, method="mezo", model="tiny-llama", lr=1e-3)


def train(tmp_path, name, loaded=None, **kw):
    return api.train({**SMALL, "steps": 6, "eval_every": 3, "output_dir": str(tmp_path / name), **kw},
                     loaded=loaded or tiny_random_model("causal", seed=0))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_replay_rebuilds_trained_weights_bitwise(tmp_path, mode):
    train(tmp_path, "run", mode=mode, n_directions=2, weight_decay=0.1)
    trained = load_file(str(tmp_path / "run" / "checkpoint-6" / "trainable.safetensors"))
    out = rebuild("tiny-llama", tmp_path / "run" / FILENAME, tmp_path / "replayed", progress=False)
    replayed = load_file(str(out / "trainable.safetensors"))
    assert replayed.keys() == trained.keys()
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)
    # and replay really did something: the base weights differ from the trained ones
    base = tiny_random_model("causal", seed=0).model.state_dict()
    if mode == "full":
        assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"],
                               replayed["model.layers.0.mlp.up_proj.weight"])
    else:
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in replayed.items())   # B starts at 0


def test_replay_of_plain_zo_loop_matches_and_needs_the_exact_passes(tmp_path):
    """Replay through zo_step equals a hand-run training loop; skipping the ±ε passes does not."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    start = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(12, 5), torch.randint(0, 2, (12,))
    est, opt = SPSA(eps=1e-2, n_directions=2, backend=TorchBackend()), ZOSGD(weight_decay=0.05)
    traj = Trajectory({"n_probed": 2})
    params = list(net.parameters())
    for step in range(15):
        tape = []

        def loss():
            tape.append(torch.nn.functional.cross_entropy(net(x), y).item())
            return tape[-1]
        e = zo_step(params, loss, [100 * step, 100 * step + 1], 0.05, est, opt)
        traj.append([s for s, _ in e.directions], [g for _, g in e.directions], 0.05, tape)
    trained = [p.detach().clone() for p in params]
    again = Trajectory.load(traj.save(tmp_path / FILENAME))
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    replay(params, again, est, opt)
    assert all(torch.equal(a, b) for a, b in zip(params, trained))
    # update passes alone (no ±ε round trips) land elsewhere in fp32: replay must redo every pass
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
        for r in traj.records:
            opt.update(params, Estimate(0.0, list(zip(r.seeds, r.grads))), r.lr, est.backend, est.distribution)
    assert not all(torch.equal(a, b) for a, b in zip(params, trained))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params, trained))


def test_replay_refuses_a_changed_estimator():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10))
    est, opt = SPSA(eps=1e-3), ZOSGD()
    traj = Trajectory({"n_probed": 1})
    tape = []
    e = zo_step([w], lambda: tape.append(float((w ** 2).sum())) or tape[-1], [7], 0.1, est, opt)
    traj.append([7], [e.directions[0][1]], 0.1, tape)
    with pytest.raises(ZoftError, match="estimator differs"):
        replay([w], traj, SPSA(eps=2e-3), opt)


def test_trajectory_of_20k_steps_is_under_1mb_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    for losses_dtype in (np.float32, np.float64):   # model losses are float32; data-parallel sums are float64
        traj = Trajectory({"format": "zoft-trajectory", "version": 1, "n_probed": 1,
                           "config": {"eps": 1e-3}, "base": {"identity": "x@y"}})
        seeds = rng.integers(0, 2**62, 20_000)
        grads, losses = rng.normal(size=20_000), rng.random((20_000, 2)).astype(losses_dtype)
        for t in range(20_000):
            traj.append([int(seeds[t])], [float(grads[t])], 1e-6 * (1 - t / 20_000), losses[t].tolist())
        path = traj.save(tmp_path / f"{losses_dtype.__name__}.safetensors", state={"step": 20_000})
        size = path.stat().st_size
        assert size < 1_000_000, size
        back = Trajectory.load(path)
        assert back.steps == 20_000 and back.header["state"]["step"] == 20_000
        assert back.records[12345] == traj.records[12345]            # int64 seeds and float64 g exact
        assert back.records[-1].losses == [float(v) for v in losses[-1]]
        assert not list(tmp_path.glob(".*"))                           # no temp file left behind


def test_wrong_base_model_is_a_one_line_error(tmp_path, capsys):
    train(tmp_path, "run", steps=3, eval_every=3)
    other = tiny_random_model("causal", seed=1)      # same architecture, different weights
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    code = cli_main(["replay", str(tmp_path / "other"), str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoft: error")]
    assert code == 2 and len(errors) == 1      # (the rest of stderr is transformers' loading bar)
    assert "base model mismatch" in errors[0] and "tiny-llama@" in errors[0]
    assert not (tmp_path / "out").exists()


def test_lora_init_mismatch_is_refused(tmp_path):
    train(tmp_path, "run", mode="lora", steps=3, eval_every=3)
    path = tmp_path / "run" / FILENAME
    traj = Trajectory.load(path)
    traj.header["config"]["lora_r"] = 4     # a different adapter init than the run's: replay must refuse
    traj.save(path)
    with pytest.raises(ZoftError, match="initial trainable weights"):
        rebuild("tiny-llama", path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("estimator", ["lozo", "smezo"])
def test_replay_of_wrapped_backends_uses_the_backend_that_drew_z(tmp_path, estimator):
    """LOZO's and Sparse MeZO's backends wrap the one that draws z; the run records that one, which
    `zoft replay` can build (it once recorded "lowrank"/"sparse", which no config accepts)."""
    train(tmp_path, "run", estimator=estimator, distribution="rademacher", steps=3, eval_every=3)
    traj = Trajectory.load(tmp_path / "run" / FILENAME)
    assert traj.header["backend"] == "cpu-fast"   # rademacher on a CPU: auto resolves to it
    trained = load_file(str(tmp_path / "run" / "checkpoint-3" / "trainable.safetensors"))
    out = rebuild("tiny-llama", tmp_path / "run" / FILENAME, tmp_path / "out", progress=False)
    replayed = load_file(str(out / "trainable.safetensors"))
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)


def test_sparse_mezo_trajectory_names_its_mask_rule_and_an_older_rule_is_refused(tmp_path, capsys):
    """Replay rebuilds Sparse MeZO's masks from θ by this zoft's rule; a file whose masks came from
    another rule (before 2026-11-29 it named none) would replay without complaint onto other weights."""
    from zoft.zo.estimator import MASK_RULE
    train(tmp_path, "run", estimator="smezo", steps=3, eval_every=3)
    path = tmp_path / "run" / FILENAME
    traj = Trajectory.load(path)
    assert traj.header["smezo_mask"] == MASK_RULE
    trained = load_file(str(tmp_path / "run" / "checkpoint-3" / "trainable.safetensors"))
    replayed = load_file(str(rebuild("tiny-llama", path, tmp_path / "ok", progress=False) / "trainable.safetensors"))
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)
    del traj.header["smezo_mask"]   # as the files of the old rule were
    traj.save(path)
    capsys.readouterr()
    code = cli_main(["replay", "tiny-llama", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoft: error")]
    assert code == 2 and len(errors) == 1 and "masks by 'the exact quantile of before 2026-11-29'" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_from_trajectory_equals_uninterrupted(tmp_path, mode):
    """save_weights=false: the run keeps no weights at all, only trajectory.safetensors."""
    opts = dict(mode=mode, save_every=2, save_weights=False, load_best=False, eval_every=4)
    full = tiny_random_model("causal", seed=0)
    train(tmp_path, "full", steps=6, loaded=full, **opts)
    cut = tiny_random_model("causal", seed=0)
    train(tmp_path, "cut", steps=4, loaded=cut, **opts)        # stopped after 4 of 6 steps
    assert not RunDir(tmp_path / "cut").checkpoints()        # no weight checkpoint to resume from
    resumed = tiny_random_model("causal", seed=0)
    api.train(resume=tmp_path / "cut", loaded=resumed, steps=6)
    a = Trajectory.load(tmp_path / "full" / FILENAME)
    b = Trajectory.load(tmp_path / "cut" / FILENAME)
    assert a.records == b.records and b.header["state"]["step"] == 6
    assert [r["step"] for r in RunDir(tmp_path / "cut").read_metrics()] == list(range(1, 7))
    sa, sb = full.model.state_dict(), resumed.model.state_dict()   # trained in place (peft injects LoRA)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    out = rebuild("tiny-llama", tmp_path / "cut" / FILENAME, tmp_path / "rb", progress=False)
    assert out.is_dir() and json.loads((tmp_path / "cut" / "eval.json").read_text())["steps"] == 6
    assert math.isfinite(a.records[-1].grads[0])


def test_resume_refuses_a_backend_other_than_the_recorded_one(tmp_path):
    """A trajectory's backend is part of its identity: resuming under another one (say "auto" picking
    a new default) would draw different directions for the remaining steps."""
    import pytest

    from zoft import api
    from zoft.errors import ZoftError
    opts = dict(method="mezo", model="tiny-llama", task="sst2", n_train=16, n_dev=8, n_eval=8, max_length=48,
                batch_size=8, steps=2, eval_every=2, lr=1e-3, progress=False, output_dir=str(tmp_path / "run"),
                distribution="gaussian")   # CPU + Gaussian: "auto" resolves to torch
    api.train(opts)
    with pytest.raises(ZoftError, match="backend 'torch', this resume would use 'cpu-fast'; resume with backend=torch"):
        api.train(resume=tmp_path / "run", steps=4, backend="cpu-fast")
    assert api.train(resume=tmp_path / "run", steps=4)["steps"] == 4
