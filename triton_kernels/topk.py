"""Top-2048 per decode row of the indexer logits, as multi-program radix-style selection.

Mirrors the semantics of vLLM 0.33 ``vllm/model_executor/layers/indexer_topk.py``
(``SparseIndexerTopk.forward``: ``cooperative_topk`` / ``persistent_topk``, fallback
``top_k_per_row_decode``): for decode row ``t`` with visible length ``L_t``, write the
request-local positions of the ``min(L_t, 2048)`` largest logits of ``logits[t, :L_t]`` (any
order) into ``topk_indices[t]`` and -1 into the columns past ``min(L_t, 2048)``. Ties may resolve
either way; exactly ``min(L_t, 2048)`` distinct positions are written. Logits past ``L_t`` are
never read (they may be garbage, -inf or NaN).

Algorithm
---------
* Keys: fp32 -> order-preserving int32 (``-0.0`` -> ``+0.0``; NaN above +inf), so every
  comparison and every tie is exact integer logic.
* ``_select_topk`` (one program, n values in global memory): narrow a key bracket ``[lo, hi]``
  known to hold the K-th largest key with ``tl.histogram`` passes of 64 bins: bins are equal
  key intervals above ``lo`` (or, while the bracket straddles zero, equal *value* intervals, which
  suit logits of both signs); both are monotone in the key, so a bin's members are exactly the
  keys between its min and max. After each histogram pass an emit pass writes every element of
  the bins above the threshold bin and, once that bin holds <= CAP elements, compacts their
  positions to a scratch buffer (else one more pass takes the bin's exact min/max). The rest runs
  in registers (histogram passes over a [CAP] tensor, then one prefix sum that emits the elements
  above the final bracket and the first ``need`` members of it: exactly K outputs, ties included).
  Typical logits take three streaming passes (min/max, histogram, emit+compact); every phase
  ends after at most 2 value-mode + 7 key-mode narrowings (a key pass removes >= 5 bits of range).
  Inputs of ``n <= CAP`` values skip the streaming passes (one load into registers).
* Two stages for long rows: stage 1 (``_topk_chunk_stage``), one program per (row, chunk of
  ``CHUNK`` positions), selects the chunk's top-min(K, n) into the candidate workspace (values
  and positions; a row of one chunk writes ``topk_indices`` directly, with its -1 padding).
  Stage 2 (``_topk_merge_stage``), one program per row, selects the final K from the row's
  ``(n_chunks-1)*K + min(K, n_last)`` contiguous candidates. The standalone launcher runs both
  in one launch: each chunk program arrives on a per-row counter (CTA barrier, then
  ``atomic_add(acq_rel, gpu)``), the last arriver runs the merge and resets the counter to 0
  (CUDA-graph replays start from zero; no memset node).

Workspace layout (:class:`TopkWorkspace`, per row, ``max_chunks = cdiv(max_len, CHUNK)``):
``cand_vals`` fp32 ``[T, max_chunks*K]`` (chunk ``c`` at ``c*K``); ``cand_idx`` int32
``[T, max_chunks*K + (max_chunks+1)*CAP]``: the candidates' positions, then one CAP-sized
scratch per chunk and one for the merge. All loads use ``.cg`` (data written by other programs
of the same launch is never read through a stale L1 line).

For a persistent kernel: ``_topk_chunk_stage`` / ``_topk_merge_stage`` take a row and chunk, never
``tl.program_id``; a row of ``L <= CHUNK`` is finished (with its -1 padding) by the one
``_topk_chunk_stage(t, 0, ...)`` call, e.g. in the program that completed its logits.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import dims

TOPK_K = dims.INDEX_TOPK  # 2048
TOPK_CHUNK = dims.TOPK_CHUNK  # positions per stage-1 program (a multiple of 256 cache tokens)
TOPK_BLOCK = 1024  # role default: tile of the streaming passes (4 warps: ~165 registers)
TOPK_LOG2_BINS = 6  # 64 histogram bins per narrowing pass
TOPK_CAP = 2048  # role default: register-resident candidate capacity (ints of scratch per item)
TOPK_CAP_MAX = 4096  # scratch the workspace holds per item: any CAP <= this works with it

_K = tl.constexpr(TOPK_K)
_BLOCK = tl.constexpr(TOPK_BLOCK)
_LOG2_NB = tl.constexpr(TOPK_LOG2_BINS)
_CAP = tl.constexpr(TOPK_CAP)
_INT_MAX = tl.constexpr(2147483647)
_INT_MIN = tl.constexpr(-2147483648)


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _f32_to_key(v):
    """fp32 -> int32 key with the same order (-0.0 and +0.0 share key 0; +NaN above +inf, -NaN
    below -inf). Keys are > ``_INT_MIN``, which marks empty register lanes."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(b == _INT_MIN, 0, b)
    return tl.maximum(b ^ ((b >> 31) & 0x7FFFFFFF), _INT_MIN + 1)


