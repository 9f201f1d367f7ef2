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


def test_ambiguity_outside_the_unit_interval_is_refused_and_nan_flags_one_item():
    with pytest.raises(ValueError, match=r"ambiguity must lie in \[0, 1\].*item 1 is 1\.5"):
        ambiguity_weights(torch.tensor([0.2, 1.5]), mode="static")
    with pytest.raises(ValueError, match=r"item 0 is -0\.1"):
        ambiguity_weights(torch.tensor([-0.1, 0.5]), mode="dynamic")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got nan"):
        ambiguity_weights(torch.tensor([0.5]), alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -1"):
        ambiguity_weights(torch.tensor([0.5]), alpha=-1.0)
    a = torch.tensor([0.1, float("nan"), 0.9, 0.5])
    w = ambiguity_weights(a, mode="dynamic", temperature=0.5)
    assert torch.isnan(w[1]) and torch.isfinite(w[[0, 2, 3]]).all()
    # the finite items' weights are those of the batch without the unreadable one
    torch.testing.assert_close(w[[0, 2, 3]], ambiguity_weights(a[[0, 2, 3]], mode="dynamic", temperature=0.5))
    assert torch.isnan(ambiguity_weights(a, mode="static")[1])
