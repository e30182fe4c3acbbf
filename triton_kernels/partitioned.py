"""The SM-partitioned persistent kernel: indexer tail || q_b_proj + RoPE in one launch.

One launch runs the key write, the paged logits and the whole q side; the logits role also fills
each row's 2048-bin histogram (``_mqa_logits_item(HIST=True)`` into ``RegionWorkspace.radix.hist``)
and the top-2048 (``radix_topk._radix_topk_item``, histogram-fed) runs either inside it
(``PartitionConfig(fuse_topk=True)``: the last arriving logits item of a row selects the whole row)
or as a second launch right after (the default: the first launch runs at 4 warps and its register
budget, the radix select wants 16 warps and a chunk in registers).
Where the GEMM tiles run is a launch parameter: beside the logits in the first launch, beside the
top-k in the second (``gemm_in_tail``), or split between them; with ``first_prequant`` a small
launch before the first quantizes ``q_c`` once per token for the first launch's tiles, with
``dense_first`` the first launch is one program per GEMM tile group and per logits item (GEMM
programs numbered first) and ``maxnreg`` caps its registers so both share SMs. With
``topk_impl="vllm"`` (the hybrid) the fused launch has no top-k role and fills no histogram, and
``launch_vllm_topk_prep`` (one program per row: clamped lengths, -1 fill) readies vLLM's own top-k,
which the host side (``smpart/partitioned.py``) launches after it.

Programs pick a role from ``tl.program_id(0)`` (static split) or claim chunks of a shared work
list from an atomic queue (dynamic, POD-Attention style). The roles call the standalone kernels'
role functions, so nothing is written twice:

==========  ==================================================================================
indexer     ``_indexer_k_cache_item`` (new keys -> cache), ``_mqa_logits_item`` over (row, run of
            blocks) items, balanced over the rows' real lengths, each logit also counted in its
            row's histogram; with ``fuse_topk`` the last item of a row runs
            ``_radix_topk_item`` for every chunk of the row (``radix_topk.py``), which also writes
            the row's -1 padding and zeroes its histogram.
GEMM        ``_q_b_proj_item`` tiles (FP8 block-scaled GEMM, fused activation quant, MLA RoPE
            epilogue and ``k_pe`` RoPE).
==========  ==================================================================================

Cross-program protocol (no program ever waits for another):

* per row int32 counters in the workspace (``fuse_topk``: logits items of the row); an item
  arrives with a CTA barrier then ``atomic_add(acq_rel, gpu)``; the arriver that completes the
  count owns the top-k and resets the counter to 0, so every CUDA-graph replay starts from zero (no
  memset node). The radix top-k's own counters and histograms are reset by each row's last
  program (``radix_topk.py``).
* the new keys: the cache write (any program, any time) is not ordered before the logits of the
  same rows. The logits item that covers a row's new positions therefore recomputes their logits
  from ``index_k`` directly, with the exact quantization of the cache write
  (``_patch_new_key_logits``), right after its own stores (program order, a CTA barrier between).
  ``smpart.validate`` checks (eager) that ``slot_mapping`` is the new token's cache slot, which makes
  this identical to write-then-read. The patch also moves the logit's histogram count from the
  bin of the value the item wrote to the bin of the patched value, so the histogram counts exactly
  the final logits.
* loads of data written by other programs in this launch use ``.cg`` (L2, never a stale L1 line).

Every per-step value (lengths, tables, slots) is read on the device: the grid and all launch
arguments depend only on shapes, so one captured graph serves every step of a shape bucket.
"""

from __future__ import annotations

import dataclasses
import numbers

import triton
import triton.language as tl

from .fill import _fill_topk_item
from .fp8 import quant_fp8_bytes, quant_scale
from .indexer_cache import _indexer_k_cache_item
from .mqa_logits import _mqa_logits_item
from .q_b_proj import _q_b_proj_item, _q_c_quant_row
from .radix_topk import RADIX_RT, RadixTopkConfig, _NB as _HIST_NB, _f32_to_key, _hist_bin, _radix_row_len
from .topk import _topk_item


