"""Shared pytest setup.

* Without a CUDA device, ``TRITON_INTERPRET=1`` is set here, before anything imports Triton (Triton
  reads it when a kernel is decorated), so plain ``pytest`` runs the kernels in the interpreter on a
  CPU. ``import torch`` and ``torch.cuda.is_available()`` do not import Triton.
* GPU-only tests (``@pytest.mark.gpu``) are skipped without CUDA (with the reason).
"""

import os
import sys
import warnings

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:  # too late for kernels already decorated in this process
        warnings.warn("tests/conftest.py: triton was imported before TRITON_INTERPRET=1 could be set; "
                      "run TRITON_INTERPRET=1 pytest", stacklevel=1)

import pytest  # noqa: E402


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
