"""FP8 paged MQA logits of the DeepSeek-V3.2 indexer (decode).

Mirrors DeepGEMM ``fp8_fp4_paged_mqa_logits`` (``deep_gemm/include/deep_gemm/impls/
sm90_fp8_paged_mqa_logits.cuh``) as vLLM calls it in
``vllm/model_executor/layers/sparse_attn_indexer.py`` (decode path): for decode row ``t``
(request ``b = t // next_n``, ``j = t % next_n``) with visible length
``L_t = max(0, context_lens[b] - next_n + 1 + j)``, for ``p < L_t``::

    logit[t, p] = sum_h weights[t, h] * relu(q[t, h, :] . k[p, :]) * k_scale[p]

with ``k[p]`` the 128 FP8 bytes of cache position ``p`` (block ``block_table[b, p // 64]``, offset
``p % 64``) and ``k_scale[p]`` its fp32 scale. Positions ``[L_t, max_len)`` get ``-inf`` (optional:
DeepGEMM leaves garbage there and vLLM's top-k never reads past ``L_t``).

Work item = (row ``t``, run of ``BLOCKS_PER_ITEM`` consecutive 64-token blocks). As in DeepGEMM,
the key tile is the MMA's M side (64 tokens) and the row's 64 heads its N side, so the sum over
heads is a reduction inside each thread and its quad (no shared-memory reduction). ``q[t]``
(64 x 128 FP8, staged once in shared memory: a wgmma B operand lives there) and ``weights[t]``
(registers) are loaded once per item; the run's block ids are loaded once, before the loop; the
loop over the run's blocks is a software-pipelined ``tl.range`` with a branch-free, masked body.

Compiled for sm_90 (Triton 3.6): the dot is ``wgmma.mma_async m64n64k32 f32.e4m3.e4m3`` with both
operands in shared memory (m64n32k32 with 8 warps, which then reduces heads across warp groups:
prefer 4 warps); key tiles arrive by 16-byte ``cp.async`` into ``num_stages`` buffers, with up to
``num_stages - 1`` blocks in flight per program.

Bounds (docs/KERNELS.md, "Every address is masked"; nothing here trusts values): block ids outside ``[0, num_blocks)`` are not
dereferenced (their keys count as zero, so their logits are 0); lengths are clamped to
``max_blocks * 64`` and to ``max_len``; the grid never depends on device values.

Torch ground truth: ``reference.paged_mqa_logits``.
"""

import torch
import triton
import triton.language as tl

from . import dims
from .radix_topk import _NB as _HIST_NB, _f32_to_key, _hist_bin