GRID_X_MAX = 2**31 - 1  # CUDA's grid limit in x (65535 in y and z; every launch here is 1-D)
QUEUE_CHUNK_MAX = 4096  # work items claimed per atomic (the tuned files use 4)
PROGRAMS_PER_SM_MAX = 32  # resident CTAs per SM on sm_90: programs past this per SM only queue
TOPK_IMPLS = ("smpart", "vllm")  # PartitionConfig.topk_impl: this package's top-k, or vLLM 0.33's own (the hybrid)


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """Launch parameters of the partitioned kernel (explicit, no global state).

    Attributes
    ----------
    indexer_programs : programs running the indexer role (static schedule); ``None`` = the cost
        model's split of the resident grid (``cost_model.first_split``).
    gemm_programs : programs running the GEMM role; ``None`` = likewise.
    dynamic : claim work from one atomic queue (indexer items first) instead of a static split.
    queue_chunk : work items claimed per atomic in the dynamic schedule.
    block_n, block_t : GEMM tile (weight rows x tokens); ``block_t=None`` = by T.
    blocks_per_item : 64-token cache blocks per logits item (divides 256).
    num_warps, num_stages : shared by both roles.
    fuse_topk : run the top-k inside the launch: the last arriving logits item of a row runs the
        row's top-k at the launch's ``num_warps`` (the sampled top-k as the row's only program; the
        radix item for each chunk in turn); False runs the fused launch without it (fewer
        registers, higher occupancy for the GEMM and logits roles), then the top-k as a second
        launch (``topk.topk``, or the tail launch with ``gemm_in_tail``).
    topk_config : ``radix_topk.RadixTopkConfig`` of the top-k (``None`` = its defaults): ``chunk``
        and ``short_max`` set the positions per top-k item (``radix_topk.radix_chunk``) in every
        split, ``num_warps`` the warps of the second launch (standalone or tail; the tail's GEMM
        tiles run at them too); ``hist_warps`` is unused (the logits role fills the histograms).
    roles : bit mask of the work run (1 key write, 2 logits, 4 top-k, 8 GEMM), 1..15 (at least one
        role; 0 is refused); anything but 15 gives incomplete outputs: a benchmark knob to time one
        role (or a subset) inside the fused launch.
    gemm_in_tail : fraction (0..1) of ``q_b_proj``'s output columns (rounded to multiples of 256,
        the last columns) whose GEMM tiles run in the top-k launch instead of the fused one
        (``fuse_topk=False`` only). The top-k is latency-bound on a few programs (one per row and
        chunk), the logits and the GEMM are bandwidth-bound: 1.0 gives the logits the whole GPU
        in the first launch, then runs the top-k next to the GEMM (``_topk_gemm_tail_kernel``).
    tail_block_n : GEMM tile rows in the tail launch (it runs at the top-k's ``num_warps``,
        ``topk_config.num_warps``).
    tail_gemm_programs : programs of the tail launch on GEMM tiles (capped to its tiles, striding
        over them); ``None`` = one per tile. The top-k items get one program each, numbered first,
        so the hardware starts them first and the GEMM tiles fill the SMs they leave free (and
        the ones they free as they end).
    tail_prequant : the tail's GEMM tiles read ``q_c`` quantized once per token by the fused
        launch (``RegionWorkspace.q_c_fp8``; ``q_b_proj._q_c_quant_row``), with both MMA operands
        loaded by pipelined async copies, instead of quantizing it in every tile's K loop. Same
        bytes either way. Moot when ``first_prequant`` takes effect: the tail then reads what that
        quant launch wrote.

    first_prequant : quantize ``q_c`` in a small launch of its own (``q_b_proj.launch_q_c_quant``,
        one program per token) before the fused launch, whose GEMM tiles then read the FP8
        activations (``_q_b_proj_item(PREQUANT=True)``) instead of quantizing them in every tile's K
        loop. Takes effect when the fused launch keeps GEMM tiles (``tail_columns(H, gemm_in_tail)
        < H * 192``: ``gemm_in_tail`` below 1 after rounding to 256 columns) and the workspace has
        the ``q_c_fp8`` buffers; else ignored. Three launches instead of two; same bytes.
    maxnreg : register cap per thread of the fused launch, 96..255 (Triton's ``maxnreg``, PTX
        ``.maxnreg``; ``None`` = ptxas decides). A launch with GEMM tiles compiles to 205-251
        registers at 4 warps (2 programs per SM; the logits role alone needs 96; sm_90 compile,
        2026-11-30); a cap of 168 lets 3 programs share an SM, 128 lets 4, at the price of spills in
        the GEMM tile (120 bytes of stack at ``block_t=64``, 640 at 128). ptxas refuses caps below
        58 (below 90 for ``block_t=128`` tiles), hence the floor.
    dense_first : a fused launch with GEMM tiles (same condition as ``first_prequant``; static
        schedule only) as ``gemm_programs`` programs striding over the GEMM tiles (``None`` = one
        per tile; capped to the tiles), numbered first so that the hardware starts them first, then
        one program per logits item of the bucket (the standalone logits kernel's grid: the items
        fill the slots the GEMM programs leave, and the ones they free), instead of
        ``indexer_programs + gemm_programs`` resident programs striding over both
        (``indexer_programs`` is then ignored). Pair it with ``maxnreg`` so that GEMM programs and
        logits items share SMs, and ``gemm_programs`` = ``num_sms`` or ``2 * num_sms`` so that the
        GEMM does not take every slot first. With ``fuse_topk`` the last arriving logits item of a
        row still runs its top-k; with no GEMM tile in the fused launch it is ignored.
    topk_impl : ``"smpart"`` (the default: this package's top-k, ``topk.topk`` with
        ``topk_config``: the sampled top-k unless ``topk_config.algo="radix"``, in the split the other
        fields choose) or ``"vllm"`` (the hybrid: the fused launch without the top-k role and
        without the producer histogram, then vLLM 0.33's own decode top-k on ``RegionWorkspace.logits``:
        ``cooperative_topk`` for <= 64 rows, else ``persistent_topk``, dispatched as
        ``smpart.vendor._vllm_topk`` does; vLLM ``model_executor/layers/indexer_topk.py``). ``"vllm"``
        needs the standalone split (``fuse_topk=False``, ``gemm_in_tail=0``) and vLLM's compiled ops
        (``smpart.vendor.load_vllm_ops``; checked at launch, before any kernel runs); ``topk_config``
        is then unused.
    first_programs : programs of a GEMM-less fused launch (``gemm_in_tail=1.0``), all on the key
        write and the logits, striding over the items; ``None`` = one per logits item of the bucket
        (``T * cdiv(max_len, 64 * blocks_per_item)``, at least ``indexer_programs + gemm_programs``),
        which the hardware schedules as SMs free up, like the standalone logits kernel.

    With ``gemm_in_tail=1.0`` the fused launch has no GEMM tile: its GEMM code is compiled out and
    its GEMM programs join the indexer. (H200, 2026-11-30, H=128, T=128, 16K: that launch took
    138 us striding over the items at 218 registers, the GEMM loop compiled in; with one program
    per item and the GEMM code compiled out (96 registers) 85.1, against 84.4 for the standalone
    logits kernel.)

    Bounds: every program count is at most 2**31 - 1 (CUDA's grid limit in x), ``queue_chunk`` at
    most 4096, ``num_stages`` at most 8 (checked when made); at launch
    (``smpart.partitioned.partitioned_region``) each role's programs are at most
    ``max(its work items, 32 * num_sms)``, so that no config launches millions of idle programs.

    Which split wins (same machine and day, H=128, us): at T <= 32 the tail split
    (``gemm_in_tail=1``); at T=128 the dense-first split (``first_prequant=True, dense_first=True,
    maxnreg=168 or 128, gemm_programs=2*num_sms, blocks_per_item=8``): 73.3 / 154.1 / 528.3 at
    4K / 16K / 64K against 83.4 / 166.0 / 554.8 for the tail split and 80.2 / 165.6 / 537.2 for
    ``sequential``. ``smpart-autotune`` picks per bucket.
    """

    indexer_programs: int | None = None
    gemm_programs: int | None = None
    dynamic: bool = False
    queue_chunk: int = 4
    block_n: int = 64
    block_t: int | None = None
    blocks_per_item: int = 4
    num_warps: int = 4
    num_stages: int = 3
    fuse_topk: bool = False
    topk_config: object = None
    roles: int = 15
    gemm_in_tail: float = 0.0
    tail_block_n: int = 128
    tail_gemm_programs: int | None = None
    tail_prequant: bool = True
    first_programs: int | None = None
    first_prequant: bool = False
    maxnreg: int | None = None
    dense_first: bool = False
    topk_impl: str = "smpart"

    def __post_init__(self):
        """Reject bad values when the config is made (a TypeError/ValueError naming the field),
        so no launch, CUDA-graph capture or tuning-cache load sees one."""
        def integer(name, lo, none_ok=False, hi=GRID_X_MAX):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"config.{name}: expected an int{' or None' if none_ok else ''}, got {v!r}")
            if v < lo or v > hi:
                raise ValueError(f"config.{name}: expected {lo}..{hi}, got {v}")

        def one_of(name, allowed):
            v = getattr(self, name)
            if type(v) is not int or v not in allowed:  # 128.0 or True would reach a constexpr
                raise ValueError(f"config.{name}: expected one of {sorted(allowed)}, got {v!r}")

        integer("indexer_programs", 1, none_ok=True)
        integer("gemm_programs", 0, none_ok=True)
        integer("queue_chunk", 1, hi=QUEUE_CHUNK_MAX)
        integer("num_stages", 1, hi=8)
        integer("tail_gemm_programs", 1, none_ok=True)
        integer("first_programs", 1, none_ok=True)
        integer("maxnreg", 96, none_ok=True)  # ptxas: >= 58 (>= 90 with 128-token tiles) to compile
        if self.maxnreg is not None and self.maxnreg > 255:
            raise ValueError(f"config.maxnreg: expected 96..255 registers per thread, got {self.maxnreg}")
        integer("roles", 1, hi=15)  # 0 would run nothing and leave every output unwritten
        one_of("block_n", (64, 128, 256))
        one_of("tail_block_n", (64, 128, 256))
        one_of("blocks_per_item", (1, 2, 4, 8))
        one_of("num_warps", (1, 2, 4, 8, 16))
        if self.block_t is not None:
            one_of("block_t", (16, 32, 64, 128))
        for name in ("dynamic", "fuse_topk", "tail_prequant", "first_prequant", "dense_first"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config.{name}: expected a bool, got {getattr(self, name)!r}")
        g = self.gemm_in_tail
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            raise TypeError(f"config.gemm_in_tail: expected a float in [0, 1], got {g!r}")
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"config.gemm_in_tail: expected a fraction in [0, 1], got {g}")
        if g > 0 and self.fuse_topk:
            raise ValueError("config: gemm_in_tail > 0 needs fuse_topk=False (the GEMM tiles go to the top-k launch)")
        if self.dense_first and self.dynamic:
            raise ValueError("config: dense_first needs the static schedule (dynamic=False)")
        if self.dense_first and self.gemm_programs == 0:
            raise ValueError("config.gemm_programs: dense_first needs >= 1 GEMM program, or None (one per tile)")
        if not isinstance(self.topk_impl, str):
            raise TypeError(f"config.topk_impl: expected a str, one of {TOPK_IMPLS}, got {self.topk_impl!r}")
        if self.topk_impl not in TOPK_IMPLS:
            raise ValueError(f"config.topk_impl: expected one of {TOPK_IMPLS}, got {self.topk_impl!r}")
        if self.topk_impl == "vllm":  # vLLM's top-k is a launch of its own after the fused launch
            if self.fuse_topk:
                raise ValueError("config.fuse_topk: topk_impl='vllm' runs vLLM's top-k after the fused launch; "
                                 "needs fuse_topk=False")
            if g > 0:
                raise ValueError(f"config.gemm_in_tail: topk_impl='vllm' has no top-k launch of ours to put GEMM "
                                 f"tiles beside; needs gemm_in_tail=0, got {g}")
        if self.topk_config is not None and not isinstance(self.topk_config, RadixTopkConfig):
            raise TypeError(f"config.topk_config: expected a radix_topk.RadixTopkConfig or None, "
                            f"got {type(self.topk_config).__name__}")


