"""Shared pytest setup: GPU-only tests are skipped without CUDA (with the reason)."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    reason = "needs a CUDA GPU (compiled Triton); CPU CI runs the interpreter cases instead"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device():
    """'cuda' when a GPU runs compiled kernels, else 'cpu' (interpreter)."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
