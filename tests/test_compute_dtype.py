"""compute_dtype: bf16 matmuls (autocast) over fp32 weights in the shared scoring path.

Tolerance: bf16 compute keeps losses and candidate log-probs within rel 1e-2 of fp32 on
tiny-llama (measured: ~1e-4), and they must differ bitwise (proof that bf16 ran).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zoft import api, lm
from zoft.compile import FixedShapeLoss
from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.lm import CandidateScorer, resolve_compute_dtype
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.tasks import load_task

REL = 1e-2
SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=32, batch_size=8, eval_batch_size=16,
             max_length=48, progress=False, model="tiny-llama")


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_random_model("causal", seed=0)
    task = load_task("sst2")
    data = task.get_data(n_train=32, n_dev=8, n_eval=8, seed=0)
    scorers = {d: CandidateScorer(loaded.model, loaded.tokenizer, task.kind, max_length=48, compute_dtype=d)
               for d in ("fp32", "bf16")}
    return loaded, scorers, scorers["fp32"].encode(data.train)


@torch.no_grad()
def test_bf16_compute_is_close_to_fp32_but_not_equal(tiny):
    _, scorers, enc = tiny
    idx = list(range(16))
    for fn in (lambda s: s.loss(enc, idx), lambda s: s.candidate_logprobs(enc, idx)[0],
               lambda s: s.candidate_logprobs(enc, idx, only_target=True)[0],   # multi-token continuation path
               lambda s: torch.stack(s.loss_pair(enc, idx))):
        a, b = fn(scorers["fp32"]), fn(scorers["bf16"])
        assert a.dtype == b.dtype == torch.float32    # log-softmax and losses stay fp32
        assert not torch.equal(a, b)                  # bf16 really ran
        torch.testing.assert_close(b, a, rtol=REL, atol=0)
    assert scorers["bf16"].predict(enc, idx) == scorers["fp32"].predict(enc, idx)


@torch.no_grad()
def test_fixed_shape_loss_runs_in_the_scorers_compute_dtype(tiny):
    _, scorers, enc = tiny
    idx = list(range(8))
    fixed = FixedShapeLoss(scorers["bf16"], enc)   # eager: same forward as the scorer, same bits
    assert fixed(idx) == scorers["bf16"].loss(enc, idx).item() != scorers["fp32"].loss(enc, idx).item()


def test_auto_resolves_per_cpu_and_weights(monkeypatch):
    model = tiny_random_model("causal", seed=0).model
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: True)
    assert resolve_compute_dtype("auto", model) == "bf16"
    assert resolve_compute_dtype("fp32", model) == "fp32"
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: False)
    assert resolve_compute_dtype("auto", model) == "fp32"
    assert resolve_compute_dtype("auto", model.to(torch.bfloat16)) == "bf16"   # the weights' own dtype


@pytest.mark.skipif(not lm.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_auto_is_bf16_on_this_cpu():
    assert resolve_compute_dtype("auto", tiny_random_model("causal", seed=0).model) == "bf16"


def test_config_refuses_unknown_compute_dtype():
    with pytest.raises(ZoftError, match="unknown compute_dtype 'fp8'"):
        load_config(overrides=["compute_dtype=fp8"])
    assert load_config(overrides=["compute_dtype=auto"]).compute_dtype == "auto"


@pytest.mark.parametrize("method", ["mezo", "ft"])
def test_bf16_runs_keep_fp32_weights_and_record_the_compute_dtype(tmp_path, method):
    loaded = tiny_random_model("causal", seed=0)
    before = [p.detach().clone() for p in loaded.model.parameters()]
    result = api.train({**SMALL, "method": method, "steps": 4, "eval_every": 2, "lr": 1e-3, "load_best": False,
                        "compute_dtype": "bf16", "output_dir": str(tmp_path / "run")}, loaded=loaded)
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, before))   # it trained
    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "trainable.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert result["compute_dtype"] == "bf16"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["compute_dtype"] == "bf16"


def _zoft(*args, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "ZOFT_FAULT"}
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | ({"ZOFT_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "zoft", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_bf16_compute_run_killed_and_resumed_is_bit_identical(tmp_path):
    """bf16 autocast on CPU is deterministic: a resumed MeZO run replays the same losses and weights."""
    common = ["train", *(f"{k}={v}" for k, v in SMALL.items()), "method=mezo", "steps=6", "eval_every=3",
              "save_every=2", "lr=1e-3", "compute_dtype=bf16"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _zoft(*common, f"output_dir={whole}").returncode == 0
    assert _zoft(*common, f"output_dir={killed}", fault="kill:step=3").returncode != 0
    done = _zoft("train", "--resume", str(killed))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(str(d / "checkpoint-6" / "trainable.safetensors")) for d in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r.get("loss") for r in RunDir(d).read_metrics()] for d in (whole, killed)]
    assert losses[0] == losses[1]


def test_every_method_and_eval_record_the_compute_dtype(tmp_path):
    from zoft import api
    small = dict(model="tiny-llama", task="sst2", n_train=16, n_dev=8, n_eval=8, max_length=48, progress=False,
                 compute_dtype="bf16")
    for method in ("zero-shot", "icl", "lp"):
        result = api.train({**small, "method": method, "icl_k": 2, "output_dir": str(tmp_path / method)})
        assert result["compute_dtype"] == "bf16", method
    assert api.evaluate(tmp_path / "zero-shot")["compute_dtype"] == "bf16"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_auto_keeps_fp32_compute_for_zo_in_lora_mode_only(tmp_path, mode):
    """MeZO-LoRA's loss differences sit below bf16's rounding (bench/eps_sweep.py), so compute_dtype=auto
    resolves to fp32 there; full mode and backprop methods keep the CPU's bf16 (where it is native)."""
    loaded = tiny_random_model("causal", seed=0)
    native = resolve_compute_dtype("auto", loaded.model)   # bf16 on a CPU with native bf16, else fp32
    result = api.train({**SMALL, "method": "mezo", "mode": mode, "steps": 2, "eval_every": 2, "lr": 1e-3,
                        "output_dir": str(tmp_path / "zo")}, loaded=loaded)
    assert result["compute_dtype"] == ("fp32" if mode == "lora" else native)
    # config.yaml records the resolved dtype, so a resume keeps it whatever auto's rule becomes
    assert RunDir(tmp_path / "zo").read_config()["compute_dtype"] == result["compute_dtype"]
    result = api.train({**SMALL, "method": "ft", "mode": mode, "steps": 1, "eval_every": 1, "lr": 1e-4,
                        "output_dir": str(tmp_path / "ft")}, loaded=tiny_random_model("causal", seed=0))
    assert result["compute_dtype"] == native
    explicit = api.train({**SMALL, "method": "mezo", "mode": mode, "steps": 1, "eval_every": 1, "lr": 1e-3,
                          "compute_dtype": "bf16", "output_dir": str(tmp_path / "asked")},
                         loaded=tiny_random_model("causal", seed=0))
    assert explicit["compute_dtype"] == "bf16"   # the caller's own choice stands