# RegionWorkspace.counters (int32): [0] queue head, [1] exited programs (dynamic schedule),
# [_QUEUE_SLOTS + t]: logits items of row t that arrived (fuse_topk). All zero between launches.
# RegionWorkspace.radix: per-row histograms and top-k counters, zero between launches.
_QUEUE_SLOTS = tl.constexpr(64)
_RT = tl.constexpr(RADIX_RT)  # rows of the radix top-k's pairwise rank tile


@triton.jit
def _arrive(counter_ptr, expected):
    """Count one arrival; True for the arriver that completes ``expected`` (it resets to 0)."""
    tl.debug_barrier()  # every thread's stores of this program precede the release
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _patch_new_key_logits(
    t, p_lo, p_hi, q_ptr, weights_ptr, k_ptr, slot_mapping_ptr, context_lens_ptr, logits_ptr,
    stride_q, stride_w, stride_k, stride_logits, num_slots, L, hist_ptr,
    USE_UE8M0: tl.constexpr, NEXT_N: tl.constexpr, HIST: tl.constexpr,
):
    """Logits of row ``t``'s visible new tokens inside positions ``[p_lo, p_hi)``, from ``index_k``.

    Row ``(b, j)`` sees the new tokens ``j' <= j`` of its request, at positions
    ``context_lens[b] - NEXT_N + j'``; each key is quantized exactly as the cache write does
    (``quant_scale`` / ``quant_fp8_bytes``), so the logit equals the one computed from the cache
    after the write. Only rows whose slot is a real one are patched (a padding row's cache, and so
    its logits, stay as they are). Called by the logits item that covers those positions, right
    after its own stores: program order makes the patch win, whenever the cache write lands. With
    ``HIST`` the patched position's count moves from the bin of the value the item stored to the
    bin of the patched value in ``hist_ptr[t]`` (the two values may differ in the last bits).
    """
    b = t // NEXT_N
    j = t - b * NEXT_N
    ctx = tl.load(context_lens_ptr + b)
    heads16 = tl.arange(0, 16)
    d = tl.arange(0, 128)
    t64 = t.to(tl.int64)
    for jj in tl.static_range(NEXT_N):
        tt = b * NEXT_N + jj
        p = ctx - NEXT_N + jj
        slot = tl.load(slot_mapping_ptr + tt)
        ok = (jj <= j) & (slot >= 0) & (slot < num_slots) & (p >= 0) & (p < L) & (p >= p_lo) & (p < p_hi)
        if ok:
            x = tl.load(k_ptr + tt.to(tl.int64) * stride_k + d).to(tl.float32)
            scale = quant_scale(tl.max(tl.abs(x), axis=0), 1e-4, USE_UE8M0)
            kq = quant_fp8_bytes(x, scale).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            acc = tl.sum(kq, axis=0) * 0.0
            for hg in tl.static_range(4):  # 16 heads at a time keeps the fp32 tile small
                h = hg * 16 + heads16
                q = tl.load(q_ptr + t64 * stride_q + h[:, None] * 128 + d[None, :]).to(tl.float32)  # [16, 128]
                w = tl.load(weights_ptr + t64 * stride_w + h)
                acc += tl.sum(tl.maximum(tl.sum(q * kq[None, :], axis=1), 0.0) * w, axis=0)
            if HIST:
                old = tl.load(logits_ptr + t64 * stride_logits + p, cache_modifier=".cg")
                hrow = hist_ptr + t64 * _HIST_NB
                tl.atomic_add(hrow + _hist_bin(_f32_to_key(old)), -1, sem="relaxed", scope="gpu")
                tl.atomic_add(hrow + _hist_bin(_f32_to_key(acc * scale)), 1, sem="relaxed", scope="gpu")
            tl.store(logits_ptr + t64 * stride_logits + p, acc * scale)


