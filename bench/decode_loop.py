"""``smpart-bench decode``: a continuous-batching decode loop of the DSV3.2 region, every path side by side.

What an inference engineer runs first: does every path give the reference's answer step after step
while requests come and go, and how many microseconds does each path save per layer?

The loop (one simulated decoder layer, decode steps only)
---------------------------------------------------------
* **Paged indexer cache and block pool, as vLLM v1 keeps them.** Each path owns one copy of the
  indexer cache, uint8 ``[num_blocks, 64, 132]`` (vLLM's layout, DESIGN.md 3), zero-filled at start
  as vLLM's model runner allocates KV caches (``torch.zeros`` in
  ``vllm/v1/worker/gpu_model_runner.py::_allocate_kv_cache_tensors``). :class:`BlockAllocator`
  mirrors ``vllm/v1/core/block_pool.py``: block 0 is the reserved null block, free blocks sit in a
  FIFO queue, allocation pops from the front, a finished request's blocks go back to the tail in
  reverse order (its tail block first, ``single_type_kv_cache_manager.py::free``). Blocks are
  never cleared: a reused block keeps its previous owner's bytes past the new owner's length
  (:attr:`LoopStats.stale_positions` counts those bytes seen inside live block tables), and no
  path may let them reach a logit.
* **Requests.** Arrivals are Poisson with a rate that rises and falls in waves
  (``peak * sin^2(pi * step / period)``), so the batch size sweeps from 1 to ``--max-batch`` and
  back. Prompt and output lengths come from :class:`RequestMix` (seeded; see its docstring for the
  assumed distribution). Admission is first-come first-served while blocks and batch slots last;
  when a running request cannot grow, the most recently admitted request is preempted (its blocks
  freed, re-queued at the front, re-prefilled on readmission with recomputed keys), as vLLM v1's
  scheduler does. Requests finish after their drawn number of output tokens (or at
  ``--max-context``) and free their blocks.
* **Prefill** writes each admitted prompt's indexer keys (random bf16, quantized exactly as
  ``reference.indexer_k_quant_and_cache``) into every path's cache copy.
* **Decode step.** Every running request decodes ``next_n`` rows (1, or 2 with one MTP draft
  token); :class:`~smpart.region.RegionArgs` is built from the allocator's
  ``block_table`` (a persistent table whose rows keep stale ids past each request's blocks, as
  vLLM's ``BlockTable`` does), ``slot_mapping``, ``context_lens`` (vLLM ``seq_lens``, new tokens
  included), ``positions``, a fixed ``cos_sin_cache`` and ``q_b_proj`` weight, and fresh random
  ``q_c``, ``k_pe``, ``index_q_fp8``, ``index_weights``, ``index_k``. The region itself writes the
  new keys into each path's cache. With MTP the draft is accepted with probability
  ``--mtp-accept`` (the context grows by 1 or 2; a rejected draft's slot is rewritten next step).
* **Checks.** ``reference`` runs every step; every other path is compared with it
  (``checks.check_region`` through ``smpart.bench.__main__.check_path``: cache bytes exact, ``k_pe``
  exact, ``q`` by normalized difference, ``topk_indices`` by the rule of DESIGN.md 7a; ``--check
  fast`` is a vectorized equivalent for long GPU runs, :func:`fast_check_region`), and after each
  step every path's cache copy must equal the reference's byte for byte. The first mismatch stops
  the run with a :class:`MismatchError` naming the step, path, row, request and first differing
  element.
* **CUDA graphs** (``--graphs``, GPU only, the default there): one graph per path per batch-size
  bucket (powers of two up to ``--max-batch``, plus ``--max-batch``: like vLLM, a fixed list of
  captured sizes with each batch padded up to the next one; vLLM's default list is denser, 1, 2, 4,
  then steps of 8), captured once after eager warm-ups, replayed with the live step copied into
  the captured buffers; padding rows have ``slot_mapping`` -1 and context length 0, as vLLM pads.
  Each replay is timed with CUDA events, by default after a read-only L2 flush (``--cold-l2``).
  The vendor paths' per-step DeepGEMM metadata (``context_lens_2d``, ``schedule_meta``) is rebuilt
  eagerly before each replay, as vLLM's metadata builder does outside the forward; their host-side
  ``max_seq_len`` is frozen in the graph at ``--max-context`` (captured with every row at that
  length).
* **CPU economy** (``--stride PATH=N``): a path may run only every N-th step; in between, its
  cache copy receives the reference's new bytes, so it keeps reading its own earlier writes.

Outputs (``--out``): ``steps.csv`` (one row per step: batch, tokens, contexts, allocator counters,
per-path us), ``summary.json``, ``summary.md`` (per-path median / p90 us per step and the per-layer
saving against ``vllm_dual_stream``, else ``dual_stream``, extrapolated to DSV3.2's 61 layers: per
model step and per generated token) and ``step_time_vs_batch.png``. Without CUDA the loop runs a
short, small-dims correctness loop under ``TRITON_INTERPRET=1`` (re-running itself with it set if
needed) and says that timings need a GPU.

Usage: ``smpart-bench decode [options]`` or ``python -m smpart.bench.decode_loop [options]``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Sequence

import numpy as np
import torch

# Kernel modules (``smpart.triton_kernels.*``) are imported lazily: Triton reads TRITON_INTERPRET when
# a kernel is decorated, so the CPU mode must set it (re-exec) before any of them is imported.

NUM_LAYERS = 61  # DSV3.2 decoder layers; every one runs this region once per decode step
BLOCK_SIZE = 64  # indexer cache tokens per block (dims.CACHE_BLOCK_SIZE)
T_MAX = 256  # decode rows the region accepts (dims.T_MAX)
MAX_MODEL_LEN = 163840  # dims.MAX_MODEL_LEN
SUPPORTED_H = (128, 64, 32, 16)
VENDOR_PATHS = ("vllm_sequential", "vllm_dual_stream")
BASELINES = ("vllm_dual_stream", "dual_stream")
_TIE_FREE_DIGITS = 5  # base-16 digits per key code (batch._DIGITS): 16**5 = 2**20 > 163840
_CODE_MOD = 16**_TIE_FREE_DIGITS


# ======================================================================================
# block pool
# ======================================================================================
class OutOfBlocksError(RuntimeError):
    """The block pool has fewer free blocks than an allocation asks for."""


class BlockAllocator:
    """A paged-cache block pool with vLLM v1's allocation order (``vllm/v1/core/block_pool.py``).

    Block 0 is reserved as the null block (vLLM's ``BlockPool.null_block``; padding rows point at
    it). The other blocks sit in a FIFO free queue, initially in id order; :meth:`allocate` pops from
    the front, :meth:`free` appends a request's blocks to the tail in reverse order (its last block
    first, as ``SingleTypeKVCacheManager.free`` does). Nothing is cleared: a reused block keeps its
    previous owner's bytes.

    Parameters
    ----------
    num_blocks : blocks in the cache (>= 2: the null block and at least one usable block).

    Attributes
    ----------
    num_blocks : int, blocks in the cache. num_allocations : int, blocks handed out so far.
    num_reused : int, allocations of a block that an earlier request had owned (and freed).
    """

    NULL_BLOCK = 0

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks: expected an int >= 2 (the null block + 1), got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = collections.deque(range(1, num_blocks))
        self._owner = [None] * num_blocks  # request id of each allocated block, None when free
        self._owned_before = [False] * num_blocks
        self.num_allocations = 0
        self.num_reused = 0

    @property
    def num_free(self) -> int:
        """Free (allocatable) blocks."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks owned by requests (the null block not counted)."""
        return self.num_blocks - 1 - len(self._free)

    def owner(self, block: int):
        """The request id owning ``block``, or ``None`` (free, or the null block)."""
        return self._owner[block]

    def allocate(self, n: int, owner) -> list[int]:
        """Take ``n`` blocks from the front of the free queue for request ``owner``.

        Raises
        ------
        ValueError : ``n < 0``.
        OutOfBlocksError : fewer than ``n`` blocks are free (nothing is taken).
        """
        if n < 0:
            raise ValueError(f"n: expected >= 0, got {n}")
        if n > len(self._free):
            raise OutOfBlocksError(f"out of blocks: request {owner!r} needs {n}, {len(self._free)} free "
                                   f"of {self.num_blocks - 1}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._owner[b] = owner
            if self._owned_before[b]:
                self.num_reused += 1
            self._owned_before[b] = True
        self.num_allocations += n
        return out

    def free(self, blocks: Sequence[int], owner) -> None:
        """Return ``owner``'s ``blocks`` (in table order) to the tail of the free queue, last block first.

        Raises
        ------
        ValueError : a block that ``owner`` does not own (double free, the null block, out of range).
        """
        for b in blocks:
            if not 0 < b < self.num_blocks or self._owner[b] != owner:
                raise ValueError(f"blocks: block {b} is not owned by request {owner!r} "
                                 f"(owner {self._owner[b] if 0 <= b < self.num_blocks else 'n/a'})")
        for b in reversed(list(blocks)):
            self._owner[b] = None
            self._free.append(b)


# ======================================================================================
# request mix
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class RequestMix:
    """Seeded prompt / output length distribution of the arriving requests.

    **An assumption, not a fit to one trace.** Prompt lengths are log-normal with median
    ``prompt_median`` tokens and log-space standard deviation ``prompt_sigma``, clipped to
    ``[prompt_min, prompt_max]``; output lengths likewise. The defaults (median 3000, sigma 1.5:
    mean ~9K, ~10% of prompts above 20K, ~1% above 100K, clipped to [1, 131072]) were chosen to lean
    long, because the sparse indexer matters most there, while staying heavy at a few thousand
    tokens. They are meant to resemble what public serving traces report for chat and coding (the
    Azure LLM inference traces of the Splitwise paper, ISCA 2024; Mooncake's traces, FAST 2025);
    the figures were not re-checked against those sources here: treat the mix as an assumption.
    Outputs: median 128 tokens, sigma 1.0, clipped to [1, 4096]. :meth:`small` is the
    CPU-interpreter variant (contexts up to a few thousand, short outputs so that requests come and
    go within a few dozen steps).

    Attributes
    ----------
    prompt_median, prompt_sigma : log-normal parameters of prompt lengths (tokens; sigma in log space).
    prompt_min, prompt_max : clip range of prompt lengths (tokens, 1 <= min <= max <= 163840).
    output_median, output_sigma, output_min, output_max : the same for output lengths (decode tokens).
    """

    prompt_median: float = 3000.0
    prompt_sigma: float = 1.5
    prompt_min: int = 1
    prompt_max: int = 131072
    output_median: float = 128.0
    output_sigma: float = 1.0
    output_min: int = 1
    output_max: int = 4096

    @classmethod
    def small(cls, max_context: int = 3072) -> "RequestMix":
        """The CPU variant: prompts median 400 (sigma 1.2) clipped to ``[1, max_context - 64]``,
        outputs median 6 (sigma 0.7) clipped to ``[1, 48]``."""
        return cls(prompt_median=400.0, prompt_sigma=1.2, prompt_min=1, prompt_max=max(1, max_context - 64),
                   output_median=6.0, output_sigma=0.7, output_min=1, output_max=48)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("prompt", "output"):
            med, sig = getattr(self, f"{name}_median"), getattr(self, f"{name}_sigma")
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if not (isinstance(med, (int, float)) and med > 0 and math.isfinite(med)):
                raise ValueError(f"{name}_median: expected a finite number > 0, got {med!r}")
            if not (isinstance(sig, (int, float)) and 0 <= sig <= 5):
                raise ValueError(f"{name}_sigma: expected a number in [0, 5], got {sig!r}")
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= MAX_MODEL_LEN):
                raise ValueError(f"{name}_min/{name}_max: expected ints with 1 <= min <= max <= {MAX_MODEL_LEN}, "
                                 f"got {lo!r}, {hi!r}")

    def mean_output(self) -> float:
        """Expected output length (tokens) of the clipped distribution (Monte Carlo, fixed seed)."""
        _, out = self.sample(np.random.default_rng(12345), 20000)
        return float(out.mean())

    def sample(self, rng: np.random.Generator, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` requests.

        Parameters
        ----------
        rng : numpy Generator (the loop's, seeded by ``--seed``).
        n : number of requests.

        Returns
        -------
        (prompt_lens, output_lens) : int64 [n] each, within the clip ranges.
        """
        p = np.rint(rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, n))
        o = np.rint(rng.lognormal(math.log(self.output_median), self.output_sigma, n))
        return (np.clip(p, self.prompt_min, self.prompt_max).astype(np.int64),
                np.clip(o, self.output_min, self.output_max).astype(np.int64))


# ======================================================================================
# configuration
# ======================================================================================
@dataclasses.dataclass
class LoopConfig:
    """Options of one decode-loop run (the CLI's, see ``--help``).

    Attributes
    ----------
    num_heads : MLA heads per rank H (128, 64, 32 or 16). next_n : rows per request (1, or 2 = MTP).
    steps : decode steps. max_batch : requests per step (max_batch * next_n <= 256).
    max_context : longest context (tokens); prompts are clipped to leave room for one step.
    num_blocks : cache blocks per copy (incl. the null block); ``None`` = enough for
        ``max(2 * max_context, 16384 * max_batch)`` tokens (GPU) or ``2 * max_context`` (CPU).
    paths : paths to run besides ``reference`` (which always runs).
    strides : ``{path: n}``: run ``path`` only every ``n``-th step (the other steps copy the
        reference's new cache bytes into its copy); 1 (every step) unless given. A CPU economy.
    configs : ``{path: config}`` passed to ``run_region`` (e.g. a ``PartitionConfig``).
    mix : RequestMix. arrival_peak : peak Poisson arrivals per step (``None``: ``2 * max_batch /
        mean output steps``). arrival_period : steps per arrival wave (``None``: ``steps / 2`` on a
        GPU, ``steps`` on the CPU, at least 2).
    mtp_accept : probability that the MTP draft is accepted (next_n = 2; DeepSeek-V3 reports 85-90%).
    tie_free : build indexer inputs whose logits are exact and distinct (exact top-k index sets).
    pad_batches : pad every batch to its bucket in eager mode too (graphs always pad).
    graphs : CUDA-graph mode. cold_l2 : flush L2 (read sweep) before each timed GPU run.
    check : ``"full"`` (``checks.check_region``) or ``"fast"`` (:func:`fast_check_region`).
    check_every : compare with the reference every n-th step (1 = every step).
    use_ue8m0 : power-of-two scales (vLLM 0.33 on Hopper). seed : RNG seed. device : torch device.
    """

    num_heads: int = 16
    next_n: int = 1
    steps: int = 20
    max_batch: int = 4
    max_context: int = 3072
    num_blocks: int | None = None
    paths: tuple = ("sequential", "partitioned")
    strides: dict = dataclasses.field(default_factory=dict)
    configs: dict = dataclasses.field(default_factory=dict)
    mix: RequestMix | None = None
    arrival_peak: float | None = None
    arrival_period: int | None = None
    mtp_accept: float = 0.85
    tie_free: bool = False
    pad_batches: bool = False
    graphs: bool = False
    cold_l2: bool = False
    check: str = "full"
    check_every: int = 1
    use_ue8m0: bool = True
    seed: int = 0
    device: str = "cpu"

    def resolved(self) -> "LoopConfig":
        """A validated copy with every ``None`` default filled in.

        Raises
        ------
        ValueError : a bad option (the message names it).
        """
        from smpart.region import PATHS

        c = dataclasses.replace(self, strides=dict(self.strides), configs=dict(self.configs))
        dev = torch.device(c.device)
        if c.num_heads not in SUPPORTED_H:
            raise ValueError(f"num_heads: expected one of {SUPPORTED_H}, got {c.num_heads!r}")
        if c.next_n not in (1, 2):
            raise ValueError(f"next_n: expected 1 or 2, got {c.next_n!r}")
        if not isinstance(c.steps, int) or c.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {c.steps!r}")
        if not isinstance(c.max_batch, int) or c.max_batch < 1 or c.max_batch * c.next_n > T_MAX:
            raise ValueError(f"max_batch: expected 1..{T_MAX // c.next_n} (max_batch * next_n <= {T_MAX}), "
                             f"got {c.max_batch!r}")
        if not isinstance(c.max_context, int) or not c.next_n + 1 <= c.max_context <= MAX_MODEL_LEN:
            raise ValueError(f"max_context: expected {c.next_n + 1}..{MAX_MODEL_LEN}, got {c.max_context!r}")
        need = -(-c.max_context // BLOCK_SIZE) + 1
        if c.num_blocks is None:
            tokens = 2 * c.max_context if dev.type != "cuda" else max(2 * c.max_context, 16384 * c.max_batch)
            c.num_blocks = -(-tokens // BLOCK_SIZE) + 1
        if not isinstance(c.num_blocks, int) or c.num_blocks < need:
            raise ValueError(f"num_blocks: expected >= {need} (one request at max_context {c.max_context} plus the "
                             f"null block), got {c.num_blocks!r}")
        paths = tuple(dict.fromkeys(p for p in c.paths if p != "reference"))
        bad = [p for p in paths if p not in PATHS]
        if bad:
            raise ValueError(f"paths: unknown {bad}; choose from {[p for p in PATHS if p != 'reference']}")
        c.paths = paths
        for p, n in c.strides.items():
            if p not in paths:
                raise ValueError(f"strides: path {p!r} is not among the paths {list(paths)}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"strides: expected an int >= 1 for {p!r}, got {n!r}")
        for p in c.configs:
            if p not in paths:
                raise ValueError(f"configs: path {p!r} is not among the paths {list(paths)}")
        if c.mix is None:
            c.mix = RequestMix() if dev.type == "cuda" else RequestMix.small(c.max_context)
        c.mix.validate()
        if c.arrival_period is None:
            c.arrival_period = max(2, c.steps // 2 if dev.type == "cuda" else c.steps)
        if not isinstance(c.arrival_period, int) or c.arrival_period < 2:
            raise ValueError(f"arrival_period: expected an int >= 2, got {c.arrival_period!r}")
        if c.arrival_peak is None:
            mean_steps = c.mix.mean_output() / (1.0 + (c.mtp_accept if c.next_n == 2 else 0.0))
            c.arrival_peak = 2.0 * c.max_batch / max(mean_steps, 1.0)
        if not (isinstance(c.arrival_peak, (int, float)) and 0 < c.arrival_peak <= 1e4):
            raise ValueError(f"arrival_peak: expected a number in (0, 1e4], got {c.arrival_peak!r}")
        if not 0.0 <= c.mtp_accept <= 1.0:
            raise ValueError(f"mtp_accept: expected a probability in [0, 1], got {c.mtp_accept!r}")
        if c.check not in ("full", "fast"):
            raise ValueError(f"check: expected 'full' or 'fast', got {c.check!r}")
        if not isinstance(c.check_every, int) or c.check_every < 1:
            raise ValueError(f"check_every: expected an int >= 1, got {c.check_every!r}")
        if c.graphs and dev.type != "cuda":
            raise ValueError("graphs: CUDA-graph mode needs a CUDA device")
        if c.cold_l2 and dev.type != "cuda":
            raise ValueError("cold_l2: the L2 flush needs a CUDA device")
        return c


def batch_buckets(max_batch: int) -> list[int]:
    """CUDA-graph batch-size buckets: the powers of two below ``max_batch``, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``batch``."""
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"batch: {batch} exceeds the largest bucket {buckets[-1]}")


# ======================================================================================
# requests, stats, errors
# ======================================================================================
@dataclasses.dataclass
class Request:
    """One request's state (host side).

    Attributes
    ----------
    rid : id (arrival order). prompt_len : tokens prefilled at (re)admission. output_len : decode
    tokens to produce. context_len : tokens in the cache after the last step (vLLM
    ``num_computed_tokens``). generated : decode tokens produced so far. blocks : block ids in table
    order. code_a, code_b : tie-free key codes ``(code_a * position + code_b) mod 2**20``.
    arrival_step, preemptions : bookkeeping.
    """

    rid: int
    prompt_len: int
    output_len: int
    arrival_step: int
    code_a: int = 1
    code_b: int = 0
    context_len: int = 0
    generated: int = 0
    blocks: list = dataclasses.field(default_factory=list)
    preemptions: int = 0


@dataclasses.dataclass
class LoopStats:
    """Counters of one run (also written to ``summary.json``).

    Attributes
    ----------
    steps : steps run. arrived, admitted, finished, preempted : request counts. prefill_tokens : keys
    prefilled. block_allocations, blocks_reused : allocator counters (reused = a block an earlier
    request had owned). stale_positions : positions past a request's context, inside a block of its
    live block table, holding key bytes left by an earlier owner of the block (nonzero scale; the
    cache starts zeroed and a request never writes past its context), summed over steps: bytes that
    must never reach a logit. steps_with_stale : steps where that count was > 0.
    max_batch_seen, min_batch_seen, max_context_seen : extremes over steps. checks : steps compared
    with the reference. path_runs : ``{path: steps it ran}``. tokens_generated, request_steps :
    decode tokens accepted and (request, step) pairs run (their ratio is the tokens per step of a
    request: 1, or 1 + the MTP acceptance rate).
    """

    steps: int = 0
    arrived: int = 0
    admitted: int = 0
    finished: int = 0
    preempted: int = 0
    prefill_tokens: int = 0
    block_allocations: int = 0
    blocks_reused: int = 0
    stale_positions: int = 0
    steps_with_stale: int = 0
    max_batch_seen: int = 0
    min_batch_seen: int = 0
    max_context_seen: int = 0
    checks: int = 0
    path_runs: dict = dataclasses.field(default_factory=dict)
    tokens_generated: int = 0
    request_steps: int = 0


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
# prefill (vLLM's key quantization, vectorized)
# ======================================================================================
def quantize_keys(keys: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-quantize indexer keys as ``reference.indexer_k_quant_and_cache`` does.

    Parameters
    ----------
    keys : bf16 [n, 128].
    use_ue8m0 : power-of-two scales.

    Returns
    -------
    (bytes uint8 [n, 128], scales fp32 [n]): ``scale = max(amax, 1e-4) / 448`` (rounded up to a power
    of two with UE8M0), ``bytes = e4m3(k / scale)`` (vLLM ``csrc/cache_kernels.cu``).
    """
    from smpart.triton_kernels import dims
    from smpart import reference

    kf = keys.float()
    scale = reference.quant_scale_torch(kf.abs().amax(dim=-1), dims.KEY_SCALE_EPS, use_ue8m0)
    return reference.quant_fp8_torch(kf, scale[:, None]).view(torch.uint8), scale


def write_keys(kv_cache: torch.Tensor, slots: torch.Tensor, key_bytes: torch.Tensor, scales: torch.Tensor) -> None:
    """Write quantized keys into the paged cache at ``slots`` (int64 [n], all >= 0), in place.

    ``kv_cache`` uint8 [num_blocks, 64, 132]; ``key_bytes`` uint8 [n, 128]; ``scales`` fp32 [n].
    """
    from smpart import reference

    values, scale_view = reference.cache_values_and_scales(kv_cache)
    blk, off = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    values[blk, off] = key_bytes
    scale_view[blk, off] = scales


def copy_slots(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor) -> None:
    """Copy the cache bytes of ``slots`` (int64 [n], >= 0) from cache ``src`` to cache ``dst``."""
    from smpart import reference

    sv, ss = reference.cache_values_and_scales(src)
    dv, ds = reference.cache_values_and_scales(dst)
    blk, off = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    dv[blk, off] = sv[blk, off]
    ds[blk, off] = ss[blk, off]


def tie_free_keys(codes: torch.Tensor) -> torch.Tensor:
    """``smpart.batch.tie_free_keys`` (imported lazily, see the note above)."""
    from smpart.batch import tie_free_keys as impl

    return impl(codes)


def tie_free_query(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``smpart.batch.tie_free_query`` (imported lazily, see the note above)."""
    from smpart.batch import tie_free_query as impl

    return impl(T, device)


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
    """Vectorized equivalent of ``bench.__main__.check_path`` (``checks.check_region``) for long runs.

    Same rules and messages: cache bytes and ``k_pe`` exact (``k_pe`` by normalized difference < 1e-5
    for the vendor paths, whose RoPE rounds once in fp32), ``q`` without NaN and normalized
    difference < ``q_diff``, and the top-k rule of DESIGN.md 7a row by row: exactly
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


# ======================================================================================
# the loop
# ======================================================================================
class _PathState:
    """One path's persistent state: its own cache copy, workspace, captured graphs, timings."""

    def __init__(self, name: str, kv_cache: torch.Tensor, workspace, config, stride: int, offset: int):
        self.name = name
        self.kv_cache = kv_cache
        self.workspace = workspace
        self.config = config
        self.stride = stride
        self.offset = offset
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, static RegionArgs)
        self.times_us: list[tuple[int, int, float]] = []  # (step, batch, us)
        self.wall_s: list[float] = []
        self.runs = 0

    def runs_at(self, step: int) -> bool:
        return (step + self.offset) % self.stride == 0


@dataclasses.dataclass
class StepBatch:
    """The decode step being run.

    Attributes
    ----------
    step : step index. requests : the running requests in row order (row ``b*next_n + j``).
    B, Bp : live and padded batch sizes; T, Tp : live and padded rows (``* next_n``).
    tensors : dict of padded device tensors (``q_c`` [Tp, 1536] bf16, ``k_pe`` [Tp, 1, 64] bf16,
        ``index_q_fp8`` [Tp, 64, 128] fp8, ``index_weights`` [Tp, 64] fp32, ``index_k`` [Tp, 128] bf16,
        ``positions`` int64 [Tp], ``slot_mapping`` int64 [Tp] (-1 on padding rows), ``block_table``
        int32 [Bp, max_blocks], ``context_lens`` int32 [Bp] (0 on padding rows)).
    live_slots : int64 [T] device tensor of the slots written this step (all >= 0).
    """

    step: int
    requests: list
    B: int
    Bp: int
    T: int
    Tp: int
    tensors: dict
    live_slots: torch.Tensor


class DecodeLoop:
    """The continuous-batching decode loop (see the module docstring).

    Parameters
    ----------
    config : LoopConfig (validated and completed with :meth:`LoopConfig.resolved`).
    progress : optional callable ``(step, info: dict) -> None`` called after every step.

    Attributes
    ----------
    cfg : the resolved LoopConfig. allocator : BlockAllocator. stats : LoopStats.
    step_rows : list of per-step dicts (the CSV rows). states : ``{path: _PathState}`` (reference first).
    skipped : ``{path: reason}`` for paths that cannot run here. failed : ``{path: reason}`` for paths
    whose CUDA-graph capture crashed (dropped from the run; the CLI exits 1).
    """

    def __init__(self, config: LoopConfig, progress: Callable[[int, dict], None] | None = None):
        from smpart.triton_kernels import dims
        from smpart import reference
        from smpart.batch import make_decode_batch

        self.cfg = cfg = config.resolved()
        self.progress = progress
        self.dev = torch.device(cfg.device)
        self.is_cuda = self.dev.type == "cuda"
        self.rng = np.random.default_rng(cfg.seed)
        self.tgen = torch.Generator(device=self.dev).manual_seed(cfg.seed + 1)
        self.allocator = BlockAllocator(cfg.num_blocks)
        self.stats = LoopStats()
        self.step_rows: list[dict] = []
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.waiting: collections.deque = collections.deque()
        self.running: list[Request] = []
        self.next_rid = 0
        self.max_blocks = -(-cfg.max_context // BLOCK_SIZE)
        self.max_len = self.max_blocks * BLOCK_SIZE
        self.buckets = batch_buckets(cfg.max_batch)
        self.host_block_table = np.zeros((cfg.max_batch, self.max_blocks), dtype=np.int32)

        # fixed per run: q_b_proj weights (DeepSeek checkpoint block quant, UE8M0 re-quant) and cos/sin
        w = make_decode_batch(cfg.next_n, batch_size=1, num_heads=cfg.num_heads, next_n=cfg.next_n,
                              use_ue8m0=cfg.use_ue8m0, seed=cfg.seed, device="cpu", spare_blocks=0).args
        self.weight = w.q_b_proj_weight.to(self.dev)
        self.weight_scale = w.q_b_proj_weight_scale.to(self.dev)
        self.cos_sin_cache = reference.make_cos_sin_cache(self.max_len, torch.bfloat16, device=self.dev)
        self._dims = dims

        # one cache copy per path (reference first), zero-filled as vLLM allocates KV caches
        shape = (cfg.num_blocks, BLOCK_SIZE, dims.CACHE_BYTES_PER_TOKEN)
        self.states: dict[str, _PathState] = {
            "reference": _PathState("reference", torch.zeros(shape, dtype=torch.uint8, device=self.dev), None, None,
                                    1, 0)}
        self._setup_paths()
        self._flush = None
        if cfg.cold_l2:
            from smpart.bench.harness import l2_flush_buffer

            self._flush = l2_flush_buffer(self.dev)
        self._pool = None
        self._validated_step = None

    # ---------------------------------------------------------------------------------
    # setup
    # ---------------------------------------------------------------------------------
    def _setup_paths(self) -> None:
        from smpart import region
        from smpart.workspace import RegionWorkspace

        cfg = self.cfg
        max_tokens = self.buckets[-1] * cfg.next_n
        strided = 0
        for p in cfg.paths:
            try:
                region.load_path(p)
            except Exception as e:  # noqa: BLE001 - report per path
                self.skipped[p] = f"not loadable ({type(e).__name__}: {e})"
                continue
            if p in VENDOR_PATHS:
                from smpart.vendor import vendor_available

                ok, why = vendor_available()
                if not ok:
                    self.skipped[p] = why
                    continue
            if p == "green_ctx" and not self.is_cuda:
                self.skipped[p] = "green_ctx: needs a CUDA device"
                continue
            stride = cfg.strides.get(p, 1)
            offset = 0
            if stride > 1:
                offset, strided = strided, strided + 1
            ws = RegionWorkspace.for_shape(max_tokens, self.max_len, self.dev)
            self.states[p] = _PathState(p, self.states["reference"].kv_cache.clone(), ws, cfg.configs.get(p), stride,
                                        offset)
            self.stats.path_runs[p] = 0

    @property
    def path_names(self) -> list[str]:
        """The non-reference paths that run (skipped ones excluded)."""
        return [p for p in self.states if p != "reference"]

    # ---------------------------------------------------------------------------------
    # scheduling
    # ---------------------------------------------------------------------------------
    def _arrival_rate(self, step: int) -> float:
        return self.cfg.arrival_peak * math.sin(math.pi * step / self.cfg.arrival_period) ** 2

    def _new_request(self, step: int, prompt: int, output: int) -> Request:
        cap = self.cfg.max_context - self.cfg.next_n
        r = Request(rid=self.next_rid, prompt_len=int(min(max(prompt, 1), cap)), output_len=int(output),
                    arrival_step=step, code_a=int(self.rng.integers(0, _CODE_MOD // 2)) * 2 + 1,
                    code_b=int(self.rng.integers(0, _CODE_MOD)))
        self.next_rid += 1
        self.stats.arrived += 1
        return r

    def _arrivals(self, step: int) -> None:
        n = int(self.rng.poisson(self._arrival_rate(step)))
        if n == 0 and not self.running and not self.waiting:
            n = 1  # never run an empty step
        if n:
            prompts, outputs = self.cfg.mix.sample(self.rng, n)
            for p, o in zip(prompts.tolist(), outputs.tolist()):
                self.waiting.append(self._new_request(step, p, o))

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE)

    def _admit(self) -> int:
        """FCFS admission while batch slots and blocks last; prefill each admitted prompt."""
        admitted = 0
        while self.waiting and len(self.running) < self.cfg.max_batch:
            r = self.waiting[0]
            need = self._blocks_for(r.prompt_len + self.cfg.next_n)
            if need > self.allocator.num_free:
                break  # head-of-line waits for blocks, as vLLM's FCFS scheduler does
            self.waiting.popleft()
            r.blocks = self.allocator.allocate(need, r.rid)
            self._prefill(r)
            r.context_len = r.prompt_len
            self.running.append(r)
            admitted += 1
        self.stats.admitted += admitted
        return admitted

    def _prefill(self, r: Request) -> None:
        """Write positions [0, prompt_len) of ``r`` into every path's cache copy."""
        n = r.prompt_len
        pos = torch.arange(n, device=self.dev)
        table = torch.tensor(r.blocks, dtype=torch.int64, device=self.dev)
        slots = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        if self.cfg.tie_free:
            keys = tie_free_keys((r.code_a * pos + r.code_b) % _CODE_MOD)
        else:
            keys = torch.randn(n, 128, generator=self.tgen, device=self.dev).to(torch.bfloat16)
        kb, ks = quantize_keys(keys, self.cfg.use_ue8m0)
        for st in self.states.values():
            write_keys(st.kv_cache, slots, kb, ks)
        self.stats.prefill_tokens += n

    def _preempt(self, r: Request) -> None:
        """vLLM v1 recompute preemption: free the blocks, re-queue at the front, re-prefill later."""
        self.allocator.free(r.blocks, r.rid)
        r.blocks = []
        r.prompt_len = r.context_len  # recompute every computed token on readmission
        r.context_len = 0
        r.preemptions += 1
        self.waiting.appendleft(r)
        self.stats.preempted += 1

    def _grow(self) -> None:
        """Allocate the blocks each running request needs for this step's ``next_n`` new tokens."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            need = self._blocks_for(r.context_len + self.cfg.next_n) - len(r.blocks)
            if need <= 0:
                i += 1
                continue
            try:
                r.blocks += self.allocator.allocate(need, r.rid)
                i += 1
            except OutOfBlocksError:
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                if victim is r:
                    break

    def _finish_step(self, step_batch: StepBatch) -> int:
        """Advance contexts (MTP acceptance), retire finished requests; returns how many finished."""
        nn = self.cfg.next_n
        done = []
        for r in step_batch.requests:
            accepted = 1 if nn == 1 else 1 + int(self.rng.random() < self.cfg.mtp_accept)
            r.context_len += accepted
            r.generated += accepted
            self.stats.tokens_generated += accepted
            self.stats.request_steps += 1
            if r.generated >= r.output_len or r.context_len + nn > self.cfg.max_context:
                done.append(r)
        for r in done:
            self.running.remove(r)
            self.allocator.free(r.blocks, r.rid)
            r.blocks = []
        self.stats.finished += len(done)
        return len(done)

    # ---------------------------------------------------------------------------------
    # step inputs
    # ---------------------------------------------------------------------------------
    def _build_step(self, step: int) -> StepBatch:
        cfg, dev, nn = self.cfg, self.dev, self.cfg.next_n
        reqs = list(self.running)
        B = len(reqs)
        Bp = bucket_for(B, self.buckets) if (cfg.graphs or cfg.pad_batches) else B
        T, Tp = B * nn, Bp * nn
        for b, r in enumerate(reqs):  # rows keep stale ids past each request's blocks (vLLM BlockTable)
            self.host_block_table[b, : len(r.blocks)] = r.blocks
        bt = np.zeros((Bp, self.max_blocks), dtype=np.int32)  # padding rows -> the null block
        bt[:B] = self.host_block_table[:B]
        ctx = np.zeros(Bp, dtype=np.int32)
        pos = np.zeros(Tp, dtype=np.int64)
        slots = np.full(Tp, -1, dtype=np.int64)
        for b, r in enumerate(reqs):
            ctx[b] = r.context_len + nn
            for j in range(nn):
                p = r.context_len + j
                pos[b * nn + j] = p
                slots[b * nn + j] = r.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
        g = self.tgen
        t = {
            "q_c": torch.zeros(Tp, 1536, dtype=torch.bfloat16, device=dev),
            "k_pe": torch.zeros(Tp, 1, 64, dtype=torch.bfloat16, device=dev),
            "index_k": torch.zeros(Tp, 128, dtype=torch.bfloat16, device=dev),
            "positions": torch.from_numpy(pos).to(dev),
            "slot_mapping": torch.from_numpy(slots).to(dev),
            "block_table": torch.from_numpy(bt).to(dev),
            "context_lens": torch.from_numpy(ctx).to(dev),
        }
        t["q_c"][:T] = torch.randn(T, 1536, generator=g, device=dev).to(torch.bfloat16)
        t["k_pe"][:T] = torch.randn(T, 1, 64, generator=g, device=dev).to(torch.bfloat16)
        if cfg.tie_free:
            q, w = tie_free_query(Tp, dev)
            codes = torch.tensor([(r.code_a * (r.context_len + j) + r.code_b) % _CODE_MOD for r in reqs
                                  for j in range(nn)], dtype=torch.int64, device=dev)
            t["index_k"][:T] = tie_free_keys(codes)
        else:
            qf = torch.zeros(Tp, 64, 128, device=dev)
            qf[:T] = torch.randn(T, 64, 128, generator=g, device=dev)
            q = qf.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            w = torch.zeros(Tp, 64, device=dev)
            w[:T] = torch.randn(T, 64, generator=g, device=dev) * (64**-0.5 * 128**-0.5)
            t["index_k"][:T] = torch.randn(T, 128, generator=g, device=dev).to(torch.bfloat16)
        t["index_q_fp8"], t["index_weights"] = q, w.float()
        return StepBatch(step=step, requests=reqs, B=B, Bp=Bp, T=T, Tp=Tp, tensors=t,
                         live_slots=torch.from_numpy(slots[:T]).to(dev))

    def _args(self, sb: StepBatch, kv_cache: torch.Tensor, padded: bool):
        """RegionArgs over the step's inputs (``padded``: all Tp rows, else the T live rows) with
        fresh outputs (``q`` NaN, ``topk_indices`` -7, ``k_pe`` a copy: it is roped in place)."""
        from smpart.region import RegionArgs

        t = sb.tensors
        T, B = (sb.Tp, sb.Bp) if padded else (sb.T, sb.B)
        return RegionArgs(
            q_c=t["q_c"][:T], q_b_proj_weight=self.weight, q_b_proj_weight_scale=self.weight_scale,
            positions=t["positions"][:T], cos_sin_cache=self.cos_sin_cache, k_pe=t["k_pe"][:T].clone(),
            q=torch.full((T, self.cfg.num_heads, 192), float("nan"), dtype=torch.bfloat16, device=self.dev),
            index_q_fp8=t["index_q_fp8"][:T], index_weights=t["index_weights"][:T], index_k=t["index_k"][:T],
            kv_cache=kv_cache, slot_mapping=t["slot_mapping"][:T], block_table=t["block_table"][:B],
            context_lens=t["context_lens"][:B],
            topk_indices=torch.full((T, 2048), -7, dtype=torch.int32, device=self.dev), next_n=self.cfg.next_n,
        )

    def _stale_positions(self, sb: StepBatch) -> int:
        """Positions past each live request's context in its last block that hold key bytes left by an
        earlier owner of the block (nonzero fp32 scale in the reference cache) while the step runs."""
        if sb.B == 0:
            return 0
        from smpart import reference

        _, scales = reference.cache_values_and_scales(self.states["reference"].kv_cache)
        last = torch.tensor([r.blocks[(r.context_len + self.cfg.next_n - 1) // BLOCK_SIZE] for r in sb.requests],
                            dtype=torch.int64, device=self.dev)
        ctx = sb.tensors["context_lens"][: sb.B].long()
        start = ctx - (ctx - 1) // BLOCK_SIZE * BLOCK_SIZE  # first offset past the context in the last block
        offs = torch.arange(BLOCK_SIZE, device=self.dev)
        beyond = offs[None, :] >= start[:, None]
        return int(((scales[last] != 0) & beyond).sum())

    # ---------------------------------------------------------------------------------
    # running the paths
    # ---------------------------------------------------------------------------------
    def static_args(self, st: _PathState, bucket: int):
        """The captured buffers of ``st``'s graph for ``bucket`` requests (RegionArgs over ``bucket *
        next_n`` rows, the path's own cache): safe warm-up contents, every slot -1 (nothing is written
        to the cache) and every length ``max_context`` over the null block (so that vendor host values
        such as the top-k's ``max_seq_len`` are captured at their largest)."""
        from smpart.region import RegionArgs

        cfg, dev = self.cfg, self.dev
        Tp = bucket * cfg.next_n
        return RegionArgs(
            q_c=torch.zeros(Tp, 1536, dtype=torch.bfloat16, device=dev), q_b_proj_weight=self.weight,
            q_b_proj_weight_scale=self.weight_scale, positions=torch.zeros(Tp, dtype=torch.int64, device=dev),
            cos_sin_cache=self.cos_sin_cache, k_pe=torch.zeros(Tp, 1, 64, dtype=torch.bfloat16, device=dev),
            q=torch.zeros(Tp, cfg.num_heads, 192, dtype=torch.bfloat16, device=dev),
            index_q_fp8=torch.zeros(Tp, 64, 128, device=dev).to(torch.float8_e4m3fn),
            index_weights=torch.zeros(Tp, 64, device=dev),
            index_k=torch.zeros(Tp, 128, dtype=torch.bfloat16, device=dev),
            kv_cache=st.kv_cache, slot_mapping=torch.full((Tp,), -1, dtype=torch.int64, device=dev),
            block_table=torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev),
            context_lens=torch.full((bucket,), cfg.max_context, dtype=torch.int32, device=dev),
            topk_indices=torch.full((Tp, 2048), -1, dtype=torch.int32, device=dev), next_n=cfg.next_n,
        )

    def _capture(self, st: _PathState, bucket: int) -> None:
        """Capture ``st``'s path for ``bucket`` requests: :meth:`static_args`, two eager warm-ups on a
        side stream (compiles; the vendor paths build their workspace), then the graph (vLLM's capture
        order; all graphs share one memory pool and are replayed one at a time)."""
        from smpart.region import run_region

        cfg, dev = self.cfg, self.dev
        static = self.static_args(st, bucket)
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(2):
                run_region(static, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0)
        cur.wait_stream(side)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            run_region(static, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0)
        torch.cuda.synchronize()
        st.graphs[bucket] = (graph, static)

    def capture_all(self, progress: Callable[[str], None] | None = None) -> None:
        """Capture every path's graph for every bucket (graph mode). A path whose warm-up or capture
        raises is dropped from the run: listed in ``skipped`` when the error says it cannot run here
        (``RuntimeError``, see ``bench.__main__._unavailable``), else in ``failed``."""
        from smpart.bench.__main__ import _unavailable

        for p in list(self.path_names):
            st = self.states[p]
            for bucket in self.buckets:
                if progress:
                    progress(f"capturing {p} B={bucket}")
                try:
                    self._capture(st, bucket)
                except Exception as e:  # noqa: BLE001 - one path must not stop the others
                    why = f"capture (B={bucket}): {type(e).__name__}: {e}"
                    (self.skipped if _unavailable(e) else self.failed)[p] = why
                    del self.states[p]
                    self.stats.path_runs.pop(p, None)
                    torch.cuda.synchronize()
                    break

    def _load_static(self, st: _PathState, sb: StepBatch):
        """Copy the live step into ``st``'s captured buffers for the step's bucket; returns (graph, static)."""
        graph, s = st.graphs[sb.Bp]
        t = sb.tensors
        for name in ("q_c", "positions", "index_q_fp8", "index_weights", "index_k", "slot_mapping"):
            getattr(s, name).copy_(t[name])
        s.k_pe.copy_(t["k_pe"])
        s.block_table.copy_(t["block_table"])
        s.context_lens.copy_(t["context_lens"])
        s.q.fill_(float("nan"))
        s.topk_indices.fill_(-7)
        if st.name in VENDOR_PATHS:  # vLLM's metadata builder: per-step DeepGEMM schedule, eager
            st.workspace.vendor.prepare(s, self.cfg.use_ue8m0)
        return graph, s

    def _run_paths(self, sb: StepBatch, ref_args) -> dict:
        """Run every path due this step; returns ``{path: (out RegionArgs over live rows, padded topk)}``."""
        import dataclasses as dc

        due = [self.states[p] for p in self.path_names if self.states[p].runs_at(sb.step)]
        outs, events = {}, {}
        for st in due:
            try:
                args = self._launch(st, sb, events)
            except MismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - a crash is a disagreement too: stop with a report
                raise MismatchError({"step": sb.step, "path": st.name, "check": "run",
                                     "message": f"raised {type(e).__name__}: {e}"}) from e
            st.runs += 1
            self.stats.path_runs[st.name] = st.runs
            live = dc.replace(args, q=args.q[: sb.T], k_pe=args.k_pe[: sb.T], topk_indices=args.topk_indices[: sb.T],
                              q_c=args.q_c[: sb.T], positions=args.positions[: sb.T],
                              index_q_fp8=args.index_q_fp8[: sb.T], index_weights=args.index_weights[: sb.T],
                              index_k=args.index_k[: sb.T], slot_mapping=args.slot_mapping[: sb.T],
                              block_table=args.block_table[: sb.B], context_lens=args.context_lens[: sb.B])
            outs[st.name] = (live, args.topk_indices[sb.T:])
        if events:
            try:
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - an asynchronous fault of one of this step's launches
                raise MismatchError({"step": sb.step, "path": ",".join(events), "check": "run",
                                     "message": f"CUDA error surfaced at the step's synchronize: "
                                                f"{type(e).__name__}: {e}"}) from e
            for name, (a, b) in events.items():
                self.states[name].times_us.append((sb.step, sb.B, a.elapsed_time(b) * 1e3))
        # paths not due this step: bring their cache copies up to date with the reference's new bytes
        for p in self.path_names:
            if not self.states[p].runs_at(sb.step) and sb.T:
                copy_slots(ref_args.kv_cache, self.states[p].kv_cache, sb.live_slots)
        return outs

    def _launch(self, st: _PathState, sb: StepBatch, events: dict):
        """Run one path on the step (graph replay or eager call, timed on a GPU); returns its args."""
        from smpart.region import run_region
        from smpart.validate import validate_region_args

        cfg = self.cfg
        if cfg.graphs:
            graph, args = self._load_static(st, sb)
            fn = graph.replay
        else:
            args = self._args(sb, st.kv_cache, padded=True)
            if self._validated_step != sb.step:  # value checks once per step, outside the timing
                validate_region_args(args, max_len=st.workspace.max_len)
                self._validated_step = sb.step

            def fn():
                run_region(args, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0,
                           check_values=False)

        if self.is_cuda:  # CUDA events around the replay / call only (the L2 flush precedes them)
            if self._flush is not None:
                self._flush()
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            fn()
            ev[1].record()
            events[st.name] = ev
        else:
            t0 = time.perf_counter()
            fn()
            st.wall_s.append(time.perf_counter() - t0)
        return args

    # ---------------------------------------------------------------------------------
    # checking
    # ---------------------------------------------------------------------------------
    def _check(self, sb: StepBatch, ref_args, outs: dict) -> None:
        from smpart.bench.__main__ import check_path
        from smpart import checks, reference

        cfg = self.cfg
        logits64 = reference_logits64(ref_args)
        tol = None
        if cfg.check == "fast" and not cfg.tie_free:
            tol = checks.logits_tolerance(ref_args, reference.visible_lens(ref_args.context_lens, cfg.next_n))
        batch = types.SimpleNamespace(tie_free=cfg.tie_free)
        for p, (out, pad_topk) in outs.items():
            try:
                if cfg.check == "fast":
                    fast_check_region(p, out, ref_args, logits64, tol, cfg.tie_free)
                else:
                    check_path(p, out, ref_args, batch, logits64)
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

    # ---------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Run one decode step (arrivals, admission, growth, all paths, checks, retirement).

        Returns
        -------
        dict : the step's CSV row.

        Raises
        ------
        MismatchError : a path disagreed with the reference.
        """
        from smpart.region import run_region

        cfg = self.cfg
        self._arrivals(step)
        preempted0 = self.stats.preempted
        self._grow()  # running requests first, then the waiting queue (vLLM v1's scheduler order)
        # no admission in a step that preempted (as vLLM), unless nothing runs (never an empty step)
        admitted = self._admit() if self.stats.preempted == preempted0 or not self.running else 0
        if not self.running:
            raise RuntimeError(f"step {step}: no request could be scheduled (num_blocks {cfg.num_blocks} too small?)")
        sb = self._build_step(step)
        stale = self._stale_positions(sb)
        ref_args = self._args(sb, self.states["reference"].kv_cache, padded=False)
        run_region(ref_args, "reference", use_ue8m0=cfg.use_ue8m0)
        outs = self._run_paths(sb, ref_args)
        checked = step % cfg.check_every == 0
        if checked:
            self._check(sb, ref_args, outs)
        ctxs = [r.context_len + cfg.next_n for r in sb.requests]
        s = self.stats
        s.steps += 1
        s.stale_positions += stale
        s.steps_with_stale += int(stale > 0)
        s.max_batch_seen = max(s.max_batch_seen, sb.B)
        s.min_batch_seen = sb.B if s.steps == 1 else min(s.min_batch_seen, sb.B)
        s.max_context_seen = max(s.max_context_seen, max(ctxs))
        finished = self._finish_step(sb)
        s.block_allocations = self.allocator.num_allocations
        s.blocks_reused = self.allocator.num_reused
        row = {"step": step, "batch": sb.B, "padded_batch": sb.Bp, "num_tokens": sb.T,
               "total_context_tokens": int(sum(ctxs)), "max_context": max(ctxs), "admitted": admitted,
               "finished": finished, "preempted": s.preempted - preempted0, "waiting": len(self.waiting),
               "blocks_used": self.allocator.num_used, "blocks_reused_total": s.blocks_reused,
               "stale_positions": stale, "checked": int(checked)}
        for p in self.path_names:
            st = self.states[p]
            ran = p in outs
            row[f"{p}_us"] = st.times_us[-1][2] if ran and st.times_us and st.times_us[-1][0] == step else None
            row[f"{p}_wall_s"] = st.wall_s[-1] if ran and st.wall_s else None
        self.step_rows.append(row)
        return row

    def run(self, time_budget_s: float | None = None) -> dict:
        """Run ``cfg.steps`` steps (capturing graphs first in graph mode); returns :meth:`summary`.

        ``time_budget_s``: stop early, after the step during which this many wall-clock seconds
        (from the call) have passed; ``self.stats.steps`` says how many ran.

        Raises
        ------
        MismatchError : the first disagreement with the reference (``self.step_rows`` holds the steps
            before it).
        """
        if self.cfg.graphs and not any(st.graphs for st in self.states.values()):
            self.capture_all()
        t0 = time.perf_counter()
        for step in range(self.cfg.steps):
            row = self.step(step)
            if self.progress:
                self.progress(step, row)
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
        return self.summary()

    # ---------------------------------------------------------------------------------
    # results
    # ---------------------------------------------------------------------------------
    def baseline(self) -> str | None:
        """``vllm_dual_stream`` if it was timed, else ``dual_stream``, else None."""
        for b in BASELINES:
            if b in self.states and self.states[b].times_us:
                return b
        return None

    def path_summary(self) -> dict:
        """Per path: runs, median / p90 / mean us per step; against the baseline: the median over the
        steps both ran of ``baseline_us - path_us`` per layer (``saving_per_layer_us``), times 61 layers
        (``saving_per_step_us``: one decode step of the model), and per generated token
        (``saving_per_token_us``: the step's saving over the tokens a request gains per step, 1 or
        1 + the MTP acceptance), and the median ratio ``path_us / baseline_us``."""
        from smpart.bench.harness import _percentile

        base = self.baseline()
        base_t = {s: us for s, _, us in self.states[base].times_us} if base else {}
        tokens_per_step = self.stats.tokens_generated / max(self.stats.request_steps, 1) or 1.0
        out = {}
        for p in self.path_names:
            st = self.states[p]
            d = {"runs": st.runs}
            if st.times_us:
                us = sorted(x[2] for x in st.times_us)
                d.update(median_us=statistics.median(us), p90_us=_percentile(us, 90), mean_us=statistics.fmean(us))
                if base and p != base:
                    sav = [base_t[s] - u for s, _, u in st.times_us if s in base_t]
                    if sav:
                        d["saving_per_layer_us"] = statistics.median(sav)
                        d["saving_per_step_us"] = NUM_LAYERS * d["saving_per_layer_us"]
                        d["saving_per_token_us"] = d["saving_per_step_us"] / tokens_per_step
                        d["ratio_to_baseline"] = statistics.median(
                            [u / base_t[s] for s, _, u in st.times_us if s in base_t])
            if st.wall_s:
                d["interpreter_s_per_step"] = statistics.fmean(st.wall_s)
            out[p] = d
        return out

    def summary(self) -> dict:
        """Everything ``summary.json`` holds: config, stats, per-path results, skipped paths."""
        cfg = dataclasses.asdict(self.cfg)
        cfg["configs"] = {k: repr(v) for k, v in self.cfg.configs.items()}
        cfg["mix"] = dataclasses.asdict(self.cfg.mix)
        return {"config": cfg, "stats": dataclasses.asdict(self.stats), "paths": self.path_summary(),
                "baseline": self.baseline(), "skipped": dict(self.skipped), "failed": dict(self.failed),
                "buckets": self.buckets,
                "timed": bool(self.is_cuda), "graphs": bool(self.cfg.graphs)}


# ======================================================================================
# output files
# ======================================================================================
def write_steps_csv(path: str, rows: list[dict]) -> None:
    """One row per step (fields: step, batch, padded_batch, num_tokens, total_context_tokens,
    max_context, allocator counters, ``<path>_us`` and ``<path>_wall_s``)."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)) for k, v in r.items()})


def plot_step_times(path: str, loop: DecodeLoop) -> bool:
    """PNG of step time (us) vs batch size, one colour per path (points: steps; line: median per
    batch size). Returns False when there is nothing timed or matplotlib is missing."""
    if not any(loop.states[p].times_us for p in loop.path_names):
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, p in enumerate(loop.path_names):
        pts = loop.states[p].times_us
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.scatter([b for _, b, _ in pts], [u for _, _, u in pts], s=6, alpha=0.25, color=color)
        by_b = collections.defaultdict(list)
        for _, b, u in pts:
            by_b[b].append(u)
        bs = sorted(by_b)
        ax.plot(bs, [statistics.median(by_b[b]) for b in bs], color=color, label=p)
    ax.set_xscale("log", base=2)
    batches = sorted({b for p in loop.path_names for _, b, _ in loop.states[p].times_us})
    ticks = [t for t in batch_buckets(max(batches)) if t >= batches[0]] or batches
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("batch size (requests)")
    ax.set_ylabel("us per step, one layer" + (" (cold L2)" if loop.cfg.cold_l2 else ""))
    ax.set_title(f"DSV3.2 region, H={loop.cfg.num_heads}, next_n={loop.cfg.next_n}"
                 f"{', CUDA graphs' if loop.cfg.graphs else ', eager'}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _env_info(device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        from smpart.vendor import deep_gemm_version

        info["gpu"] = torch.cuda.get_device_name(device)
        info["deep_gemm"] = deep_gemm_version() or "n/a"
    else:
        info["gpu"] = "none (CPU, Triton interpreter)"
    return info


def summary_table(summary: dict) -> list[list]:
    """Rows of the per-path table: path, runs, median us, p90 us, x baseline, saving per layer us,
    saving per model step (61 layers) us, saving per generated token us."""

    def f(x, nd=1):
        return "" if x is None else f"{x:.{nd}f}"

    rows = []
    for p, d in summary["paths"].items():
        ratio = "baseline" if p == summary.get("baseline") else f(d.get("ratio_to_baseline"), 2)
        rows.append([p, d["runs"], f(d.get("median_us")), f(d.get("p90_us")), ratio,
                     f(d.get("saving_per_layer_us"), 2), f(d.get("saving_per_step_us"), 1),
                     f(d.get("saving_per_token_us"), 1)])
    return rows


TABLE_HEADERS = ["path", "steps run", "median us/step", "p90 us/step", "x baseline", "saving us/layer",
                 f"saving us/step ({NUM_LAYERS} layers)", "saving us/token"]


def _format_table(rows: list[list]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=TABLE_HEADERS, tablefmt="github")
    except ImportError:
        lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
        lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
        return "\n".join(lines)


def write_outputs(out_dir: str, loop: DecodeLoop, summary: dict, env: dict, mismatch: dict | None) -> list[str]:
    """Write ``steps.csv``, ``summary.json``, ``summary.md`` and (when timed) ``step_time_vs_batch.png``."""
    os.makedirs(out_dir, exist_ok=True)
    files = []
    p = os.path.join(out_dir, "steps.csv")
    write_steps_csv(p, loop.step_rows)
    files.append(p)
    p = os.path.join(out_dir, "summary.json")
    with open(p, "w") as f:
        json.dump({**summary, "env": env, "mismatch": mismatch}, f, indent=1, default=str)
    files.append(p)
    p = os.path.join(out_dir, "summary.md")
    cfg, st = loop.cfg, summary["stats"]
    with open(p, "w") as f:
        f.write(f"# smpart-bench decode, {env.get('gpu')}, {env['date']}\n\n")
        f.write(f"torch {env['torch']}, triton {env['triton']}"
                f"{', DeepGEMM ' + env['deep_gemm'] if 'deep_gemm' in env else ''}; H={cfg.num_heads}, "
                f"next_n={cfg.next_n}, {st['steps']} steps, batch {st['min_batch_seen']}..{st['max_batch_seen']}, "
                f"contexts up to {st['max_context_seen']}; {'CUDA graphs per batch bucket' if cfg.graphs else 'eager'}"
                f"{', L2 flushed before each timed run' if cfg.cold_l2 else ''}; baseline "
                f"{summary['baseline'] or 'n/a'}; {st['checks']} steps checked against the reference, "
                f"{'a MISMATCH' if mismatch else 'zero mismatches'}.\n\n")
        f.write(_format_table(summary_table(summary)) + "\n")
    files.append(p)
    p = os.path.join(out_dir, "step_time_vs_batch.png")
    if plot_step_times(p, loop):
        files.append(p)
    return files


# ======================================================================================
# CLI
# ======================================================================================
def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _kv_int(s: str) -> tuple[str, int]:
    try:
        k, v = s.split("=", 1)
        return k.strip(), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATH=N (an int), got {s!r}") from None


def parse_partition_config(s: str):
    """``KEY=VAL[,KEY=VAL]`` -> ``PartitionConfig`` (ints, ``true``/``false``, ``none``).

    Raises
    ------
    ValueError : an unknown key or a malformed pair.
    """
    from smpart.triton_kernels.partitioned import PartitionConfig

    names = {f.name for f in dataclasses.fields(PartitionConfig)}
    kw = {}
    for item in _str_list(s):
        if "=" not in item:
            raise ValueError(f"--partitioned-config: expected KEY=VAL, got {item!r}")
        k, v = (x.strip() for x in item.split("=", 1))
        if k not in names or k == "topk_config":
            raise ValueError(f"--partitioned-config: unknown key {k!r}; choose from {sorted(names - {'topk_config'})}")
        low = v.lower()
        if low == "none":
            kw[k] = None
        elif low in ("true", "false"):
            kw[k] = low == "true"
        else:
            try:
                kw[k] = int(v) if v.lstrip("+-").isdigit() else float(v)  # gemm_in_tail is a fraction
            except ValueError:
                raise ValueError(f"--partitioned-config: {k}={v!r} is not a number, none, true or false") from None
    return PartitionConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smpart-bench decode",
        description="Continuous-batching decode loop of the DSV3.2 region: every path against the reference at "
                    "every step, timed per step on a GPU (CUDA graphs per batch bucket).",
        epilog="H200 targets: smpart-bench decode --steps 2000 --max-context 65536 (H=128), then add --heads 32; "
               "MTP: --next-n 2. CPU: a short interpreter loop at H=16 (correctness only).")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default: 200 on a GPU, 20 on the CPU)")
    p.add_argument("--heads", type=int, default=None, choices=SUPPORTED_H,
                   help="MLA heads per rank H (default: 128 on a GPU, 16 on the CPU)")
    p.add_argument("--next-n", type=int, default=1, choices=(1, 2),
                   help="rows per request (2 = one MTP draft token; default 1)")
    p.add_argument("--max-batch", type=int, default=None, help="requests per step (default: 128 GPU, 4 CPU)")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest context in tokens (default: 131072 GPU, 3072 CPU)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="cache blocks per path copy (default: max(2*max_context, 16384*max_batch) tokens on a GPU, "
                        "2*max_context on the CPU)")
    p.add_argument("--paths", type=_str_list, default=None,
                   help="paths besides reference (default: sequential,dual_stream,partitioned + vllm_* where DeepGEMM "
                        "and vLLM's ops load; CPU: sequential,partitioned)")
    p.add_argument("--stride", type=_kv_int, action="append", default=[], metavar="PATH=N",
                   help="run PATH only every N-th step (its cache copy gets the reference's new bytes otherwise); "
                        "repeatable")
    p.add_argument("--partitioned-config", default=None, metavar="KEY=VAL,...",
                   help="PartitionConfig fields for the partitioned path (default: the tuned/default choice)")
    p.add_argument("--prompt-median", type=float, default=None, help="prompt length median (tokens)")
    p.add_argument("--prompt-sigma", type=float, default=None, help="prompt length log-space sigma")
    p.add_argument("--output-median", type=float, default=None, help="output length median (tokens)")
    p.add_argument("--output-sigma", type=float, default=None, help="output length log-space sigma")
    p.add_argument("--output-max", type=int, default=None, help="output length clip (tokens)")
    p.add_argument("--arrival-peak", type=float, default=None, help="peak arrivals per step (default: auto)")
    p.add_argument("--arrival-period", type=int, default=None, help="steps per arrival wave (default: auto)")
    p.add_argument("--mtp-accept", type=float, default=0.85,
                   help="MTP draft acceptance probability (next_n=2; default 0.85)")
    p.add_argument("--tie-free", action="store_true", help="tie-free indexer inputs (exact top-k index sets)")
    p.add_argument("--pad-batches", action="store_true", help="pad eager batches to their bucket too")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs per batch bucket (default: on with CUDA)")
    p.add_argument("--cold-l2", action=argparse.BooleanOptionalAction, default=None,
                   help="read-only L2 flush before each timed run (default: on with CUDA)")
    p.add_argument("--check", choices=("full", "fast"), default=None,
                   help="full = checks.check_region; fast = its vectorized twin (default: fast on GPU, full on CPU)")
    p.add_argument("--check-every", type=int, default=1, help="compare with the reference every N-th step (default 1)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop after the step that passes this many seconds of loop time (outputs still written)")
    p.add_argument("--fp32-scales", action="store_true", help="plain fp32 scales instead of UE8M0")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--out", default="decode_out", help="output folder for steps.csv, summary.json, summary.md, "
                   "step_time_vs_batch.png (default decode_out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(a: argparse.Namespace, cuda: bool) -> LoopConfig:
    """LoopConfig from parsed CLI options (device-dependent defaults filled in).

    Raises
    ------
    ValueError : a bad option.
    """
    max_context = a.max_context if a.max_context is not None else (131072 if cuda else 3072)
    if not isinstance(max_context, int) or max_context < 3:
        raise ValueError(f"--max-context: expected an int >= 3, got {max_context!r}")
    base = RequestMix() if cuda else RequestMix.small(max_context)
    mix = dataclasses.replace(
        base,
        prompt_max=min(base.prompt_max, max(1, max_context - a.next_n)),
        **{k: v for k, v in (("prompt_median", a.prompt_median), ("prompt_sigma", a.prompt_sigma),
                             ("output_median", a.output_median), ("output_sigma", a.output_sigma),
                             ("output_max", a.output_max)) if v is not None})
    if cuda:
        paths = ["sequential", "dual_stream", "partitioned"]
        from smpart.vendor import vendor_available

        if vendor_available()[0]:
            paths += list(VENDOR_PATHS)
    else:
        paths = ["sequential", "partitioned"]  # dual_stream is sequential on one CPU stream
    if a.paths is not None:
        paths = a.paths
        if "reference" in paths:
            raise ValueError("--paths: 'reference' always runs (every path is checked against it); "
                             "name the paths to compare with it")
        if not paths:
            raise ValueError("--paths: name at least one path besides the reference")
    configs = {}
    if a.partitioned_config:
        configs["partitioned"] = parse_partition_config(a.partitioned_config)
        if "partitioned" not in paths:
            raise ValueError("--partitioned-config: the partitioned path is not among --paths")
    strides = {}
    for k, v in a.stride:
        if k in strides:
            raise ValueError(f"--stride: {k!r} given twice")
        strides[k] = v
    return LoopConfig(
        num_heads=a.heads if a.heads is not None else (128 if cuda else 16), next_n=a.next_n,
        steps=a.steps if a.steps is not None else (200 if cuda else 20),
        max_batch=a.max_batch if a.max_batch is not None else (128 if cuda else 4),
        max_context=max_context, num_blocks=a.num_blocks, paths=tuple(paths), strides=strides, configs=configs,
        mix=mix, arrival_peak=a.arrival_peak, arrival_period=a.arrival_period, mtp_accept=a.mtp_accept,
        tie_free=a.tie_free, pad_batches=a.pad_batches,
        graphs=cuda if a.graphs is None else a.graphs, cold_l2=cuda if a.cold_l2 is None else a.cold_l2,
        check=a.check or ("fast" if cuda else "full"), check_every=a.check_every,
        use_ue8m0=not a.fp32_scales, seed=a.seed, device="cuda" if cuda else "cpu",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smpart-bench decode`` and ``python -m smpart.bench.decode_loop``; returns the exit
    status (0 ok, 1 a mismatch, 2 bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.device not in (None, "cpu", "cuda"):
        parser.error(f"--device: expected cuda or cpu, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    want_cuda = a.device != "cpu" and torch.cuda.is_available()
    if not want_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("smpart-bench decode: no CUDA device; re-running under TRITON_INTERPRET=1", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "smpart.bench.decode_loop", *argv], env=env)
    if want_cuda and os.environ.get("TRITON_INTERPRET") == "1":
        print("smpart-bench decode: TRITON_INTERPRET=1 with a GPU present: running the CPU interpreter loop")
        want_cuda = False
    try:
        cfg = config_from_args(a, want_cuda).resolved()
    except (ValueError, TypeError) as e:  # bad options, or a --partitioned-config value of the wrong type
        print(f"smpart-bench decode: {e}", file=sys.stderr)
        return 2
    if want_cuda:
        for pkg in ("tqdm", "matplotlib"):
            try:
                __import__(pkg)
            except ImportError:
                print(f"smpart-bench decode: the '{pkg}' package is missing; pip install -e '.[bench]'",
                      file=sys.stderr)
                return 2
    env = _env_info(cfg.device)
    mode = ("CUDA graphs" if cfg.graphs else "eager") if want_cuda else "CPU, Triton interpreter"
    print(f"smpart-bench decode ({mode}): H={cfg.num_heads} next_n={cfg.next_n} steps={cfg.steps} "
          f"max_batch={cfg.max_batch} max_context={cfg.max_context} num_blocks={cfg.num_blocks} "
          f"paths={','.join(('reference',) + tuple(cfg.paths))} check={cfg.check}; {env['gpu']}, torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)

    bar = None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and not a.no_progress:
        bar = tqdm(total=cfg.steps, desc="decode", unit="step")

    def progress(step: int, row: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(f"B={row['batch']} max_ctx={row['max_context']} reused={row['blocks_reused_total']}")
            bar.update(1)
        elif not a.no_progress:
            print(f"step {step}: B={row['batch']} max_ctx={row['max_context']}", flush=True)

    loop = DecodeLoop(cfg, progress=progress)
    for p, why in loop.skipped.items():
        print(f"skipped: {p}: {why}")
    mismatch = None
    t0 = time.perf_counter()
    try:
        if cfg.graphs:
            print(f"capturing {len(loop.path_names)} paths x {len(loop.buckets)} batch buckets {loop.buckets}",
                  flush=True)
            tc = time.perf_counter()
            loop.capture_all(progress=None if a.no_progress else (lambda msg: print(msg, flush=True)))
            print(f"captured in {time.perf_counter() - tc:.0f} s", flush=True)
        loop.run(time_budget_s=a.time_budget_s)
    except MismatchError as e:
        mismatch = e.report
    finally:
        if bar is not None:
            bar.close()
    for p, why in loop.skipped.items():
        if p not in loop.states and why.startswith("capture"):
            print(f"skipped: {p}: {why}")
    for p, why in loop.failed.items():
        print(f"FAILED: {p}: {why}", file=sys.stderr)
    summary = loop.summary()
    files = write_outputs(a.out, loop, summary, env, mismatch)
    st = loop.stats
    print(f"{st.steps} steps in {time.perf_counter() - t0:.0f} s: batch {st.min_batch_seen}..{st.max_batch_seen}, "
          f"contexts up to {st.max_context_seen}; requests arrived {st.arrived}, finished {st.finished}, "
          f"preempted {st.preempted}; blocks allocated {st.block_allocations}, reused {st.blocks_reused}; stale "
          f"positions in live blocks {st.stale_positions} over {st.steps_with_stale} steps; "
          f"{st.checks} steps checked against the reference")
    if want_cuda:
        print(_format_table(summary_table(summary)))
        if summary["baseline"] is None:
            print("no baseline (dual_stream / vllm_dual_stream) was timed: savings not computed")
    else:
        for p, d in summary["paths"].items():
            if "interpreter_s_per_step" in d:
                print(f"{p}: {d['runs']} steps, {d['interpreter_s_per_step']:.1f} s per step under the interpreter")
        print("Timings need a CUDA GPU: run smpart-bench decode on the GPU machine.")
    print("wrote " + ", ".join(files))
    if mismatch:
        print(format_report(mismatch), file=sys.stderr)
        return 1
    print("zero mismatches" + (f"; but {sorted(loop.failed)} could not be captured" if loop.failed else ""))
    return 1 if loop.failed else 0


if __name__ == "__main__":
    sys.exit(main())
