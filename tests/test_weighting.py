"""Ambiguity and its weights: the static and dynamic forms and the warm-up schedule."""

import math

import pytest
import torch

from shala.weighting import AmbiguityWeighting, ambiguity, ambiguity_weights


def test_ambiguity_weights():
    a = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ambiguity_weights(a, mode="static", alpha=2.0), 1 + 2 * a)
    w = ambiguity_weights(a, mode="dynamic", alpha=1.0, temperature=0.5)
    assert w.mean().item() == pytest.approx(1.0)
    assert (w.diff() > 0).all()
    assert torch.allclose(ambiguity_weights(a, mode="dynamic", alpha=0.0), torch.ones(3, dtype=torch.float64))
    sharper = ambiguity_weights(a, mode="dynamic", alpha=1.0, temperature=0.1)
    assert sharper.max() > w.max()
    with pytest.raises(ValueError, match="mode must be one of"):
        ambiguity_weights(a, mode="linear")
    with pytest.raises(ValueError, match="alpha must be in"):
        ambiguity_weights(a, mode="dynamic", alpha=2.0)
    with pytest.raises(ValueError, match="temperature must be"):
        ambiguity_weights(a, mode="dynamic", temperature=0.0)


def test_ambiguity_of_hand_made_distributions():
    q = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ambiguity(q), torch.tensor([0.0, 1.0, math.log(2) / math.log(3)], dtype=torch.float64))


def test_weighting_schedule_ramps_alpha_and_none_gives_no_weights():
    a = torch.tensor([0.0, 0.5, 1.0])
    ramp = AmbiguityWeighting("static", alpha=2.0, warmup=4)
    assert [ramp.alpha_at(s) for s in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]
    torch.testing.assert_close(ramp(a, 2), 1 + a)
    torch.testing.assert_close(AmbiguityWeighting("dynamic", temperature=0.5)(a, 0),
                               ambiguity_weights(a, mode="dynamic", temperature=0.5))
    assert AmbiguityWeighting("none")(a, 3) is None
    with pytest.raises(ValueError, match="weighting must be one of"):
        AmbiguityWeighting("linear")
