"""decision=argmax|expected: the level a classification run reports from its level probabilities."""
import pytest
import torch

from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.tasks.decision import decide, decide_one, requires_scale
from zoft.tasks import load_task


def test_expected_is_the_level_of_least_expected_squared_error():
    """Against a brute-force argmin over levels of E[(j - Y)^2], on random distributions of 2-6 levels."""
    g = torch.Generator().manual_seed(0)
    for k in range(2, 7):
        probs = torch.rand(500, k, generator=g, dtype=torch.float64) ** 3
        probs /= probs.sum(-1, keepdim=True)
        levels = torch.arange(k, dtype=torch.float64)
        loss = ((levels.view(1, k, 1) - levels.view(1, 1, k)) ** 2 * probs.unsqueeze(1)).sum(-1)   # (N, j)
        assert decide(probs, "expected") == loss.argmin(-1).tolist()
        assert decide(probs, "argmax") == probs.argmax(-1).tolist()
        if k == 2:   # on a binary scale the two rules agree
            assert decide(probs, "expected") == decide(probs, "argmax")


def test_the_rules_differ_where_quadratic_weights_say_they_should():
    assert decide_one([0.45, 0.10, 0.45], "argmax") == 0
    assert decide_one([0.45, 0.10, 0.45], "expected") == 1        # the middle is never far off
    assert decide_one([0.40, 0.0, 0.0, 0.60], "expected") == 2     # mean 1.8
    assert decide_one([0.5, 0.5], "expected") == 1                 # half-way goes up, as round-half-up
    with pytest.raises(ZoftError, match="finite level probabilities"):
        decide_one([0.5, float("nan")], "expected")


def test_expected_needs_ordered_levels(asap_offline):
    requires_scale("expected", load_task("asap-1"))
    requires_scale("argmax", load_task("cb"))
    with pytest.raises(ZoftError, match="decision=expected needs a scoring task.*'cb'"):
        requires_scale("expected", load_task("cb"))
    with pytest.raises(ZoftError, match="unknown decision 'median'"):
        load_config(overrides={"decision": "median"})
