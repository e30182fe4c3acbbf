"""Correctness rules shared by the tests and the benchmark's pre-timing check (docs/CORRECTNESS.md).

Each check raises ``AssertionError`` naming the first bad coordinate.
"""

from __future__ import annotations

import torch

from .triton_kernels import dims
from . import reference


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's normalized difference ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64
    (DeepGEMM ``deep_gemm/testing/numeric.py::calc_diff``). 0 for equal tensors."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def assert_equal_bytes(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Exact equality (bytes); reports the first differing element."""
    g, w = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    if not torch.equal(g, w):
        idx = (g != w).nonzero()[0].tolist()
        n = int((g != w).sum())
        raise AssertionError(f"{name}: {n} bytes differ; first at byte index {idx}: got {g[tuple(idx)].item()}, "
                             f"want {w[tuple(idx)].item()}")


def logits_tolerance(args, lens: torch.Tensor) -> torch.Tensor:
    """Per-position absolute tolerance of a path's logits against the float64 check, float64 [T, L].

    ``2**-10 * A`` with ``A = sum_h |w| (|q| . |k|) k_scale`` (``reference.paged_mqa_logits`` with
    ``absolute=True``): FP8 products are exact, and Hopper's FP8 MMA accumulates with about 14
    mantissa bits within a 128-wide dot (DeepSeek-V3 report, section 3.3.2), so any summation order
    lands within ``2**-13 * A``; the bound keeps an 8x margin and is still far below the gap an
    indexing bug makes (a wrong key moves a logit by O(A)).
    """
    max_len = max(int(lens.max()), 1)
    A = reference.paged_mqa_logits(args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table,
                                   args.context_lens, args.next_n, max_len, dtype=torch.float64, absolute=True)
    return torch.nan_to_num(A, neginf=0.0) * 2.0**-10


def check_topk(topk: torch.Tensor, ref_logits: torch.Tensor, lens: torch.Tensor, tol: torch.Tensor | None = None,
               exact_sets: bool = False) -> None:
    """Top-k rule of docs/CORRECTNESS.md.

    Parameters
    ----------
    topk : int32 [T, 2048] produced by a path.
    ref_logits : float [T, >= max len], the reference logits (float64 preferred).
    lens : int [T] visible lengths.
    tol : float64 [T, >= max len] per-position tolerance (default: exact values).
    exact_sets : demand the index set equal the reference's (tie-free inputs).
    """
    topk, ref_logits, lens = topk.cpu(), ref_logits.cpu().double(), lens.cpu()
    K = topk.shape[1]
    for t in range(topk.shape[0]):
        L = int(lens[t])
        n = min(K, L)
        row = topk[t]
        sel, pad = row[:n], row[n:]
        if (pad != -1).any():
            c = int((pad != -1).nonzero()[0]) + n
            raise AssertionError(f"topk row {t} (len {L}): column {c} = {row[c].item()}, want -1 padding")
        if ((sel < 0) | (sel >= L)).any():
            c = int(((sel < 0) | (sel >= L)).nonzero()[0])
            raise AssertionError(f"topk row {t} (len {L}): column {c} = {sel[c].item()} outside [0, {L})")
        if torch.unique(sel).numel() != n:
            raise AssertionError(f"topk row {t} (len {L}): {n - torch.unique(sel).numel()} duplicate indices")
        if n == 0:
            continue
        vals = ref_logits[t, :L]
        kth = torch.topk(vals, n).values[-1].item()
        got = vals[sel.long()]
        # a selected logit may sit below the true n-th largest by the two logits' error bounds
        slack = torch.zeros_like(got) if tol is None else tol[t, sel.long()].cpu().double() + tol[t, :L].max().cpu()
        if (got < kth - slack).any():
            c = int((got < kth - slack).nonzero()[0])
            raise AssertionError(f"topk row {t} (len {L}): index {sel[c].item()} has logit {got[c].item()} "
                                 f"< {n}th largest {kth} - tol {slack[c].item():.3e}")
        if exact_sets:
            want = set(torch.topk(vals, n).indices.tolist())
            if set(sel.tolist()) != want:
                missing = sorted(want - set(sel.tolist()))[:5]
                raise AssertionError(f"topk row {t} (len {L}): index set differs, missing e.g. {missing}")


def check_region(out, want, batch=None, *, logits64: torch.Tensor | None = None, q_diff: float = 1e-5) -> None:
    """Compare a path's outputs (``out``: RegionArgs after the run) with the reference's (``want``).

    Cache bytes and ``k_pe`` exact; ``q`` by normalized difference < ``q_diff`` (accumulation order
    only, the quantized inputs are identical) and no NaN (every element written); ``topk_indices``
    by :func:`check_topk` against float64 logits (exact index sets on tie-free batches).
    """
    assert_equal_bytes("kv_cache", out.kv_cache, want.kv_cache)
    assert_equal_bytes("k_pe", out.k_pe, want.k_pe)
    if out.q.isnan().any():
        idx = out.q.isnan().nonzero()[0].tolist()
        raise AssertionError(f"q: unwritten (NaN) element at {idx}")
    d = calc_diff(out.q.float(), want.q.float())
    if not d < q_diff:
        raise AssertionError(f"q: normalized difference {d:.3e} >= {q_diff:.0e}")
    lens = reference.visible_lens(want.context_lens, want.next_n)
    if logits64 is None:
        max_len = max(int(lens.max()), 1)
        logits64 = reference.paged_mqa_logits(want.index_q_fp8, want.index_weights, want.kv_cache, want.block_table,
                                              want.context_lens, want.next_n, max_len, dtype=torch.float64)
    tie_free = bool(batch is not None and batch.tie_free)
    check_topk(out.topk_indices, logits64, lens, None if tie_free else logits_tolerance(want, lens),
               exact_sets=tie_free)


__all__ = ["calc_diff", "assert_equal_bytes", "logits_tolerance", "check_topk", "check_region", "dims"]
