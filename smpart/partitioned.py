"""Host side of the ``partitioned`` path: shapes a :class:`PartitionConfig` into the launches of
``smpart.triton_kernels.partitioned`` (the kernels, their protocol and the config's fields are
documented there).

``partitioned_region`` resolves ``config=None`` through the tuning cache (:mod:`smpart.tuning`),
sizes the static split with the cost model (:mod:`smpart.cost_model`) and launches the fused
kernel, then either the standalone top-k (``topk.topk``) or the top-k + GEMM tail
launch; with ``fuse_topk`` the top-k runs inside the fused launch. The top-k is the sampled one
(``sample_topk``) unless ``config.topk_config.algo == "radix"``, whose per-row histograms the
logits role fills (``RegionWorkspace.radix``). With ``topk_impl="vllm"`` (the
hybrid) the fused launch fills no histogram and vLLM 0.33's own decode top-k follows it
(:func:`_vllm_topk_launch`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings

import torch
import triton

from . import cost_model, vendor
from .prep import index_q_side
from .validate import _is_capturing
from .triton_kernels import dims
from .triton_kernels.mqa_logits import mqa_logits_runs_per_row
from .triton_kernels.partitioned import (GRID_X_MAX, PROGRAMS_PER_SM_MAX, PartitionConfig, _partitioned_kernel,
                                         _topk_gemm_tail_kernel, launch_vllm_topk_prep)
from .triton_kernels.q_b_proj import default_block_t, launch_q_c_quant
from .triton_kernels.radix_topk import TOPK_K, RadixTopkConfig, RadixTopkWorkspace, hist_fed, radix_chunk
from .triton_kernels.topk_config import programs_per_row
from .triton_kernels.topk import topk, topk_sample_constexprs


_TAIL_ALIGN = 256  # gemm_in_tail moves output columns in multiples of this (any tile height divides it)


def tail_columns(num_heads: int, gemm_in_tail: float) -> int:
    """Output columns of ``q_b_proj`` (the last ones) whose tiles run in the top-k launch: the
    fraction ``gemm_in_tail`` of ``num_heads * 192``, rounded to a multiple of 256."""
    N = num_heads * dims.QK_HEAD_DIM
    return min(N, int(round(gemm_in_tail * N / _TAIL_ALIGN)) * _TAIL_ALIGN)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a small grid keeps CPU runs short
    return torch.cuda.get_device_properties(device).multi_processor_count


def partitioned_region(args, ws, config: PartitionConfig | None = None, use_ue8m0: bool = True) -> None:
    """Run the whole region in one launch of :func:`_partitioned_kernel` (see module docstring).

    Parameters
    ----------
    args : RegionArgs (validated by the caller, ``run_region``).
    ws : RegionWorkspace (logits, zeroed counters, ``radix``: the radix top-k's histograms,
        counters and candidates for >= T rows).
    config : PartitionConfig; ``None`` = the tuned configuration of this shape bucket
        (``tuning.choose``), else the defaults with the cost model's split. A tuned
        ``topk_impl="vllm"`` runs as ``"smpart"`` where vLLM's ops do not load (one warning per process),
        and under CUDA-graph capture with a workspace whose vLLM top-k buffers were never made.

    Raises
    ------
    ValueError : a workspace without ``radix`` or with too few rows, a split out of bounds.
    RuntimeError : ``config.topk_impl="vllm"`` and vLLM's compiled ops do not load
        (``vendor.load_vllm_ops``), or its buffers are missing under CUDA-graph capture
        (``RegionWorkspace.ensure_vllm_topk``); both before any launch.
    """
    T, H, next_n = args.num_tokens, args.num_heads, args.next_n
    dev = args.q_c.device
    if config is not None and not isinstance(config, PartitionConfig):
        raise TypeError(f"config: expected a PartitionConfig or None, got {type(config).__name__}")
    if config is None:
        from . import tuning  # the tuned config of this bucket, else the cost model's split

        config = tuning.choose(T, H, next_n, ws.max_len, dev).config
        ops = _vllm_topk_ops(None) if config.topk_impl == "vllm" else None
        # vLLM's ops do not load, or a workspace made under capture (no profile run reserved it:
        # integration.ops.workspace_for) lacks their buffers, which are not allocated under capture
        if config.topk_impl == "vllm" and (ops is None or (
                (ws.vllm_topk_workspace is None or ws.vllm_topk_lens is None) and _is_capturing())):
            config, ops = dataclasses.replace(config, topk_impl="smpart"), None
    else:
        ops = _vllm_topk_ops(config) if config.topk_impl == "vllm" else None  # before any launch
    cfg = config  # field values were checked when it was made (PartitionConfig.__post_init__)
    if ops is not None:
        ws.ensure_vllm_topk()
    N = H * dims.QK_HEAD_DIM
    # the schedule does not depend on ``roles`` (a role left out keeps its programs, idle)
    tail_cols = tail_columns(H, cfg.gemm_in_tail)
    rw = ws.radix
    if not isinstance(rw, RadixTopkWorkspace):  # refused before the first launch writes anything
        raise ValueError("workspace.radix: the partitioned path needs the radix top-k's workspace "
                         "(RegionWorkspace.for_shape makes one)")
    if T > rw.max_tokens:
        raise ValueError(f"workspace.radix: holds {rw.max_tokens} rows, the batch has {T}")
    block_t = cfg.block_t or default_block_t(T)
    n_t_tiles = triton.cdiv(T, block_t)
    head_cols = N - tail_cols  # a multiple of 256, so of block_n: whole n-tiles stay in the fused launch
    n_gemm = triton.cdiv(head_cols, cfg.block_n) * n_t_tiles
    max_blocks = args.block_table.shape[1]
    max_len = ws.max_len
    # columns a row can see: its length clamped (in every kernel) to the block table's capacity and
    # the workspace, whatever context_lens says (value checks are off under CUDA graphs)
    cols = ws.visible_cols(args)
    # positions per top-k item, in every split (the fused top-k, the tail, the standalone launch)
    topk_chunk = radix_chunk(cols, cfg.topk_config)
    runs = mqa_logits_runs_per_row(max_len, max_blocks, cfg.blocks_per_item, write_neg_inf=False)
    num_sms = _num_sms(dev)
    resident = cost_model.resident_programs(num_sms, cfg.num_warps)
    dense = False  # one program per (row, run) logits item, no prefix sums
    gemm_first = False  # programs [0, n_gemm) on the GEMM tiles, the indexer's after them
    if cfg.dynamic:
        total = resident if cfg.indexer_programs is None else cfg.indexer_programs + (cfg.gemm_programs or 0)
        n_idx, n_gemm_p = total, 0
    else:
        n_idx, n_gemm_p = cfg.indexer_programs, cfg.gemm_programs
        if n_idx is None or n_gemm_p is None:
            # shapes only (no device read): every request at the bucket's capacity
            rb = cost_model.role_bytes(T, H, next_n, [cols] * (T // next_n))
            model_idx, model_gemm = cost_model.first_split(resident, rb)
            n_idx = n_idx or model_idx
            n_gemm_p = n_gemm_p or model_gemm
        if n_gemm == 0:
            # no GEMM tile in this launch: every program on the key write and the logits, with the
            # GEMM code compiled out (fewer registers, more programs per SM): one per logits item
            # of the bucket unless first_programs says otherwise
            n_idx = cfg.first_programs or max(n_idx + n_gemm_p, T * runs)
            n_gemm_p = 0
            dense = n_idx >= T * runs
        elif cfg.dense_first:
            n_idx, n_gemm_p = T * runs, min(cfg.gemm_programs or n_gemm, n_gemm)
            dense = gemm_first = True
        total = n_idx + n_gemm_p
    if n_idx < 1 or (not cfg.dynamic and n_gemm > 0 and n_gemm_p < 1):
        raise ValueError(f"config: need >= 1 program per role, got indexer={n_idx}, gemm={n_gemm_p}")
    # no role gets more programs than max(its work items, what the GPU holds at once): beyond that
    # programs are idle, and 2**31 of them exceed CUDA's grid (the interpreter would run them all)
    busy = PROGRAMS_PER_SM_MAX * num_sms
    idx_items = T + T * runs  # key-write rows, then logits items of the bucket
    if cfg.dynamic:
        _bound("indexer_programs + gemm_programs" if cfg.indexer_programs is not None else "indexer_programs",
               total, idx_items + n_gemm, busy)
    else:
        name = "first_programs" if n_gemm == 0 and cfg.first_programs is not None else "indexer_programs"
        _bound(name, n_idx, idx_items, busy)
        _bound("gemm_programs", n_gemm_p, n_gemm, busy)
    if total > GRID_X_MAX:
        raise ValueError(f"config: {total} programs exceed CUDA's grid limit {GRID_X_MAX}")
    hw_cvt = dev.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    have_q_buf = ws.q_c_fp8 is not None and bool(cfg.roles & 8)
    # the fused launch's GEMM tiles read q_c quantized by a launch of its own before it
    first_pre = cfg.first_prequant and n_gemm > 0 and have_q_buf
    # the tail's GEMM tiles read q_c quantized once, by that launch or by the fused launch's
    # per-token items
    prequant = bool(tail_cols) and have_q_buf and (cfg.tail_prequant or first_pre)
    xq, xs = (ws.q_c_fp8, ws.q_c_scale) if prequant or first_pre else (args.q_c, args.q_c)
    roles = cfg.roles if cfg.fuse_topk else cfg.roles & ~4
    if not args.write_keys:
        roles &= ~1  # the caller wrote the new keys (RegionArgs.write_keys; the logits read them, no patch)
    if n_gemm == 0:
        roles &= ~8  # the GEMM runs in the top-k launch (or not at all)
    # the logits role counts every logit in its row's histogram whenever the top-k runs (in this
    # launch or the next): the top-k zeroes the histograms, so they never outlive a launch pair
    # (the tail's and the fused top-k's items need it; a standalone top-k after the launch builds
    # its own above radix_topk.FED_MAX_POSITIONS, where the producer's atomics cost more)
    tcfg = cfg.topk_config or RadixTopkConfig()
    hist = bool(cfg.roles & 2) and bool(cfg.roles & 4) and (cfg.fuse_topk or bool(tail_cols) or hist_fed(T, cols, tcfg))
    hist = hist and ops is None and tcfg.algo == "radix"  # vLLM's and the sampled top-k read no histogram
    topk_cx = topk_sample_constexprs(tcfg, cols)
    index_q_side(args)  # RegionArgs.index_q given: the index-q prep as a prologue launch (smpart.prep)
    if ops is not None and cfg.roles & 4:
        # each row's clamped length (vLLM's context_lens_2d) and the -1 fill, before vLLM's top-k
        launch_vllm_topk_prep(args.context_lens, ws.vllm_topk_lens, args.topk_indices, next_n, cols)
    if first_pre:
        launch_q_c_quant(args.q_c, xq, xs, use_ue8m0, hw_cvt)
    extra = {} if cfg.maxnreg is None else dict(maxnreg=cfg.maxnreg)
    _partitioned_kernel[(total,)](
        args.q_c, args.q_b_proj_weight, args.q_b_proj_weight_scale, args.positions, args.cos_sin_cache,
        args.k_pe, args.q, xq, xs,
        T, N, args.cos_sin_cache.shape[0], args.q_c.stride(0), N, args.k_pe.stride(0), args.cos_sin_cache.stride(0),
        args.index_q_fp8, args.index_weights, args.index_k, args.kv_cache, args.block_table, args.context_lens,
        args.slot_mapping, ws.logits, args.topk_indices, ws.counters, rw.hist, rw.counters, rw.cand_key,
        rw.cand_pos, rw.scratch,
        args.index_q_fp8.stride(0), args.index_weights.stride(0), args.index_k.stride(0), args.block_table.stride(0),
        ws.logits.stride(0), args.topk_indices.stride(0),
        args.kv_cache.shape[0], max_blocks, max_len, runs,
        n_gemm, n_idx, max(n_gemm_p, 1),
        USE_UE8M0=bool(use_ue8m0), NEXT_N=next_n, BLOCKS_PER_ITEM=cfg.blocks_per_item, NUM_STAGES=cfg.num_stages,
        BLOCK_N=cfg.block_n, BLOCK_T=block_t, T_PAD=triton.next_power_of_2(T),
        DYNAMIC=bool(cfg.dynamic),
        QUEUE_CHUNK=cfg.queue_chunk, HW_CVT=hw_cvt, HIST=hist,
        TOPK_CHUNK=topk_chunk, TOPK_K=TOPK_K, CAND=rw.cand, CP=rw.cp, **topk_cx,
        ROLES=roles, QUANT_Q_C=prequant and not first_pre, DENSE=dense, GEMM_PREQUANT=first_pre, GEMM_FIRST=gemm_first,
        PATCH=bool(args.write_keys), ROPE_FUSED_Q=bool(args.rope_fused_q), ROPE_K_PE=bool(args.rope_k_pe),
        num_warps=cfg.num_warps, num_stages=1, **extra,
    )
    if cfg.fuse_topk:
        return
    if ops is not None:
        if cfg.roles & 4:
            _vllm_topk_launch(args, ws, ops, cols)
    elif tail_cols:
        if cfg.roles & 12:
            _tail_launch(args, ws, cfg, use_ue8m0, N - tail_cols, block_t, n_t_tiles, hw_cvt, prequant, xq, xs,
                         cols, topk_chunk, tcfg, topk_cx)
    elif cfg.roles & 4:
        # check_values=False: run_region checked the workspace's clean state before the first launch
        topk(ws.logits, args.context_lens, args.topk_indices, next_n=next_n, workspace=rw, max_len=cols,
             hist_ready=hist, config=cfg.topk_config, check_values=False)


_vllm_topk_missing: str | None = None  # why vLLM's ops did not load for a tuned topk_impl="vllm" (warned once)


def _vllm_topk_ops(cfg: PartitionConfig | None):
    """vLLM's compiled ops (``vendor.load_vllm_ops``) for ``topk_impl="vllm"``.

    ``cfg`` given (an explicit config): the ops, or ``RuntimeError`` naming ``config.topk_impl``.
    ``cfg`` None (a tuned config): the ops, or ``None`` after one warning per process (the caller
    then runs the radix top-k; later calls do not retry the load).
    """
    global _vllm_topk_missing
    if cfg is None and _vllm_topk_missing is not None:
        return None
    try:
        ops = vendor.load_vllm_ops()
        if ops.cooperative_topk is None and ops.persistent_topk is None and ops.top_k_per_row_decode is None:
            raise RuntimeError("the loaded vLLM ops have none of cooperative_topk / persistent_topk / "
                               "top_k_per_row_decode")
    except RuntimeError as e:
        if not torch.cuda.is_available():  # say the first thing first: the hybrid needs a CUDA GPU
            e = RuntimeError(f"vLLM's top-k ops are CUDA kernels and this machine has no CUDA GPU ({e})")
        if cfg is not None:
            raise RuntimeError(f"config.topk_impl='vllm' runs vLLM 0.33's decode top-k, whose ops do not load "
                               f"here: {e}") from e
        _vllm_topk_missing = str(e)
        warnings.warn(f"smpart: the tuned config's topk_impl='vllm' runs as 'smpart' here: vLLM's ops do not load "
                      f"({str(e)[:300]})", stacklevel=3)
        return None
    return ops


def _vllm_topk_launch(args, ws, ops, cols: int) -> None:
    """vLLM 0.33's decode top-k on ``ws.logits[:T]``, dispatched as the vendor paths dispatch it
    (``vendor._vllm_topk``, ``auto``: ``cooperative_topk`` for <= 64 rows, else ``persistent_topk``;
    vLLM ``model_executor/layers/indexer_topk.py``), into ``args.topk_indices``.

    The ops read each row's length from ``ws.vllm_topk_lens`` viewed ``[B, next_n]`` (written by
    ``launch_vllm_topk_prep``: the visible length clamped to ``cols``, the logits' bound, since
    ``context_lens`` is not trusted under CUDA graphs); ``max_seq_len`` (a host int: vLLM passes
    ``max(seq_lens)`` in eager steps, whose read would sync) is ``cols``, a bound of every row's length
    from shapes only. In the FULL CUDA graphs a vLLM server replays, vLLM itself captured the top-k
    with ``max_seq_len = max_model_len`` (``v1/worker/gpu_model_runner.py``,
    ``_build_attention_metadata(for_cudagraph_capture=True)``), about what ``cols`` is there. They write each row's top positions and -1 past ``min(L, 2048)``; the prep's -1
    fill covers any slot they leave unwritten.
    """
    T, next_n = args.num_tokens, args.next_n
    lens = ws.vllm_topk_lens[:T].view(T // next_n, next_n)
    vs = types.SimpleNamespace(device=args.q_c.device, ops=ops, topk_workspace=ws.vllm_topk_workspace,
                               max_seq_len=max(cols, 1))
    vendor._vllm_topk(vs, ws.logits[:T], lens, args.topk_indices, next_n, None, "partitioned (topk_impl='vllm')")


def _bound(name: str, programs: int, items: int, busy: int) -> None:
    """Refuse ``programs`` above ``max(items, busy)`` (``busy``: programs the GPU holds at once)."""
    limit = max(items, busy)
    if programs > limit:
        raise ValueError(f"config.{name}: {programs} programs for {items} work items; at most "
                         f"max(work items, {PROGRAMS_PER_SM_MAX} x SMs) = {limit} (more would only be idle)")


def _tail_launch(args, ws, cfg: PartitionConfig, use_ue8m0: bool, n_cut: int, block_t: int, n_t_tiles: int,
                 hw_cvt: bool, prequant: bool, xq, xs, cols: int, chunk: int, tcfg: RadixTopkConfig,
                 topk_cx: dict) -> None:
    """The top-k launch with the GEMM tiles of output columns ``[n_cut, N)`` beside it: one
    program per top-k item (row, chunk of ``chunk`` positions for the radix algorithm; row, one of
    ``topk_config.programs_per_row`` programs for the sampled one), numbered first, then the GEMM
    programs. ``cols``: the rows' length bound (``min(ws.max_len, max_blocks * 64)``, as the
    logits role clamps them; ``ws.logits`` has at least that many columns, ``check_fits``). ``xq``/``xs``: the quantized ``q_c`` the first launch wrote
    (``prequant``), else unused placeholders. ``tcfg``: the top-k config, ``topk_cx`` its constexprs
    (``topk_sample_constexprs``), as the fused launch got them."""
    T, next_n = args.num_tokens, args.next_n
    N = args.num_heads * dims.QK_HEAD_DIM
    rw = ws.radix
    n_chunks = max(triton.cdiv(cols, chunk), 1)
    ppr = n_chunks if tcfg.algo == "radix" else programs_per_row(tcfg, T, n_chunks, args.q_c.device)
    n_topk = T * ppr if cfg.roles & 4 else 0
    bn = cfg.tail_block_n
    gemm_lo = (n_cut // bn) * n_t_tiles
    gemm_hi = triton.cdiv(N, bn) * n_t_tiles if cfg.roles & 8 else gemm_lo
    n_gemm_p = min(cfg.tail_gemm_programs or gemm_hi - gemm_lo, gemm_hi - gemm_lo)  # never more than tiles
    if n_topk + n_gemm_p == 0:
        return
    _topk_gemm_tail_kernel[(n_topk + n_gemm_p,)](
        ws.logits, args.context_lens, args.topk_indices, rw.hist, rw.counters, rw.cand_key, rw.cand_pos, rw.scratch,
        ws.logits.stride(0), args.topk_indices.stride(0), cols, n_topk, n_topk, ppr,
        args.q_c, args.q_b_proj_weight, args.q_b_proj_weight_scale, args.positions, args.cos_sin_cache,
        args.k_pe, args.q, xq, xs,
        T, N, args.cos_sin_cache.shape[0], args.q_c.stride(0), N, args.k_pe.stride(0), args.cos_sin_cache.stride(0),
        gemm_lo, gemm_hi, max(n_gemm_p, 1),
        NEXT_N=next_n, CHUNK=chunk, TOPK_K=TOPK_K, CAND=rw.cand, CP=rw.cp, **topk_cx,
        USE_UE8M0=bool(use_ue8m0), HW_CVT=hw_cvt, BLOCK_N=bn, BLOCK_T=block_t, NUM_STAGES=cfg.num_stages,
        PREQUANT=prequant, ROPE_FUSED_Q=bool(args.rope_fused_q), ROPE_K_PE=bool(args.rope_k_pe),
        num_warps=tcfg.num_warps, num_stages=1,
    )


def run_partitioned(args, ws, config, use_ue8m0):
    """The ``partitioned`` entry of :data:`smpart.region.PATHS` (``run_region``'s signature)."""
    partitioned_region(args, ws, config, use_ue8m0)