@triton.jit
def _key_to_f32(k):
    """Inverse of :func:`_f32_to_key` (the map is an involution on the bits)."""
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _load_idx(idx_ptr, idx_base, offs, msk, has_idx):
    """Positions of elements ``offs``: explicit ``idx_ptr[offs]`` (``has_idx``) or ``idx_base + offs``."""
    if has_idx:
        ix = tl.load(idx_ptr + offs, mask=msk, other=-1, cache_modifier=".cg")
    else:
        ix = idx_base + offs
    return ix


@triton.jit
def _tile_members(vals_ptr, start, r, n, lo, hi):
    """One streaming tile: positions ``start + r``, their values (``.cg``: written by other programs
    of the launch), keys, and the mask of in-range members of the bracket ``[lo, hi]``."""
    offs = start + r
    msk = offs < n
    v = tl.load(vals_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
    k = _f32_to_key(v)
    return offs, v, k, msk & (k >= lo) & (k <= hi)


@triton.jit
def _pick_bin(h, need, NB: tl.constexpr):
    """Threshold bin of histogram ``h`` [NB]: the bin b with above(b) < need <= above(b) + h[b].

    Returns (b, above(b), h[b]) where above(b) = members in bins > b (requires 1 <= need <= sum h).
    """
    bins = tl.arange(0, NB)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)
    b = tl.sum((above >= need).to(tl.int32), 0)
    hit = bins == b
    return b, tl.sum(tl.where(hit, above, 0), 0), tl.sum(tl.where(hit, h, 0), 0)


