"""The PyTorch reference and the DecodeBatch factory: self-consistency and known answers."""

import pytest
import torch

from smpart.triton_kernels import dims
from smpart import reference as R
from smpart.batch import make_decode_batch
from smpart.checks import calc_diff, check_topk
from smpart.triton_kernels.fp8 import FP8_DTYPE


@pytest.mark.parametrize("next_n", [1, 2])
def test_visible_lens(next_n):
    ctx = torch.tensor([5, 2, 0], dtype=torch.int32)
    got = R.visible_lens(ctx, next_n).tolist()
    want = [5, 2, 0] if next_n == 1 else [4, 5, 1, 2, 0, 0]
    assert got == want


def test_cache_write_layout_and_padding():
    b = make_decode_batch([70, 3], num_heads=16, num_padding=0, seed=3)
    a = b.args
    cache = a.kv_cache.clone()
    slots = a.slot_mapping.clone()
    slots[1] = -1
    R.indexer_k_quant_and_cache(a.index_k, cache, slots)
    flat = cache.view(-1, dims.CACHE_BYTES_PER_BLOCK)
    block, off = divmod(int(slots[0]), 64)
    kf = a.index_k[0].float()
    scale = flat[block, 8192 + 4 * off: 8192 + 4 * off + 4].view(torch.float32).item()
    # UE8M0: a power of two >= amax/448
    assert scale >= kf.abs().max().item() / 448 and (torch.tensor(scale).log2() % 1 == 0)
    vals = flat[block, off * 128:(off + 1) * 128].view(FP8_DTYPE).float() * scale
    assert calc_diff(vals, kf) < 1e-3
    # the padding row wrote nothing: only the 132 bytes of row 0 changed
    assert int((cache != a.kv_cache).sum()) <= 132


def test_logits_match_float64_and_mask():
    b = make_decode_batch([130, 64, 1], num_heads=16, seed=4)
    a = b.args
    lens = R.visible_lens(a.context_lens, 1)
    l32 = R.paged_mqa_logits(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 1, 192)
    l64 = R.paged_mqa_logits(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 1, 192,
                             dtype=torch.float64)
    for t, L in enumerate(lens.tolist()):
        assert torch.isinf(l32[t, L:]).all() and (l32[t, L:] < 0).all()
        assert torch.allclose(l32[t, :L].double(), l64[t, :L], rtol=1e-5, atol=1e-5 * l64[t, :L].abs().max())


def test_tie_free_logits_are_exact_and_distinct():
    b = make_decode_batch([3000, 90], num_heads=16, tie_free=True, seed=5)
    a = b.args
    l32 = R.paged_mqa_logits(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 1, 3000)
    l64 = R.paged_mqa_logits(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 1, 3000,
                             dtype=torch.float64)
    # the cached keys are the prefill; the new key (last position) is not in the cache until the
    # region writes it, so that position holds stale bytes
    assert torch.equal(l32[0, :2999].double(), l64[0, :2999])
    assert torch.equal(l32[1, :89].double(), l64[1, :89])
    assert torch.unique(l32[0, :2999]).numel() == 2999


def test_topk_rule_catches_a_wrong_index():
    logits = torch.arange(3000, dtype=torch.float64)[None].flip(1)  # row: 2999, ..., 0
    lens = torch.tensor([3000])
    good = R.topk_indices(logits.float(), lens)
    check_topk(good, logits, lens, exact_sets=True)
    bad = good.clone()
    bad[0, 5] = 2500  # a position outside the top 2048
    with pytest.raises(AssertionError, match="row 0"):
        check_topk(bad, logits, lens)
    dup = good.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(AssertionError, match="duplicate"):
        check_topk(dup, logits, lens)


@pytest.mark.parametrize("use_ue8m0", [True, False])
def test_q_b_proj_reference_tracks_bf16_matmul(use_ue8m0):
    b = make_decode_batch([10, 20, 30], num_heads=16, use_ue8m0=use_ue8m0, seed=6)
    a = b.args
    got = R.q_b_proj(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0)
    want = a.q_c.float() @ b.q_b_proj_weight_bf16.float().T
    assert calc_diff(got, want) < 2e-3
    if use_ue8m0:
        s = a.q_b_proj_weight_scale
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))


def test_rope_rotates_pairs_by_position():
    b = make_decode_batch([5, 100], num_heads=16, rope_dtype=torch.float32, seed=7)
    a = b.args
    q = torch.randn(2, 16, 192).to(torch.bfloat16)
    k_pe = a.k_pe.clone()
    q0, k0 = q.clone(), k_pe.clone()
    R.mla_rope_(q, k_pe, a.positions, a.cos_sin_cache)
    assert torch.equal(q[..., :128], q0[..., :128])  # nope part untouched
    # a rotation keeps the norm of every pair
    n0 = k0.float().view(2, 32, 2).norm(dim=-1)
    n1 = k_pe.float().view(2, 32, 2).norm(dim=-1)
    assert torch.allclose(n0, n1, rtol=1e-2)
    # position 4 (request 0's new token), pair 0: angle = 4 * inv_freq[0] = 4 rad
    c, s = a.cos_sin_cache[4, 0].item(), a.cos_sin_cache[4, 32].item()
    assert abs(c - torch.cos(torch.tensor(4.0)).item()) < 1e-5 and abs(s - torch.sin(torch.tensor(4.0)).item()) < 1e-5


def test_region_reference_end_to_end_next_n2():
    b = make_decode_batch([2, 65, 2049], num_heads=16, next_n=2, num_padding=1, seed=8)
    a = b.args
    R.run_region(a)
    lens = R.visible_lens(a.context_lens, 2)
    assert (a.topk_indices[-2:] == -1).all()  # the padding request
    assert ((a.topk_indices >= 0).sum(1) == lens.clamp(max=2048)).all()
    # the new key of row (b, j) is visible to row (b, j) and (b, j+1): the last position is selected
    # by the last MTP row only if its logit is high enough, so check the cache instead
    values, scales = R.cache_values_and_scales(a.kv_cache)
    slot = int(a.slot_mapping[1])
    assert scales[slot // 64, slot % 64] > 0
    assert not a.q.isnan().any()


def test_factory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="next_n"):
        make_decode_batch([10], num_heads=16, next_n=3)
    with pytest.raises(ValueError, match="num_heads"):
        make_decode_batch([10], num_heads=12)
    with pytest.raises(ValueError, match="context_lens"):
        make_decode_batch([10, 5], batch_size=3, num_heads=16)
    with pytest.raises(ValueError, match="batch_size"):
        make_decode_batch(10, batch_size=300, num_heads=16)
    with pytest.raises(ValueError, match=r"context_lens\[0\]"):
        make_decode_batch([dims.MAX_MODEL_LEN + 1], num_heads=16)
