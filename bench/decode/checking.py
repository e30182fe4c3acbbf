"""Checking every path against the reference: the full rule (``checks.check_region``), its
vectorized twin for long GPU runs, and the mismatch report (step, path, row, request, element)."""

from __future__ import annotations

import re
import types

import numpy as np
import torch

from .common import BLOCK_SIZE, VENDOR_PATHS, StepBatch



class MismatchError(AssertionError):
    """A path disagreed with the reference; ``report`` (dict) names the step, path, row, request and
    first differing element (see :func:`format_report`)."""

    def __init__(self, report: dict):
        self.report = report
        super().__init__(format_report(report))


def format_report(r: dict) -> str:
    """Human-readable lines of a mismatch report."""
    lines = [f"MISMATCH at step {r.get('step')}: path {r.get('path')!r} vs reference ({r.get('check')})",
             f"  {r.get('message')}"]
    for key in ("row", "request", "draft_index", "context_len", "visible_len", "position", "element", "got", "want",
                "block", "block_owner", "note"):
        if r.get(key) is not None:
            lines.append(f"  {key}: {r[key]}")
    return "\n".join(lines)


# ======================================================================================
# checks
# ======================================================================================
def reference_logits64(want) -> torch.Tensor:
    """float64 reference logits [T, max visible] of the post-step reference cache (``want``: RegionArgs)."""
    from smpart import reference

    lens = reference.visible_lens(want.context_lens, want.next_n)
    max_len = max(int(lens.max()), 1)
    return reference.paged_mqa_logits(want.index_q_fp8, want.index_weights, want.kv_cache, want.block_table,
                                      want.context_lens, want.next_n, max_len, dtype=torch.float64)


def fast_check_region(path: str, out, want, logits64: torch.Tensor, tol: torch.Tensor | None, tie_free: bool,
                      q_diff: float = 1e-5) -> None:
    """Vectorized equivalent of ``smpart.bench.common.check_path`` (``checks.check_region``) for long runs.

    Same rules and messages: cache bytes and ``k_pe`` exact (``k_pe`` by normalized difference < 1e-5
    for the vendor paths, whose RoPE rounds once in fp32), ``q`` without NaN and normalized
    difference < ``q_diff``, and the top-k rule of docs/CORRECTNESS.md row by row: exactly
    ``max(0, 2048 - L)`` trailing -1, selected indices unique and in ``[0, L)``, every selected
    reference logit >= the reference's ``min(2048, L)``-th largest minus the two logits' tolerances
    (``tol``: ``checks.logits_tolerance``; ``None`` = exact), equal index sets when ``tie_free``.
    Whole-tensor operations on the device, no per-row Python loop.

    Parameters
    ----------
    path : the path's name. out, want : RegionArgs of the path and of the reference (same rows).
    logits64 : float64 [T, >= max visible] reference logits (-inf past each row's length).
    tol : float64 [T, same width] per-position tolerance, or None.

    Raises
    ------
    AssertionError : the first failing rule (first row, first column).
    """
    from smpart import checks, reference

    checks.assert_equal_bytes("kv_cache", out.kv_cache, want.kv_cache)
    if path in VENDOR_PATHS:
        d = checks.calc_diff(out.k_pe.float(), want.k_pe.float())
        if not d < 1e-5:
            raise AssertionError(f"k_pe: normalized difference {d:.3e} >= 1e-05")
    else:
        checks.assert_equal_bytes("k_pe", out.k_pe, want.k_pe)
    if out.q.isnan().any():
        idx = out.q.isnan().nonzero()[0].tolist()
        raise AssertionError(f"q: unwritten (NaN) element at {idx}")
    d = checks.calc_diff(out.q.float(), want.q.float())
    if not d < q_diff:
        raise AssertionError(f"q: normalized difference {d:.3e} >= {q_diff:.0e}")

    topk = out.topk_indices
    T, K = topk.shape
    dev = topk.device
    lens = reference.visible_lens(want.context_lens, want.next_n).to(dev).long()  # [T]
    n = lens.clamp(max=K)  # [T]
    cols = torch.arange(K, device=dev)
    sel_mask = cols[None, :] < n[:, None]  # [T, K]
    topk = topk.long()

    def first(mask: torch.Tensor) -> tuple[int, int] | None:
        if not bool(mask.any()):
            return None
        t, c = mask.nonzero()[0].tolist()
        return t, c

    hit = first(~sel_mask & (topk != -1))
    if hit:
        t, c = hit
        raise AssertionError(f"topk row {t} (len {int(lens[t])}): column {c} = {int(topk[t, c])}, want -1 padding")
    hit = first(sel_mask & ((topk < 0) | (topk >= lens[:, None])))
    if hit:
        t, c = hit
        raise AssertionError(f"topk row {t} (len {int(lens[t])}): column {c} = {int(topk[t, c])} "
                             f"outside [0, {int(lens[t])})")
    keyed = torch.where(sel_mask, topk, -2 - cols[None, :])  # unselected columns get distinct negatives
    srt = keyed.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        t = int(dup.any(dim=1).nonzero()[0])
        raise AssertionError(f"topk row {t} (len {int(lens[t])}): {int(dup[t].sum())} duplicate indices")
    if int(n.max()) == 0:
        return
    lg = logits64.to(dev).double()
    width = lg.shape[1]
    kk = min(K, width)
    top = torch.topk(lg, kk, dim=1)
    kth = top.values.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)  # [T]
    safe = topk.clamp(0, width - 1)
    got = lg.gather(1, safe)
    if tol is None:
        slack = torch.zeros_like(got)
    else:
        tl_ = tol.to(dev).double()
        slack = tl_.gather(1, safe) + tl_.max(dim=1).values[:, None]
    bad = sel_mask & (n[:, None] > 0) & (got < kth[:, None] - slack)
    hit = first(bad)
    if hit:
        t, c = hit
        raise AssertionError(f"topk row {t} (len {int(lens[t])}): index {int(topk[t, c])} has logit "
                             f"{float(got[t, c])} < {int(n[t])}th largest {float(kth[t])} - tol "
                             f"{float(slack[t, c]):.3e}")
    if tie_free:
        want_idx = torch.where(cols[None, :kk] < n[:, None], top.indices, torch.full_like(top.indices, -1))
        if kk < K:
            want_idx = torch.cat([want_idx, torch.full((T, K - kk), -1, dtype=want_idx.dtype, device=dev)], dim=1)
        got_sorted = torch.where(sel_mask, topk, -1).sort(dim=1).values
        want_sorted = want_idx.sort(dim=1).values
        rows = (got_sorted != want_sorted).any(dim=1)
        if bool(rows.any()):
            t = int(rows.nonzero()[0])
            missing = sorted(set(want_sorted[t].tolist()) - set(got_sorted[t].tolist()))[:5]
            raise AssertionError(f"topk row {t} (len {int(lens[t])}): index set differs, missing e.g. {missing}")