@triton.jit
def _mqa_logits_item(
    item,
    q_ptr,
    weights_ptr,
    kv_cache_ptr,
    block_table_ptr,
    context_lens_ptr,
    logits_ptr,
    stride_q,
    stride_w,
    stride_bt,
    stride_logits,
    num_blocks,
    max_blocks,
    max_len,
    runs_per_row,
    NEXT_N: tl.constexpr,
    BLOCKS_PER_ITEM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WRITE_NEG_INF: tl.constexpr,
    FIXED_TRIP: tl.constexpr = False,
    PRECISE_ACC: tl.constexpr = False,
    NUM_HEADS: tl.constexpr = 64,
    HEAD_DIM: tl.constexpr = 128,
    CACHE_BLOCK: tl.constexpr = 64,
    HIST: tl.constexpr = False,
    hist_ptr=None,
):
    """Logits of row ``t = item // runs_per_row`` for the blocks of run ``item % runs_per_row``.

    Pointers: ``q_ptr`` float8e4nv ``[T, NUM_HEADS, HEAD_DIM]`` (row stride ``stride_q``, the
    inner two dims contiguous); ``weights_ptr`` fp32 ``[T, NUM_HEADS]`` (row stride ``stride_w``);
    ``kv_cache_ptr`` uint8, ``CACHE_BLOCK * (HEAD_DIM + 4)`` bytes per block; ``block_table_ptr``
    int32 ``[B, max_blocks]`` (row stride ``stride_bt``); ``context_lens_ptr`` int32 ``[B]``;
    ``logits_ptr`` fp32 ``[T, >= max_len]`` (row stride ``stride_logits``).

    ``item`` must be in ``[0, T * runs_per_row)``. Blocks of the run past the row's visible length
    are not read: with ``FIXED_TRIP=False`` the loop runs only over the run's visible blocks (an
    item past the row's length loads nothing); with ``FIXED_TRIP=True`` it always runs
    ``BLOCKS_PER_ITEM`` iterations with masked loads.

    ``PRECISE_ACC``: on sm_90 the FP8 wgmma accumulates with reduced precision; by default the
    four k=32 steps chain in the MMA accumulator (as DeepGEMM's kernel does); with
    ``PRECISE_ACC`` each step's partial sum is added in fp32 registers
    (``max_num_imprecise_acc=32``). No effect under the interpreter.

    ``HIST``: also add every visible logit it writes to row ``t``'s histogram ``hist_ptr``
    (int32 ``[T, 2048]``, bins of ``radix_topk._hist_bin``) with relaxed atomics whose result is
    unused (RED), for ``radix_topk.radix_topk(hist_ready=True)``, which zeroes it again.
    """
    BLOCK_BYTES: tl.constexpr = CACHE_BLOCK * (HEAD_DIM + 4)
    SCALE_OFFSET: tl.constexpr = CACHE_BLOCK * HEAD_DIM
    tl.static_assert(BLOCKS_PER_ITEM >= 1 and BLOCKS_PER_ITEM <= 8)
    tl.static_assert(NUM_HEADS % 16 == 0)

    t = item // runs_per_row
    run = item - t * runs_per_row
    b = t // NEXT_N
    j = t - b * NEXT_N

    # visible length, clamped to the block table and to the workspace
    L = tl.load(context_lens_ptr + b) - NEXT_N + 1 + j
    L = tl.minimum(tl.maximum(L, 0), tl.minimum(max_blocks * CACHE_BLOCK, max_len))
    blk0 = run * BLOCKS_PER_ITEM
    n_blk = tl.minimum(tl.maximum(tl.cdiv(L, CACHE_BLOCK) - blk0, 0), BLOCKS_PER_ITEM)
    active = n_blk > 0

    t64 = t.to(tl.int64)
    heads = tl.arange(0, NUM_HEADS)
    d = tl.arange(0, HEAD_DIM)
    tok = tl.arange(0, CACHE_BLOCK)
    # q[t] [NUM_HEADS, HEAD_DIM]; its transpose is the MMA's B operand, K-major (HEAD_DIM contiguous)
    q = tl.load(q_ptr + t64 * stride_q + heads[:, None] * HEAD_DIM + d[None, :], mask=active, other=0.0)
    q = tl.trans(q)
    w = tl.load(weights_ptr + t64 * stride_w + heads, mask=active, other=0.0)

    # read the cache bytes as FP8 through a pointer cast (a value bitcast would force the MMA's
    # A operand through registers)
    kv_fp8_ptr = kv_cache_ptr.to(tl.pointer_type(tl.float8e4nv))
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt + blk0
    out_row = logits_ptr + t64 * stride_logits + blk0 * CACHE_BLOCK
    if FIXED_TRIP:
        n_iter = BLOCKS_PER_ITEM
    else:
        n_iter = n_blk
    # The run's block ids, loaded once before the loop (a load inside the loop would sit between
    # the pipeliner's stages and serialize it), masked only by the table's width so that the load
    # does not wait for context_lens; ids past the visible blocks or outside [0, num_blocks) -> -1.
    r = tl.arange(0, 8)
    ids = tl.load(bt_row + r, mask=(r < BLOCKS_PER_ITEM) & (blk0 + r < max_blocks), other=-1)
    ids = tl.where((r < n_blk) & (ids >= 0) & (ids < num_blocks), ids, -1)
    for i in tl.range(0, n_iter, num_stages=NUM_STAGES):
        block_id = tl.max(tl.where(r == i, ids, -1), axis=0)
        valid = block_id >= 0
        base = kv_fp8_ptr + tl.maximum(block_id, 0).to(tl.int64) * BLOCK_BYTES
        k = tl.load(base + tok[:, None] * HEAD_DIM + d[None, :], mask=valid, other=0.0)
        k_scale = tl.load((base + SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + tok, mask=valid, other=0.0)
        # [64 tokens, 128] x [128, 64 heads] -> fp32 [64 tokens, 64 heads]
        if PRECISE_ACC:
            s = tl.dot(k, q, out_dtype=tl.float32, max_num_imprecise_acc=32)
        else:
            s = tl.dot(k, q, out_dtype=tl.float32)
        s = tl.maximum(s, 0.0) * w[None, :]
        logit = tl.sum(s, axis=1) * k_scale
        pos = (blk0 + i) * CACHE_BLOCK + tok
        tl.store(out_row + i * CACHE_BLOCK + tok, logit, mask=pos < L)
        if HIST:
            tl.atomic_add(hist_ptr + t64 * _HIST_NB + _hist_bin(_f32_to_key(logit)), 1, mask=pos < L,
                          sem="relaxed")

    if WRITE_NEG_INF:
        neg_inf = tl.full([CACHE_BLOCK], float("-inf"), tl.float32)
        for i in tl.static_range(BLOCKS_PER_ITEM):
            pos = (blk0 + i) * CACHE_BLOCK + tok
            tl.store(out_row + i * CACHE_BLOCK + tok, neg_inf, mask=(pos >= L) & (pos < max_len))


@triton.jit
def _mqa_logits_kernel(
    q_ptr,
    weights_ptr,
    kv_cache_ptr,
    block_table_ptr,
    context_lens_ptr,
    logits_ptr,
    stride_q,
    stride_w,
    stride_bt,
    stride_logits,
    num_blocks,
    max_blocks,
    max_len,
    runs_per_row,
    num_items,
    NEXT_N: tl.constexpr,
    BLOCKS_PER_ITEM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WRITE_NEG_INF: tl.constexpr,
    FIXED_TRIP: tl.constexpr,
    PRECISE_ACC: tl.constexpr,
    hist_ptr,
    HIST: tl.constexpr,
):
    """Items ``pid, pid + grid, ...`` below ``num_items`` (one item per program when the grid is
    ``mqa_logits_num_items(...)``; a smaller grid makes it persistent)."""
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        _mqa_logits_item(
            item, q_ptr, weights_ptr, kv_cache_ptr, block_table_ptr, context_lens_ptr, logits_ptr,
            stride_q, stride_w, stride_bt, stride_logits, num_blocks, max_blocks, max_len, runs_per_row,
            NEXT_N, BLOCKS_PER_ITEM, NUM_STAGES, WRITE_NEG_INF, FIXED_TRIP, PRECISE_ACC,
            HIST=HIST, hist_ptr=hist_ptr,
        )


def mqa_logits_runs_per_row(max_len: int, max_blocks: int, blocks_per_item: int, write_neg_inf: bool = True) -> int:
    """Runs (work items) per row, from host shapes only.

    Items must cover every column the kernel may write: ``[0, max_len)`` when writing ``-inf``,
    else only the blocks a row can see (``min(max_len, max_blocks * 64)`` positions).
    """
    cols = max_len if write_neg_inf else min(max_len, max_blocks * dims.CACHE_BLOCK_SIZE)
    return max(triton.cdiv(triton.cdiv(max(cols, 0), dims.CACHE_BLOCK_SIZE), blocks_per_item), 1)


def mqa_logits_num_items(
    num_rows: int, max_len: int, max_blocks: int, blocks_per_item: int, write_neg_inf: bool = True
) -> int:
    """Total work items for ``num_rows`` decode rows: ``num_rows * runs_per_row`` (no device reads)."""
    return num_rows * mqa_logits_runs_per_row(max_len, max_blocks, blocks_per_item, write_neg_inf)


def paged_mqa_logits(
    q_fp8: torch.Tensor,
    weights: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    logits: torch.Tensor,
    *,
    next_n: int,
    blocks_per_item: int = 4,
    num_warps: int = 4,
    num_stages: int = 4,
    write_neg_inf: bool = True,
    fixed_trip: bool = False,
    max_len: int | None = None,
    num_programs: int | None = None,
    precise_acc: bool = False,
    hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 paged MQA logits into the caller's workspace ``logits``.

    Parameters
    ----------
    q_fp8 : float8_e4m3fn ``[T, 64, 128]`` (inner two dims contiguous), ``T = B * next_n``.
    weights : fp32 ``[T, 64]`` (already scaled), unit column stride.
    kv_cache : uint8 ``[num_blocks, 64, 132]`` (8448 contiguous bytes per block).
    block_table : int32 ``[B, max_blocks]``, unit column stride.
    context_lens : int32 ``[B]``, vLLM ``seq_lens`` (including the new token(s)).
    logits : fp32 ``[T, >= max_len]``, unit column stride; written in place.
    next_n : decode rows per request (1 or 2).
    blocks_per_item : 64-token blocks per work item (1..8).
    num_warps, num_stages : launch parameters (``num_stages`` pipelines the block loop).
    write_neg_inf : write ``-inf`` into ``[L_t, max_len)`` of each row.
    fixed_trip : always loop ``blocks_per_item`` times with masked loads (else only over visible
        blocks).
    max_len : columns written (default ``logits.shape[1]``). The grid is
        ``T * cdiv(cdiv(max_len, 64), blocks_per_item)`` items whatever the lengths: pass the
        shape bucket's length, not vLLM's full-width table (163840 columns), to keep it small.
    num_programs : if given, launch ``min(num_items, num_programs)`` programs that stride over
        the items (persistent); else one program per item.
    precise_acc : add each k=32 wgmma step's partial sum in fp32 registers (sm_90 FP8 MMAs
        accumulate with reduced precision; the default chains them in the accumulator, as
        DeepGEMM does).
    hist : optional int32 ``[>= T, 2048]`` contiguous (``radix_topk.RadixTopkWorkspace.hist``, zero
        on entry): each visible logit is also counted in its row's histogram for
        ``radix_topk.radix_topk(..., hist_ready=True)``.

    Returns
    -------
    ``logits``: ``logits[t, p]`` for ``p < min(L_t, max_len, max_blocks*64)``; ``-inf`` in the rest
    of ``[0, max_len)`` if ``write_neg_inf``; columns ``>= max_len`` untouched.
    """
    T = q_fp8.shape[0]
    if max_len is None:
        max_len = logits.shape[1]
    max_blocks = block_table.shape[1]
    runs = mqa_logits_runs_per_row(max_len, max_blocks, blocks_per_item, write_neg_inf)
    if T == 0 or max_len <= 0:
        return logits
    num_items = T * runs
    grid = num_items if num_programs is None else max(1, min(num_items, num_programs))
    _mqa_logits_kernel[(grid,)](
        q_fp8, weights, kv_cache, block_table, context_lens, logits,
        q_fp8.stride(0), weights.stride(0), block_table.stride(0), logits.stride(0),
        kv_cache.shape[0], max_blocks, max_len, runs, num_items,
        NEXT_N=next_n, BLOCKS_PER_ITEM=blocks_per_item, NUM_STAGES=num_stages,
        WRITE_NEG_INF=bool(write_neg_inf), FIXED_TRIP=bool(fixed_trip), PRECISE_ACC=bool(precise_acc),
        hist_ptr=hist if hist is not None else logits, HIST=hist is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return logits
