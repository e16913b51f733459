"""The shared scoring path: ZO estimate on a real (tiny) LM, candidate scores, generation, ICL."""
from pathlib import Path

import pytest
import torch

from zoft import api
from zoft.lm import CandidateScorer
from zoft.methods.icl import with_demonstrations
from zoft.models import tiny_random_model
from zoft.tasks import load_task
from zoft.zo import TorchBackend, spsa

QA_YAML = str(Path(__file__).parent / "fixtures" / "qa_small.yaml")


def scorer_for(loaded, task, max_length=64):
    return CandidateScorer(loaded.model, loaded.tokenizer, task.kind, loaded.is_masked_lm, max_length,
                           task.target_delimiter)


@pytest.mark.parametrize("task_name", ["sst2", "copa"])
def test_loss_pair_is_the_loss_of_each_half_of_the_stacked_batch(task_name):
    """Offload's dual forward reads L+ and L− from one forward over the batch stacked on itself."""
    loaded = tiny_random_model("causal", seed=0)
    task = load_task(task_name)
    examples = task.get_data(n_train=6, n_dev=2, n_eval=2, seed=0).train
    scorer = scorer_for(loaded, task)
    enc, idx = scorer.encode(examples), list(range(6))
    with torch.no_grad():
        first, second = scorer.loss_pair(enc, idx)
        single = scorer.loss(enc, idx)
        other = scorer.loss(enc, idx[:3])
    assert first.item() == pytest.approx(single.item(), abs=1e-6)
    assert second.item() == pytest.approx(single.item(), abs=1e-6)
    assert abs(other.item() - single.item()) > 1e-4   # a different batch would be told apart


@pytest.mark.parametrize("task_name", ["sst2", "copa"])
def test_zo_estimate_matches_autograd_on_tiny_lm_float64(task_name):
    loaded = tiny_random_model("causal", seed=0)
    loaded.model.double()
    task = load_task(task_name)
    examples = task.get_data(n_train=8, n_dev=2, n_eval=2, seed=0).train
    scorer = scorer_for(loaded, task)
    enc, idx = scorer.encode(examples), list(range(8))
    params = [p for p in loaded.model.parameters()]
    backend, seed = TorchBackend(), 99
    loss = scorer.loss(enc, idx)
    grads = torch.autograd.grad(loss, params)
    true = sum((g * backend.direction(p, seed, i).double()).sum() for i, (g, p) in enumerate(zip(grads, params)))
    # Llama's RMSNorm computes in float32 even in a float64 model, which leaves ~6e-5 relative
    # error at small ε; at ε = 1e-4 the O(ε²) truncation error is below that (at 1e-3 it is 0.6%).
    with torch.no_grad():
        lp, lm = spsa(params, lambda: scorer.loss(enc, idx).item(), seed, 1e-4, backend)
    assert (lp - lm) / 2e-4 == pytest.approx(true.item(), rel=2e-4)


def test_candidate_scores_equal_manual_log_likelihoods():
    loaded = tiny_random_model("causal", seed=1)
    task = load_task("copa")
    ex = task.get_data(n_train=4, n_dev=2, n_eval=2, seed=0).train[:4]
    scorer = scorer_for(loaded, task)
    enc = scorer.encode(ex)
    with torch.no_grad():
        scores, lengths = scorer.candidate_logprobs(enc, [0, 1, 2, 3])
        for i in range(4):
            for c, cont in enumerate(enc.choice_ids[i]):
                ids = torch.tensor([enc.context_ids[i] + cont])
                logp = loaded.model(ids).logits[0].log_softmax(-1)
                n = len(enc.context_ids[i])
                manual = sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont))
                assert scores[i, c].item() == pytest.approx(manual, abs=1e-4)
                assert lengths[i, c].item() == len(cont)


def test_greedy_generation_matches_a_manual_argmax_loop():
    loaded = tiny_random_model("causal", seed=2)
    task = load_task(QA_YAML)
    ex = task.get_data(n_train=4, n_dev=2, n_eval=3, seed=0).eval
    scorer = scorer_for(loaded, task, max_length=128)
    enc = scorer.encode(ex)
    texts = scorer.generate(enc, [0, 1, 2], max_new_tokens=5, until=())
    for i, text in enumerate(texts):
        ids = torch.tensor([enc.context_ids[i]])
        with torch.no_grad():
            for _ in range(5):
                nxt = loaded.model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        manual = loaded.tokenizer.decode(ids[0, len(enc.context_ids[i]):], skip_special_tokens=True).strip()
        assert text == manual