@triton.jit
def _key_shift(lo, hi, LOG2_NB: tl.constexpr):
    """Right shift mapping key offsets in [0, hi - lo] onto < 2**LOG2_NB bins."""
    span = hi.to(tl.int64) - lo.to(tl.int64)
    e = ((span.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2), maybe +1
    return tl.maximum(e + 1 - LOG2_NB, 0)


@triton.jit
def _value_mode(lo, hi, it, NB: tl.constexpr):
    """Use value-space bins for narrowing step ``it``? Only for the first two steps of a bracket
    that straddles zero (key-space bins there are logarithmic), and only on a finite range."""
    vlo = _key_to_f32(lo)
    rng = _key_to_f32(hi) - vlo
    ok = (it < 2) & (lo < 0) & (hi >= 0) & (rng > 1e-30) & (rng < 1e38)
    scale = NB / tl.where(ok, rng, 1.0)
    return ok, vlo, scale


@triton.jit
def _bins(v, k, mm, use_val, vlo, scale, lo, s, NB: tl.constexpr):
    """Bin of every member (``mm``): monotone in the key, so higher bins hold strictly larger keys
    and equal keys share a bin. Value mode: floor((v - vlo) * scale); key mode: (k - lo) >> s."""
    if use_val:
        t = tl.where(mm, (v - vlo) * scale, 0.0)
        d = tl.minimum(t.to(tl.int32), NB - 1)
    else:
        d = ((k - lo).to(tl.uint32, bitcast=True) >> s.to(tl.uint32)).to(tl.int32)
        d = tl.where(mm, d, 0)
    return d


@triton.jit
def _narrow_regs(k, lo, hi, cnt, need, LOG2_NB: tl.constexpr):
    """Narrow a bracket over keys held in registers until it is one key or exactly ``need`` wide.

    ``k`` [CAP]: keys, ``_INT_MIN`` on empty lanes; members are the lanes with key in ``[lo, hi]``
    (``cnt`` of them), of which ``need`` (1 <= need <= cnt) are to select. Returns the final
    ``(lo, hi, need)``: select every lane above ``hi`` and ``need`` members of ``[lo, hi]``.
    Membership is recomputed from the bracket (bins are monotone in the key, so a bin's members
    are exactly the keys between its min and max): no mask is carried through the loop.
    """
    NB: tl.constexpr = 1 << LOG2_NB
    it = need - need
    while (need < cnt) & (lo < hi):
        use_val, vlo, scale = _value_mode(lo, hi, it, NB)
        s = _key_shift(lo, hi, LOG2_NB)
        m = (k >= lo) & (k <= hi)
        d = _bins(_key_to_f32(k), k, m, use_val, vlo, scale, lo, s, NB)
        b, above, cnt = _pick_bin(tl.histogram(d, NB, mask=m), need, NB)
        need = need - above
        m = m & (d == b)
        lo = tl.min(tl.where(m, k, _INT_MAX), 0)
        hi = tl.max(tl.where(m, k, _INT_MIN), 0)
        it += 1
    return lo, hi, need


@triton.jit
def _select_topk(vals_ptr, idx_ptr, idx_base, n, out_idx_ptr, out_val_ptr, scratch_ptr, has_idx, write_vals, pad,
                 K: tl.constexpr, BLOCK: tl.constexpr = _BLOCK, LOG2_NB: tl.constexpr = _LOG2_NB,
                 CAP: tl.constexpr = _CAP):
    """Select exactly ``min(K, n)`` of ``n`` values: the positions of the largest (one program).

    Parameters
    ----------
    vals_ptr : fp32 pointer to ``n`` values (only ``vals_ptr[0:n]`` is read, with ``.cg`` loads).
    idx_ptr : int32 pointer to ``n`` positions if ``has_idx``, else unused (position = ``idx_base + i``).
    idx_base : int32 scalar, first implicit position.
    n : int32 scalar, number of values (<= 0: nothing selected).
    out_idx_ptr : int32 pointer; receives the ``min(K, n)`` selected positions in ``[0, min(K, n))``
        (any order), and -1 in ``[min(K, n), K)`` if ``pad``.
    out_val_ptr : fp32 pointer; receives the selected values in the same slots if ``write_vals``.
    scratch_ptr : int32 pointer to ``CAP`` ints private to this call (positions of the threshold
        candidates); unused when ``n <= CAP``.
    has_idx, write_vals, pad : bool flags, constexpr or runtime scalars (runtime flags let one
        inlined copy serve several call patterns).
    K : number to select (2048). BLOCK : tile of the streaming passes. LOG2_NB : log2 of the
    histogram bins (6). CAP : register capacity (<= 32767).

    Never calls ``tl.program_id``: usable from any role of a persistent kernel.
    """
    tl.static_assert(CAP <= 32767)
    tl.static_assert(BLOCK <= 32767)
    NB: tl.constexpr = 1 << LOG2_NB
    r = tl.arange(0, BLOCK)
    if n <= K:
        # everything is selected
        for start in range(0, n, BLOCK):
            offs = start + r
            msk = offs < n
            tl.store(out_idx_ptr + offs, _load_idx(idx_ptr, idx_base, offs, msk, has_idx), mask=msk)
            if write_vals:
                v = tl.load(vals_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
                tl.store(out_val_ptr + offs, v, mask=msk)
        if pad:
            for p0 in tl.static_range(0, K, BLOCK):
                offs = p0 + r
                tl.store(out_idx_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= n) & (offs < K))
    else:
        zero = n - n
        need = zero + K  # still to select among the members (keys in [lo, hi])
        out_cnt = zero  # outputs written so far (all above the members)
        ccnt = n  # members held in registers next (n <= CAP: the whole input); -1: none
        if n > CAP:
            # pass A: key range
            kmin = tl.full([BLOCK], _INT_MAX, tl.int32)
            kmax = tl.full([BLOCK], _INT_MIN, tl.int32)
            for start in range(0, n, BLOCK):
                offs = start + r
                msk = offs < n
                k = _f32_to_key(tl.load(vals_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
                kmin = tl.minimum(kmin, tl.where(msk, k, _INT_MAX))
                kmax = tl.maximum(kmax, tl.where(msk, k, _INT_MIN))
            lo = tl.min(kmin, 0)
            hi = tl.max(kmax, 0)
            ccnt = zero - 1
            it = zero
            while (ccnt < 0) & (lo < hi):
                use_val, vlo, scale = _value_mode(lo, hi, it, NB)
                s = _key_shift(lo, hi, LOG2_NB)
                # histogram pass over the members
                h = tl.zeros([NB], dtype=tl.int32)
                for start in range(0, n, BLOCK):
                    offs, v, k, mm = _tile_members(vals_ptr, start, r, n, lo, hi)
                    h += tl.histogram(_bins(v, k, mm, use_val, vlo, scale, lo, s, NB), NB, mask=mm)
                b, above, cb = _pick_bin(h, need, NB)
                compact = cb <= CAP
                # emit pass: bins above b -> out; bin b -> scratch when it fits
                tl.debug_barrier()  # scratch reuse: earlier reads of it by any warp are done
                run_a = out_cnt
                run_m = zero
                for start in range(0, n, BLOCK):
                    offs, v, k, mm = _tile_members(vals_ptr, start, r, n, lo, hi)
                    d = _bins(v, k, mm, use_val, vlo, scale, lo, s, NB)
                    a = mm & (d > b)
                    c = mm & (d == b)
                    packed = a.to(tl.int32) * 65536 + c.to(tl.int32)
                    cs = tl.cumsum(packed, 0)
                    pos = run_a + (cs >> 16) - 1
                    tl.store(out_idx_ptr + pos, _load_idx(idx_ptr, idx_base, offs, a, has_idx), mask=a)
                    if write_vals:
                        tl.store(out_val_ptr + pos, v, mask=a)
                    tl.store(scratch_ptr + run_m + (cs & 0xFFFF) - 1, offs, mask=c & compact)
                    tot = tl.sum(packed, 0)
                    run_a += tot >> 16
                    run_m += tot & 0xFFFF
                out_cnt = run_a
                need = need - above
                if compact:
                    ccnt = cb  # the registers take the exact bracket from the compacted keys
                else:
                    # rare (> CAP keys in bin b): its exact key range, for the next narrowing
                    mn = tl.full([BLOCK], _INT_MAX, tl.int32)
                    mx = tl.full([BLOCK], _INT_MIN, tl.int32)
                    for start in range(0, n, BLOCK):
                        offs, v, k, mm = _tile_members(vals_ptr, start, r, n, lo, hi)
                        c = mm & (_bins(v, k, mm, use_val, vlo, scale, lo, s, NB) == b)
                        mn = tl.minimum(mn, tl.where(c, k, _INT_MAX))
                        mx = tl.maximum(mx, tl.where(c, k, _INT_MIN))
                    lo = tl.min(mn, 0)
                    hi = tl.max(mx, 0)
                it += 1
            if ccnt < 0:
                # more than CAP members, all equal (lo == hi): the first `need` of them by position
                run_m = zero
                for start in range(0, n, BLOCK):
                    offs = start + r
                    msk = offs < n
                    v = tl.load(vals_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
                    mm = msk & (_f32_to_key(v) == lo)
                    cs = tl.cumsum(mm.to(tl.int32), 0)
                    rank = run_m + cs - 1
                    sel = mm & (rank < need)
                    pos = K - need + rank
                    tl.store(out_idx_ptr + pos, _load_idx(idx_ptr, idx_base, offs, sel, has_idx), mask=sel)
                    if write_vals:
                        tl.store(out_val_ptr + pos, v, mask=sel)
                    run_m += tl.sum(mm.to(tl.int32), 0)
        if ccnt >= 0:
            # registers: the whole input (n <= CAP) or the compacted threshold bin
            tl.debug_barrier()  # scratch stores of every warp precede the loads
            rc = tl.arange(0, CAP)
            valid = rc < ccnt
            p = tl.load(scratch_ptr + rc, mask=valid & (n > CAP), other=0, cache_modifier=".cg")
            p = tl.where(n <= CAP, rc, p)
            k = tl.load(vals_ptr + p, mask=valid, other=0.0, cache_modifier=".cg")
            k = tl.where(valid, _f32_to_key(k), _INT_MIN)
            lo = tl.min(tl.where(valid, k, _INT_MAX), 0)
            hi = tl.max(k, 0)
            lo, hi, need = _narrow_regs(k, lo, hi, ccnt, need, LOG2_NB)
            # emit: lanes above the bracket at out_cnt.., the first `need` members at K-need..
            up = valid & (k > hi)
            m = (k >= lo) & (k <= hi)
            cs = tl.cumsum(up.to(tl.int32) * 65536 + m.to(tl.int32), 0)
            rank = (cs & 0xFFFF) - 1
            sel = up | (m & (rank < need))
            pos = tl.where(up, out_cnt + (cs >> 16) - 1, K - need + rank)
            p = tl.load(scratch_ptr + rc, mask=sel & (n > CAP), other=0, cache_modifier=".cg")
            p = tl.where(n <= CAP, rc, p)
            tl.store(out_idx_ptr + pos, _load_idx(idx_ptr, idx_base, p, sel, has_idx), mask=sel)
            if write_vals:
                tl.store(out_val_ptr + pos, tl.load(vals_ptr + p, mask=sel, other=0.0, cache_modifier=".cg"),
                         mask=sel)


# --------------------------------------------------------------------------------------
# role functions (called by the standalone kernels below and by the partitioned kernel)
# --------------------------------------------------------------------------------------
@triton.jit
def _topk_stage(t, c, L, n_chunks, merge, logits_ptr, stride_logits, topk_ptr, stride_topk,
                cand_vals_ptr, cand_idx_ptr, max_chunks, CHUNK: tl.constexpr,
                K: tl.constexpr = _K, BLOCK: tl.constexpr = _BLOCK, LOG2_NB: tl.constexpr = _LOG2_NB,
                CAP: tl.constexpr = _CAP):
    """Stage 1 (``merge`` false) or stage 2 (``merge`` true) of row ``t``.

    ``L``: the row's visible length; ``n_chunks = max(cdiv(L, CHUNK), 1)``. ``merge`` may be a
    runtime flag (one inlined :func:`_select_topk` for both stages, e.g. in a two-trip loop), but
    on sm_90 that loop cost ~60 more registers than two call sites with a constexpr ``merge``
    (the wrappers ``_topk_chunk_stage`` / ``_topk_merge_stage``), which the kernels here use.

    * stage 1, ``n_chunks == 1``: the row's top-min(K, L) positions and -1 padding -> ``topk[t]``.
    * stage 1, ``n_chunks >= 2``: the top-min(K, n_c) of positions ``[c*CHUNK, c*CHUNK + n_c)``
      -> candidate slot ``c`` of row ``t`` (values and positions).
    * stage 2 (``n_chunks >= 2``): the top-K of the row's ``(n_chunks-1)*K + min(K, n_last)``
      contiguous candidates -> ``topk[t]``.

    Reads ``logits[t, c*CHUNK : min(L, (c+1)*CHUNK)]`` (stage 1) or the candidates (stage 2)
    with ``.cg`` loads; the caller guarantees they are complete and ordered before this call.
    """
    tl.static_assert(CHUNK >= K)
    t64 = t.to(tl.int64)
    topk_row = topk_ptr + t64 * stride_topk
    cv_row = cand_vals_ptr + t64 * (max_chunks * K)
    ci_row = cand_idx_ptr + t64 * (max_chunks * K + (max_chunks + 1) * CAP)
    single = n_chunks <= 1
    if merge:
        last = n_chunks - 1
        vals = cv_row
        base = L - L
        n = last * K + tl.minimum(L - last * CHUNK, K)
        out_idx = topk_row
        scratch = ci_row + max_chunks * K + max_chunks * CAP
    else:
        base = tl.where(single, 0, c * CHUNK)
        vals = logits_ptr + t64 * stride_logits + base
        n = tl.minimum(L - base, CHUNK)
        if single:
            out_idx = topk_row
        else:
            out_idx = ci_row + c * K
        scratch = ci_row + max_chunks * K + c * CAP
    _select_topk(vals, ci_row, base, n, out_idx, cv_row + c * K, scratch,
                 merge, (not merge) & (not single), (not merge) & single, K, BLOCK, LOG2_NB, CAP)


@triton.jit
def _topk_chunk_stage(t, c, L, n_chunks, logits_ptr, stride_logits, topk_ptr, stride_topk,
                      cand_vals_ptr, cand_idx_ptr, max_chunks, CHUNK: tl.constexpr,
                      K: tl.constexpr = _K, BLOCK: tl.constexpr = _BLOCK, LOG2_NB: tl.constexpr = _LOG2_NB,
                      CAP: tl.constexpr = _CAP):
    """Stage 1 for chunk ``c`` of row ``t`` (see :func:`_topk_stage`)."""
    _topk_stage(t, c, L, n_chunks, False, logits_ptr, stride_logits, topk_ptr, stride_topk,
                cand_vals_ptr, cand_idx_ptr, max_chunks, CHUNK, K, BLOCK, LOG2_NB, CAP)


@triton.jit
def _topk_merge_stage(t, L, n_chunks, topk_ptr, stride_topk, cand_vals_ptr, cand_idx_ptr, max_chunks,
                      CHUNK: tl.constexpr, K: tl.constexpr = _K, BLOCK: tl.constexpr = _BLOCK,
                      LOG2_NB: tl.constexpr = _LOG2_NB, CAP: tl.constexpr = _CAP):
    """Stage 2 for row ``t`` with ``n_chunks >= 2`` (see :func:`_topk_stage`)."""
    _topk_stage(t, t - t, L, n_chunks, True, cand_vals_ptr, 0, topk_ptr, stride_topk,
                cand_vals_ptr, cand_idx_ptr, max_chunks, CHUNK, K, BLOCK, LOG2_NB, CAP)


@triton.jit
def _topk_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS: tl.constexpr):
    """Visible length of row ``t``, clamped to ``[0, lmax]``: ``lens[t]``, or from ``context_lens``:
    ``context_lens[t // next_n] - next_n + 1 + t % next_n`` (vLLM ``seq_lens``, DESIGN.md 7a)."""
    if PER_ROW_LENS:
        L = tl.load(lens_ptr + t)
    else:
        b = t // next_n
        L = tl.load(lens_ptr + b) - next_n + 1 + (t - b * next_n)
    return tl.minimum(tl.maximum(L, 0), lmax)


@triton.jit
def _topk_chunk_item(item, num_rows, lens_ptr, next_n, lmax, logits_ptr, stride_logits, topk_ptr, stride_topk,
                     cand_vals_ptr, cand_idx_ptr, counters_ptr, max_chunks,
                     CHUNK: tl.constexpr, PER_ROW_LENS: tl.constexpr, FUSED_MERGE: tl.constexpr,
                     K: tl.constexpr = _K, BLOCK: tl.constexpr = _BLOCK, LOG2_NB: tl.constexpr = _LOG2_NB,
                     CAP: tl.constexpr = _CAP):
    """Work item ``item = c * num_rows + t`` (chunk-major): stage 1 of (t, c); with ``FUSED_MERGE``
    the row's last chunk to finish also runs stage 2 and resets the row counter to 0."""
    c = item // num_rows
    t = item - c * num_rows
    L = _topk_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS)
    n_chunks = tl.maximum(tl.cdiv(L, CHUNK), 1)
    if c < n_chunks:
        _topk_chunk_stage(t, c, L, n_chunks, logits_ptr, stride_logits, topk_ptr, stride_topk,
                          cand_vals_ptr, cand_idx_ptr, max_chunks, CHUNK, K, BLOCK, LOG2_NB, CAP)
        if FUSED_MERGE:
            if n_chunks > 1:
                tl.debug_barrier()  # every thread's candidate stores precede the release
                old = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel", scope="gpu")
                if old == n_chunks - 1:
                    tl.atomic_xchg(counters_ptr + t, 0, sem="relaxed", scope="gpu")
                    _topk_merge_stage(t, L, n_chunks, topk_ptr, stride_topk, cand_vals_ptr, cand_idx_ptr,
                                      max_chunks, CHUNK, K, BLOCK, LOG2_NB, CAP)


@triton.jit
def _topk_merge_item(row, lens_ptr, next_n, lmax, topk_ptr, stride_topk, cand_vals_ptr, cand_idx_ptr, max_chunks,
                     CHUNK: tl.constexpr, PER_ROW_LENS: tl.constexpr,
                     K: tl.constexpr = _K, BLOCK: tl.constexpr = _BLOCK, LOG2_NB: tl.constexpr = _LOG2_NB,
                     CAP: tl.constexpr = _CAP):
    """Stage 2 of ``row`` if it has more than one chunk (two-launch mode)."""
    L = _topk_row_len(row, lens_ptr, next_n, lmax, PER_ROW_LENS)
    n_chunks = tl.maximum(tl.cdiv(L, CHUNK), 1)
    if n_chunks > 1:
        _topk_merge_stage(row, L, n_chunks, topk_ptr, stride_topk, cand_vals_ptr, cand_idx_ptr, max_chunks,
                          CHUNK, K, BLOCK, LOG2_NB, CAP)


# --------------------------------------------------------------------------------------
# standalone kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _topk_chunk_kernel(logits_ptr, lens_ptr, topk_ptr, cand_vals_ptr, cand_idx_ptr, counters_ptr,
                       stride_logits, stride_topk, num_rows, next_n, lmax, max_chunks,
                       CHUNK: tl.constexpr, PER_ROW_LENS: tl.constexpr, FUSED_MERGE: tl.constexpr,
                       K: tl.constexpr, BLOCK: tl.constexpr, LOG2_NB: tl.constexpr, CAP: tl.constexpr):
    _topk_chunk_item(tl.program_id(0), num_rows, lens_ptr, next_n, lmax, logits_ptr, stride_logits, topk_ptr,
                     stride_topk, cand_vals_ptr, cand_idx_ptr, counters_ptr, max_chunks,
                     CHUNK, PER_ROW_LENS, FUSED_MERGE, K, BLOCK, LOG2_NB, CAP)


@triton.jit
def _topk_merge_kernel(lens_ptr, topk_ptr, cand_vals_ptr, cand_idx_ptr, stride_topk, next_n, lmax, max_chunks,
                       CHUNK: tl.constexpr, PER_ROW_LENS: tl.constexpr,
                       K: tl.constexpr, BLOCK: tl.constexpr, LOG2_NB: tl.constexpr, CAP: tl.constexpr):
    _topk_merge_item(tl.program_id(0), lens_ptr, next_n, lmax, topk_ptr, stride_topk, cand_vals_ptr, cand_idx_ptr,
                     max_chunks, CHUNK, PER_ROW_LENS, K, BLOCK, LOG2_NB, CAP)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TopkConfig:
    """Launch parameters of :func:`topk_decode` (STYLE.md 5).

    Attributes
    ----------
    block : tile of the streaming passes (power of two, <= 32767).
    cap : register capacity: inputs of <= cap values skip the streaming passes, and a threshold
        bin of <= cap values finishes in registers (power of two, <= ``workspace.cap``).
        ``None``: 4096 when every work item gets its own SM (latency: a 4K row is one register
        load), else 2048 (half the registers: two programs per SM).
    log2_bins : log2 of the histogram bins per narrowing pass (5..8; 6 = 64 bins).
    num_warps : warps per program (the role functions are correct with 4 and 8).
    fused_merge : one launch (last chunk of a row merges) instead of two launches.

    Defaults measured on the H200 (2026-11-30, cold L2, us for B x L at H=128: 1x4K / 32x8K /
    128x16K / 1x64K): 16 warps, block 2048, cap 4096: 16.1 / 31.1 / 46.4 / 78.5; the earlier
    8 warps, cap by grid: 24.1 / 43.6 / 68.2 / 122.5; 32 warps, block 4096: 17.0 / 33.8 / 48.3 / 71.3.
    Registers on sm_90 (ptxas, fused kernel, no spills): block 2048 / cap 4096 / 8 warps: 208;
    block 2048 / cap 2048 / 8 warps: 122; block 1024 / cap 2048 / 4 warps (the role defaults): 167.
    """

    block: int = 2048
    cap: int | None = 4096
    log2_bins: int = TOPK_LOG2_BINS
    num_warps: int = 16
    fused_merge: bool = True

    def __post_init__(self):
        """Reject bad values when the config is made (a TypeError/ValueError naming the field)."""
        def pow2(name, hi, none_ok=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if type(v) is not int or v < 1 or v > hi or v & (v - 1):
                raise ValueError(f"config.{name}: expected a power of two in [1, {hi}]"
                                 f"{' or None' if none_ok else ''}, got {v!r}")

        pow2("block", 16384)
        pow2("cap", 16384, none_ok=True)
        pow2("num_warps", 32)
        if type(self.log2_bins) is not int or not 5 <= self.log2_bins <= 8:
            raise ValueError(f"config.log2_bins: expected an int in 5..8, got {self.log2_bins!r}")
        if not isinstance(self.fused_merge, bool):
            raise TypeError(f"config.fused_merge: expected a bool, got {self.fused_merge!r}")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30  # the interpreter: no occupancy to trade
    return torch.cuda.get_device_properties(device).multi_processor_count


class TopkWorkspace:
    """Candidate buffers and row counters of the top-k, for up to ``max_tokens`` rows of up to
    ``max_len`` visible positions (allocated once; the launcher allocates nothing).

    Parameters
    ----------
    max_tokens : rows T the buffers hold.
    max_len : largest visible length (the logits width); lengths beyond it are clamped.
    device : torch device.
    chunk : positions per stage-1 program (>= k); ``max_chunks = max(cdiv(max_len, chunk), 1)``.
    cap : scratch ints per item: the largest ``CAP`` a kernel may use with this workspace.
    k : top-k (2048).

    Attributes
    ----------
    cand_vals : fp32 [max_tokens, max_chunks * k], chunk ``c``'s candidates at ``c * k``.
    cand_idx : int32 [max_tokens, max_chunks * k + (max_chunks + 1) * cap]: candidate positions, then
        per-chunk scratch (``max_chunks * k + c * CAP``) and the merge's scratch (``c = max_chunks``).
        Kernels lay rows out with their own ``CAP <= cap`` (row stride
        ``max_chunks * k + (max_chunks + 1) * CAP``), which stays inside the buffer.
    counters : int32 [max_tokens], zero between launches (reset in-kernel by the merging program).
    """

    def __init__(self, max_tokens: int, max_len: int, device, *, chunk: int = TOPK_CHUNK, cap: int = TOPK_CAP_MAX,
                 k: int = TOPK_K):
        if chunk < k:
            raise ValueError(f"chunk: expected >= k = {k}, got {chunk}")
        if not 1 <= cap <= 32767:
            raise ValueError(f"cap: expected 1..32767, got {cap}")
        self.max_tokens = int(max_tokens)
        self.max_len = int(max_len)
        self.chunk = int(chunk)
        self.cap = int(cap)
        self.k = int(k)
        self.max_chunks = max(triton.cdiv(self.max_len, self.chunk), 1)
        mc = self.max_chunks
        self.cand_vals = torch.empty(self.max_tokens, mc * k, dtype=torch.float32, device=device)
        self.cand_idx = torch.empty(self.max_tokens, mc * k + (mc + 1) * cap, dtype=torch.int32, device=device)
        self.counters = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.cand_vals, self.cand_idx, self.counters))


