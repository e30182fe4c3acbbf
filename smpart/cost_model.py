"""Byte cost model of the decode region: each role's HBM bytes, predicted times, a first SM split.

Both chains are memory-bound at decode M (the FP8 ``q_b_proj`` moves 37.7 MB at
H=128 and does ~0.1 GFLOP; the logits read 132 bytes per visible position per request), so a role's
time is its bytes over the bandwidth its programs can pull. Bandwidth does not scale linearly with
SMs: on the H200 a copy kernel on 32 of 132 SMs (24%) reached 2.89 of 4.24 TB/s (68%; measured
2026-11-30 with ``torch.mul(x, 1.0, out=y)`` on a 32-SM green-context stream),
so a role holding a fraction ``x`` of the programs pulls ``min(1, x / SATURATION)`` of the
bandwidth with ``SATURATION = 0.35``, and the two roles together never exceed the whole. A fixed
cost per role (launch and ramp-up: a small op takes ~4-5 us however little it moves, e.g. the
key write, docs/RESULTS.md per-op table) is added to each.

The model picks a first split without running anything (``first_split``); the autotuner
(``smpart.bench.autotune``) searches around it on the GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .triton_kernels import dims

HBM_BYTES_PER_S = 4.24e12  # H200 copy-kernel bandwidth, 2026-11-30 (the bench re-measures it)
SATURATION = 0.35  # fraction of programs that pulls the full bandwidth (from 32 SMs -> 68%)
FIXED_US = 3.0  # per role: launch/ramp-up share inside one launch
_HIST_BINS = 2048  # bins of the radix top-k's per-row histogram (triton_kernels/radix_topk.py HIST_BINS)


@dataclasses.dataclass(frozen=True)
class RoleBytes:
    """Compulsory HBM bytes of one decode step, per role (units: bytes)."""

    indexer: float
    gemm: float

    @property
    def total(self) -> float:
        return self.indexer + self.gemm


def role_bytes(num_tokens: int, num_heads: int, next_n: int, context_lens: Sequence[int]) -> RoleBytes:
    """Bytes each role must move for one step.

    Parameters
    ----------
    num_tokens : T = B * next_n decode rows.
    num_heads : MLA heads H on this rank.
    next_n : rows per request.
    context_lens : per-request lengths (vLLM ``seq_lens``), or one length per request of a bucket.

    Returns
    -------
    RoleBytes: indexer = 132 bytes per visible position per request (the next_n rows of a request
    share its keys) + the FP8 queries and weights + logits written and read once (the radix top-k
    reads each row once) + each row's 2048-bin int32 histogram (added to by the logits, read and
    zeroed by the top-k: 3 x 8 KiB) + top-k out;
    gemm = FP8 weights + block scales + ``q_c`` in + ``q`` out + ``k_pe`` read and written.
    """
    T, H = int(num_tokens), int(num_heads)
    keys = sum(max(0, int(L)) for L in context_lens) * dims.CACHE_BYTES_PER_TOKEN
    vis = sum(max(0, int(L)) for L in context_lens) * next_n  # logits per row ~ context
    indexer = (keys + T * dims.INDEX_N_HEADS * (dims.INDEX_HEAD_DIM + 4) + vis * 4 * 2
               + T * dims.INDEX_TOPK * 4 + T * dims.INDEX_HEAD_DIM * 2 + T * _HIST_BINS * 4 * 3)
    n = H * dims.QK_HEAD_DIM
    gemm = (n * dims.Q_LORA_RANK + (n // dims.QUANT_GROUP) * (dims.Q_LORA_RANK // dims.QUANT_GROUP) * 4
            + T * dims.Q_LORA_RANK * 2 + T * n * 2 + T * dims.QK_ROPE_HEAD_DIM * 2 * 2)
    return RoleBytes(float(indexer), float(gemm))


def _share(x: float) -> float:
    return min(1.0, max(x, 0.0) / SATURATION)


def predict_us(rb: RoleBytes, indexer_fraction: float, bw: float = HBM_BYTES_PER_S) -> tuple[float, float, float]:
    """Predicted (indexer us, gemm us, region us) with ``indexer_fraction`` of the programs on the
    indexer role. Region time = max of the roles, and never below all bytes at full bandwidth."""
    if not 0.0 < indexer_fraction < 1.0:
        raise ValueError(f"indexer_fraction: expected in (0, 1), got {indexer_fraction}")
    t_idx = rb.indexer / (bw * _share(indexer_fraction)) * 1e6 + FIXED_US
    t_gemm = rb.gemm / (bw * _share(1.0 - indexer_fraction)) * 1e6 + FIXED_US
    return t_idx, t_gemm, max(t_idx, t_gemm, rb.total / bw * 1e6 + FIXED_US)


def first_split(total_programs: int, rb: RoleBytes, bw: float = HBM_BYTES_PER_S) -> tuple[int, int]:
    """The split of ``total_programs`` (>= 2) that minimizes :func:`predict_us`'s region time;
    ties (both roles saturated: the region is bound by all bytes at full bandwidth) go to the split
    closest to byte-proportional, which keeps both roles' programs equally loaded.

    Raises
    ------
    ValueError : ``total_programs < 2``.
    """
    if total_programs < 2:
        raise ValueError(f"total_programs: need at least 2, got {total_programs}")
    best = None
    proportional = rb.indexer / max(rb.total, 1.0)
    for n_idx in range(1, total_programs):
        x = n_idx / total_programs
        _, _, t = predict_us(rb, x, bw)
        key = (round(t, 6), abs(x - proportional))
        if best is None or key < best[0]:
            best = (key, n_idx)
    n_idx = best[1]
    return n_idx, total_programs - n_idx


def resident_programs(num_sms: int, num_warps: int) -> int:
    """Programs of the partitioned kernel resident at once: the kernel uses ~242 registers per
    thread (ptxas -v, sm_90, 4 warps, 2026-11-30), so 65536 / (242 * 32 * num_warps) programs fit
    per SM: 2 at 4 warps, 1 at 8."""
    per_sm = max(1, 65536 // (256 * 32 * num_warps))
    return num_sms * per_sm


def gemm_in_tail(num_tokens: int, max_len: int, num_sms: int) -> float:
    """Fraction of ``q_b_proj`` to run beside the top-k (``PartitionConfig.gemm_in_tail``): 1.0.

    The top-k is latency-bound on one program per (row, chunk) and the logits are bandwidth-bound:
    the GEMM goes beside the top-k, and the logits get the whole GPU first in a GEMM-less launch
    (one program per logits item). Rule read off the H200 (2026-11-30, H=128, cold L2): since the
    tail's GEMM reads ``q_c`` quantized once per token and its top-k items each get a program,
    the tail split beat the best one-launch split at every shape measured, T = 1..128 and
    4K..64K (e.g. T=128, 4K: 104.8 vs 136.4 us; T=128, 64K: 741.8 vs 1054.3; in the autotune
    after the dense first launch, T=8, 4K: 27.6 vs 41.2; T=32, 16K: 77.7 vs 107.9); before those
    changes it lost once the top-k had more than ``num_sms // 4`` items.
    The autotune still tries 0, 1/4 and 1/2 per bucket. Arguments are kept for the rule's shape
    dependence (none measured now). Not covered by this rule: the dense-first split
    (``PartitionConfig.dense_first``, GEMM beside the logits under a register cap), which beat the
    tail split at T=128 (73.3 vs 83.4 us at 4K, 528.3 vs 554.8 at 64K, same machine and day) and
    which only the autotune picks.
    """
    del num_tokens, max_len, num_sms
    return 1.0
