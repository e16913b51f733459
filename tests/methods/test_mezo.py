"""MeZO recipe end to end on tiny random models: modes, objectives, divergence (kills and resume: test_crash.py)."""

import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.adapters import apply_mode, named_trainable
from zoft.errors import ZoftError
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.training import DivergedError

SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=32, batch_size=8, eval_batch_size=16,
             max_length=48, progress=False)


def run_mezo(tmp_path, loaded, **kw):
    cfg = {**SMALL, "method": "mezo", "model": "tiny-llama", "steps": 6, "eval_every": 3,
           "lr": 1e-3, "output_dir": str(tmp_path / kw.pop("name", "run")), **kw}
    return api.train(cfg, loaded=loaded)


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_mezo_changes_only_trainable_weights(tmp_path, monkeypatch, mode):
    loaded = tiny_random_model("causal", seed=0)
    base = [(p, p.detach().clone()) for p in loaded.model.parameters()]
    wrapped = {}

    def capture(model, *args, **kwargs):   # keep a handle on the model the recipe trains
        wrapped["model"] = apply_mode(model, *args, **kwargs)
        wrapped["start"] = {k: v.detach().clone() for k, v in named_trainable(wrapped["model"]).items()}
        return wrapped["model"]
    monkeypatch.setattr("zoft.methods.common.apply_mode", capture)
    result = run_mezo(tmp_path, loaded, mode=mode, load_best=False)

    trained = named_trainable(wrapped["model"])
    assert all(not torch.equal(v, wrapped["start"][k]) for k, v in trained.items())
    base_changed = [not torch.equal(p, p0) for p, p0 in base]
    if mode == "full":
        assert all(base_changed)
    else:
        assert not any(base_changed)     # the pretrained weights are untouched
        assert all(("lora_" if mode == "lora" else "prompt_encoder") in k for k in trained)
    saved = load_file(str(tmp_path / "run" / "checkpoint-6" / "trainable.safetensors"))
    assert saved.keys() == trained.keys()
    assert 0.0 <= result["eval"]["acc"] <= 1.0


def test_masked_lm_mezo_runs(tmp_path):
    loaded = tiny_random_model("masked", seed=0)
    result = run_mezo(tmp_path, loaded, model="tiny-bert")
    assert result["best_dev"] is not None


@pytest.mark.parametrize("objective", ["acc", "f1"])
def test_non_differentiable_objective(tmp_path, objective):
    loaded = tiny_random_model("causal", seed=0)
    result = run_mezo(tmp_path, loaded, objective=objective, eps=1e-1, lr=1e-2)
    records = RunDir(result["run_dir"]).read_metrics()
    # the logged loss is minus the batch metric: in [-1, 0]
    assert all(-1.0 <= r["loss"] <= 0.0 for r in records)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    loaded = tiny_random_model("causal", seed=0)
    calls = {"n": 0}
    from zoft.lm import CandidateScorer
    real_loss = CandidateScorer.loss

    def flaky_loss(self, enc, idx):
        calls["n"] += 1
        return real_loss(self, enc, idx) * (float("nan") if calls["n"] > 8 else 1.0)   # step 5 goes NaN
    monkeypatch.setattr(CandidateScorer, "loss", flaky_loss)
    # steps count from 1 here as in metrics.jsonl and checkpoint-N: the 9th and 10th losses are step 5's
    # without the guard (tests/test_guard.py: with it, a NaN rolls back) the run stops
    with pytest.raises(DivergedError, match=r"step 5: loss is nan.*last good checkpoint: .*checkpoint-3"):
        run_mezo(tmp_path, loaded, steps=10, eval_every=3, guard=False)
    weights = load_file(str(tmp_path / "run" / "checkpoint-3" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())   # the NaN step was not applied


def test_unknown_method_and_option_are_clear_errors(tmp_path):
    with pytest.raises(ZoftError, match="unknown method 'sgd'"):
        api.train({**SMALL, "method": "sgd", "output_dir": str(tmp_path)})
    with pytest.raises(ZoftError, match="unknown option 'learning_rate'"):
        api.train({**SMALL, "learning_rate": 1e-3})
