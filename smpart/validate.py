"""Input validation shared by every path (docs/CORRECTNESS.md, "Inputs").

Metadata checks (dtype, shape, device, contiguity, T <= T_MAX) always run on the host and cost
nothing. Value checks (lengths within the block table, block ids within the cache, slots and
positions in range) read device values, so they run in eager mode only and are skipped while a
CUDA graph is being captured; the kernels mask every address so that no value can make them touch
memory out of bounds.
"""

from __future__ import annotations

import torch

from .triton_kernels import dims
from .triton_kernels.topk_config import is_capturing as _is_capturing


def _check(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device, contiguous: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of q_c), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def check_args_type(args, name: str = "args") -> None:
    """Refuse anything but a :class:`smpart.region.RegionArgs` (duck-typed: this module sits below
    ``region``).

    Raises
    ------
    TypeError : ``name`` is None, a ``DecodeBatch`` (message: pass ``batch.args``) or another type.
    """
    if hasattr(args, "args") and hasattr(getattr(args, "args"), "q_c"):
        raise TypeError(f"{name}: expected a RegionArgs, got a {type(args).__name__}; pass batch.args")
    if type(args).__name__ != "RegionArgs" or not all(hasattr(args, f) for f in _TENSOR_FIELDS + ("next_n",)):
        raise TypeError(f"{name}: expected a RegionArgs, got {type(args).__name__}")


def check_max_len(max_len, name: str = "max_len") -> None:
    """``max_len`` (if not None) is an int (not a bool) >= 1.

    Raises
    ------
    TypeError : not an int. ValueError : <= 0.
    """
    if max_len is None:
        return
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"{name}: expected an int, got {type(max_len).__name__} {max_len!r}")
    if max_len < 1:
        raise ValueError(f"{name}: expected a positive int, got {max_len}")


