"""Indexer key cache write (``indexer_cache.py``) and the top-k fill (``fill.py``).

Cache bytes must equal the torch reference exactly (values and fp32 scales), for UE8M0 and plain
fp32 scales; padding (-1) and out-of-range slots must leave every byte of the cache unchanged.
Run on CPU with ``TRITON_INTERPRET=1``.
"""

import os

import pytest
import torch

from smpart.triton_kernels import dims
from smpart import reference
from smpart.triton_kernels.fill import fill_topk_indices
from smpart.triton_kernels.indexer_cache import indexer_k_quant_and_cache

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1", allow_module_level=True)


def _poisoned_cache(num_blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randint(0, 256, (num_blocks, dims.CACHE_BLOCK_SIZE, dims.CACHE_BYTES_PER_TOKEN),
                         dtype=torch.uint8, generator=g, device=DEVICE)


def _keys(T: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Keys with a wide spread of magnitudes: FP8 subnormals, saturation-free normals, all-zero rows
    (scale from the 1e-4 floor) and rows below the floor."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp2(torch.randint(-20, 8, (T, 1), generator=g).float())
    k = torch.randn(T, dims.INDEX_HEAD_DIM, generator=g) * row_scale
    # a few huge outliers per row push the rest of the row into e4m3 subnormals
    k[:, ::37] *= 300.0
    if T > 2:
        k[1] = 0.0
        k[2] = torch.randn(dims.INDEX_HEAD_DIM, generator=g) * 1e-6
    return k.to(dtype).to(DEVICE)


def _assert_cache_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    if torch.equal(out, ref):
        return
    bad = (out != ref).nonzero()
    b, off, byte = (int(v) for v in bad[0])
    raise AssertionError(
        f"{bad.shape[0]} cache bytes differ; first at block {b}, offset {off}, byte {byte}: "
        f"got {int(out[b, off, byte])}, expected {int(ref[b, off, byte])}"
    )


@pytest.mark.parametrize("use_ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T", [1, 7, 70])
def test_cache_bytes_exact(T, dtype, use_ue8m0):
    num_blocks = 5
    k = _keys(T, dtype, seed=T)
    g = torch.Generator().manual_seed(100 + T)
    slots = torch.randperm(num_blocks * dims.CACHE_BLOCK_SIZE, generator=g)[:T]
    if T > 3:
        slots[3] = -1  # padding row
    slot_mapping = slots.to(torch.int64).to(DEVICE)
    cache = _poisoned_cache(num_blocks, seed=T)
    expected = cache.clone()
    reference.indexer_k_quant_and_cache(k, expected, slot_mapping, use_ue8m0=use_ue8m0)
    indexer_k_quant_and_cache(k, cache, slot_mapping, use_ue8m0=use_ue8m0)
    _assert_cache_equal(cache, expected)


def test_scales_are_powers_of_two_with_ue8m0():
    k = _keys(16, torch.bfloat16, seed=3)
    slot_mapping = torch.arange(16, dtype=torch.int64, device=DEVICE)
    cache = _poisoned_cache(1)
    indexer_k_quant_and_cache(k, cache, slot_mapping, use_ue8m0=True)
    _, scales = reference.cache_values_and_scales(cache)
    mant = scales[0, :16].contiguous().view(torch.int32) & 0x7FFFFF
    assert torch.all(mant == 0), scales[0, :16]


def test_padding_rows_write_nothing():
    k = _keys(8, torch.bfloat16, seed=5)
    slot_mapping = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)
    cache = _poisoned_cache(2, seed=5)
    before = cache.clone()
    indexer_k_quant_and_cache(k, cache, slot_mapping)
    _assert_cache_equal(cache, before)


def test_out_of_range_slots_write_nothing():
    num_blocks = 3
    num_slots = num_blocks * dims.CACHE_BLOCK_SIZE
    bad = [num_slots, num_slots + 1, num_slots + 63, 2**31, 2**40, -2, -65, -(2**40)]
    good = [0, 63, 64, num_slots - 1]
    slots = torch.tensor(bad + good, dtype=torch.int64)
    T = slots.numel()
    k = _keys(T, torch.bfloat16, seed=9)
    slot_mapping = slots.to(DEVICE)
    cache = _poisoned_cache(num_blocks, seed=9)
    expected = cache.clone()
    valid = torch.where((slots >= 0) & (slots < num_slots), slots, -1).to(DEVICE)
    reference.indexer_k_quant_and_cache(k, expected, valid)
    indexer_k_quant_and_cache(k, cache, slot_mapping)
    _assert_cache_equal(cache, expected)


def test_new_key_visible_through_cache_views():
    """The written row dequantizes back to the key (within FP8 rounding)."""
    k = _keys(4, torch.float32, seed=11)
    k[1] = torch.randn(dims.INDEX_HEAD_DIM, device=DEVICE)  # a well-scaled row instead of zeros
    slot_mapping = torch.tensor([5, 70, 127, 64], dtype=torch.int64, device=DEVICE)
    cache = _poisoned_cache(2, seed=11)
    indexer_k_quant_and_cache(k, cache, slot_mapping, use_ue8m0=False)
    values, scales = reference.cache_values_and_scales(cache)
    blocks, offs = slot_mapping // 64, slot_mapping % 64
    deq = values[blocks, offs].view(torch.float8_e4m3fn).float() * scales[blocks, offs][:, None]
    amax = k.abs().amax(-1, keepdim=True)
    # e4m3: 3 mantissa bits (relative 2**-4 for normals), subnormal step 2**-9 of the scale
    tol = (k.abs() * 2**-4 + amax / 448 * 2**-9 * 1.01)[1]
    assert torch.all((deq[1] - k[1]).abs() <= tol)


@pytest.mark.parametrize("num_rows", [0, 1, 5, 33])
def test_fill_topk_indices(num_rows):
    buf = torch.randint(0, 1000, (40, dims.INDEX_TOPK), dtype=torch.int32, device=DEVICE)
    expected = buf.clone()
    expected[:num_rows] = -1
    fill_topk_indices(buf, num_rows)
    assert torch.equal(buf, expected)


def test_fill_topk_indices_strided_odd_width():
    base = torch.randint(0, 1000, (6, 40), dtype=torch.int32, device=DEVICE)
    view = base[:, 3:33]  # K = 30 (not a power of two), row stride 40
    expected = base.clone()
    expected[:4, 3:33] = -1
    fill_topk_indices(view, 4)
    assert torch.equal(base, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton)")
@pytest.mark.parametrize("use_ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
@pytest.mark.parametrize("T", [1, 128, 256])
def test_cache_bytes_exact_gpu_large(T, use_ue8m0):
    num_blocks = 260000  # 2.2 GB: byte offsets beyond 2**31 need int64
    k = _keys(T, torch.bfloat16, seed=T)
    g = torch.Generator().manual_seed(T)
    num_slots = num_blocks * dims.CACHE_BLOCK_SIZE
    n_top = min(T, 4)  # the last slots of the cache (byte offsets past 2**31), then unique random ones
    slots = torch.cat([num_slots - 1 - torch.arange(n_top), torch.randperm(num_slots - n_top, generator=g)[: T - n_top]])
    if T > 8:
        slots[5] = -1
    slot_mapping = slots.to(torch.int64).to(DEVICE)
    cache = _poisoned_cache(num_blocks, seed=T)
    expected = cache.clone()
    reference.indexer_k_quant_and_cache(k, expected, slot_mapping, use_ue8m0=use_ue8m0)
    indexer_k_quant_and_cache(k, cache, slot_mapping, use_ue8m0=use_ue8m0)
    torch.cuda.synchronize()
    _assert_cache_equal(cache, expected)
