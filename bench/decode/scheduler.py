"""Block pool, request mix, requests and the scheduling half of the loop (arrivals, FCFS admission,
prefill, recompute preemption, growth, retirement), as vLLM v1 does them."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from .common import _CODE_MOD, BLOCK_SIZE, MAX_MODEL_LEN, StepBatch



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

    Raises
    ------
    ValueError : ``num_blocks`` not an int >= 2.
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


def batch_buckets(max_batch: int) -> list[int]:
    """CUDA-graph batch-size buckets: the powers of two below ``max_batch``, then ``max_batch``.

    Parameters
    ----------
    max_batch : the largest batch (requests per step), an int >= 1 (``LoopConfig.max_batch``; the
        loop never runs an empty step, so there is no bucket 0).

    Returns
    -------
    list[int] : ascending, ending with ``max_batch`` (e.g. 48 -> ``[1, 2, 4, 8, 16, 32, 48]``).

    Raises
    ------
    TypeError : ``max_batch`` not an int (a bool included).
    ValueError : ``max_batch`` < 1.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int):
        raise TypeError(f"max_batch: expected an int, got {type(max_batch).__name__} {max_batch!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch: expected >= 1 (a batch of requests), got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``batch`` (``buckets`` ascending, as :func:`batch_buckets` makes them).

    Raises
    ------
    ValueError : ``batch`` exceeds the largest bucket.
    """
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



class SchedulerMixin:
    """The scheduling steps of :class:`~smpart.bench.decode.loop.DecodeLoop` (state lives on the loop)."""

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