@triton.jit
def _row_items(context_lens_ptr, T, max_blocks, max_len,
               NEXT_N: tl.constexpr, BLOCKS_PER_ITEM: tl.constexpr, T_PAD: tl.constexpr):
    """Per-row real logits items (>= 1, so an empty row still gets its -1 row) and their
    inclusive prefix sum, for rows ``[0, T)`` (vectors of ``T_PAD`` lanes, zero past ``T``)."""
    rows = tl.arange(0, T_PAD)
    b = rows // NEXT_N
    L = tl.load(context_lens_ptr + b, mask=rows < T, other=0) - NEXT_N + 1 + (rows - b * NEXT_N)
    L = tl.minimum(tl.maximum(L, 0), tl.minimum(max_blocks * 64, max_len))
    n = tl.where(rows < T, tl.maximum(tl.cdiv(tl.cdiv(L, 64), BLOCKS_PER_ITEM), 1), 0)
    return n, tl.cumsum(n, axis=0)


@triton.jit
def _item_row_run(i, n_items, cum_items, T_PAD: tl.constexpr):
    """Row and run of the ``i``-th real logits item (rows' items laid end to end, ``cum_items``
    their inclusive prefix sum; :func:`_row_items`)."""
    rows = tl.arange(0, T_PAD)
    t = tl.sum((cum_items <= i).to(tl.int32), axis=0)  # the row whose items cover i
    run = i - tl.sum(tl.where(rows == t, cum_items - n_items, 0), axis=0)
    return t, run


