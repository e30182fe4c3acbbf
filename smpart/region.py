"""The one entry point of the DSV3.2 decode region: ``run_region(args, path=..., workspace=...)``.

Paths (docs/ARCHITECTURE.md, "The paths and the partitioned kernel"): ``reference`` (PyTorch), ``sequential`` (standalone Triton kernels on
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
from .validate import _is_capturing, validate_region_args


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

    Production-model options (``smpart.prep``; defaults = the generic model's region)
    --------------------------------------------------------------------------------
    index_q : bf16 [T, 64, 128] or None; index_weights_raw : bf16/fp32 [T, 64] or None;
    index_cos_sin_cache : fp32/bf16 [max_pos, 64] or None (the indexer RoPE's table, rows at
    ``positions``); index_rope_interleave : bool. With ``index_q`` every path first runs the index-q
    prep (vLLM 0.33 ``fused_q`` pid 1, byte-exact) into ``index_q_fp8`` / ``index_weights``, which
    are then outputs (their input values are ignored).
    write_keys : bool, write the new keys into ``kv_cache`` (False: the caller did, e.g. vLLM's
    ``fused_norm_rope``; the partitioned kernel then reads them from the cache, no new-key patch).
    fill : bool, the -1 fill of ``topk_indices`` past each row's length (False: the caller filled it;
    the partitioned path's top-k writes each row's padding either way).
    rope_k_pe : bool, rope ``k_pe`` in place (False: untouched). rope_fused_q : bool, q_pe RoPE
    rounded as vLLM 0.33's production ``fused_q`` pid 0 (fp32 math, one rounding).
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
    index_q: torch.Tensor | None = None
    index_weights_raw: torch.Tensor | None = None
    index_cos_sin_cache: torch.Tensor | None = None
    index_rope_interleave: bool = False
    write_keys: bool = True
    fill: bool = True
    rope_k_pe: bool = True
    rope_fused_q: bool = False

    @property
    def num_tokens(self) -> int:
        """``T``, the decode tokens in the batch (``q_c.shape[0]``; with MTP, requests x ``next_n``)."""
        return self.q_c.shape[0]

    @property
    def num_heads(self) -> int:
        """``H``, the attention heads (``q_b_proj_weight.shape[0] // dims.QK_HEAD_DIM``, 192 per head)."""
        return self.q_b_proj_weight.shape[0] // dims.QK_HEAD_DIM

    def to(self, device) -> "RegionArgs":
        """A copy with every tensor field moved to ``device`` (``torch.Tensor.to``; dtypes kept).

        Parameters
        ----------
        device : torch.device or str

        Returns
        -------
        RegionArgs
            A new instance; the non-tensor fields (``next_n``, the flags) are copied as they are.
        """
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
    "vllm_v32": "smpart.vendor_v32:run_vllm_v32",
    "vllm_v32_dual_stream": "smpart.vendor_v32:run_vllm_v32_dual_stream",
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


# which paths take a ``config`` and of what type (the others refuse one: it would be ignored)
_CONFIG_TYPES = {"partitioned": "PartitionConfig", "green_ctx": "(indexer_sms, gemm_sms)",
                 "vllm_sequential": "dict", "vllm_dual_stream": "dict", "vllm_v32": "dict",
                 "vllm_v32_dual_stream": "dict"}
# vLLM's generic-model baselines run the generic region only (their key write, fill and RoPE launches);
# vllm_v32* need the production model's inputs (smpart.prep)
_TOPK_BACKENDS = ("auto", "cooperative", "persistent", "per_row")  # smpart.vendor._vllm_topk
_GENERIC_ONLY = ("vllm_sequential", "vllm_dual_stream")
_PRODUCTION_ONLY = ("vllm_v32", "vllm_v32_dual_stream")


def _check_config(path: str, config) -> None:
    """``config`` must be ``None`` or what ``path`` reads (see ``_CONFIG_TYPES``)."""
    if config is None:
        return
    want = _CONFIG_TYPES.get(path)
    if want is None:
        raise ValueError(f"config: path {path!r} takes no config (it would be ignored), got {type(config).__name__}")
    if want == "PartitionConfig":
        from .triton_kernels.partitioned import PartitionConfig

        if not isinstance(config, PartitionConfig):
            raise TypeError(f"config: expected a PartitionConfig or None, got {type(config).__name__}")
    elif want == "dict":
        if not isinstance(config, dict):
            raise TypeError(f"config: path {path!r} expects a dict or None, got {type(config).__name__}")
        unknown = set(config) - {"topk_backend", "max_model_len"}
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)} for path {path!r}")
        # the values too: the vendor paths read them only after their first launches
        backend = config.get("topk_backend", "auto")
        if backend not in _TOPK_BACKENDS:
            raise ValueError(f"config.topk_backend: expected one of {_TOPK_BACKENDS}, got {backend!r}")
        mml = config.get("max_model_len")
        if mml is not None and type(mml) is not int:
            raise TypeError(f"config.max_model_len: expected an int or None, got {mml!r}")
        if mml is not None and mml < 1:
            raise ValueError(f"config.max_model_len: expected >= 1, got {mml}")
    else:
        ok = (isinstance(config, tuple) and len(config) == 2
              and all(type(x) is int and x >= 1 for x in config))
        if not ok:
            raise TypeError(f"config: path {path!r} expects a tuple of two SM counts >= 1, got {config!r}")


