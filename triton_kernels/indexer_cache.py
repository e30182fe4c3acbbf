"""FP8 quantization of new indexer keys into the paged indexer cache.

Mirrors vLLM ``csrc/cache_kernels.cu::indexer_k_quant_and_cache_kernel`` (called from
``vllm/model_executor/layers/sparse_attn_indexer.py`` as ``ops.indexer_k_quant_and_cache``):
per token, ``amax = max |k|`` over the 128 values, ``scale = max(amax, 1e-4) / 448`` (rounded up
to a power of two when ``use_ue8m0``), value bytes ``e4m3(k / scale)`` (saturating, RNE), written
at byte ``block*8448 + off*128`` and the fp32 scale at byte ``block*8448 + 8192 + off*4`` where
``slot = block*64 + off``. A negative slot (padding row) writes nothing.

Differences from vLLM (documented on purpose):

* slots ``>= num_blocks*64`` are skipped too (vLLM trusts them); the kernel never writes out of
  bounds whatever ``slot_mapping`` holds.
* the UE8M0 round-up is the exact integer form of ``exp2(ceil(log2(s)))`` (``fp8.ue8m0_ceil``,
  which differs from vLLM's float form only within a few ulps above a power of two).

Torch ground truth: ``reference.indexer_k_quant_and_cache``.
"""

import torch
import triton
import triton.language as tl

from . import dims
from .fp8 import quant_fp8_bytes, quant_scale


@triton.jit
def _indexer_k_cache_item(
    t,
    k_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    num_slots,
    stride_k,
    USE_UE8M0: tl.constexpr,
    HEAD_DIM: tl.constexpr = 128,
    CACHE_BLOCK: tl.constexpr = 64,
):
    """Quantize key row ``t`` and write it into the cache at ``slot_mapping[t]``.

    ``k_ptr``: bf16/fp16/fp32 ``[T, HEAD_DIM]`` (row stride ``stride_k``, unit column stride);
    ``kv_cache_ptr``: uint8, ``CACHE_BLOCK * (HEAD_DIM + 4)`` bytes per block; ``slot_mapping_ptr``:
    int64 ``[T]``. Slots outside ``[0, num_slots)`` write nothing and read no key.
    """
    BLOCK_BYTES: tl.constexpr = CACHE_BLOCK * (HEAD_DIM + 4)
    SCALE_OFFSET: tl.constexpr = CACHE_BLOCK * HEAD_DIM
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(k_ptr + t.to(tl.int64) * stride_k + d, mask=valid, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = quant_scale(amax, 1e-4, USE_UE8M0)  # dims.KEY_SCALE_EPS
    qbytes = quant_fp8_bytes(x, scale)
    slot = tl.where(valid, slot, 0)
    block = slot // CACHE_BLOCK
    off = slot % CACHE_BLOCK
    base = kv_cache_ptr + block * BLOCK_BYTES  # int64 byte offset: caches exceed 2 GiB
    tl.store(base + off * HEAD_DIM + d, qbytes, mask=valid)
    scale_ptr = (base + SCALE_OFFSET + off * 4).to(tl.pointer_type(tl.float32))
    tl.store(scale_ptr, scale, mask=valid)


@triton.jit
def _indexer_k_cache_kernel(
    k_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    num_slots,
    stride_k,
    USE_UE8M0: tl.constexpr,
):
    """One key row per program."""
    _indexer_k_cache_item(tl.program_id(0), k_ptr, kv_cache_ptr, slot_mapping_ptr, num_slots, stride_k,
                          USE_UE8M0)


def indexer_k_quant_and_cache(
    k: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    use_ue8m0: bool = True,
    num_warps: int = 4,
) -> None:
    """Quantize new indexer keys to FP8 and write them into the paged cache, in place.

    Parameters
    ----------
    k : bf16 (or fp16 / fp32) ``[T, 128]``, unit column stride.
    kv_cache : uint8 ``[num_blocks, 64, 132]`` (8448 contiguous bytes per block), written in place.
    slot_mapping : int64 ``[T]``; ``slot = block*64 + off``; slots outside ``[0, num_blocks*64)``
        (``-1`` = padding) write nothing.
    use_ue8m0 : round each scale up to a power of two (vLLM ``scale_fmt == "ue8m0"``).
    num_warps : launch parameter.

    Math: ``scale = max(max|k_t|, 1e-4) / 448``; ``bytes = e4m3_rne(clamp(k_t / scale, +-448))``.
    No validation, allocation or host sync here (``smpart.validate`` checks inputs).
    """
    T = k.shape[0]
    if T == 0:
        return
    num_slots = kv_cache.shape[0] * dims.CACHE_BLOCK_SIZE
    _indexer_k_cache_kernel[(T,)](
        k, kv_cache, slot_mapping, num_slots, k.stride(0),
        USE_UE8M0=bool(use_ue8m0), num_warps=num_warps,
    )