@triton.jit
def _indexer_logits_and_topk_item(
    t, run,
    # tensors
    index_q_ptr, index_w_ptr, index_k_ptr, kv_cache_ptr, block_table_ptr, context_lens_ptr, slot_mapping_ptr,
    logits_ptr, topk_ptr, row_ctr_ptr, hist_ptr, rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr,
    # strides and sizes
    stride_q, stride_w, stride_k, stride_bt, stride_logits, stride_topk,
    num_blocks, max_blocks, max_len, runs_per_row,
    USE_UE8M0: tl.constexpr, NEXT_N: tl.constexpr, BLOCKS_PER_ITEM: tl.constexpr, NUM_STAGES: tl.constexpr,
    HIST: tl.constexpr, TOPK_CHUNK: tl.constexpr, TOPK_K: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr,
    ROLES: tl.constexpr, PATCH: tl.constexpr = True,
    TOPK_S: tl.constexpr = 0, TOPK_BITS: tl.constexpr = 4, TOPK_COUNT: tl.constexpr = 1,
):
    """The logits item ``run`` of row ``t`` (blocks ``[run*BLOCKS_PER_ITEM, ...)``; with ``HIST``
    counted in the row's histogram), its new-key patch when it covers a new token, then (``ROLES &
    4``, the in-launch top-k) an arrival on the row's counter: the row's last item runs the radix
    top-k of every chunk of the row (``radix_topk._radix_topk_item``; its histogram is complete).
    ``PATCH`` False: no new-key patch (the caller wrote the new keys before the launch, e.g. vLLM's
    ``fused_norm_rope``; ``index_k`` is then not the cached key and must not be read)."""
    if ROLES & 2:
        _mqa_logits_item(
            t * runs_per_row + run, index_q_ptr, index_w_ptr, kv_cache_ptr, block_table_ptr, context_lens_ptr,
            logits_ptr, stride_q, stride_w, stride_bt, stride_logits, num_blocks, max_blocks, max_len, runs_per_row,
            NEXT_N, BLOCKS_PER_ITEM, NUM_STAGES, False, HIST=HIST, hist_ptr=hist_ptr,
        )
    b = t // NEXT_N
    j = t - b * NEXT_N
    L = tl.load(context_lens_ptr + b) - NEXT_N + 1 + j
    L = tl.minimum(tl.maximum(L, 0), tl.minimum(max_blocks * 64, max_len))
    nblk = tl.cdiv(L, 64)
    p_lo = run * BLOCKS_PER_ITEM * 64
    # the new tokens of row (b, j) sit at positions [L - 1 - j, L - 1]: only the item(s) covering
    # them patch (the others skip the patch's loads)
    if (ROLES & 2) and PATCH:
        if (p_lo + BLOCKS_PER_ITEM * 64 > L - 1 - j) & (p_lo < L):
            tl.debug_barrier()  # this item's logits stores (all threads) precede the patch's stores
            _patch_new_key_logits(
                t, p_lo, p_lo + BLOCKS_PER_ITEM * 64, index_q_ptr, index_w_ptr, index_k_ptr, slot_mapping_ptr,
                context_lens_ptr, logits_ptr, stride_q, stride_w, stride_k, stride_logits, num_blocks * 64, L,
                hist_ptr, USE_UE8M0, NEXT_N, HIST,
            )
    if ROLES & 4:
        # a row's real items: max(cdiv(blocks, BLOCKS_PER_ITEM), 1) (run 0 always runs)
        if _arrive(row_ctr_ptr + t, tl.maximum(tl.cdiv(nblk, BLOCKS_PER_ITEM), 1)):
            if TOPK_S == 0:  # the radix items, one per chunk, in turn
                for c in range(0, tl.maximum(tl.cdiv(L, TOPK_CHUNK), 1)):
                    _topk_item(t, c, L, L - L + 1, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr,
                               rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr, HIST, TOPK_CHUNK, TOPK_K, CAND,
                               CP, _RT, TOPK_S, TOPK_BITS, TOPK_COUNT)
            else:  # the sampled top-k: this program owns the row (one cutoff, no atomics)
                _topk_item(t, L - L, L, L - L + 1, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr,
                           rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr, HIST, TOPK_CHUNK, TOPK_K, CAND, CP,
                           _RT, TOPK_S, TOPK_BITS, TOPK_COUNT)


