"""Input validation shared by every path (DESIGN.md 7a).

Metadata checks (dtype, shape, device, contiguity, T <= T_MAX) always run on the host and cost
nothing. Value checks (lengths within the block table, block ids within the cache, slots and
positions in range) read device values, so they run in eager mode only and are skipped while a
CUDA graph is being captured; the kernels mask every address so that no value can make them touch
memory out of bounds.
"""

from __future__ import annotations

import torch

from .triton_kernels import dims


def _is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
    TypeError : wrong tensor type or dtype (message names the argument).
    ValueError : wrong shape, device, contiguity, ``T > 256``, ``next_n``, or (value checks) a
        length beyond the block table / workspace, a block id beyond the cache, a slot outside
        ``[-1, num_blocks*64)``, a position outside ``cos_sin_cache``.
    """
    a = args
    if not isinstance(a.next_n, int) or isinstance(a.next_n, bool):
        raise TypeError(f"next_n: expected an int (1 or 2), got {type(a.next_n).__name__}")
    if a.next_n not in dims.SUPPORTED_NEXT_N:
        raise ValueError(f"next_n: expected one of {dims.SUPPORTED_NEXT_N}, got {a.next_n}")
    if not isinstance(a.q_c, torch.Tensor) or a.q_c.dim() != 2:
        raise ValueError("q_c: expected a 2-D torch.Tensor [T, 1536]")
    dev = a.q_c.device
    T = a.q_c.shape[0]
    if T < 1 or T > dims.T_MAX:
        raise ValueError(f"q_c: expected 1..{dims.T_MAX} decode rows (T), got {T}")
    if T % a.next_n:
        raise ValueError(f"q_c: T={T} is not a multiple of next_n={a.next_n}")
    B = T // a.next_n
    _check("q_c", a.q_c, torch.bfloat16, (T, dims.Q_LORA_RANK), dev)
    if not isinstance(a.q_b_proj_weight, torch.Tensor) or a.q_b_proj_weight.dim() != 2:
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
    written = slots[slots >= 0]
    if written.numel() != torch.unique(written).numel():
        vals, counts = torch.unique(written, return_counts=True)
        raise ValueError(f"slot_mapping: slot {int(vals[counts > 1][0])} is written by more than one row "
                         f"(two rows would race on the same cache entry)")
    # every written slot must be the cache position of the row's new token (vLLM's invariant; the
    # partitioned kernel relies on it to use the new keys before the cache write lands)
    table = a.block_table.cpu().long()
    for t in (slots >= 0).nonzero().flatten().tolist():
        b, j = divmod(t, a.next_n)
        p = int(lens[b]) - a.next_n + j
        if p < 0:
            raise ValueError(f"slot_mapping: row {t} writes slot {int(slots[t])}, but context_lens[{b}] = "
                             f"{int(lens[b])} leaves no new token for it (next_n = {a.next_n}); padding rows "
                             f"need slot -1")
        want = int(table[b, p // dims.CACHE_BLOCK_SIZE]) * dims.CACHE_BLOCK_SIZE + p % dims.CACHE_BLOCK_SIZE if p >= 0 else None
        if want != int(slots[t]):
            raise ValueError(f"slot_mapping: row {t} writes slot {int(slots[t])}, but its new token (position {p}) "
                             f"lives at slot {want} through block_table")
    pos = a.positions.cpu()
    if (pos < 0).any() or (pos >= a.cos_sin_cache.shape[0]).any():
        raise ValueError(f"positions: expected values in [0, {a.cos_sin_cache.shape[0]}), "
                         f"got [{pos.min().item()}, {pos.max().item()}]")