def test_generation_task_runs_zero_shot_and_mezo(tmp_path):
    loaded = tiny_random_model("causal", seed=0)
    common = dict(task=QA_YAML, model="tiny-llama", n_train=16, n_dev=8, n_eval=8, progress=False,
                  max_length=128, batch_size=4)
    zs = api.train(method="zero-shot", output_dir=str(tmp_path / "zs"), loaded=loaded, **common)
    assert set(zs["eval"]) == {"squad_f1", "exact_match"}
    mz = api.train(method="mezo", steps=4, eval_every=2, lr=1e-3, output_dir=str(tmp_path / "mz"), loaded=loaded,
                   **common)
    assert 0.0 <= mz["eval"]["squad_f1"] <= 1.0


def test_icl_prepends_demonstrations_and_truncates_from_the_left():
    loaded = tiny_random_model("causal", seed=0)
    task = load_task("sst2")
    data = task.get_data(n_train=8, n_dev=2, n_eval=2, seed=0)
    prompted = with_demonstrations(data.eval, data.train[:3], task.target_delimiter)
    demo = data.train[0]
    assert prompted[0].context.startswith(demo.context + " " + demo.choices[demo.target] + "\n\n")
    assert prompted[0].context.endswith(data.eval[0].context)
    scorer = scorer_for(loaded, task, max_length=12)
    enc = scorer.encode(prompted)
    full = loaded.tokenizer(prompted[0].context).input_ids
    assert len(enc.context_ids[0]) <= 11 and enc.context_ids[0] == full[-len(enc.context_ids[0]):]


def _labelled(contexts, labels, targets):
    from zoft.tasks.example import Example
    return [Example(context=c, choices=list(labels), target=t, answers=[labels[t]], doc={}, ref=f"t:{i}")
            for i, (c, t) in enumerate(zip(contexts, targets))]


def test_labels_sharing_their_first_tokens_score_as_the_whole_labels_in_one_row_per_example():
    """' level 0' .. ' level 3' share their first token: it moves into the context, and the label
    probabilities and loss equal those of scoring each whole label after the unfolded context."""
    from zoft.lm import common_label_tokens
    loaded = tiny_random_model("causal", seed=3)
    loaded.model.double()
    labels = ["level 0", "level 1", "level 2", "level 3"]
    contexts = ["the answer names two plastics and a test", "no idea", "it stretched more so it is better"]
    examples = _labelled(contexts, labels, [2, 0, 3])
    scorer = CandidateScorer(loaded.model, loaded.tokenizer, "classification", max_length=64)
    full = [loaded.tokenizer(" " + w, add_special_tokens=False).input_ids for w in labels]
    assert common_label_tokens([full] * 3) == full[0][:1] and all(len(f) == 2 for f in full)
    enc = scorer.encode(examples)
    assert enc.label_ids is not None and enc.label_ids.tolist() == [f[-1] for f in full]
    with torch.no_grad():
        probs = scorer.candidate_logprobs(enc, [0, 1, 2])[0].softmax(-1)
        loss = scorer.loss(enc, [0, 1, 2]).item()
        manual = torch.zeros(3, 4, dtype=torch.float64)
        for i, ex in enumerate(examples):
            context = loaded.tokenizer(ex.context).input_ids
            for c, label in enumerate(full):
                logp = loaded.model(torch.tensor([context + label])).logits[0].log_softmax(-1)
                manual[i, c] = sum(logp[len(context) - 1 + j, t] for j, t in enumerate(label))
    assert torch.allclose(probs, manual.softmax(-1), atol=1e-9)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(manual, torch.tensor([2, 0, 3])).item(), abs=1e-9)
    assert (probs.argmax(-1) == manual.argmax(-1)).all()


def test_labels_that_differ_before_their_last_token_are_not_folded():
    from zoft.lm import common_label_tokens
    assert common_label_tokens([[[1, 5], [2, 5]]]) == []            # different first tokens
    assert common_label_tokens([[[1, 5], [1, 6, 7]]]) == []         # different lengths
    assert common_label_tokens([[[1, 5], [1, 5]]]) == []            # the same last token: not told apart
    assert common_label_tokens([[[1, 5], [1, 6]], [[1, 5], [1, 7]]]) == []   # tokenised differently per example
    assert common_label_tokens([[[9, 1, 5], [9, 1, 6]]]) == [9, 1]
    loaded = tiny_random_model("causal", seed=3)
    scorer = CandidateScorer(loaded.model, loaded.tokenizer, "classification", max_length=64)
    enc = scorer.encode(_labelled(["a b c"], ["yes please", "no please"], [0]))
    assert enc.label_ids is None and enc.context_ids[0] == loaded.tokenizer("a b c").input_ids


def test_folded_rows_keep_max_length():
    loaded = tiny_random_model("causal", seed=3)
    scorer = CandidateScorer(loaded.model, loaded.tokenizer, "classification", max_length=8)
    enc = scorer.encode(_labelled([" ".join(["word"] * 40)], ["level 0", "level 1"], [1]))
    assert enc.label_ids is not None and len(enc.context_ids[0]) + 1 == 8
