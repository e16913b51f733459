"""Fixed-shape (pre-tokenised, padded) loss and its compiled form against the scorer's eager loss."""
import warnings

import pytest
import torch

from zoft.compile import FixedShapeLoss
from zoft.errors import ZoftError
from zoft.lm import CandidateScorer
from zoft.models import tiny_random_model
from zoft.tasks import load_task


@pytest.fixture
def sst2(data_dir, monkeypatch):
    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    loaded = tiny_random_model("causal", seed=0)
    task = load_task("sst2")
    data = task.get_data(n_train=24, n_dev=8, n_eval=8, seed=0)
    scorer = CandidateScorer(loaded.model, loaded.tokenizer, task.kind, max_length=48,
                             target_delimiter=task.target_delimiter)
    return scorer, scorer.encode(data.train)


def test_fixed_width_loss_equals_scorer_loss(sst2):
    # extra left padding is masked out and positions restart after it: the same function
    scorer, enc = sst2
    fixed = FixedShapeLoss(scorer, enc, width=64)
    assert fixed.ids.shape == (24, 64)
    for idx in ([0, 1, 2, 3], [5, 9, 17, 23]):
        assert fixed(idx) == pytest.approx(scorer.loss(enc, idx).item(), abs=1e-5)


def test_compiled_loss_equals_eager_within_1e4(sst2):
    # CPU inductor (mode "reduce-overhead" means "default" off CUDA); fp32, tolerance 1e-4 absolute
    scorer, enc = sst2
    eager = FixedShapeLoss(scorer, enc)
    compiled = FixedShapeLoss(scorer, enc, compile="reduce-overhead")
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a silent fallback to eager would make this test vacuous
        value = compiled([0, 1, 2, 3])     # compiles once (~5 s warm, ~60 s with a cold inductor cache)
    assert compiled.compiled
    assert value == pytest.approx(eager([0, 1, 2, 3]), abs=1e-4)
    with torch.no_grad():                  # in-place weight changes are seen by the compiled graph
        for p in scorer.model.parameters():
            p.mul_(1.01)
    assert compiled([0, 1, 2, 3]) == pytest.approx(eager([0, 1, 2, 3]), abs=1e-4)


def test_compile_failure_falls_back_to_eager_with_one_warning(sst2, monkeypatch):
    scorer, enc = sst2
    def broken(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("no backend here\nsecond line")
        return fails
    monkeypatch.setattr(torch, "compile", broken)
    fixed = FixedShapeLoss(scorer, enc, compile="default")
    with pytest.warns(UserWarning, match="falling back to eager"):
        value = fixed([0, 1])
    assert value == pytest.approx(scorer.loss(enc, [0, 1]).item(), abs=1e-5) and not fixed.compiled


def test_fixed_shape_refuses_multi_token_candidates(sst2):
    scorer, enc = sst2
    enc.label_ids = None
    with pytest.raises(ZoftError, match="single-token"):
        FixedShapeLoss(scorer, enc)


def test_cuda_graph_mode_on_a_cpu_runs_eager_with_one_warning(sst2):
    scorer, enc = sst2
    with pytest.warns(UserWarning, match="cuda-graph needs a CUDA device"):
        fixed = FixedShapeLoss(scorer, enc, compile="cuda-graph")
    assert not fixed.compiled
    assert fixed([0, 1, 2]) == pytest.approx(scorer.loss(enc, [0, 1, 2]).item(), abs=1e-5)


def test_compile_is_refused_where_weights_move():
    from zoft.config import load_config
    for moving in (dict(offload=True), dict(device_map="auto")):
        with pytest.raises(ZoftError, match="compile needs the weights at fixed addresses"):
            load_config(overrides=dict(compile="cuda-graph", **moving))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_follow_in_place_weight_changes_on_gpu(sst2):
    """The captured forward reads the weights by address: after in-place perturbations of the
    flat buffer (what a MeZO step does) the replayed loss still equals the eager loss."""
    from zoft.zo import TorchBackend
    from zoft.zo.flat import flatten_
    scorer, enc = sst2
    scorer.model.to("cuda")
    flat = flatten_([p for p in scorer.model.parameters()])
    eager = FixedShapeLoss(scorer, enc)
    graphed = FixedShapeLoss(scorer, enc, compile="cuda-graph")
    backend = TorchBackend()
    for step in range(3):
        for idx in ([0, 1, 2, 3], [4, 5, 6, 7]):
            assert graphed(idx) == pytest.approx(eager(idx), abs=1e-5)
        backend.add_noise_(flat, seed=step, scale=1e-2)
    assert graphed.compiled and len(graphed._graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_mezo_run_follows_the_eager_run_on_gpu(tmp_path, data_dir, monkeypatch):
    """A whole MeZO run (flat buffer, fused step, Triton backend) with the forward captured as a
    CUDA graph: its per-step losses match the eager fixed-shape run's within 1e-4."""
    import json

    from zoft import api
    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    losses = {}
    for mode in ("off", "cuda-graph"):
        out = tmp_path / mode
        api.train(dict(task="sst2", model="tiny-llama", method="mezo", n_train=32, n_dev=16, n_eval=16,
                       batch_size=8, max_length=48, steps=6, eval_every=3, lr=1e-3, device="cuda",
                       flat_params=True, compile=mode, progress=False,
                       output_dir=str(out)))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["cuda-graph"]) == 6
    assert losses["cuda-graph"] == pytest.approx(losses["off"], abs=1e-4)