def _check_prep(out, want, exact: bool) -> bool:
    """The index-q prep's outputs (production region) against the reference's: byte-exact when
    ``exact`` (a GPU: every path's prep gives vLLM's ``fused_q`` pid 1 bytes, the reference its torch
    twin's); under the interpreter, whose fp8 cast rounds differently from torch's
    (tests/test_v32_index_q.py), by normalized difference < 1e-2.

    Returns
    -------
    bool : the bytes are equal.

    Raises
    ------
    AssertionError : naming ``index_q_fp8`` or ``index_weights``.
    """
    from smpart import checks

    same = True
    for name in ("index_q_fp8", "index_weights"):
        got, ref = getattr(out, name), getattr(want, name)
        if exact:
            checks.assert_equal_bytes(name, got, ref)
        elif not torch.equal(got.view(torch.uint8), ref.view(torch.uint8)):
            same = False
            d = checks.calc_diff(got.float(), ref.float())
            if not d < 1e-2:
                raise AssertionError(f"{name}: normalized difference {d:.3e} >= 1e-02")
    return same


class CheckMixin:
    """The per-step check of :class:`~smpart.bench.decode.loop.DecodeLoop`."""

    def _check(self, sb: StepBatch, ref_args, outs: dict) -> None:
        from smpart.bench.common import check_path
        from smpart import checks, reference

        cfg = self.cfg
        logits64 = reference_logits64(ref_args)
        tol = None
        if cfg.check == "fast" and not cfg.tie_free:
            tol = checks.logits_tolerance(ref_args, reference.visible_lens(ref_args.context_lens, cfg.next_n))
        batch = types.SimpleNamespace(tie_free=cfg.tie_free)
        for p, (out, pad_topk) in outs.items():
            try:
                want, lg, tl = ref_args, logits64, tol
                if cfg.production and not _check_prep(out, ref_args, exact=self.is_cuda):
                    # interpreter: the top-k is judged on the logits of the path's own prep bytes
                    import dataclasses

                    want = dataclasses.replace(ref_args, index_q_fp8=out.index_q_fp8, index_weights=out.index_weights)
                    lg = reference_logits64(want)
                    tl = None if tol is None else checks.logits_tolerance(
                        want, reference.visible_lens(want.context_lens, cfg.next_n))
                if cfg.check == "fast":
                    fast_check_region(p, out, want, lg, tl, cfg.tie_free)
                else:
                    check_path(p, out, want, batch, lg)
                if pad_topk.numel() and bool((pad_topk != -1).any()):
                    t, c = (pad_topk != -1).nonzero()[0].tolist()
                    raise AssertionError(f"topk padding row {sb.T + t}: column {c} = {int(pad_topk[t, c])}, want -1 "
                                         f"(context length 0)")
            except AssertionError as e:
                raise MismatchError(self._locate(sb, p, str(e), out, ref_args)) from None
        # every copy, run this step or not, must hold the reference's bytes
        ref_cache = self.states["reference"].kv_cache
        for p in self.path_names:
            if p in outs:
                continue
            try:
                checks.assert_equal_bytes("kv_cache", self.states[p].kv_cache, ref_cache)
            except AssertionError as e:
                out = types.SimpleNamespace(kv_cache=self.states[p].kv_cache)
                raise MismatchError(self._locate(sb, p, str(e), out, ref_args)) from None
        self.stats.checks += 1

    def _row_info(self, sb: StepBatch, t: int) -> dict:
        nn = self.cfg.next_n
        b, j = divmod(t, nn)
        if b >= len(sb.requests):
            return {"row": t, "note": "padding row"}
        r = sb.requests[b]
        ctx = r.context_len + nn
        return {"row": t, "request": r.rid, "draft_index": j, "context_len": ctx,
                "visible_len": max(0, ctx - nn + 1 + j)}

    def _locate(self, sb: StepBatch, path: str, message: str, out, want) -> dict:
        """Turn a check failure into a report: step, path, row, request, first differing element."""
        rep = {"step": sb.step, "path": path, "check": self.cfg.check, "message": message}
        try:
            if message.startswith("kv_cache"):
                g = out.kv_cache.view(out.kv_cache.shape[0], -1)
                w = want.kv_cache.view(want.kv_cache.shape[0], -1)
                blk, byte = (g != w).nonzero()[0].tolist()
                rep.update(block=blk, got=int(g[blk, byte]), want=int(w[blk, byte]))
                if byte < 8192:
                    tok, what = byte // 128, f"value byte {byte % 128}"
                else:
                    tok, what = (byte - 8192) // 4, f"scale byte {(byte - 8192) % 4}"
                rep["element"] = f"block {blk}, token {tok}, {what}"
                owner = self.allocator.owner(blk)
                rep["block_owner"] = "null block" if blk == 0 else ("free" if owner is None else f"request {owner}")
                for r in self.running:
                    if blk in r.blocks:
                        rep["request"] = r.rid
                        rep["position"] = r.blocks.index(blk) * BLOCK_SIZE + tok
                        rep["context_len"] = r.context_len + self.cfg.next_n
            elif message.startswith("k_pe"):
                g, w = out.k_pe.view(torch.int16), want.k_pe.view(torch.int16)
                t, _, d = (g != w).nonzero()[0].tolist() if bool((g != w).any()) else (0, 0, 0)
                rep.update(self._row_info(sb, t), element=[t, 0, d], got=float(out.k_pe[t, 0, d]),
                           want=float(want.k_pe[t, 0, d]))
            elif message.startswith("q:"):
                diff = (out.q.float() - want.q.float()).abs().nan_to_num(float("inf"))
                t, h, d = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
                rep.update(self._row_info(sb, int(t)), element=[int(t), int(h), int(d)],
                           got=float(out.q[t, h, d]), want=float(want.q[t, h, d]),
                           note="element of largest |difference|")
            else:
                m = re.search(r"row (\d+)", message)
                if m:
                    rep.update(self._row_info(sb, int(m.group(1))))
                m = re.search(r"column (\d+)", message)
                if m:
                    rep["element"] = f"topk_indices[{rep.get('row')}, {m.group(1)}]"
        except Exception as e:  # noqa: BLE001 - the report must never hide the mismatch itself
            rep["note"] = f"(could not locate the element: {type(e).__name__}: {e})"
        return rep
