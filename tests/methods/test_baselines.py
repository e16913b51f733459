"""Backprop baselines (FT, LP, LP-FT) on a tiny random causal LM and a small SST-2 sample."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.methods import finetune, linear_probe
from zoft.methods.common import Setup
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.tasks import compute_metric, load_task
from zoft.training import DivergedError


@pytest.fixture(scope="module")
def sst2():
    task = load_task("sst2")
    return task, task.get_data(n_train=32, n_dev=16, n_eval=32, seed=0)


def make_setup(sst2, kind="causal", **overrides):
    task, data = sst2
    options = {"method": "ft", "model": "tiny", "steps": 4, "batch_size": 8, "eval_batch_size": 16,
               "eval_every": 2, "lr": 1e-3, "progress": False,
               "compute_dtype": "fp32", **overrides}   # fp32: the checks compare features to 1e-5
    return Setup(load_config(overrides=options), task, data, tiny_random_model(kind, seed=0))


def tie_head(model) -> None:
    """Tie the tiny Llama's head to its input embeddings, as SmolLM2 does."""
    model.lm_head.weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- FT
def test_ft_full_lowers_the_loss_on_a_fixed_batch(sst2, tmp_path):
    # batch_size = n_train: every step sees the same 32 examples
    setup = make_setup(sst2, steps=20, batch_size=32, eval_every=10, lr=1e-3, load_best=False)
    scorer = setup.scorer()
    enc = scorer.encode(setup.data.train)
    with torch.no_grad():
        before = scorer.loss(enc, list(range(32))).item()
    result = finetune.run(setup, RunDir(tmp_path))
    with torch.no_grad():
        after = scorer.loss(enc, list(range(32))).item()
    losses = [r["loss"] for r in RunDir(tmp_path).read_metrics()]
    assert len(losses) == 20 and losses[0] == pytest.approx(before, rel=1e-5)
    assert after < 0.5 * before and losses[-1] < losses[0]
    assert result["method"] == "ft" and result["mode"] == "full" and 0 <= result["eval"]["acc"] <= 1
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["eval"] == result["eval"] and (tmp_path / "curve.png").exists()


def test_ft_lora_changes_only_lora_tensors(sst2, tmp_path):
    setup = make_setup(sst2, mode="lora", steps=3, lr=1e-2)
    before = snapshot(setup.loaded.model)
    finetune.run(setup, RunDir(tmp_path))
    after = snapshot(setup.loaded.model)   # peft injects its layers into the same model object
    lora = [k for k in after if "lora_" in k]
    assert lora and not any("lora_" in k for k in before)
    assert set(after) - set(lora) == set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)


def test_ft_weight_decay_only_on_matrices():
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    groups = finetune.make_optimizer(params, lr=0.1, weight_decay=0.5).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.5), (1, 0.0)]
    assert groups[0]["params"][0] is params[0]


class Killed(Exception):
    pass


class KilledAfterCheckpoint(RunDir):
    """A run directory whose process dies right after writing checkpoint-``at``."""

    def __init__(self, path, at: int):
        super().__init__(path)
        self.at = at

    def save_checkpoint(self, step, *args, **kwargs):
        out = super().save_checkpoint(step, *args, **kwargs)
        if step == self.at:
            raise Killed
        return out


def with_dropout(setup: Setup, p: float = 0.1) -> Setup:
    """Turn on attention dropout so the test also covers the per-step RNG."""
    for module in setup.loaded.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return setup


