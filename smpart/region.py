"""The one entry point of the DSV3.2 decode region: ``run_region(args, path=..., workspace=...)``.

Paths (DESIGN.md 4 / 7a): ``reference`` (PyTorch), ``sequential`` (standalone Triton kernels on
one stream), ``dual_stream``, ``green_ctx``, ``partitioned`` (one persistent launch), and the
vendor variants ``vllm_sequential`` / ``vllm_dual_stream``. Every path reads the same
:class:`RegionArgs` and writes the same caller-provided buffers (``kv_cache``, ``topk_indices``,
``q``, ``k_pe``); the Triton paths allocate nothing and never sync the host, so they capture in
CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable

import torch

from .triton_kernels import dims
from .validate import validate_region_args


@dataclasses.dataclass
class RegionArgs:
    """Tensors of one decode step of the region (vLLM names; T = B * next_n rows).

    Inputs
    ------
    q_c : bf16 [T, 1536] (after ``q_a_layernorm``).
    q_b_proj_weight : float8_e4m3fn [H*192, 1536]; q_b_proj_weight_scale : fp32 [H*192/128, 12].
    positions : int64 [T]; cos_sin_cache : bf16 or fp32 [max_pos, 64] (cos | sin).
    index_q_fp8 : float8_e4m3fn [T, 64, 128]; index_weights : fp32 [T, 64]; index_k : bf16 [T, 128].
    slot_mapping : int64 [T] (-1 = padding row); block_table : int32 [B, max_blocks];
    context_lens : int32 [B] (vLLM ``seq_lens``: lengths including the new tokens).
    next_n : int, 1 or 2.

    Outputs (written in place)
    --------------------------
    kv_cache : uint8 [num_blocks, 64, 132] (the new keys are written); k_pe : bf16 [T, 1, 64]
    (roped in place; last dim unit-stride); q : bf16 [T, H, 192]; topk_indices : int32 [T, 2048].
    """

    q_c: torch.Tensor
    q_b_proj_weight: torch.Tensor
    q_b_proj_weight_scale: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    k_pe: torch.Tensor
    q: torch.Tensor
    index_q_fp8: torch.Tensor
    index_weights: torch.Tensor
    index_k: torch.Tensor
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    context_lens: torch.Tensor
    topk_indices: torch.Tensor
    next_n: int = 1

    @property
    def num_tokens(self) -> int:
        return self.q_c.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q_b_proj_weight.shape[0] // dims.QK_HEAD_DIM

    def to(self, device) -> "RegionArgs":
        """A copy with every tensor moved to ``device``."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)}
        )


PATHS: dict[str, str] = {
    # name -> "module:function" implementing it; imported on first use (``load_path``), so importing
    # this module stays cheap and no implementation module imports this one back
    "reference": "smpart.region:_run_reference",
    "sequential": "smpart.schedules:run_sequential",
    "dual_stream": "smpart.schedules:run_dual_stream",
    "green_ctx": "smpart.schedules:run_green_ctx",
    "partitioned": "smpart.partitioned:run_partitioned",
    "vllm_sequential": "smpart.vendor:run_vllm_sequential",
    "vllm_dual_stream": "smpart.vendor:run_vllm_dual_stream",
}
"""The execution paths of the region: name -> ``"module:function"`` of its implementation, a
callable ``fn(args, workspace, config, use_ue8m0) -> None``. Iterating gives the names in order."""


def load_path(name: str) -> Callable:
    """The implementation of path ``name`` (imports its module on first use).

    Raises
    ------
    ValueError : ``name`` is not in :data:`PATHS`.
    ImportError : its module cannot be imported here (a build or environment problem).
    """
    if name not in PATHS:
        raise ValueError(f"name: expected one of {tuple(PATHS)}, got {name!r}")
    module, _, attr = PATHS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _run_reference(args, workspace, config, use_ue8m0) -> None:
    """The ``reference`` path: the PyTorch reference (``smpart.reference.run_region``)."""
    from . import reference

    reference.run_region(args, use_ue8m0=use_ue8m0)


def _kernels_interpreted() -> bool:
    """Were this package's Triton kernels defined under the interpreter (``TRITON_INTERPRET=1`` at
    import time)? Setting the variable later does not change kernels already decorated."""
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_kernels.fill import _fill_topk_kernel

    return isinstance(_fill_topk_kernel, InterpretedFunction)


def run_region(args: RegionArgs, path: str = "sequential", workspace=None, config=None,
               use_ue8m0: bool = True, check_values: bool | None = None) -> None:
    """Run the decode region on one batch, writing ``kv_cache``, ``topk_indices``, ``q``, ``k_pe``.

    Parameters
    ----------
    args : RegionArgs (see its docstring for shapes and dtypes).
    path : one of :data:`PATHS` (its keys).
    workspace : :class:`smpart.workspace.RegionWorkspace` sized for this shape
        bucket (required by every path but ``reference``; made once, reused across steps).
    config : path-specific launch parameters (e.g. the partitioned split); ``None`` = the tuned or
        default choice.
    use_ue8m0 : power-of-two activation/key scales (vLLM 0.33 on Hopper); False = plain fp32 scales.
    check_values : see :func:`validate_region_args` (default: on unless capturing a CUDA graph).

    Raises
    ------
    ValueError / TypeError : bad inputs (before any kernel runs; nothing is written).
    RuntimeError : the path cannot run here (vendor kernels or green contexts unavailable, or CPU
        tensors without ``TRITON_INTERPRET=1`` set before triton was imported).
    """
    if path not in PATHS:
        raise ValueError(f"path: expected one of {tuple(PATHS)}, got {path!r}")
    if not isinstance(args, RegionArgs):
        raise TypeError(f"args: expected a RegionArgs, got {type(args).__name__}")
    from .workspace import RegionWorkspace

    if workspace is not None and not isinstance(workspace, RegionWorkspace):
        raise TypeError(f"workspace: expected a RegionWorkspace, got {type(workspace).__name__}")
    max_len = None if workspace is None else workspace.max_len
    validate_region_args(args, max_len=max_len, check_values=check_values)
    if path == "reference":
        _run_reference(args, None, config, use_ue8m0)
        return
    if workspace is None:
        raise ValueError(f"workspace: path {path!r} needs a RegionWorkspace (RegionWorkspace.for_args(args))")
    workspace.check_fits(args)
    if args.q_c.device.type == "cpu" and path != "reference" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"path {path!r}: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                           "before importing triton), or move the batch to a CUDA device")
    if args.q_c.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError(f"path {path!r}: TRITON_INTERPRET=1 was set after triton's kernels were defined, so "
                           "they are compiled for a GPU; set it before importing triton or smpart")
    load_path(path)(args, workspace, config, use_ue8m0)