@triton.jit
def _partitioned_kernel(
    # q side
    q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr, xq_ptr, xs_ptr,
    T, N, max_pos, stride_qc, stride_q_out, stride_kpe, stride_cs,
    # indexer
    index_q_ptr, index_w_ptr, index_k_ptr, kv_cache_ptr, block_table_ptr, context_lens_ptr, slot_mapping_ptr,
    logits_ptr, topk_ptr, counters_ptr, hist_ptr, rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr,
    stride_q, stride_w, stride_k, stride_bt, stride_logits, stride_topk,
    num_blocks, max_blocks, max_len, runs_per_row,
    # schedule
    n_gemm_items, num_idx_programs, num_gemm_programs,
    USE_UE8M0: tl.constexpr, NEXT_N: tl.constexpr, BLOCKS_PER_ITEM: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, T_PAD: tl.constexpr,
    DYNAMIC: tl.constexpr, QUEUE_CHUNK: tl.constexpr, HW_CVT: tl.constexpr, HIST: tl.constexpr,
    TOPK_CHUNK: tl.constexpr, TOPK_K: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr,
    ROLES: tl.constexpr, QUANT_Q_C: tl.constexpr,
    DENSE: tl.constexpr, GEMM_PREQUANT: tl.constexpr, GEMM_FIRST: tl.constexpr,
    PATCH: tl.constexpr = True, ROPE_FUSED_Q: tl.constexpr = False, ROPE_K_PE: tl.constexpr = True,
    TOPK_S: tl.constexpr = 0, TOPK_BITS: tl.constexpr = 4, TOPK_COUNT: tl.constexpr = 1,
):
    """Whole region, one launch (module docstring). ``PATCH``: the logits items patch the new keys
    from ``index_k`` (off when the caller wrote the keys; ``RegionArgs.write_keys``); ``ROPE_FUSED_Q``
    / ``ROPE_K_PE``: the GEMM tiles' RoPE switches (``q_b_proj._q_b_proj_item``).
    ``counters_ptr``: [0] queue head, [1] exited programs, [64 + t] logits items of row t that
    arrived (``ROLES & 4``); ``hist_ptr`` int32
    [T, 2048] row histograms (``HIST``), ``rctr_ptr``/``cand_*``/``scratch_ptr``: the radix top-k's
    workspace (``radix_topk.RadixTopkWorkspace``).
    ``QUANT_Q_C``: the per-token items also quantize ``q_c`` into ``xq_ptr``/``xs_ptr`` for the
    prequantized GEMM tiles of the tail launch."""
    pid = tl.program_id(0)
    zero = pid * 0  # loop indices + zero are tensors under the interpreter too (role functions call .to)
    row_ctr_ptr = counters_ptr + _QUEUE_SLOTS
    if DYNAMIC:
        # one work list: [cache rows T][real logits items][gemm tiles]; claimed QUEUE_CHUNK at a time
        n_items, cum_items = _row_items(context_lens_ptr, T, max_blocks, max_len, NEXT_N, BLOCKS_PER_ITEM, T_PAD)
        n_logit = tl.sum(n_items, axis=0)
        total = T + n_logit + n_gemm_items
        start = tl.atomic_add(counters_ptr, QUEUE_CHUNK, sem="relaxed", scope="gpu")
        while start < total:
            for w in range(start, tl.minimum(start + QUEUE_CHUNK, total)):
                w = zero + w
                if w < T:
                    if ROLES & 1:
                        _indexer_k_cache_item(w, index_k_ptr, kv_cache_ptr, slot_mapping_ptr, num_blocks * 64, stride_k,
                                              USE_UE8M0)
                    if QUANT_Q_C:
                        _q_c_quant_row(w, q_c_ptr, stride_qc, xq_ptr, xs_ptr, USE_UE8M0, HW_CVT)
                elif w < T + n_logit:
                    t, run = _item_row_run(w - T, n_items, cum_items, T_PAD)
                    _indexer_logits_and_topk_item(
                        t, run, index_q_ptr, index_w_ptr, index_k_ptr, kv_cache_ptr,
                        block_table_ptr, context_lens_ptr, slot_mapping_ptr, logits_ptr, topk_ptr, row_ctr_ptr,
                        hist_ptr, rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr, stride_q, stride_w, stride_k,
                        stride_bt, stride_logits, stride_topk, num_blocks, max_blocks, max_len, runs_per_row,
                        USE_UE8M0, NEXT_N, BLOCKS_PER_ITEM, NUM_STAGES, HIST, TOPK_CHUNK, TOPK_K, CAND, CP, ROLES,
                        PATCH, TOPK_S, TOPK_BITS, TOPK_COUNT,
                    )
                elif ROLES & 8:
                    _q_b_proj_item(
                        w - T - n_logit, q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr,
                        xq_ptr, xs_ptr, T, N, max_pos, stride_qc, stride_q_out, stride_kpe, stride_cs,
                        USE_UE8M0, True, HW_CVT, BLOCK_N, BLOCK_T, NUM_STAGES, GEMM_PREQUANT, ROPE_FUSED_Q, ROPE_K_PE,
                    )
            start = tl.atomic_add(counters_ptr, QUEUE_CHUNK, sem="relaxed", scope="gpu")
        # the last program out resets the queue head for the next replay
        if _arrive(counters_ptr + 1, tl.num_programs(0)):
            tl.atomic_xchg(counters_ptr, 0, sem="relaxed", scope="gpu")
    else:
        # GEMM_FIRST: programs [0, num_gemm_programs) take the GEMM tiles, the indexer's follow
        ipid = pid - num_gemm_programs if GEMM_FIRST else pid
        if (ipid >= 0) & (ipid < num_idx_programs):
            for t in range(ipid, T if (ROLES & 1) or QUANT_Q_C else 0, num_idx_programs):
                if ROLES & 1:
                    _indexer_k_cache_item(zero + t, index_k_ptr, kv_cache_ptr, slot_mapping_ptr, num_blocks * 64,
                                          stride_k, USE_UE8M0)
                if QUANT_Q_C:
                    _q_c_quant_row(zero + t, q_c_ptr, stride_qc, xq_ptr, xs_ptr, USE_UE8M0, HW_CVT)
            if DENSE:
                n_logit = T * runs_per_row  # every (row, run) item of the bucket, one program each
            else:
                n_items, cum_items = _row_items(context_lens_ptr, T, max_blocks, max_len, NEXT_N, BLOCKS_PER_ITEM,
                                                T_PAD)
                n_logit = tl.sum(n_items, axis=0)
            for i in range(ipid, n_logit, num_idx_programs):
                if DENSE:
                    # the standalone logits kernel's mapping, no prefix sums: runs past a row's
                    # blocks do nothing (run 0 always runs)
                    t = (zero + i) // runs_per_row
                    run = (zero + i) - t * runs_per_row
                    L = _radix_row_len(t, context_lens_ptr, NEXT_N, tl.minimum(max_blocks * 64, max_len), False)
                    todo = (run == 0) | (run * BLOCKS_PER_ITEM * 64 < L)
                else:
                    t, run = _item_row_run(zero + i, n_items, cum_items, T_PAD)
                    todo = run >= 0
                if todo:
                    _indexer_logits_and_topk_item(
                        t, run, index_q_ptr, index_w_ptr, index_k_ptr, kv_cache_ptr,
                        block_table_ptr, context_lens_ptr, slot_mapping_ptr, logits_ptr, topk_ptr, row_ctr_ptr,
                        hist_ptr, rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr, stride_q, stride_w, stride_k,
                        stride_bt, stride_logits, stride_topk, num_blocks, max_blocks, max_len, runs_per_row,
                        USE_UE8M0, NEXT_N, BLOCKS_PER_ITEM, NUM_STAGES, HIST, TOPK_CHUNK, TOPK_K, CAND, CP, ROLES,
                        PATCH, TOPK_S, TOPK_BITS, TOPK_COUNT,
                    )
        elif ROLES & 8:
            # a constexpr test, so that a launch without GEMM tiles compiles no GEMM code: a loop
            # of zero trips would still be compiled and its registers counted for every program
            for item in range(pid if GEMM_FIRST else pid - num_idx_programs, n_gemm_items, num_gemm_programs):
                _q_b_proj_item(
                    zero + item, q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr,
                    xq_ptr, xs_ptr, T, N, max_pos, stride_qc, stride_q_out, stride_kpe, stride_cs,
                    USE_UE8M0, True, HW_CVT, BLOCK_N, BLOCK_T, NUM_STAGES, GEMM_PREQUANT, ROPE_FUSED_Q, ROPE_K_PE,
                )