def test_ft_resume_is_bit_identical(sst2, tmp_path):
    options = {"steps": 6, "save_every": 3, "eval_every": 2, "lr_schedule": "linear", "warmup_steps": 2,
               "weight_decay": 0.1, "load_best": False}
    whole = with_dropout(make_setup(sst2, **options))
    finetune.run(whole, RunDir(tmp_path / "whole"))

    killed = with_dropout(make_setup(sst2, **options))
    with pytest.raises(Killed):
        finetune.run(killed, KilledAfterCheckpoint(tmp_path / "cut", at=3))
    assert [p.name for p in RunDir(tmp_path / "cut").checkpoints()] == ["checkpoint-3"]
    torch.manual_seed(1234)   # a new process: other global RNG state, a fresh model from the same seed
    resumed = with_dropout(make_setup(sst2, **options))
    finetune.run(resumed, RunDir(tmp_path / "cut"), resume=True)

    a, b = snapshot(whole.loaded.model), snapshot(resumed.loaded.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    opt_a = load_file(str(tmp_path / "whole/checkpoint-6/optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "cut/checkpoint-6/optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and "state.0.exp_avg" in opt_a and "state.0.step" in opt_a
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert opt_a["state.0.step"].item() == 6
    steps = [r["step"] for r in RunDir(tmp_path / "cut").read_metrics()]
    assert steps == list(range(1, 7))
    losses = [r["loss"] for r in RunDir(tmp_path / "whole").read_metrics()]
    assert losses == [r["loss"] for r in RunDir(tmp_path / "cut").read_metrics()]


def test_ft_stops_before_a_non_finite_step(sst2, tmp_path):
    setup = make_setup(sst2, steps=6, lr=1e20, eval_every=10, save_every=10, guard=False)   # the guard would roll back first
    with pytest.raises(DivergedError, match="training stopped before applying"):
        finetune.run(setup, RunDir(tmp_path))


# ---------------------------------------------------------------- LP
def test_lp_fit_probe_separates_an_easy_synthetic_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 20)) + 4.0 * np.eye(3, 20)[y] + 50.0   # offset: the scaler must centre
    probe = linear_probe.fit_probe(x[:200], y[:200], c=1.0)
    assert (probe.predict(x[200:]) == y[200:]).mean() > 0.95


def test_lp_matches_sklearn_on_the_same_features(sst2, tmp_path):
    setup = make_setup(sst2, method="lp")
    result = linear_probe.run(setup, RunDir(tmp_path))
    assert result["method"] == "lp" and json.loads((tmp_path / "eval.json").read_text()) == result

    scorer, data = setup.scorer(), setup.data
    feats = {name: linear_probe.extract_features(scorer, scorer.encode(getattr(data, name)), 8)
             for name in ("train", "dev", "eval")}
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=setup.cfg.lp_c, max_iter=5000))
    reference.fit(feats["train"], [ex.target for ex in data.train])
    for split in ("dev", "eval"):
        preds = reference.predict(feats[split]).tolist()
        assert result[split]["acc"] == compute_metric("acc", preds, getattr(data, split))
    assert feats["train"].shape == (32, setup.loaded.model.config.hidden_size)


def test_a_finished_lp_run_loads_with_its_probe_and_scores_as_the_probe_did(sst2, tmp_path, capsys):
    """zoft eval/score/serve and an ensemble load an LP run with its probe in the LM head: the
    label-normalised probabilities are the probe's, so predictions and confidences match eval.json."""
    setup = make_setup(sst2, method="lp")
    result = linear_probe.run(setup, RunDir(tmp_path))
    assert result["probe_head"] and (tmp_path / linear_probe.PROBE_HEAD_FILE).is_file()
    fresh = make_setup(sst2, method="lp")
    base = fresh.scorer()
    feats = {name: linear_probe.extract_features(base, base.encode(getattr(fresh.data, name)), 8)
             for name in ("train", "eval")}
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=fresh.cfg.lp_c, max_iter=5000))
    reference.fit(feats["train"], [ex.target for ex in fresh.data.train])
    scorer = linear_probe.load(fresh, RunDir(tmp_path))
    enc = scorer.encode(fresh.data.eval)
    with torch.no_grad():
        probs = scorer.candidate_logprobs(enc, list(range(len(enc))))[0].double().softmax(-1)
    assert np.allclose(probs.numpy(), reference.predict_proba(feats["eval"]), atol=1e-4)
    outputs = result["eval_outputs"]
    assert probs.argmax(-1).tolist() == outputs["predictions"]
    assert np.allclose(probs.max(-1).values.numpy(), outputs["confidences"], atol=1e-4)
    assert "keeps no" not in capsys.readouterr().err