def _check_aliasing(args, workspace) -> None:
    """No output (``kv_cache``, ``topk_indices``, ``q``, ``k_pe``, the workspace's buffers) may overlap
    itself, another output or an input (:func:`smpart.triton_kernels.aliasing.check_no_overlap`)."""
    from .triton_kernels.aliasing import check_no_overlap

    out_names = ("kv_cache", "topk_indices", "q", "k_pe")
    if getattr(args, "index_q", None) is not None:  # the index-q prep writes them
        out_names += ("index_q_fp8", "index_weights")
    outputs = {n: getattr(args, n) for n in out_names}
    if workspace is not None:
        outputs.update(workspace.buffers())
    inputs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
              if f.name not in out_names and isinstance(getattr(args, f.name), torch.Tensor)}
    check_no_overlap(outputs, inputs)


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
        bucket (required by every path but ``reference``, which ignores it; made once, reused across
        steps). Every buffer is checked against the batch (``RegionWorkspace.check_fits``, metadata
        only); in eager mode a workspace with non-zero arrival counters is refused
        (``RegionWorkspace.check_clean``; ``RegionWorkspace.reset()`` clears them).
    config : path-specific launch parameters, ``None`` = the tuned or default choice:
        ``partitioned`` a ``PartitionConfig``; ``green_ctx`` a tuple ``(indexer_sms, gemm_sms)``;
        ``vllm_*`` a dict (``topk_backend``: ``auto`` / ``cooperative`` / ``persistent`` / ``per_row``;
        ``max_model_len``: int >= 1, DeepGEMM's logits width). The other paths take none.
    use_ue8m0 : bool, power-of-two activation/key scales (vLLM 0.33 on Hopper); False = plain fp32.
    check_values : bool or None, see :func:`validate_region_args` (default: on unless capturing a
        CUDA graph).

    Raises
    ------
    ValueError / TypeError : bad inputs (before any kernel runs; nothing is written): a message
        naming the argument or field. Includes outputs that overlap themselves, each other or an
        input (``smpart.triton_kernels.aliasing``), a ``config`` the path does not take, non-bool flags.
    RuntimeError : the path cannot run here (vendor kernels or green contexts unavailable, or CPU
        tensors without ``TRITON_INTERPRET=1`` set before triton was imported).
    """
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path: expected one of {tuple(PATHS)}, got {path!r}")
    if not isinstance(args, RegionArgs):
        raise TypeError(f"args: expected a RegionArgs, got {type(args).__name__}")
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f"use_ue8m0: expected a bool, got {use_ue8m0!r}")
    if check_values is not None and not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool or None, got {check_values!r}")
    _check_config(path, config)
    from .workspace import RegionWorkspace

    if workspace is not None and not isinstance(workspace, RegionWorkspace):
        raise TypeError(f"workspace: expected a RegionWorkspace, got {type(workspace).__name__}")
    if path == "reference":
        workspace = None  # the reference allocates its own scratch (a workspace is accepted, unused)
    elif workspace is None:
        raise ValueError(f"workspace: path {path!r} needs a RegionWorkspace (RegionWorkspace.for_args(args))")
    if workspace is not None:
        validate_region_args(args, check_values=False)  # metadata first: check_fits reads args' shapes
        workspace.check_fits(args)  # metadata only: before the value checks, which read max_len
    max_len = None if workspace is None else workspace.max_len
    validate_region_args(args, max_len=max_len, check_values=check_values)
    from .prep import check_prep_args

    check_prep_args(args, check_values=check_values if check_values is not None else not _is_capturing())
    from .prep import has_prep, is_generic

    if path in _GENERIC_ONLY and not is_generic(args):
        raise ValueError(f"path: {path!r} runs the generic model's region; with the production options "
                         f"(index_q / write_keys / fill / rope_k_pe / rope_fused_q) use 'vllm_v32' or "
                         f"'vllm_v32_dual_stream'")
    if path in _PRODUCTION_ONLY and not has_prep(args):
        raise ValueError(f"path: {path!r} runs vLLM's fused_q index-q prep: give RegionArgs.index_q, "
                         f"index_weights_raw and index_cos_sin_cache (smpart.prep.to_production)")
    _check_aliasing(args, workspace)
    if workspace is not None and (check_values if check_values is not None else not _is_capturing()):
        workspace.check_clean()  # stale arrival counters (eager mode: reads them)
    if path == "reference":
        _run_reference(args, None, config, use_ue8m0)
        return
    if args.q_c.device.type == "cpu" and path != "reference" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"path {path!r}: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                           "before importing triton), or move the batch to a CUDA device")
    if args.q_c.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError(f"path {path!r}: TRITON_INTERPRET=1 was set after triton's kernels were defined, so "
                           "they are compiled for a GPU; set it before importing triton or smpart")
    load_path(path)(args, workspace, config, use_ue8m0)