def resolve_cap(cap: int | None, items: int, programs: int, workspace: TopkWorkspace) -> int:
    """Register capacity (``CAP``) of a top-k launch: ``cap`` as given, or for ``None`` 4096 when
    each of the ``items`` (row, chunk) work items has its own program (latency: a 4K row is one
    register load), else 2048 (half the registers); never above ``workspace.cap``.

    Raises
    ------
    ValueError : ``cap`` larger than the workspace's scratch per item.
    """
    if cap is None:
        return min(TOPK_CAP_MAX if items <= programs else TOPK_CAP, workspace.cap)
    if cap > workspace.cap:
        raise ValueError(f"config.cap: {cap} exceeds the workspace's scratch of {workspace.cap} ints per item")
    return cap


def topk_workspace(max_tokens: int, max_len: int, device, **kwargs) -> TopkWorkspace:
    """Allocate a :class:`TopkWorkspace` (same arguments)."""
    return TopkWorkspace(max_tokens, max_len, device, **kwargs)


def topk_decode(logits: torch.Tensor, context_lens: torch.Tensor, topk_indices: torch.Tensor, *, next_n: int,
                workspace: TopkWorkspace, row_lens: torch.Tensor | None = None, max_len: int | None = None,
                config: TopkConfig | None = None) -> None:
    """Top-k positions of every decode row's visible logits, -1 padded (one launch, or two).

    Parameters
    ----------
    logits : fp32 [>= T, W], unit stride in the last dim; ``logits[t, :L_t]`` is read, nothing past.
    context_lens : int32 [B] vLLM ``seq_lens``; row ``t`` sees
        ``L_t = max(0, context_lens[t // next_n] - next_n + 1 + t % next_n)`` positions.
    topk_indices : int32 [T, k] output (T = ``topk_indices.shape[0]``), unit stride in the last dim.
    next_n : rows per request (1 or 2).
    workspace : :class:`TopkWorkspace` with ``max_tokens >= T``.
    row_lens : optional int32 [T] visible lengths (replaces ``context_lens`` / ``next_n``).
    max_len : optional host bound on every ``L_t`` (vLLM's ``max_seq_len``): sizes the grid; lengths
        are clamped to ``min(W, workspace.max_len, max_len)`` (never a read past the buffers).
    config : :class:`TopkConfig`.

    Notes
    -----
    No host sync, no allocation; the grid depends on ``T`` and the length bound only, so the call
    can be captured in a CUDA graph. Inputs are not validated here (``validate.py``).
    """
    cfg = config or TopkConfig()
    ws = workspace
    T = topk_indices.shape[0]
    if T == 0:
        return
    lmax = min(logits.shape[1], ws.max_len)
    if max_len is not None:
        lmax = min(lmax, int(max_len))
    lmax = max(lmax, 0)
    n_chunks = max(triton.cdiv(lmax, ws.chunk), 1)
    per_row = row_lens is not None
    lens = row_lens if per_row else context_lens
    cap = resolve_cap(cfg.cap, T * n_chunks, _num_sms(logits.device), ws)
    common = dict(K=ws.k, BLOCK=cfg.block, LOG2_NB=cfg.log2_bins, CAP=cap)
    fused = cfg.fused_merge or n_chunks == 1
    _topk_chunk_kernel[(T * n_chunks,)](
        logits, lens, topk_indices, ws.cand_vals, ws.cand_idx, ws.counters,
        logits.stride(0), topk_indices.stride(0), T, next_n, lmax, ws.max_chunks,
        CHUNK=ws.chunk, PER_ROW_LENS=per_row, FUSED_MERGE=fused, num_warps=cfg.num_warps, **common,
    )
    if not fused:
        _topk_merge_kernel[(T,)](
            lens, topk_indices, ws.cand_vals, ws.cand_idx, topk_indices.stride(0), next_n, lmax, ws.max_chunks,
            CHUNK=ws.chunk, PER_ROW_LENS=per_row, num_warps=cfg.num_warps, **common,
        )