def validate_region_args(args, max_len: int | None = None, check_values: bool | None = None) -> None:
    """Check a :class:`RegionArgs` before any kernel runs.

    Parameters
    ----------
    args : RegionArgs.
    max_len : the logits workspace's width; every visible length must fit (checked with values).
    check_values : force (True) or skip (False) the value checks; default: on unless a CUDA graph
        is being captured.

    Raises
    ------
    TypeError : ``args`` not a RegionArgs (a ``DecodeBatch``: pass ``batch.args``), ``max_len`` not an
        int, wrong tensor type or dtype (message names the argument).
    ValueError : ``max_len`` <= 0, tensors on a device other than cpu / cuda (e.g. ``meta``), wrong
        shape, device, contiguity, ``T > 256``, ``next_n``, or (value checks) a
        length beyond the block table / workspace, a block id beyond the cache, a slot outside
        ``[-1, num_blocks*64)``, a position outside ``cos_sin_cache``.
    """
    check_args_type(args)
    check_max_len(max_len)
    a = args
    if not isinstance(a.next_n, int) or isinstance(a.next_n, bool):
        raise TypeError(f"next_n: expected an int (1 or 2), got {type(a.next_n).__name__}")
    if a.next_n not in dims.SUPPORTED_NEXT_N:
        raise ValueError(f"next_n: expected one of {dims.SUPPORTED_NEXT_N}, got {a.next_n}")
    if check_values is not None and not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool or None, got {check_values!r}")
    for name in _TENSOR_FIELDS:
        if not isinstance(getattr(a, name), torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(getattr(a, name)).__name__}")
    if a.q_c.dim() != 2:
        raise ValueError("q_c: expected a 2-D torch.Tensor [T, 1536]")
    dev = a.q_c.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"q_c: tensors on device {str(dev)!r}; the region runs on cpu or cuda tensors "
                         f"(a {dev.type} tensor has no values to compute with)")
    T = a.q_c.shape[0]
    if T < 1 or T > dims.T_MAX:
        raise ValueError(f"q_c: expected 1..{dims.T_MAX} decode rows (T), got {T}")
    if T % a.next_n:
        raise ValueError(f"q_c: T={T} is not a multiple of next_n={a.next_n}")
    B = T // a.next_n
    _check("q_c", a.q_c, torch.bfloat16, (T, dims.Q_LORA_RANK), dev)
    if a.q_b_proj_weight.dim() != 2:
        raise ValueError("q_b_proj_weight: expected a 2-D torch.Tensor [H*192, 1536]")
    N = a.q_b_proj_weight.shape[0]
    if N % dims.QK_HEAD_DIM or N // dims.QK_HEAD_DIM not in dims.SUPPORTED_H:
        raise ValueError(f"q_b_proj_weight: expected H*192 rows with H in {dims.SUPPORTED_H}, got {N}")
    H = N // dims.QK_HEAD_DIM
    _check("q_b_proj_weight", a.q_b_proj_weight, torch.float8_e4m3fn, (N, dims.Q_LORA_RANK), dev)
    _check("q_b_proj_weight_scale", a.q_b_proj_weight_scale, torch.float32,
           (N // dims.QUANT_GROUP, dims.Q_LORA_RANK // dims.QUANT_GROUP), dev)
    _check("positions", a.positions, torch.int64, (T,), dev)
    if not isinstance(a.cos_sin_cache, torch.Tensor) or a.cos_sin_cache.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError("cos_sin_cache: expected a bf16 or fp32 torch.Tensor [max_pos, 64]")
    _check("cos_sin_cache", a.cos_sin_cache, a.cos_sin_cache.dtype, (None, dims.QK_ROPE_HEAD_DIM), dev)
    _check("k_pe", a.k_pe, torch.bfloat16, (T, 1, dims.QK_ROPE_HEAD_DIM), dev, contiguous=False)
    if a.k_pe.stride(-1) != 1:
        raise ValueError(f"k_pe: expected unit stride on the last dim, got strides {a.k_pe.stride()}")
    _check("q", a.q, torch.bfloat16, (T, H, dims.QK_HEAD_DIM), dev)
    _check("index_q_fp8", a.index_q_fp8, torch.float8_e4m3fn, (T, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM), dev)
    _check("index_weights", a.index_weights, torch.float32, (T, dims.INDEX_N_HEADS), dev)
    _check("index_k", a.index_k, torch.bfloat16, (T, dims.INDEX_HEAD_DIM), dev)
    _check("kv_cache", a.kv_cache, torch.uint8, (None, dims.CACHE_BLOCK_SIZE, dims.CACHE_BYTES_PER_TOKEN), dev)
    _check("slot_mapping", a.slot_mapping, torch.int64, (T,), dev)
    _check("block_table", a.block_table, torch.int32, (B, None), dev)
    _check("context_lens", a.context_lens, torch.int32, (B,), dev)
    _check("topk_indices", a.topk_indices, torch.int32, (T, dims.INDEX_TOPK), dev)
    if a.block_table.shape[1] < 1:
        raise ValueError("block_table: expected at least one column")

    if check_values is None:
        check_values = not _is_capturing()
    if not check_values:
        return
    num_blocks = a.kv_cache.shape[0]
    max_blocks = a.block_table.shape[1]
    lens = a.context_lens.cpu()
    if (lens < 0).any():
        raise ValueError(f"context_lens: expected values >= 0, got {lens.min().item()}")
    cap = max_blocks * dims.CACHE_BLOCK_SIZE
    if (lens > cap).any():
        raise ValueError(f"context_lens: {lens.max().item()} exceeds the block table's {max_blocks} blocks x 64 = {cap}")
    if max_len is not None and (lens > max_len).any():
        raise ValueError(f"context_lens: {lens.max().item()} exceeds the workspace max_len {max_len}")
    if lens.max().item() > dims.MAX_MODEL_LEN:
        raise ValueError(f"context_lens: {lens.max().item()} exceeds max_model_len {dims.MAX_MODEL_LEN}")
    used = torch.arange(max_blocks)[None, :] < ((lens[:, None] + dims.CACHE_BLOCK_SIZE - 1) // dims.CACHE_BLOCK_SIZE)
    bt = a.block_table.cpu()[used]
    if bt.numel() and (bt.min() < 0 or bt.max() >= num_blocks):
        bad = bt[(bt < 0) | (bt >= num_blocks)][0].item()
        raise ValueError(f"block_table: block id {bad} outside the cache's [0, {num_blocks})")
    slots = a.slot_mapping.cpu()
    if (slots < -1).any() or (slots >= num_blocks * dims.CACHE_BLOCK_SIZE).any():
        bad = slots[(slots < -1) | (slots >= num_blocks * dims.CACHE_BLOCK_SIZE)][0].item()
        raise ValueError(f"slot_mapping: slot {bad} outside [-1, {num_blocks * dims.CACHE_BLOCK_SIZE})")
    _check_slots(slots, lens, a.block_table.cpu().long(), a.next_n, num_blocks)
    pos = a.positions.cpu()
    if (pos < 0).any() or (pos >= a.cos_sin_cache.shape[0]).any():
        raise ValueError(f"positions: expected values in [0, {a.cos_sin_cache.shape[0]}), "
                         f"got [{pos.min().item()}, {pos.max().item()}]")
    _check_finite(a)


# every tensor field of RegionArgs (a non-tensor is a TypeError naming it, before any other check)
_TENSOR_FIELDS = ("q_c", "q_b_proj_weight", "q_b_proj_weight_scale", "positions", "cos_sin_cache", "k_pe", "q",
                  "index_q_fp8", "index_weights", "index_k", "kv_cache", "slot_mapping", "block_table",
                  "context_lens", "topk_indices")

# floating-point inputs that are not checked for NaN/inf each step: the outputs (``q`` and
# ``topk_indices`` are overwritten), the indexer cache (bytes, written by the key write), and
# constants loaded once (weights; ``cos_sin_cache`` is checked at the rows ``positions`` selects)
_NOT_FINITE_CHECKED = {"q", "topk_indices", "kv_cache", "q_b_proj_weight", "q_b_proj_weight_scale", "cos_sin_cache"}


def _check_slots(slots: torch.Tensor, lens: torch.Tensor, table: torch.Tensor, next_n: int, num_blocks: int) -> None:
    """Value checks on the cache write (host tensors; vectorized, no loop over rows).

    * no two rows write one slot;
    * a written slot is its row's new-token slot through ``block_table`` (vLLM's invariant; the
      partitioned kernel uses the new keys before the cache write lands);
    * no block is listed twice in the visible part of one request's table;
    * no slot written by one request lies inside another request's visible range (its new key
      would be read by the other request's logits while it is being written: a race on a GPU,
      where the reference reads the new key).
    """
    C = dims.CACHE_BLOCK_SIZE
    written_rows = (slots >= 0).nonzero().flatten()
    written = slots[written_rows]
    if written.numel() != torch.unique(written).numel():
        vals, counts = torch.unique(written, return_counts=True)
        raise ValueError(f"slot_mapping: slot {int(vals[counts > 1][0])} is written by more than one row "
                         f"(two rows would race on the same cache entry)")
    own = written_rows // next_n
    p = lens[own].long() - next_n + written_rows % next_n
    if (p < 0).any():
        i = int((p < 0).nonzero()[0])
        t, b = int(written_rows[i]), int(own[i])
        raise ValueError(f"slot_mapping: row {t} writes slot {int(written[i])}, but context_lens[{b}] = "
                         f"{int(lens[b])} leaves no new token for it (next_n = {next_n}); padding rows "
                         f"need slot -1")
    want = table[own, p // C] * C + p % C
    if (want != written).any():
        i = int((want != written).nonzero()[0])
        raise ValueError(f"slot_mapping: row {int(written_rows[i])} writes slot {int(written[i])}, but its new "
                         f"token (position {int(p[i])}) lives at slot {int(want[i])} through block_table")
    # the visible blocks of every request (a request's longest row sees context_lens[b] positions)
    max_blocks = table.shape[1]
    used = torch.arange(max_blocks)[None, :] < ((lens.long()[:, None] + C - 1) // C)
    bi, ci = used.nonzero(as_tuple=True)
    blk = table[bi, ci]
    keys = bi * num_blocks + blk
    uk, counts = torch.unique(keys, return_counts=True)
    if (counts > 1).any():
        k = int(uk[counts > 1][0])
        b, blk_id = divmod(k, num_blocks)
        cols = ci[(bi == b) & (blk == blk_id)].tolist()
        raise ValueError(f"block_table: block {blk_id} is listed twice in request {b}'s visible range "
                         f"(columns {cols}); a block may appear once per request")
    if not written.numel():
        return
    # for each block holding written slots: the lowest written offset (and its writer), and the
    # lowest offset written by any other request; another request b' that sees the block at column
    # c sees offsets < lim = min(64, context_lens[b'] - 64 c) of it
    wb, wo = written // C, written % C
    ub, inv = torch.unique(wb, return_inverse=True)
    m1 = torch.full(ub.shape, C, dtype=torch.int64).scatter_reduce(0, inv, wo, "amin")
    first = wo == m1[inv]
    o1 = torch.full(ub.shape, -1, dtype=torch.int64).scatter(0, inv[first], own[first])
    other = own != o1[inv]
    m2 = torch.full(ub.shape, C, dtype=torch.int64).scatter_reduce(0, inv[other], wo[other], "amin")
    hit = torch.isin(blk, ub)
    bi, ci, blk = bi[hit], ci[hit], blk[hit]
    k = torch.searchsorted(ub, blk)
    lim = (lens.long()[bi] - ci * C).clamp(max=C)
    eff = torch.where(o1[k] == bi, m2[k], m1[k])
    bad = eff < lim
    if bad.any():
        j = int(bad.nonzero()[0])
        b, c, blk_id, lj = int(bi[j]), int(ci[j]), int(blk[j]), int(lim[j])
        w = int(((wb == blk_id) & (own != b) & (wo < lj)).nonzero()[0])
        raise ValueError(f"slot_mapping: row {int(written_rows[w])} writes slot {int(written[w])}, which lies "
                         f"inside request {b}'s visible range (block_table[{b}, {c}] = block {blk_id}): a "
                         f"new key must be visible only to its own request")


def _check_finite(a) -> None:
    """NaN/inf in the step's floating-point inputs (``_NOT_FINITE_CHECKED`` excepted; FP8 tensors:
    the NaN bytes 0x7f/0xff, e4m3fn has no inf) and in the ``cos_sin_cache`` rows at ``positions``.
    The contract (README, Limitations) is finite inputs: the Triton paths and the reference order
    and quantize NaN differently."""
    import dataclasses

    skip = set(_NOT_FINITE_CHECKED) | {"index_cos_sin_cache"}  # its rows at positions: smpart.prep
    if getattr(a, "index_q", None) is not None:
        skip |= {"index_q_fp8", "index_weights"}  # outputs of the index-q prep (smpart.prep)
    named = [(f.name, getattr(a, f.name)) for f in dataclasses.fields(a) if f.name not in skip]
    named.append(("cos_sin_cache", a.cos_sin_cache[a.positions]))
    for name, x in named:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not x.numel():
            continue
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            bad = (x.view(torch.uint8) & 0x7F) == 0x7F if x.dtype == torch.float8_e4m3fn else x.view(torch.uint8) == 0x80
        else:
            bad = ~torch.isfinite(x)
        if bad.any():
            at = bad.nonzero()[0].tolist()
            where = "rows at positions" if name == "cos_sin_cache" else "element"
            raise ValueError(f"{name}: non-finite value at {where} {at}; inputs must be finite "
                             f"(NaN/inf are outside the contract)")
