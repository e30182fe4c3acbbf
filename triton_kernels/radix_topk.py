"""Top-2048 per decode row from a 2048-bin per-row histogram: one read of the row, many programs.

Every path's top-k. Semantics of vLLM 0.33 ``vllm/model_executor/layers/indexer_topk.py``
(``SparseIndexerTopk``): for decode row ``t`` with visible length ``L_t``, the positions of the
``min(L_t, 2048)`` largest logits of ``logits[t, :L_t]`` (any order) go to ``topk_indices[t]``, -1
to the columns past ``min(L_t, 2048)``; nothing past ``L_t`` is read.
Selection is exact and deterministic: rank by key (descending), then by position (ascending); the
selected *set* is the same on every call whatever the programs' order (the order inside the row
is free and may vary).

Algorithm
---------
* Keys: fp32 -> order-preserving int32 (``-0.0`` and ``+0.0`` share key 0, +-inf at the ends).
* Bins (:func:`_hist_bin`, 2048, monotone in the key, cut from the bits): sign, then an exponent
  window ``[2**-32, 2**32)`` at 16 bins per binade (exponent + top 4 mantissa bits); magnitudes
  outside the window clamp to the window's end bins (bins 0 and 2047 hold ``|x| >= 2**32`` and
  +-inf, bins 1023/1024 hold ``|x| < 2**-32``, zeros and subnormals).
* Histogram: ``hist[t, 2048]`` int32 in global memory, built either by the logits producer
  (``mqa_logits.paged_mqa_logits(hist=...)``: one relaxed ``atomic_add`` per logit whose result
  is unused, i.e. RED) or by :func:`_radix_hist_kernel` (same, a pass of its own).
* Select (:func:`_radix_select_kernel`, one program per (row, chunk of ``CHUNK`` positions)): a
  reverse cumsum over the row's bins gives the threshold bin ``b``, the count ``A`` of values in
  bins above it and ``need = K - A``. Each program reads its chunk once, reserves output and
  candidate slots with ONE value-returning atomic, writes its positions in bins ``> b`` straight
  into ``topk_indices[t, :A]`` and the members of bin ``b`` (key, position) into the row's
  candidate buffer (``CAND`` slots), then arrives on the row counter; the last arriver resolves
  bin ``b`` exactly (:func:`_resolve_regs`: 64-bin key narrowing in registers, then a pairwise
  (key, position) rank of <= ``CP`` members), writes them at ``[A, K)``, and resets the row's
  histogram and counters to zero (CUDA-graph replays start from zero; no memset node).
* A row of one chunk (``L <= CHUNK``, e.g. every row of a 4K/8K batch) is one program holding the
  row in registers: no atomics; without a histogram it narrows from the row's key range.
* Exact fallback (:func:`_stream_select`): when bin ``b`` holds more than ``CAND`` values (narrow
  value ranges: vLLM issue #51782's case) or the histogram does not count the row's ``L`` values,
  the last arriver selects by streaming 64-bin narrowing passes over the row (slow, exact).

Configuration, workspace and argument checks: ``topk_config.py`` (re-exported here).
Workspace (:class:`RadixTopkWorkspace`): ``hist`` int32 [T, 2048] and ``counters`` int32 [T, 2]
(zero between launches), ``cand_key``/``cand_pos`` int32 [T, CAND], ``scratch`` int32 [T, 2*CP].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk_config import (RADIX_CAND, RADIX_CHUNK, RADIX_CP, RADIX_RT, RADIX_SHORT, TOPK_K,  # noqa: F401
                          HIST_BINS, RadixTopkConfig, RadixTopkWorkspace, _check_radix_args, launch_geometry,
                          radix_chunk)

# Largest rows x positions for which the logits producer builds the histograms (``hist_fed``).
# Measured on an H100 (2026-12-07, bench/results/nvidia_h100/2026-12-07/topk.csv, us, cold L2):
# logits + producer histogram + select = 16.5 / 40.3 / 160.8 at 1x4K / 32x8K / 128x16K against
# 6.8+17.1 / 20.8+24.3 / 105.4+75.8 for logits + standalone radix (its own histogram pass), but
# 724.1 against 392.0+212.1 at 128x64K: the producer's RED atomics contend on the hot bins there.
FED_MAX_POSITIONS = 1 << 21

_NB = tl.constexpr(HIST_BINS)
_K_OUT = tl.constexpr(TOPK_K)  # columns of a topk_indices row
_INT_MAX = tl.constexpr(2147483647)
_INT_MIN = tl.constexpr(-2147483648)


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _f32_to_key(v):
    """fp32 -> int32 key with the same order (-0.0 and +0.0 share key 0; +NaN above +inf, -NaN
    below -inf). Keys are > ``_INT_MIN``, which marks empty lanes."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(b == _INT_MIN, 0, b)
    return tl.maximum(b ^ ((b >> 31) & 0x7FFFFFFF), _INT_MIN + 1)