@triton.jit
def _topk_gemm_tail_kernel(
    # top-k
    logits_ptr, context_lens_ptr, topk_ptr, hist_ptr, rctr_ptr, cand_key_ptr, cand_pos_ptr, scratch_ptr,
    stride_logits, stride_topk, lmax, n_topk_items, num_topk_programs, topk_ppr,
    # q side
    q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr, xq_ptr, xs_ptr,
    T, N, max_pos, stride_qc, stride_q_out, stride_kpe, stride_cs, gemm_lo, gemm_hi, num_gemm_programs,
    NEXT_N: tl.constexpr, CHUNK: tl.constexpr, TOPK_K: tl.constexpr, CAND: tl.constexpr, CP: tl.constexpr,
    USE_UE8M0: tl.constexpr, HW_CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    NUM_STAGES: tl.constexpr, PREQUANT: tl.constexpr,
    ROPE_FUSED_Q: tl.constexpr = False, ROPE_K_PE: tl.constexpr = True,
    TOPK_S: tl.constexpr = 0, TOPK_BITS: tl.constexpr = 4, TOPK_COUNT: tl.constexpr = 1,
):
    """The top-k launch with GEMM tiles beside it (``PartitionConfig.gemm_in_tail``): programs
    ``[0, num_topk_programs)`` take the top-k items (``item = c * T + row``: the radix item of chunk
    ``c`` from the histograms the first launch filled, whose row's last chunk resolves the threshold
    bin and zeroes the histogram; or program ``c`` of the row's ``topk_ppr`` of the sampled
    top-k), the rest take GEMM items
    ``[gemm_lo, gemm_hi)`` of the ``BLOCK_N`` x ``BLOCK_T`` tiling. The logits and histograms it
    reads are complete: the fused launch before it wrote them (stream order). ``lmax``: the rows'
    length bound (``min(max_len, max_blocks * 64)``, as the logits role clamps them)."""
    pid = tl.program_id(0)
    zero = pid * 0
    if pid < num_topk_programs:
        for item in range(pid, n_topk_items, num_topk_programs):
            c = (zero + item) // T
            t = (zero + item) - c * T
            L = _radix_row_len(t, context_lens_ptr, NEXT_N, lmax, False)
            _topk_item(t, c, L, topk_ppr, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr, rctr_ptr,
                       cand_key_ptr, cand_pos_ptr, scratch_ptr, True, CHUNK, TOPK_K, CAND, CP, _RT,
                       TOPK_S, TOPK_BITS, TOPK_COUNT)
    else:
        for item in range(gemm_lo + pid - num_topk_programs, gemm_hi, num_gemm_programs):
            _q_b_proj_item(
                zero + item, q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr,
                xq_ptr, xs_ptr, T, N, max_pos, stride_qc, stride_q_out, stride_kpe, stride_cs,
                USE_UE8M0, True, HW_CVT, BLOCK_N, BLOCK_T, NUM_STAGES, PREQUANT, ROPE_FUSED_Q, ROPE_K_PE,
            )


