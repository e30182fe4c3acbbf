"""Benchmark harness of the region (method: docs/RESULTS.md, "Method").

Method: every path runs inside a CUDA graph captured once (after two eager warm-ups); before each
replay the L2 is flushed with a **read-only** sweep of a buffer of twice the L2 size (a memset
flush leaves dirty lines whose write-back lands on the next kernel, docs/RESULTS.md "Method"); two events
bracket the replay only, so the flush is not timed; the median of the replays is reported with
the 10th and 90th percentiles. The HBM floor is the region's compulsory bytes (:func:`floor_bytes`)
over the copy bandwidth measured in the same process (:func:`copy_bandwidth`).

Nothing here imports Triton or the optional plotting/table packages.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from smpart.triton_kernels import dims

_DEFAULT_L2_BYTES = 60 * 2**20  # H100/H200 L2 (50-60 MB) if the property is missing


class L2Flush:
    """A read-only L2 sweep: ``torch.sum(buffer, dim=0, out=scalar)`` over ``nbytes`` of fp32.

    Reading a buffer twice the L2 size evicts every line the timed kernel could reuse, and
    writes only the 4-byte result, so no dirty lines are left for the next kernel to write back.
    Call the object to flush (on the current stream; nothing synchronizes).

    Attributes
    ----------
    buffer : fp32 [nbytes / 4] on ``device``. nbytes : int, bytes swept per call.
    """

    def __init__(self, device, nbytes: int):
        self.nbytes = int(nbytes) // 4 * 4
        self.buffer = torch.ones(self.nbytes // 4, dtype=torch.float32, device=device)
        self._out = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        torch.sum(self.buffer, dim=0, out=self._out)  # torch 2.11 has no out= without dim


def l2_flush_buffer(device="cuda", factor: int = 2) -> L2Flush:
    """Make the L2 flush used before each timed replay.

    Parameters
    ----------
    device : the CUDA device to flush.
    factor : sweep ``factor`` x the L2 size (default 2; the method asks for >= 2).

    Returns
    -------
    :class:`L2Flush` (callable; sweeps ``factor * L2_cache_size`` bytes, read-only).
    """
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2_BYTES)
    return L2Flush(device, max(factor, 2) * l2)


def copy_bandwidth(device="cuda", nbytes: int = 2**30, replays: int = 20) -> float:
    """HBM bandwidth of an SM copy kernel, in bytes/s (read + write counted).

    ``torch.mul(x, 1.0, out=y)`` on ``nbytes`` of bf16, captured in a CUDA graph and replayed
    ``replays`` times; the median replay time gives ``2 * nbytes / t`` (a same-dtype ``copy_``
    would become a slower memcpy node in a graph, docs/RESULTS.md "Method"). Allocates ``2 * nbytes`` of
    device memory for the duration of the call.

    Returns
    -------
    float, bytes/s.
    """
    n = int(nbytes) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)

    def fn():
        torch.mul(x, 1.0, out=y)

    stats = time_graph(fn, flush=None, replays=replays)
    del x, y, fn
    torch.cuda.empty_cache()
    return 2 * n * 2 / (stats["median_us"] * 1e-6)


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of an ascending list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_graph(fn: Callable[[], None], flush: Callable[[], None] | None, replays: int = 50,
               warmups: int = 2) -> dict:
    """Time ``fn`` as one CUDA-graph replay, cold L2.

    ``fn`` runs ``warmups`` times eagerly on a side stream (compiles, allocates workspaces), is
    captured once into a CUDA graph, replayed once untimed, then ``replays`` times as: ``flush()``,
    record start event, replay, record end event. Events bracket the replay only.

    Parameters
    ----------
    fn : the work to time; must be capturable (no host sync, no allocation outside the graph pool).
    flush : called before each replay (:func:`l2_flush_buffer`), or ``None`` for a warm L2.
    replays : timed replays (>= 1; the method, docs/RESULTS.md, asks for >= 30).
    warmups : eager calls before capture.

    Returns
    -------
    dict with ``median_us``, ``p10_us``, ``p90_us``, ``min_us``, ``mean_us`` (floats, us) and
    ``times_us`` (list of every replay, us).
    """
    if replays < 1:
        raise ValueError(f"replays: expected >= 1, got {replays}")
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    cur.wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for i in range(replays):
        if flush is not None:
            flush()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]  # ms -> us
    graph.reset()
    srt = sorted(times)
    return {
        "median_us": statistics.median(srt),
        "p10_us": _percentile(srt, 10),
        "p90_us": _percentile(srt, 90),
        "min_us": srt[0],
        "mean_us": statistics.fmean(srt),
        "times_us": times,
    }


def floor_bytes(args, breakdown: bool = False):
    """Compulsory HBM bytes of the region on one batch (the floor's numerator).

    With ``T`` rows, ``H`` heads, ``N = 192 H``, ``K = 1536``:

    ====================  =========================================================
    term                  bytes
    ====================  =========================================================
    weight                ``N * K`` (FP8 ``q_b_proj`` weight, read once)
    weight_scales         ``4 * (N / 128) * (K / 128)`` (fp32 block scales)
    q_c                   ``2 * T * K`` (bf16 read)
    q                     ``2 * T * N`` (bf16 write)
    k_pe                  ``2 * 2 * T * 64`` (bf16 read + write)
    indexer_cache         ``132 * sum_b max_j visible_len[b, j]`` (128 FP8 values + one fp32
                          scale per visible position; the ``next_n`` rows of a request share its
                          keys, which DeepGEMM loads once for all of them: with ``next_n = 1`` this
                          is 132 bytes per visible position per row)
    index_q               ``T * 64 * 128 + 4 * T * 64`` (FP8 queries + fp32 head weights)
    topk_indices          ``4 * T * 2048`` (int32 write)
    ====================  =========================================================

    Terms below ~1 KB per row are left out (positions, cos/sin rows, new keys and their cache
    write, block table, lengths), so the floor stays a lower bound; logits are not counted (a
    fused kernel need not write them). Reads ``context_lens`` on the host.

    Parameters
    ----------
    args : RegionArgs.
    breakdown : return the dict of terms (bytes) instead of the total.

    Returns
    -------
    int (bytes), or dict ``{term: bytes}`` with a ``"total"`` entry.
    """
    from smpart.reference import visible_lens

    T = args.num_tokens
    N, K = args.q_b_proj_weight.shape
    next_n = args.next_n
    vis = visible_lens(args.context_lens.cpu(), next_n).view(-1, next_n).to(torch.int64)
    per_request = vis.max(dim=1).values
    terms = {
        "weight": N * K * args.q_b_proj_weight.element_size(),
        "weight_scales": args.q_b_proj_weight_scale.numel() * args.q_b_proj_weight_scale.element_size(),
        "q_c": T * K * args.q_c.element_size(),
        "q": T * N * args.q.element_size(),
        "k_pe": 2 * T * dims.QK_ROPE_HEAD_DIM * args.k_pe.element_size(),
        "indexer_cache": int(per_request.sum()) * dims.CACHE_BYTES_PER_TOKEN,
        "index_q": T * dims.INDEX_N_HEADS * (dims.INDEX_HEAD_DIM * args.index_q_fp8.element_size()
                                             + args.index_weights.element_size()),
        "topk_indices": T * dims.INDEX_TOPK * args.topk_indices.element_size(),
    }
    total = sum(terms.values())
    if breakdown:
        return {**terms, "total": total}
    return total


__all__ = ["L2Flush", "l2_flush_buffer", "copy_bandwidth", "time_graph", "floor_bytes"]