@triton.jit
def _hist_bin(k):
    """Histogram bin in [0, 2048) of key ``k``: monotone (non-decreasing) in the key.

    ``u = k >> 19`` is sign, 8 exponent bits and 4 mantissa bits (16 bins per binade); the window
    ``[2**-32, 2**32)`` of each sign maps to 1024 bins, magnitudes outside clamp to its ends.
    """
    u = k >> 19
    pos = u >= 0
    v = tl.where(pos, u, -1 - u)  # magnitude bits >> 19 for either sign
    c = tl.minimum(tl.maximum(v - 1520, 0), 1023)  # 1520 = 95 * 16: biased exponent 95 = 2**-32
    return tl.where(pos, 1024 + c, 1023 - c)


@triton.jit
def _pick_desc(h, need, NB: tl.constexpr):
    """Threshold bin of histogram ``h`` [NB] counted from the top: the bin b with
    above(b) < need <= above(b) + h[b]. Returns (b, above(b), h[b]); needs 1 <= need <= sum(h)."""
    bins = tl.arange(0, NB)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)
    b = tl.sum((above >= need).to(tl.int32), 0)
    hit = bins == b
    return b, tl.sum(tl.where(hit, above, 0), 0), tl.sum(tl.where(hit, h, 0), 0)


@triton.jit
def _shift64(lo, hi):
    """Right shift mapping offsets in [0, hi - lo] onto < 64 bins (int32 scalars, span < 2**32)."""
    span = hi.to(tl.int64) - lo.to(tl.int64)
    e = ((span.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2), maybe +1
    return tl.maximum(e - 5, 0)


@triton.jit
def _narrow(lo, hi, bb, s):
    """Bracket of sub-bin ``bb`` of ``[lo, hi]`` with shift ``s`` (int64 arithmetic, int32 result)."""
    nlo = lo.to(tl.int64) + (bb.to(tl.int64) << s.to(tl.int64))
    nhi = tl.minimum(hi.to(tl.int64), nlo + (tl.full([], 1, tl.int64) << s.to(tl.int64)) - 1)
    return nlo.to(tl.int32), nhi.to(tl.int32)


@triton.jit
def _sub_bin(x, lo, s, m):
    """Sub-bin ``(x - lo) >> s`` of members ``m`` (0 elsewhere); x >= lo on members."""
    d = ((x - lo).to(tl.uint32, bitcast=True) >> s.to(tl.uint32)).to(tl.int32)
    return tl.where(m, d, 0)


@triton.jit
def _resolve_regs(k, p, valid, lo, hi, cnt, need, out_ptr, base, scratch_ptr,
                  CP: tl.constexpr, RT: tl.constexpr):
    """Exact selection over lanes held in registers (one program).

    ``k`` [N] int32 keys, ``p`` [N] int32 positions, ``valid`` [N]; members: valid lanes with key
    in ``[lo, hi]`` (``cnt`` of them, 1 <= need <= cnt). Writes to ``out_ptr[base:]`` the position
    of every valid lane with key ``> hi`` and of the ``need`` best members by (key desc, position
    asc): ``n_above + need`` slots, in any order. ``scratch_ptr``: 2*CP ints private to the call.
    """
    # key narrowing until <= CP members or one key
    while (cnt > CP) & (lo < hi):
        s = _shift64(lo, hi)
        m = valid & (k >= lo) & (k <= hi)
        bb, above, cnt = _pick_desc(tl.histogram(_sub_bin(k, lo, s, m), 64, mask=m), need, 64)
        need = need - above
        lo, hi = _narrow(lo, hi, bb, s)
    # position narrowing among equal keys (lowest positions first)
    plo = cnt - cnt
    phi = plo + _INT_MAX
    if cnt > CP:
        m = valid & (k == lo)
        plo = tl.min(tl.where(m, p, _INT_MAX), 0)
        phi = tl.max(tl.where(m, p, -1), 0)
        while (cnt > CP) & (plo < phi):  # (plo == phi with cnt > 1 only from garbage candidates)
            s = _shift64(plo, phi)
            m = valid & (k == lo) & (p >= plo) & (p <= phi)
            h = tl.histogram(_sub_bin(p, plo, s, m), 64, mask=m)
            cum = tl.cumsum(h, 0)
            bb = tl.sum((cum < need).to(tl.int32), 0)  # first bin reaching `need` from below
            hit = tl.arange(0, 64) == bb
            need = need - tl.sum(tl.where(hit, cum - h, 0), 0)
            cnt = tl.sum(tl.where(hit, h, 0), 0)
            plo, phi = _narrow(plo, phi, bb, s)
    inb = valid & (k >= lo) & (k <= hi)
    sure = valid & ((k > hi) | (inb & (p < plo)))
    member = inb & (p >= plo) & (p <= phi)
    packed = sure.to(tl.int32) * 65536 + member.to(tl.int32)
    cs = tl.cumsum(packed, 0)
    n_sure = tl.sum(sure.to(tl.int32), 0)
    # the row's K columns bound every store (consistent inputs stay below; dirty counters or garbage
    # candidates must not write past the row)
    tl.store(out_ptr + base + (cs >> 16) - 1, p, mask=sure & (base + (cs >> 16) - 1 < _K_OUT))
    tl.store(scratch_ptr + (cs & 0xFFFF) - 1, k, mask=member)
    tl.store(scratch_ptr + CP + (cs & 0xFFFF) - 1, p, mask=member)
    tl.debug_barrier()  # every warp's scratch stores precede the loads below
    cj = tl.arange(0, CP)
    vj = cj < cnt
    kj = tl.load(scratch_ptr + cj, mask=vj, other=_INT_MIN, cache_modifier=".cg")
    pj = tl.load(scratch_ptr + CP + cj, mask=vj, other=_INT_MAX, cache_modifier=".cg")
    for i0 in range(0, cnt, RT):
        ci = i0 + tl.arange(0, RT)
        vi = ci < cnt
        ki = tl.load(scratch_ptr + ci, mask=vi, other=_INT_MIN, cache_modifier=".cg")
        pi = tl.load(scratch_ptr + CP + ci, mask=vi, other=_INT_MAX, cache_modifier=".cg")
        better = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (pj[None, :] < pi[:, None]))
        rank = tl.sum((better & vj[None, :]).to(tl.int32), 1)
        tl.store(out_ptr + base + n_sure + rank, pi, mask=vi & (rank < need) & (base + n_sure + rank < _K_OUT))