def topk_decode_torch(logits: torch.Tensor, lens: torch.Tensor, k: int = TOPK_K) -> torch.Tensor:
    """PyTorch twin (vLLM ``SparseIndexerTopk`` "torch" backend): mask past ``lens``, ``topk``, -1 pad.

    Parameters
    ----------
    logits : float [T, W]. lens : int [T] visible lengths (<= W).

    Returns
    -------
    int32 [T, k].
    """
    T, W = logits.shape
    cols = torch.arange(W, device=logits.device)
    masked = logits.float().masked_fill(cols[None, :] >= lens[:, None], float("-inf"))
    if W < k:
        masked = torch.nn.functional.pad(masked, (0, k - W), value=float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    keep = torch.arange(k, device=logits.device)[None, :] < lens[:, None].clamp(max=k)
    return torch.where(keep, idx, -1).to(torch.int32)


__all__ = [
    "TOPK_K", "TOPK_CHUNK", "TOPK_BLOCK", "TOPK_CAP", "TOPK_CAP_MAX", "TopkConfig", "TopkWorkspace", "topk_workspace", "topk_decode", "resolve_cap",
    "topk_decode_torch", "_select_topk", "_topk_chunk_stage", "_topk_merge_stage", "_topk_chunk_item",
    "_topk_merge_item",
]
