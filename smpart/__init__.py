"""smpart: one SM-partitioned persistent Triton kernel for the DeepSeek-V3.2 decode region.

The public API (imported lazily, so ``import smpart`` loads neither torch nor triton)::

    from smpart import RegionArgs, RegionWorkspace, run_region, make_decode_batch, PartitionConfig, PATHS

Layout (``pyproject.toml`` maps the repository's top-level folders to subpackages):

* ``smpart`` (``smpart/``): the runtime a user calls: :mod:`smpart.region` (``RegionArgs``,
  ``run_region``, the ``PATHS`` table), :mod:`~smpart.validate`, :mod:`~smpart.workspace`,
  :mod:`~smpart.tuning` + :mod:`~smpart.cost_model`, the path implementations
  (:mod:`~smpart.schedules`: ``sequential`` / ``dual_stream`` / ``green_ctx``;
  :mod:`~smpart.partitioned`; :mod:`~smpart.vendor`: vLLM's own kernels), the PyTorch
  :mod:`~smpart.reference`, the test-data factory :mod:`~smpart.batch` and the shared correctness
  rules :mod:`~smpart.checks`.
* ``smpart.triton_kernels`` (``triton_kernels/``): only ``@triton.jit`` kernels, each op's
  launcher and the model dims. It imports nothing from the runtime.
* ``smpart.bench`` (``bench/``): ``smpart-bench`` (grid, per-kernel table, the decode loop in
  ``smpart.bench.decode``) and ``smpart-autotune``.
* ``smpart.integration`` (``integration/``): the vLLM plugin (``SMPART_DSV32=1``).
"""

from __future__ import annotations

import importlib
import os as _os

__version__ = "0.1.0"

# Run from a source checkout without the package-dir mapping (the repository root on sys.path, or
# an editable install made by an older setuptools that only adds the root, as seen on a GPU machine
# with ``pip install --no-deps --no-build-isolation -e .``): the subpackages live beside this
# folder, so let ``smpart.triton_kernels`` / ``smpart.bench`` / ``smpart.integration`` resolve there.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_root, "pyproject.toml"))
        and _os.path.isdir(_os.path.join(_root, "triton_kernels"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "triton_kernels"))):
    __path__.append(_root)  # noqa: F821 (the package's own __path__)

# public name -> module that defines it (imported on first attribute access, PEP 562)
_EXPORTS = {
    "RegionArgs": "smpart.region",
    "run_region": "smpart.region",
    "PATHS": "smpart.region",
    "load_path": "smpart.region",
    "RegionWorkspace": "smpart.workspace",
    "make_decode_batch": "smpart.batch",
    "DecodeBatch": "smpart.batch",
    "PartitionConfig": "smpart.triton_kernels.partitioned",
    "validate_region_args": "smpart.validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smpart' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