@triton.jit
def _stream_select(row_ptr, L, by_bin, b, cnt, need, out_ptr, base, ck_ptr, cp_ptr, scratch_ptr,
                   BLOCK: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr, RT: tl.constexpr):
    """Exact fallback of one program streaming the row ``row_ptr[0:L]`` (``.cg`` loads).

    Members: every position (``by_bin`` False; then cnt = L) or those in histogram bin ``b``
    (``cnt`` of them). Selects every member above the final bracket and the ``need`` best members
    by (key desc, position asc) into ``out_ptr[base:]``. ``ck_ptr``/``cp_ptr``: ``CAND`` ints each.
    """
    r = tl.arange(0, BLOCK)
    # exact key range of the members
    mn = tl.full([BLOCK], _INT_MAX, tl.int32)
    mx = tl.full([BLOCK], _INT_MIN, tl.int32)
    for start in range(0, L, BLOCK):
        offs = start + r
        msk = offs < L
        k = _f32_to_key(tl.load(row_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
        m = msk & ((_hist_bin(k) == b) | (by_bin == 0))
        mn = tl.minimum(mn, tl.where(m, k, _INT_MAX))
        mx = tl.maximum(mx, tl.where(m, k, _INT_MIN))
    lo = tl.min(mn, 0)
    hi = tl.max(mx, 0)
    while (cnt > CAND) & (lo < hi):
        s = _shift64(lo, hi)
        h = tl.zeros([64], dtype=tl.int32)
        for start in range(0, L, BLOCK):
            offs = start + r
            msk = offs < L
            k = _f32_to_key(tl.load(row_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
            m = msk & (k >= lo) & (k <= hi)
            h += tl.histogram(_sub_bin(k, lo, s, m), 64, mask=m)
        bb, above, cnt = _pick_desc(h, need, 64)
        run = base
        for start in range(0, L, BLOCK):
            offs = start + r
            msk = offs < L
            k = _f32_to_key(tl.load(row_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
            m = msk & (k >= lo) & (k <= hi)
            sel = m & (_sub_bin(k, lo, s, m) > bb)
            cs = tl.cumsum(sel.to(tl.int32), 0)
            tl.store(out_ptr + run + cs - 1, offs, mask=sel)
            run += tl.sum(sel.to(tl.int32), 0)
        base += above
        need -= above
        lo, hi = _narrow(lo, hi, bb, s)
    if cnt > CAND:
        # all members share one key: the `need` lowest positions
        run = cnt - cnt
        for start in range(0, L, BLOCK):
            offs = start + r
            msk = offs < L
            k = _f32_to_key(tl.load(row_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
            m = msk & (k == lo)
            rank = run + tl.cumsum(m.to(tl.int32), 0) - 1
            tl.store(out_ptr + base + rank, offs, mask=m & (rank < need))
            run += tl.sum(m.to(tl.int32), 0)
    else:
        run = cnt - cnt
        for start in range(0, L, BLOCK):
            offs = start + r
            msk = offs < L
            k = _f32_to_key(tl.load(row_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg"))
            m = msk & (k >= lo) & (k <= hi)
            cs = run + tl.cumsum(m.to(tl.int32), 0) - 1
            tl.store(ck_ptr + cs, k, mask=m)
            tl.store(cp_ptr + cs, offs, mask=m)
            run += tl.sum(m.to(tl.int32), 0)
        tl.debug_barrier()
        rc = tl.arange(0, CAND)
        v = rc < cnt
        kk = tl.load(ck_ptr + rc, mask=v, other=_INT_MIN, cache_modifier=".cg")
        pp = tl.load(cp_ptr + rc, mask=v, other=0, cache_modifier=".cg")
        _resolve_regs(kk, pp, v, lo, hi, cnt, need, out_ptr, base, scratch_ptr, CP, RT)


@triton.jit
def _radix_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS: tl.constexpr):
    """Visible length of row ``t`` clamped to ``[0, lmax]``: ``lens[t]``, or from vLLM ``seq_lens``:
    ``context_lens[t // next_n] - next_n + 1 + t % next_n`` (docs/KERNELS.md, "Layouts")."""
    if PER_ROW_LENS:
        L = tl.load(lens_ptr + t)
    else:
        b = t // next_n
        L = tl.load(lens_ptr + b) - next_n + 1 + (t - b * next_n)
    return tl.minimum(tl.maximum(L, 0), lmax)


@triton.jit
def _radix_topk_item(t, c, L, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr, ctr_ptr,
                     cand_key_ptr, cand_pos_ptr, scratch_ptr, HAS_HIST: tl.constexpr, CHUNK: tl.constexpr,
                     K: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr, RT: tl.constexpr):
    """Top-k work of chunk ``c`` of row ``t`` (visible length ``L``); see the module docstring.

    With ``HAS_HIST`` the row's histogram ``hist_ptr[t, :2048]`` must count exactly its ``L``
    visible values (else the exact fallback runs); it is zeroed by the row's last program.
    Never calls ``tl.program_id``: usable from any role of a persistent kernel.
    """
    tl.static_assert(CHUNK >= K)
    tl.static_assert(CHUNK <= 32768)
    nch = tl.maximum(tl.cdiv(L, CHUNK), 1)
    if c < nch:
        t64 = t.to(tl.int64)
        row = logits_ptr + t64 * stride_logits
        out = topk_ptr + t64 * stride_topk
        hrow = hist_ptr + t64 * _NB
        ctr = ctr_ptr + t64 * 2
        ck = cand_key_ptr + t64 * CAND
        cpos = cand_pos_ptr + t64 * CAND
        scr = scratch_ptr + t64 * (2 * CP)
        r = tl.arange(0, CHUNK)
        offs = c * CHUNK + r
        msk = offs < L
        if L <= K:
            rk = tl.arange(0, K)
            tl.store(out + rk, tl.where(rk < L, rk, -1))
            if HAS_HIST:
                tl.store(hrow + tl.arange(0, _NB), tl.zeros([_NB], tl.int32))
        else:
            # .cg: in the partitioned kernel's fused top-k other programs of the launch wrote the row
            k = tl.where(msk, _f32_to_key(tl.load(row + offs, mask=msk, other=0.0, cache_modifier=".cg")), _INT_MIN)
            if HAS_HIST:
                h = tl.load(hrow + tl.arange(0, _NB), cache_modifier=".cg")
                valid = tl.sum(h, 0) == L
                b, A, hb = _pick_desc(h, K, _NB)
                if nch == 1:
                    if valid:
                        m = msk & (_hist_bin(k) == b)
                        lo = tl.min(tl.where(m, k, _INT_MAX), 0)
                        hi = tl.max(tl.where(m, k, _INT_MIN), 0)
                        _resolve_regs(k, offs, msk, lo, hi, hb, K - A, out, 0, scr, CP, RT)
                    else:
                        lo = tl.min(tl.where(msk, k, _INT_MAX), 0)
                        hi = tl.max(k, 0)
                        _resolve_regs(k, offs, msk, lo, hi, L, L - L + K, out, 0, scr, CP, RT)
                    tl.store(hrow + tl.arange(0, _NB), tl.zeros([_NB], tl.int32))
                else:
                    d = _hist_bin(k)
                    a = msk & valid & (d > b)
                    m = msk & valid & (d == b) & (hb <= CAND)
                    packed = a.to(tl.int32) * 65536 + m.to(tl.int32)
                    cs = tl.cumsum(packed, 0)
                    tot = tl.sum(packed, 0)
                    # one reservation per program: above-count in bits 0..11 (< 2048), members above
                    res = tl.atomic_add(ctr, (tot >> 16) + ((tot & 0xFFFF) << 12), sem="relaxed", scope="gpu")
                    # the bounds masks only matter for dirty counters (a launch that did not complete):
                    # no leftover state writes past the row's K columns or its CAND slots
                    opos = (res & 0xFFF) + (cs >> 16) - 1
                    tl.store(out + opos, offs, mask=a & (opos < K))
                    mpos = (res >> 12) + (cs & 0xFFFF) - 1
                    tl.store(ck + mpos, k, mask=m & (mpos >= 0) & (mpos < CAND))
                    tl.store(cpos + mpos, offs, mask=m & (mpos >= 0) & (mpos < CAND))
                    tl.debug_barrier()  # every thread's stores precede the release
                    old = tl.atomic_add(ctr + 1, 1, sem="acq_rel", scope="gpu")
                    if old == nch - 1:
                        tl.atomic_xchg(ctr, 0, sem="relaxed", scope="gpu")
                        tl.atomic_xchg(ctr + 1, 0, sem="relaxed", scope="gpu")
                        if valid & (hb <= CAND):
                            rc = tl.arange(0, CAND)
                            v = rc < hb
                            kk = tl.load(ck + rc, mask=v, other=_INT_MIN, cache_modifier=".cg")
                            pp = tl.load(cpos + rc, mask=v, other=0, cache_modifier=".cg")
                            lo = tl.min(tl.where(v, kk, _INT_MAX), 0)
                            hi = tl.max(kk, 0)
                            _resolve_regs(kk, pp, v, lo, hi, hb, K - A, out, A, scr, CP, RT)
                        else:
                            _stream_select(row, L, valid, b, tl.where(valid, hb, L), tl.where(valid, K - A, K),
                                           out, tl.where(valid, A, 0), ck, cpos, scr, CHUNK, CAND, CP, RT)
                        tl.store(hrow + tl.arange(0, _NB), tl.zeros([_NB], tl.int32))
            else:
                if nch == 1:
                    lo = tl.min(tl.where(msk, k, _INT_MAX), 0)
                    hi = tl.max(k, 0)
                    _resolve_regs(k, offs, msk, lo, hi, L, L - L + K, out, 0, scr, CP, RT)
                elif c == 0:  # no histogram for a long row: one program streams it (slow, exact)
                    _stream_select(row, L, False, 0, L, L - L + K, out, L - L, ck, cpos, scr, CHUNK, CAND, CP, RT)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _radix_hist_kernel(logits_ptr, lens_ptr, hist_ptr, stride_logits, num_rows, next_n, lmax,
                       PER_ROW_LENS: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    """Histogram pass: program ``c * num_rows + t`` adds chunk ``c`` of row ``t`` (rows of more
    than K visible values only) to ``hist[t]`` with relaxed atomics whose result is unused (RED)."""
    item = tl.program_id(0)
    c = item // num_rows
    t = item - c * num_rows
    L = _radix_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS)
    if (c * CHUNK < L) & (L > K):
        offs = c * CHUNK + tl.arange(0, CHUNK)
        msk = offs < L
        v = tl.load(logits_ptr + t.to(tl.int64) * stride_logits + offs, mask=msk, other=0.0)
        tl.atomic_add(hist_ptr + t.to(tl.int64) * _NB + _hist_bin(_f32_to_key(v)), 1, mask=msk, sem="relaxed")


@triton.jit
def _radix_select_kernel(logits_ptr, lens_ptr, topk_ptr, hist_ptr, ctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr,
                         stride_logits, stride_topk, num_rows, next_n, lmax,
                         PER_ROW_LENS: tl.constexpr, HAS_HIST: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
                         CAND: tl.constexpr, CP: tl.constexpr, RT: tl.constexpr):
    """Program ``c * num_rows + t``: :func:`_radix_topk_item` for chunk ``c`` of row ``t``."""
    item = tl.program_id(0)
    c = item // num_rows
    t = item - c * num_rows
    L = _radix_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS)
    _radix_topk_item(t, c, L, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr, ctr_ptr,
                     cand_key_ptr, cand_pos_ptr, scratch_ptr, HAS_HIST, CHUNK, K, CAND, CP, RT)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def hist_fed(num_rows: int, lmax: int, config: RadixTopkConfig | None = None) -> bool:
    """Whether the logits producer should build the radix histograms for ``num_rows`` rows of up to
    ``lmax`` positions (else the top-k runs its own histogram pass: ``radix_topk(hist_ready=False)``).

    Parameters
    ----------
    num_rows : int, rows T. lmax : int, the rows' length bound (positions).
    config : the top-k's :class:`RadixTopkConfig` (None: its defaults).

    Returns
    -------
    bool : ``algo == "radix"`` and ``num_rows * lmax <= FED_MAX_POSITIONS`` (the H100 measurement in
    this module's header); the sampled top-k reads no histogram.
    """
    cfg = config or RadixTopkConfig()
    return cfg.algo == "radix" and num_rows * lmax <= FED_MAX_POSITIONS


def radix_topk(logits: torch.Tensor, context_lens: torch.Tensor | None, topk_indices: torch.Tensor, *, next_n: int,
               workspace: RadixTopkWorkspace, row_lens: torch.Tensor | None = None, max_len: int | None = None,
               hist_ready: bool = False, config: RadixTopkConfig | None = None,
               check_values: bool | None = None) -> None:
    """Top-2048 positions of every decode row's visible logits, -1 padded (one or two launches), by
    this module's histogram algorithm whatever ``config.algo`` says (``topk.topk`` is the entry point
    that dispatches on it).

    Parameters
    ----------
    logits : fp32 [>= T, W], unit stride in the last dim; ``logits[t, :L_t]`` is read, nothing past.
    context_lens : int32 [B] vLLM ``seq_lens``; row ``t`` sees
        ``L_t = context_lens[t // next_n] - next_n + 1 + t % next_n`` positions (clamped to [0, lmax]).
    topk_indices : int32 [T, 2048] output, unit stride in the last dim (T = its first dim).
    next_n : rows per request (1 or 2).
    workspace : :class:`RadixTopkWorkspace` with ``max_tokens >= T``.
    row_lens : optional int32 [T] visible lengths (replaces ``context_lens``/``next_n``, which are
        then not read).
    max_len : optional host bound on every ``L_t``; lengths are clamped to ``lmax = min(W, max_len)``
        (so a length past the logits' width W is cut to W, silently).
    hist_ready : (``algo="radix"`` only) the producer already added each row's ``L_t`` visible values to
        ``workspace.hist`` (``mqa_logits.paged_mqa_logits(hist=workspace.hist)`` with the same
        lengths); else a histogram pass runs first when a row spans several chunks.
    config : :class:`RadixTopkConfig`.
    check_values : refuse a workspace left dirty by a launch that did not complete (non-zero
        ``counters``, and ``hist`` unless ``hist_ready``): one host sync. None (default): on unless
        a CUDA graph is being captured on the current stream.

    Raises
    ------
    TypeError : an argument of the wrong type (not a tensor, a workspace or config of another
        class, a non-int ``next_n`` / ``max_len`` (a numpy int too), a non-bool ``hist_ready`` /
        ``check_values``); a workspace buffer of the wrong dtype.
    ValueError : wrong dtype / rank / device / last-dim stride of an argument, ``topk_indices`` not
        2048 wide, ``logits`` or the lengths shorter than T rows, non-contiguous lengths, neither
        ``context_lens`` nor ``row_lens``, ``next_n`` not 1 or 2, ``max_len`` < 0, a workspace that
        does not fit (``RadixTopkWorkspace.check``), an output sharing memory with an input or
        another output (views of one allocation over 4 MiB are refused unless provably disjoint by
        their byte ranges), dirty workspace state (``check_values``).
    RuntimeError : CPU tensors without ``TRITON_INTERPRET=1``.

    Notes
    -----
    No allocation, and no host sync unless ``check_values``; the grid depends on T and lmax only
    (CUDA-graph capturable). NaN: keys follow the fp32 bits (``_f32_to_key``): +NaN ranks above
    +inf, -NaN below -inf (``torch.topk`` ranks every NaN first); ``run_region`` refuses
    non-finite inputs before they reach the logits.
    """
    _check_radix_args(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, config,
                      check_values, hist_ready, "radix")
    _radix_launch(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, hist_ready,
                  config or RadixTopkConfig())


def _radix_launch(logits, context_lens, topk_indices, next_n, ws, row_lens, max_len, hist_ready, cfg) -> None:
    """The launches of :func:`radix_topk`, its arguments already checked (``topk.topk`` checks once)."""
    T = topk_indices.shape[0]
    if T == 0:
        return
    lmax, chunk, n_chunks = launch_geometry(logits, max_len, cfg)
    per_row = row_lens is not None
    lens = row_lens if per_row else context_lens
    has_hist = bool(hist_ready) or n_chunks > 1
    if has_hist and not hist_ready:
        _radix_hist_kernel[(T * n_chunks,)](logits, lens, ws.hist, logits.stride(0), T, next_n, lmax,
                                            PER_ROW_LENS=per_row, CHUNK=chunk, K=TOPK_K, num_warps=cfg.hist_warps)
    _radix_select_kernel[(T * n_chunks,)](
        logits, lens, topk_indices, ws.hist, ws.counters, ws.cand_key, ws.cand_pos, ws.scratch,
        logits.stride(0), topk_indices.stride(0), T, next_n, lmax,
        PER_ROW_LENS=per_row, HAS_HIST=has_hist, CHUNK=chunk, K=TOPK_K, CAND=ws.cand, CP=ws.cp, RT=RADIX_RT,
        num_warps=cfg.num_warps,
    )


__all__ = ["TOPK_K", "HIST_BINS", "RADIX_CAND", "RADIX_CP", "RADIX_CHUNK", "RADIX_SHORT", "RadixTopkConfig",
           "RadixTopkWorkspace", "radix_chunk", "radix_topk", "_radix_topk_item", "_hist_bin",
           "_f32_to_key"]
