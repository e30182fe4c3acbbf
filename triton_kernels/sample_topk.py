"""Top-2048 per decode row from a sampled cutoff: one read of the row, no histogram, no RED atomics.

Semantics of vLLM 0.33 ``vllm/model_executor/layers/indexer_topk.py`` (``SparseIndexerTopk``), as
:mod:`.radix_topk`: for decode row ``t`` with visible length ``L_t``, the positions of the
``min(L_t, 2048)`` largest logits of ``logits[t, :L_t]`` (any order) go to ``topk_indices[t]``, -1 to
the columns past ``min(L_t, 2048)``; nothing past ``L_t`` is read. Exact and deterministic: rank by
key (descending), then by position (ascending).

Algorithm
---------
* Keys: fp32 -> order-preserving int32 (``radix_topk._f32_to_key``).
* Exact selection in registers (:func:`_select_exact`): multiway bisection over the key range. Each
  round counts the members of the current bracket ``[lo, hi]`` in ``2**BITS`` equal sub-ranges
  (``COUNT=0``: ``tl.histogram``; ``COUNT=1``: one-hot 16-bit fields packed in int64 words and
  summed), keeps the sub-range holding the ``need``-th best, and stops when the bracket holds
  exactly the members still needed or a single key; ties at that key are broken by the lowest
  positions with the same bisection over positions. One prefix sum then writes the selection.
* A row of one chunk (``L <= CHUNK``) is one program holding the row in registers.
* A longer row is split into ``(row, chunk)`` programs. Each computes the same cutoff ``tau`` from a
  deterministic sample of the row (:func:`_row_cutoff`: ``S`` values in groups of 8 consecutive
  positions, one 32-byte sector each, one group per equal stretch of the row at a hashed offset;
  ``tau`` is a sample key whose sample count-above predicts between ``E_LO`` and
  ``E_HI`` values >= ``tau`` in the row, the idea of vLLM's ``sampled_topk``), writes its values
  ``>= tau`` (key, position) into the row's candidate buffer through ONE reservation atomic, and
  arrives on the row counter. The row's last arriver selects exactly among the candidates
  (:func:`_select_exact`), and resets the row's counters (CUDA-graph replays start from zero).
* Exact always: with ``n`` candidates, ``2048 <= n <= CAND`` means every value of the top-2048 is a
  candidate (all programs share ``tau``). Otherwise (a bad sample, ties or narrow ranges that put
  many values on ``tau``) the last arriver runs ``radix_topk._stream_select`` over the row (slow,
  exact).

Workspace: :class:`radix_topk.RadixTopkWorkspace` (``counters`` zero between launches,
``cand_key``/``cand_pos`` of at least ``CAND`` slots per row, ``scratch``); ``hist`` is not used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .radix_topk import _INT_MAX, _INT_MIN, _f32_to_key, _narrow, _pick_desc, _radix_row_len, _stream_select
from .topk_config import RADIX_RT, TOPK_K, RadixTopkConfig, _check_radix_args, launch_geometry, programs_per_row

# expected row values >= tau: the window the sample aims at (1.75 x 2048 ... 2.5 x 2048). The PyTorch
# twin of _row_cutoff (smpart.reference.sample_cutoff_torch) on 60 rows each of N(0, 1), a hot recent
# window, attention sinks, period-64 and period-128 patterns, 256-wide smoothing, quantized values
# and ReLU'd values, at L = 5000, 9000, 16384, 40000, 65536, 163840 (2,880 rows): between 1893 and
# 7342 values reached tau; one row (256-wide smoothing: neighbours strongly correlated) fell under
# 2048 and would take the exact fallback
# (tests/test_sample_topk.py::test_sampled_cutoff_keeps_the_candidates_in_range keeps a smaller set).
SAMPLE_E_LO = 3584
SAMPLE_E_HI = 5120
_E_LO = tl.constexpr(SAMPLE_E_LO)
_E_HI = tl.constexpr(SAMPLE_E_HI)


@triton.jit
def _span_shift(lo, hi, BITS: tl.constexpr):
    """Shift ``s`` with ``(hi - lo) >> s < 2**BITS`` (int32 scalars ``lo <= hi``; span < 2**32)."""
    span = hi.to(tl.int64) - lo.to(tl.int64)
    e = ((span.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2), maybe +1
    return tl.maximum(e - BITS + 1, 0)


@triton.jit
def _bin_counts(x, m, lo, s, BITS: tl.constexpr, COUNT: tl.constexpr):
    """Counts int32 [2**BITS] of the members ``m`` of ``x`` by sub-range ``(x - lo) >> s`` (< 2**BITS)."""
    NB: tl.constexpr = 1 << BITS
    tl.static_assert((COUNT == 0) | (BITS == 3) | (BITS == 4))
    d = ((x - lo).to(tl.uint32, bitcast=True) >> s.to(tl.uint32)).to(tl.int32)
    d = tl.where(m, d, 0)
    if COUNT == 0:
        c = tl.histogram(d, NB, mask=m)
    else:
        # one-hot 16-bit fields, 4 per int64 word: bin b -> word b >> 2, field b & 3 (counts < 65536)
        one = tl.where(m, tl.full(d.shape, 1, tl.int64) << ((d & 3) * 16).to(tl.int64), 0)
        w = d >> 2
        w0 = tl.sum(tl.where(w == 0, one, 0), 0)
        w1 = tl.sum(tl.where(w == 1, one, 0), 0)
        words = tl.join(w0, w1)  # [2]
        if BITS == 4:
            w2 = tl.sum(tl.where(w == 2, one, 0), 0)
            w3 = tl.sum(tl.where(w == 3, one, 0), 0)
            words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [[w0, w1], [w2, w3]]
        words = tl.reshape(words, [NB // 4])
        f = tl.arange(0, 4)
        c = tl.reshape((words[:, None] >> (f[None, :] * 16).to(tl.int64)) & 0xFFFF, [NB]).to(tl.int32)
    return c


@triton.jit
def _select_exact(k, p, valid, n, need, BITS: tl.constexpr, COUNT: tl.constexpr):
    """Exact top-``need`` of the ``n`` valid lanes by (key desc, position asc); ``1 <= need <= n``.

    ``k``/``p`` int32 [N] keys and positions (positions distinct among valid lanes). Returns
    ``(kth, pth)``: the selection is ``valid & ((k > kth) | ((k == kth) & (p <= pth)))``, exactly
    ``need`` lanes.
    """
    NB: tl.constexpr = 1 << BITS
    lo = tl.min(tl.where(valid, k, _INT_MAX), 0)
    hi = tl.max(tl.where(valid, k, _INT_MIN), 0)
    cnt = n
    while (cnt > need) & (lo < hi):
        s = _span_shift(lo, hi, BITS)
        m = valid & (k >= lo) & (k <= hi)
        b, above, cnt = _pick_desc(_bin_counts(k, m, lo, s, BITS, COUNT), need, NB)
        need = need - above
        lo, hi = _narrow(lo, hi, b, s)
    pth = cnt - cnt + _INT_MAX
    if cnt > need:
        # every member of the bracket has key lo: the `need` lowest positions among them
        m = valid & (k == lo)
        plo = tl.min(tl.where(m, p, _INT_MAX), 0)
        phi = tl.max(tl.where(m, p, -1), 0)
        while (cnt > need) & (plo < phi):  # (plo == phi with cnt > 1 only from garbage candidates)
            s = _span_shift(plo, phi, BITS)
            h = _bin_counts(p, m & (p >= plo) & (p <= phi), plo, s, BITS, COUNT)
            cum = tl.cumsum(h, 0)
            bb = tl.sum((cum < need).to(tl.int32), 0)  # first sub-range reaching `need` from below
            hit = tl.arange(0, NB) == bb
            need = need - tl.sum(tl.where(hit, cum - h, 0), 0)
            cnt = tl.sum(tl.where(hit, h, 0), 0)
            plo, phi = _narrow(plo, phi, bb, s)
        pth = phi
    return lo, pth


@triton.jit
def _write_selection(k, p, valid, kth, pth, out_ptr, K: tl.constexpr):
    """Store the positions of the selection of :func:`_select_exact` to ``out_ptr[0:need]``; never
    past ``out_ptr[K - 1]`` (only garbage candidates, e.g. after dirty counters, could select more)."""
    sel = valid & ((k > kth) | ((k == kth) & (p <= pth)))
    cs = tl.cumsum(sel.to(tl.int32), 0)
    tl.store(out_ptr + cs - 1, p, mask=sel & (cs <= K))


@triton.jit
def _select_candidates(ck, cpos, n_c, out, N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr,
                       COUNT: tl.constexpr):
    """Exact top-``K`` of the ``n_c <= N`` candidates (keys ``ck``, positions ``cpos``) into ``out``."""
    rc = tl.arange(0, N)
    vc = rc < n_c
    kk = tl.load(ck + rc, mask=vc, other=_INT_MIN, cache_modifier=".cg")
    pp = tl.load(cpos + rc, mask=vc, other=0, cache_modifier=".cg")
    kth, pth = _select_exact(kk, pp, vc, n_c, n_c - n_c + K, BITS, COUNT)
    _write_selection(kk, pp, vc, kth, pth, out, K)


@triton.jit
def _row_cutoff(row, L, K: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, COUNT: tl.constexpr):
    """Cutoff key ``tau`` of a row of ``L`` positions from ``n_s = min(S, L)`` values (``S / 8``
    groups of 8 consecutive positions, group ``g`` in the stretch ``[g * L / (S/8), (g+1) * L / (S/8))``
    at a hashed whole-sector offset; the same for every program of the row): a sample key whose sample count-above
    ``c`` lies in ``[n_s * E_LO / L, n_s * E_HI / L]`` (``E_* = SAMPLE_E_* * K / 2048``) when ties allow
    it, else the largest key with ``c >= n_s * E_LO / L``."""
    n_s = tl.minimum(L, S)
    i = tl.arange(0, S)
    v = i < n_s
    # groups of 8 consecutive values (one 32-byte sector each), one group per equal stretch of the
    # row at a hashed whole-sector offset inside it: every program of the row reads S / 8 sectors,
    # not S, the whole row is covered, and no periodic pattern of the row aliases with a fixed
    # stride (all of the row when it has fewer than S values)
    G: tl.constexpr = 8
    NG: tl.constexpr = S // G
    g = i // G
    start = (((g.to(tl.int64) * L) // NG) // G * G).to(tl.int32)  # stretch g: [g * L / NG, (g + 1) * L / NG)
    h = (g.to(tl.int64) * 2654435761) & 0xFFFFFFFF
    off = ((h >> 16) % tl.maximum(L // (NG * G), 1).to(tl.int64)).to(tl.int32)  # whole sectors inside it
    pos = tl.where(L >= S, start + off * G + (i % G), i)
    ks = tl.where(v, _f32_to_key(tl.load(row + pos, mask=v, other=0.0, cache_modifier=".cg")), _INT_MIN)
    e_lo = (_E_LO * K) // 2048
    e_hi = (_E_HI * K) // 2048
    c_lo = tl.minimum(tl.maximum((n_s * e_lo + L - 1) // L, 1), n_s)
    c_hi = tl.minimum(tl.maximum((n_s * e_hi) // L, c_lo), n_s)
    NB: tl.constexpr = 1 << BITS
    lo = tl.min(tl.where(v, ks, _INT_MAX), 0)
    hi = tl.max(ks, 0)
    above = n_s - n_s  # samples > hi
    cnt = n_s  # samples in [lo, hi]
    need = c_lo - above
    while (above + cnt > c_hi) & (lo < hi):
        s = _span_shift(lo, hi, BITS)
        m = v & (ks >= lo) & (ks <= hi)
        b, a, cnt = _pick_desc(_bin_counts(ks, m, lo, s, BITS, COUNT), need, NB)
        need = need - a
        above = above + a
        lo, hi = _narrow(lo, hi, b, s)
    return lo


@triton.jit
def _finish_row(row, L, n_c, out, ck, cpos, scr, CHUNK: tl.constexpr, K: tl.constexpr, CAND: tl.constexpr,
                CP: tl.constexpr, RT: tl.constexpr, BITS: tl.constexpr, COUNT: tl.constexpr):
    """The row's last step: exact top-``K`` of its ``n_c`` candidates (``ck``/``cpos``) into ``out``
    when ``K <= n_c <= CAND``, else the exact streaming fallback over the whole row."""
    if (n_c >= K) & (n_c <= CAND // 2):  # the usual case: half the lanes
        _select_candidates(ck, cpos, n_c, out, CAND // 2, K, BITS, COUNT)
    elif (n_c >= K) & (n_c <= CAND):
        _select_candidates(ck, cpos, n_c, out, CAND, K, BITS, COUNT)
    else:  # exact fallback: one program streams the row
        _stream_select(row, L, False, 0, L, L - L + K, out, L - L, ck, cpos, scr, CHUNK, CAND, CP, RT)


@triton.jit
def _sample_topk_item(t, c, L, ppr, logits_ptr, stride_logits, topk_ptr, stride_topk, ctr_ptr, cand_key_ptr,
                      cand_pos_ptr, scratch_ptr, CHUNK: tl.constexpr, K: tl.constexpr, CAND: tl.constexpr,
                      CP: tl.constexpr, RT: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr,
                      COUNT: tl.constexpr):
    """Top-k work of program ``c`` of row ``t`` (visible length ``L``); see the module docstring.

    A row of ``nch = cdiv(L, CHUNK)`` chunks has ``npr = min(ppr, nch)`` programs (``ppr`` >= 1, the
    same for every program of the row); program ``c < npr`` takes chunks ``c, c + npr, ...``, with
    one cutoff. With ``npr == 1`` the program owns the row: no atomics, it selects right after its
    last chunk. Never calls ``tl.program_id``: usable from any role of a persistent kernel."""
    tl.static_assert(CHUNK >= K)
    tl.static_assert(CAND >= 2 * K)
    nch = tl.maximum(tl.cdiv(L, CHUNK), 1)
    npr = tl.minimum(nch, tl.maximum(ppr, 1))
    if c < npr:
        t64 = t.to(tl.int64)
        row = logits_ptr + t64 * stride_logits
        out = topk_ptr + t64 * stride_topk
        r = tl.arange(0, CHUNK)
        if L <= K:
            rk = tl.arange(0, K)
            tl.store(out + rk, tl.where(rk < L, rk, -1))
        elif nch == 1:
            msk = r < L
            # .cg: in a persistent kernel other programs of the launch wrote the row
            k = tl.where(msk, _f32_to_key(tl.load(row + r, mask=msk, other=0.0, cache_modifier=".cg")), _INT_MIN)
            kth, pth = _select_exact(k, r, msk, L, L - L + K, BITS, COUNT)
            _write_selection(k, r, msk, kth, pth, out, K)
        else:
            ctr = ctr_ptr + t64 * 2
            ck = cand_key_ptr + t64 * CAND
            cpos = cand_pos_ptr + t64 * CAND
            scr = scratch_ptr + t64 * (2 * CP)
            # the first chunk's load is in flight while the cutoff is computed, and each chunk's
            # while the one before is compacted (one chunk of registers ahead)
            x = tl.load(row + c * CHUNK + r, mask=c * CHUNK + r < L, other=0.0, cache_modifier=".cg")
            tau = _row_cutoff(row, L, K, S, BITS, COUNT)
            n_own = L - L  # candidates of this program
            for cc in range(c, nch, npr):
                offs = cc * CHUNK + r
                msk = offs < L
                nxt = offs + npr * CHUNK
                x_next = tl.load(row + nxt, mask=nxt < L, other=0.0, cache_modifier=".cg")
                k = _f32_to_key(x)
                x = x_next
                m = msk & (k >= tau)
                cs = tl.cumsum(m.to(tl.int32), 0)
                n_m = tl.sum(m.to(tl.int32), 0)
                if npr == 1:
                    res = n_own
                else:
                    res = tl.atomic_add(ctr, n_m, sem="relaxed", scope="gpu")
                n_own += n_m
                slot = res + cs - 1
                ok = m & (slot >= 0) & (slot < CAND)  # (slot < 0 only from dirty counters)
                tl.store(ck + slot, k, mask=ok)
                tl.store(cpos + slot, offs, mask=ok)
            tl.debug_barrier()  # every thread's stores precede the release (or this program's reads)
            if npr == 1:
                _finish_row(row, L, n_own, out, ck, cpos, scr, CHUNK, K, CAND, CP, RT, BITS, COUNT)
            else:
                old = tl.atomic_add(ctr + 1, 1, sem="acq_rel", scope="gpu")
                if old == npr - 1:
                    n_c = tl.atomic_xchg(ctr, 0, sem="relaxed", scope="gpu")
                    tl.atomic_xchg(ctr + 1, 0, sem="relaxed", scope="gpu")
                    _finish_row(row, L, n_c, out, ck, cpos, scr, CHUNK, K, CAND, CP, RT, BITS, COUNT)


@triton.jit
def _sample_topk_kernel(logits_ptr, lens_ptr, topk_ptr, ctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr,
                        stride_logits, stride_topk, num_rows, next_n, lmax, ppr,
                        PER_ROW_LENS: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, CAND: tl.constexpr,
                        CP: tl.constexpr, RT: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr,
                        COUNT: tl.constexpr):
    """Program ``c * num_rows + t``: :func:`_sample_topk_item`, program ``c`` of row ``t`` (``ppr``
    programs per row at most)."""
    item = tl.program_id(0)
    c = item // num_rows
    t = item - c * num_rows
    L = _radix_row_len(t, lens_ptr, next_n, lmax, PER_ROW_LENS)
    _sample_topk_item(t, c, L, ppr, logits_ptr, stride_logits, topk_ptr, stride_topk, ctr_ptr, cand_key_ptr,
                      cand_pos_ptr, scratch_ptr, CHUNK, K, CAND, CP, RT, S, BITS, COUNT)


def sample_size(lmax: int) -> int:
    """Sampled values per long row for a launch whose rows see at most ``lmax`` positions:
    ``next_power_of_2(lmax // 32)`` clamped to [512, 4096] (about 128 sampled values above ``tau``
    at ``lmax`` <= 128K; vLLM's ``sampled_topk`` samples 4096)."""
    return min(max(triton.next_power_of_2(max(lmax // 32, 1)), 512), 4096)


def sample_topk(logits, context_lens, topk_indices, *, next_n: int, workspace, row_lens=None, max_len=None,
                config=None, check_values=None) -> None:
    """Top-2048 positions of every decode row's visible logits, -1 padded (one launch).

    Parameters
    ----------
    logits : fp32 [>= T, W], unit stride in the last dim; ``logits[t, :L_t]`` is read, nothing past.
    context_lens : int32 [B] vLLM ``seq_lens``; row ``t`` sees
        ``L_t = context_lens[t // next_n] - next_n + 1 + t % next_n`` positions (clamped to [0, lmax]).
    topk_indices : int32 [T, 2048] output, unit stride in the last dim (T = its first dim).
    next_n : rows per request (1 or 2).
    workspace : ``radix_topk.RadixTopkWorkspace`` with ``max_tokens >= T`` (``counters`` zero between
        launches, as every launch leaves them).
    row_lens : optional int32 [T] visible lengths (replaces ``context_lens``/``next_n``).
    max_len : optional host bound on every ``L_t``; lengths are clamped to ``lmax = min(W, max_len)``.
    config : ``radix_topk.RadixTopkConfig`` (``chunk``, ``short_max``, ``num_warps``, ``bits``,
        ``count``, ``sample``, ``programs_per_row``; ``algo`` is not read: this is the sampled
        top-k); None = its defaults.
    check_values : as ``radix_topk.radix_topk`` (non-zero ``counters`` refused; one host sync; None:
        unless capturing).

    Raises
    ------
    TypeError, ValueError, RuntimeError : as ``radix_topk.radix_topk`` (the same checks, before any
        launch).

    Notes
    -----
    No allocation, and no host sync unless ``check_values``; the grid depends on T and lmax only
    (CUDA-graph capturable). NaN ordering as ``radix_topk.radix_topk``.
    """
    _check_radix_args(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, config,
                      check_values, False, "sample")
    _sample_launch(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len,
                   config or RadixTopkConfig())


def _sample_launch(logits, context_lens, topk_indices, next_n, ws, row_lens, max_len, cfg) -> None:
    """The launch of :func:`sample_topk`, its arguments already checked (``topk.topk`` checks once)."""
    T = topk_indices.shape[0]
    if T == 0:
        return
    lmax, chunk, n_chunks = launch_geometry(logits, max_len, cfg)
    ppr = programs_per_row(cfg, T, n_chunks, logits.device)  # (config.algo is not read)
    per_row = row_lens is not None
    _sample_topk_kernel[(T * ppr,)](
        logits, row_lens if per_row else context_lens, topk_indices, ws.counters, ws.cand_key, ws.cand_pos,
        ws.scratch, logits.stride(0), topk_indices.stride(0), T, next_n, lmax, ppr,
        PER_ROW_LENS=per_row, CHUNK=chunk, K=TOPK_K, CAND=ws.cand, CP=ws.cp, RT=RADIX_RT,
        S=cfg.sample or sample_size(lmax), BITS=cfg.bits, COUNT=cfg.count, num_warps=cfg.num_warps,
    )