def test_an_lp_run_without_a_probe_head_loads_the_base_lm_and_says_so(sst2, tmp_path, capsys):
    setup = make_setup(sst2, "masked", method="lp")   # a masked LM's head reads other vectors: no rows kept
    result = linear_probe.run(setup, RunDir(tmp_path))
    assert not result["probe_head"] and not (tmp_path / linear_probe.PROBE_HEAD_FILE).exists()
    assert "not kept as LM-head rows" in capsys.readouterr().err
    linear_probe.load(make_setup(sst2, "masked", method="lp"), RunDir(tmp_path))
    assert "keeps no probe_head.safetensors; scoring with the base LM" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["copa", "qa"])
@pytest.mark.parametrize("method", ["lp", "lp-ft"])
def test_lp_needs_a_classification_task(name, method, tmp_path, request):
    path = request.config.rootpath / "tests/fixtures/qa_small.yaml" if name == "qa" else name
    task = load_task(path)
    data = task.get_data(n_train=4, n_dev=2, n_eval=2, seed=0)
    cfg = load_config(overrides={"method": method, "progress": False})
    run = linear_probe.run if method == "lp" else finetune.run_lp_ft
    with pytest.raises(ZoftError, match="needs a classification task"):
        run(Setup(cfg, task, data, tiny_random_model("causal", seed=0)), RunDir(tmp_path))


