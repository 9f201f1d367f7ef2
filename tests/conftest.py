"""Test configuration: Triton runs under its interpreter on CPU, and nothing is downloaded."""

import os

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def shared_data():
    """``../shared/data`` beside the checkout; tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (it ships beside the developers' checkout only)")
    return SHARED_DATA


@pytest.fixture
def fixtures():
    return FIXTURES


@pytest.fixture
def head_once(monkeypatch):
    """``(head length, result)`` of each call of the common-prefix path (:func:`shala.lm._after_common_prefix`);
    a result of None is its fallback to the plain forward."""
    from shala import lm

    calls, real = [], lm._after_common_prefix

    def spy(model, prompts, n, pad_id, cache=None):
        calls.append((n, real(model, prompts, n, pad_id, cache)))
        return calls[-1][1]

    monkeypatch.setattr(lm, "_after_common_prefix", spy)
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