@triton.jit
def _vllm_topk_prep_kernel(context_lens_ptr, lens_ptr, topk_ptr, stride_topk, T, lmax,
                           NEXT_N: tl.constexpr, TOPK_K: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``t = program_id(0)``: ``lens[t]`` = its visible length clamped to ``[0, lmax]`` (as the
    logits role clamps it), and ``topk[t, :TOPK_K] = -1`` (``fill._fill_topk_item``)."""
    t = tl.program_id(0)
    b = t // NEXT_N
    L = tl.load(context_lens_ptr + b) - NEXT_N + 1 + (t - b * NEXT_N)
    tl.store(lens_ptr + t, tl.minimum(tl.maximum(L, 0), lmax))
    _fill_topk_item(t, topk_ptr, stride_topk, T, TOPK_K, BLOCK)


def launch_vllm_topk_prep(context_lens, lens, topk_indices, next_n: int, lmax: int) -> None:
    """The inputs of vLLM's decode top-k for ``PartitionConfig(topk_impl="vllm")``, in one launch
    (one program per row, nothing read on the host, so it is CUDA-graph capturable).

    Parameters
    ----------
    context_lens : int32 [B] (vLLM ``seq_lens``). lens : int32 [>= T] contiguous, written: row
        ``t = b * next_n + j`` gets ``clamp(context_lens[b] - next_n + 1 + j, 0, lmax)`` (viewed
        ``[B, next_n]`` it is the ``context_lens_2d`` vLLM's top-k takes; ``reference.visible_lens``,
        clamped as the logits are). topk_indices : int32 [T, K], unit column stride: rows ``[0, T)``
        set to -1 (vLLM ``sparse_attn_indexer.py``'s fill before its top-k, so that a slot vLLM's op
        leaves unwritten reads -1). next_n : 1 or 2. lmax : the rows' length bound
        (``RegionWorkspace.visible_cols``).
    """
    T = topk_indices.shape[0]
    if T == 0:
        return
    K = topk_indices.shape[1]
    _vllm_topk_prep_kernel[(T,)](context_lens, lens, topk_indices, topk_indices.stride(0), T, lmax,
                                 NEXT_N=next_n, TOPK_K=K, BLOCK=triton.next_power_of_2(K), num_warps=4)