# ---------------------------------------------------------------- LP-FT
@pytest.mark.parametrize("model_kind", ["causal", "causal-tied", "masked"])
def test_lp_ft_head_reproduces_the_probe(sst2, model_kind):
    setup = make_setup(sst2, kind=model_kind.split("-")[0], method="lp-ft")
    model = setup.loaded.model.eval()
    if model_kind == "causal-tied":
        tie_head(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (model_kind != "causal")   # the tiny BERT ties its decoder, like real BERTs
    scorer = setup.scorer()
    enc = scorer.encode(setup.data.train)
    embeddings = model.get_input_embeddings().weight.detach().clone()

    x = finetune.head_inputs(scorer, enc, 8)
    if model_kind != "masked":   # a causal LM's head sees exactly the LP features
        np.testing.assert_allclose(x, linear_probe.extract_features(scorer, enc, 8), rtol=1e-5, atol=1e-5)
    y = np.array([ex.target for ex in setup.data.train])
    probe = linear_probe.fit_probe(x, y, setup.cfg.lp_c)
    rows, bias = finetune.probe_to_head(probe, 2)
    finetune.install_head(model, enc.label_ids, rows, bias)

    idx = list(range(len(enc)))
    agree = (np.array(scorer.predict(enc, idx)) == probe.predict(x)).mean()
    assert agree >= 0.95
    with torch.no_grad():
        scores, _ = scorer.candidate_logprobs(enc, idx)   # per example: logits − log Z
    diff = (scores[:, 1] - scores[:, 0]).double().numpy()
    np.testing.assert_allclose(diff, probe.decision_function(x), rtol=1e-3, atol=1e-3 * np.abs(diff).max())
    # untied: the input embeddings keep their values and the head is its own tensor
    head = model.get_output_embeddings()
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    if tied:
        assert model.config.tie_word_embeddings is False


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_lp_ft_runs_and_resumes_from_its_probe_head(sst2, tmp_path, mode):
    options = {"method": "lp-ft", "mode": mode, "steps": 4, "save_every": 2, "load_best": False}
    setup = make_setup(sst2, **options)
    tie_head(setup.loaded.model)
    embeddings = setup.loaded.model.get_input_embeddings().weight.detach().clone()
    result = finetune.run_lp_ft(setup, RunDir(tmp_path))
    assert result["method"] == "lp-ft" and result["mode"] == mode and 0 < result["probe_train_acc"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["probe_train_acc"] == result["probe_train_acc"]
    saved = load_file(str(tmp_path / finetune.PROBE_HEAD_FILE))
    head = setup.loaded.model.get_output_embeddings()
    if mode == "lora":   # the head stays frozen at the probe; the embeddings are untouched
        assert torch.equal(head.weight[saved["label_ids"]], saved["rows"])
        assert torch.equal(setup.loaded.model.get_input_embeddings().weight, embeddings)
    # a finished run rebuilt on a fresh model: probe head first, then the trained tensors
    fresh = make_setup(sst2, **options)
    tie_head(fresh.loaded.model)
    assert finetune.restore_probe_head(fresh.loaded.model, tmp_path)
    again = finetune.run_lp_ft(fresh, RunDir(tmp_path), resume=True)   # all steps done: eval only
    assert again["eval"] == result["eval"]


def test_lp_ft_probe_steps_train_the_head_only(sst2, tmp_path):
    setup = make_setup(sst2, method="lp-ft", steps=2, lp_ft_probe_steps=2, lr=1e-2)
    model = setup.loaded.model
    before = snapshot(model)
    finetune.run_lp_ft(setup, RunDir(tmp_path))
    after = snapshot(model)
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight", "lm_head.bias"}
    with pytest.raises(ZoftError, match="needs a trainable head"):
        finetune.run_lp_ft(make_setup(sst2, method="lp-ft", mode="lora", lp_ft_probe_steps=1),
                           RunDir(tmp_path / "lora"))


# ---------------------------------------------------------------- LP-MeZO
def test_lp_mezo_trains_from_the_probe_head_and_resumes(sst2, tmp_path):
    from zoft.methods import mezo
    from zoft.methods.replay import rebuild
    from zoft.zo.trajectory import TrajectoryMismatch
    options = {"method": "lp-mezo", "mode": "full", "steps": 4, "save_every": 2, "lr": 1e-3, "load_best": False}
    setup = make_setup(sst2, **options)
    tie_head(setup.loaded.model)
    result = mezo.run_lp_mezo(setup, RunDir(tmp_path))
    assert result["method"] == "lp-mezo" and 0 < result["probe_train_acc"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["probe_train_acc"] == result["probe_train_acc"]
    steps = [r for r in RunDir(tmp_path).read_metrics() if "projected_grad" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["forwards"] == 2 for r in steps)
    # the head started at the probe (its bias too) and MeZO moved it: full mode trains every tensor
    saved = load_file(str(tmp_path / finetune.PROBE_HEAD_FILE))
    head = setup.loaded.model.get_output_embeddings()
    assert head.bias is not None and not torch.equal(head.weight[saved["label_ids"]], saved["rows"])
    # a finished run on a fresh model: probe head first, then the trained tensors; same eval
    fresh = make_setup(sst2, **options)
    tie_head(fresh.loaded.model)
    again = mezo.run_lp_mezo(fresh, RunDir(tmp_path), resume=True)   # all steps done: eval only
    assert again["eval"] == result["eval"]
    # its trajectory starts from the probed model, which a base model alone cannot rebuild
    with pytest.raises(TrajectoryMismatch, match="lp-mezo run starts from weights the base model alone does not give"):
        rebuild("tiny-llama", tmp_path / "trajectory.safetensors", tmp_path / "replayed")


def test_lp_mezo_defaults_to_lr_auto_as_mezo_does():
    assert load_config(overrides={"method": "lp-mezo"}).lr == "auto"
    with pytest.raises(ZoftError, match="lr must be a number, got 'auto'"):
        load_config(overrides={"method": "lp-ft", "lr": "auto"})
