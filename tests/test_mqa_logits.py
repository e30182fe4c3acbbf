"""FP8 paged MQA logits (``mqa_logits.py``) against the float64 reference.

Tolerance: each logit is ``sum_h w_h * relu(sum_d q_hd k_d) * s`` with exact FP8 x FP8 products;
fp32 accumulation over 128 dims then 64 heads (plus two multiplies) gives
``|err| <= (128 + 64 + 4) * 2**-24 * A`` with ``A = sum_h |w_h| sum_d |q_hd k_d| s`` (relu is
1-Lipschitz), computed in float64 by running the reference on |q|, |w| and |k|. On the GPU the
FP8 wgmma accumulates with reduced precision (no promotion, as DeepGEMM), so the bound there is
``2**-10 * A``. ``-inf`` masks are exact; the workspace is poisoned with NaN first, so any
unwritten visible position fails.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from smpart.triton_kernels import dims
from smpart import reference
from smpart.batch import make_decode_batch
from smpart.triton_kernels.mqa_logits import mqa_logits_num_items, mqa_logits_runs_per_row, paged_mqa_logits

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings(
    # Triton 3.6's interpreter converts runtime loop bounds through a deprecated numpy path
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
)

FP32_GAMMA = (dims.INDEX_HEAD_DIM + dims.INDEX_N_HEADS + 4) * 2.0**-24
GPU_GAMMA = 2.0**-10


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _abs_inputs(q_fp8, weights, kv_cache):
    """|q|, |w| and a cache whose FP8 values are |k| (sign bit cleared; scales are positive)."""
    q_abs = q_fp8.view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    cache_abs = kv_cache.clone()
    values, _ = reference.cache_values_and_scales(cache_abs)
    values.bitwise_and_(0x7F)
    return q_abs, weights.abs(), cache_abs


def _expected(q_fp8, weights, kv_cache, block_table, context_lens, next_n, max_len):
    """float64 reference and its error scale ``A``, with the kernel's clamps applied.

    Each row ``t`` is run as its own request (next_n = 1) of length
    ``min(L_t, max_blocks * 64, max_len)``; block ids outside ``[0, num_blocks)`` point to an
    appended all-zero block (their keys count as zero).
    """
    num_blocks, max_blocks = kv_cache.shape[0], block_table.shape[1]
    lens = reference.visible_lens(context_lens, next_n).clamp(max=min(max_blocks * dims.CACHE_BLOCK_SIZE, max_len))
    table = block_table.repeat_interleave(next_n, dim=0).clone()
    table[(table < 0) | (table >= num_blocks)] = num_blocks
    cache = torch.cat([kv_cache, torch.zeros_like(kv_cache[:1])])
    cache.view(-1, dims.CACHE_BYTES_PER_BLOCK)[-1].zero_()
    ref = reference.paged_mqa_logits(q_fp8, weights, cache, table, lens, 1, max_len, dtype=torch.float64)
    q_abs, w_abs, cache_abs = _abs_inputs(q_fp8, weights, cache)
    scale = reference.paged_mqa_logits(q_abs, w_abs, cache_abs, table, lens, 1, max_len, dtype=torch.float64)
    return ref, scale, lens


def _assert_logits(out, ref, scale, lens, gamma, width=None):
    """Visible positions within ``gamma * scale``; ``[L_t, width)`` exactly -inf."""
    out = out.double().cpu()
    ref, scale = ref.cpu(), scale.cpu()
    width = ref.shape[1] if width is None else width
    for t, L in enumerate(lens.tolist()):
        got, want = out[t, :L], ref[t, :L]
        err = (got - want).abs()
        bad = ~(err <= gamma * scale[t, :L] + 1e-30)  # NaN (unwritten) fails too
        if bad.any():
            p = int(bad.nonzero()[0])
            raise AssertionError(
                f"row {t} (len {L}): {int(bad.sum())} bad logits; first at position {p}: got {got[p].item()}, "
                f"want {want[p].item()}, tol {gamma * scale[t, p].item():.3e}")
        tail = out[t, L:width]
        if not torch.all(torch.isneginf(tail)):
            p = int((~torch.isneginf(tail)).nonzero()[0]) + L
            raise AssertionError(f"row {t} (len {L}): position {p} = {out[t, p].item()}, want -inf")


def _run(args, logits, **kw):
    return paged_mqa_logits(args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table,
                            args.context_lens, logits, next_n=args.next_n, **kw)


def _poisoned(T, width):
    return torch.full((T, width), float("nan"), dtype=torch.float32, device=DEVICE)


_LENS = [1, 63, 64, 65, 2047, 2048, 2049]


@functools.lru_cache(maxsize=None)
def _edge_batch(next_n):
    lens = [max(L, next_n) for L in _LENS] + ([2] if next_n == 2 else [])  # next_n=2: rows of length 1 and 2
    b = make_decode_batch(lens, num_heads=16, next_n=next_n, seed=10 + next_n, device=DEVICE)
    a = b.args
    max_len = a.block_table.shape[1] * dims.CACHE_BLOCK_SIZE
    want = _expected(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, next_n, max_len)
    return a, max_len, want


@pytest.fixture(params=[1, 2], ids=["next_n1", "next_n2"])
def edge_batch(request):
    return _edge_batch(request.param)


# --------------------------------------------------------------------------------------
# CPU (interpreter) and GPU
# --------------------------------------------------------------------------------------
# (next_n, blocks_per_item, num_stages, fixed_trip, num_programs): each launch option on one
# next_n keeps the interpreter run short; both next_n see several run lengths.
_CONFIGS = [
    (1, 1, 2, False, None),
    (1, 3, 3, False, None),
    (1, 8, 3, False, None),
    (1, 2, 3, False, 7),
    (2, 4, 4, True, None),
    (2, 2, 3, False, None),
    (2, 5, 4, False, 11),
]


@pytest.mark.parametrize("next_n,blocks_per_item,num_stages,fixed_trip,num_programs", _CONFIGS,
                         ids=[f"next_n{c[0]}-R{c[1]}-S{c[2]}" + ("-fixed" if c[3] else "") + (f"-persistent{c[4]}" if c[4] else "")
                              for c in _CONFIGS])
def test_edge_lengths(next_n, blocks_per_item, num_stages, fixed_trip, num_programs):
    a, max_len, (ref, scale, lens) = _edge_batch(next_n)
    # the reference's own next_n semantics agree with the per-row expansion used for clamping
    assert torch.equal(lens, reference.visible_lens(a.context_lens, a.next_n))
    logits = _poisoned(a.num_tokens, max_len)
    _run(a, logits, blocks_per_item=blocks_per_item, num_stages=num_stages, fixed_trip=fixed_trip,
         num_programs=num_programs)
    _assert_logits(logits, ref, scale, lens, GPU_GAMMA if ON_GPU else FP32_GAMMA)


def test_matches_reference_semantics_directly(edge_batch):
    """Against ``reference.paged_mqa_logits`` as written (no clamps needed for this batch)."""
    a, max_len, (_, scale, lens) = edge_batch
    ref = reference.paged_mqa_logits(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens,
                                      a.next_n, max_len, dtype=torch.float64)
    logits = _poisoned(a.num_tokens, max_len)
    _run(a, logits)
    _assert_logits(logits, ref, scale, lens, GPU_GAMMA if ON_GPU else FP32_GAMMA)


def test_rerun_is_bitwise_identical():
    a, max_len, _ = _edge_batch(1)
    l1, l2 = _poisoned(a.num_tokens, max_len), _poisoned(a.num_tokens, max_len)
    _run(a, l1)
    _run(a, l2)
    assert torch.equal(l1.view(torch.int32), l2.view(torch.int32))


def test_without_neg_inf_leaves_tail_untouched(edge_batch):
    a, max_len, (ref, scale, lens) = edge_batch
    logits = _poisoned(a.num_tokens, max_len)
    _run(a, logits, write_neg_inf=False)
    for t, L in enumerate(lens.tolist()):
        assert torch.isnan(logits[t, L:]).all(), f"row {t}: wrote past its length {L}"
    filled = logits.clone()
    for t, L in enumerate(lens.tolist()):
        filled[t, L:] = float("-inf")
    _assert_logits(filled, ref, scale, lens, GPU_GAMMA if ON_GPU else FP32_GAMMA)


def test_long_row():
    """One ~20K row (next_n = 2: the two rows share the request's blocks) and a short one."""
    b = make_decode_batch([20001, 130], num_heads=16, next_n=2, seed=21, device=DEVICE)
    a = b.args
    max_len = a.block_table.shape[1] * dims.CACHE_BLOCK_SIZE
    ref, scale, lens = _expected(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 2, max_len)
    logits = _poisoned(a.num_tokens, max_len)
    _run(a, logits, blocks_per_item=8, num_stages=4)
    _assert_logits(logits, ref, scale, lens, GPU_GAMMA if ON_GPU else FP32_GAMMA)


def test_bad_block_ids_and_lengths_are_masked():
    """Block ids outside the cache (inside and past the visible range), negative ids, lengths past
    the block table, a padding request (length 0), and a workspace narrower than the rows."""
    b = make_decode_batch([300, 200, 1, 130], num_heads=16, num_padding=1, seed=31, device=DEVICE)
    a = b.args
    nb = a.kv_cache.shape[0]
    table = torch.cat([a.block_table, torch.full_like(a.block_table[:, :2], 2**30)], dim=1)  # garbage columns
    table[0, 1] = nb  # first id past the cache, inside row 0's visible range
    table[0, 3] = -5
    table[1, 2] = 2**31 - 1
    table[2, 0] = -(2**31)  # row 2 (length 1)
    ctx = a.context_lens.clone()
    ctx[1] = 10**6  # beyond the table: clamped to max_blocks * 64
    a.block_table, a.context_lens = table.contiguous(), ctx
    max_blocks = table.shape[1]
    for max_len, width in [(max_blocks * 64, max_blocks * 64 + 40), (200, 256)]:
        ref, scale, lens = _expected(a.index_q_fp8, a.index_weights, a.kv_cache, a.block_table, a.context_lens, 1,
                                     max_len)
        assert lens[1] == min(max_blocks * 64, max_len) and lens[3] == 0
        logits = _poisoned(a.num_tokens, width)
        _run(a, logits, max_len=max_len, blocks_per_item=2)
        _assert_logits(logits, ref, scale, lens, GPU_GAMMA if ON_GPU else FP32_GAMMA)
        assert torch.isnan(logits[:, max_len:]).all(), "wrote past max_len"
        # positions of the bad ids inside the visible range are exactly 0 (zero keys)
        assert torch.all(logits[0, 64:128] == 0) and torch.all(logits[2, :1] == 0)


def test_item_count_is_host_only():
    assert mqa_logits_runs_per_row(4096, 64, 4) == 16
    assert mqa_logits_runs_per_row(4096, 64, 3) == 22
    assert mqa_logits_runs_per_row(200, 64, 2) == 2
    # without -inf, items stop at the block table's capacity
    assert mqa_logits_runs_per_row(8192, 10, 4, write_neg_inf=False) == 3
    assert mqa_logits_num_items(7, 4096, 64, 8) == 7 * 8


_SM90_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from smpart.triton_kernels.mqa_logits import _mqa_logits_kernel

num_warps = int(sys.argv[1])
sig = {"q_ptr": "*fp8e4nv", "weights_ptr": "*fp32", "kv_cache_ptr": "*u8", "block_table_ptr": "*i32",
       "context_lens_ptr": "*i32", "logits_ptr": "*fp32", "stride_q": "i32", "stride_w": "i32",
       "stride_bt": "i32", "stride_logits": "i32", "num_blocks": "i32", "max_blocks": "i32", "max_len": "i32",
       "runs_per_row": "i32", "num_items": "i32", "NEXT_N": "constexpr", "BLOCKS_PER_ITEM": "constexpr",
       "NUM_STAGES": "constexpr", "WRITE_NEG_INF": "constexpr", "FIXED_TRIP": "constexpr",
       "PRECISE_ACC": "constexpr"}
const = {"NEXT_N": 2, "BLOCKS_PER_ITEM": 4, "NUM_STAGES": 4, "WRITE_NEG_INF": True, "FIXED_TRIP": False,
         "PRECISE_ACC": False}
attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}  # 16-byte aligned pointers and strides
src = triton.compiler.ASTSource(fn=_mqa_logits_kernel, signature=sig, constexprs=const, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 4})
json.dump({"ptx": k.asm["ptx"], "ttgir": k.asm["ttgir"]}, sys.stdout)
"""


@pytest.mark.parametrize("num_warps", [4, 8])
def test_compiles_for_sm90_with_wgmma(num_warps):
    """The kernel compiles for sm_90 on any machine, and the FP8 dot is a wgmma reading both
    operands from shared memory (a value bitcast of the key bytes would route A through registers).
    Runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE, str(num_warps)], capture_output=True, text=True,
                         env=env, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr.lower() and "not found" in res.stderr.lower():
        pytest.skip(f"no CUDA toolchain for sm_90 compiles: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    ptx, ttgir = out["ptx"], out["ttgir"]
    assert "wgmma.mma_async.sync.aligned" in ptx and ".e4m3.e4m3" in ptx
    assert "cp.async.cg.shared.global" in ptx  # 16-byte async key loads
    dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
    assert dots and all(": !ttg.memdesc<64x128xf8E4M3FN" in line for line in dots), dots


# --------------------------------------------------------------------------------------
# GPU only: full sizes
# --------------------------------------------------------------------------------------
def _gpu_batch(B, L, next_n, seed):
    """Random cache bytes (finite FP8) and scales, a shuffled block table, lengths jittered around
    ``L`` (DeepGEMM's test recipe), built on the GPU. 260000 spare blocks put block ids past
    2**31 / 8448 (int64 byte offsets)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = (L - torch.randint(0, max(L // 8, 1), (B,), device="cuda", generator=g)).clamp(min=next_n)
    lens[0] = L
    max_blocks = triton_cdiv(L, 64)
    num_blocks = B * max_blocks + 260000
    cache = torch.randint(0, 0x7F, (num_blocks, 64, 132), dtype=torch.uint8, device="cuda", generator=g)
    cache |= (torch.randint(0, 2, cache.shape, dtype=torch.uint8, device="cuda", generator=g) << 7)  # signs
    _, scales = reference.cache_values_and_scales(cache)
    scales.copy_(torch.rand(scales.shape, device="cuda", generator=g) * 1e-2 + 1e-4)
    table = torch.randperm(num_blocks, device="cuda", generator=g)[: B * max_blocks].view(B, max_blocks).int()
    T = B * next_n
    q = torch.randn(T, 64, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    w = torch.randn(T, 64, device="cuda", generator=g) / 90.0
    return q, w, cache, table.contiguous(), lens.int(), max_blocks * 64


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,L", [(1, 4096), (32, 8192), (128, 8192), (8, 65536), (128, 65536)])
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("blocks_per_item", [2, 4, 8])
def test_full_size_gpu(B, L, next_n, blocks_per_item):
    if B * next_n > dims.T_MAX:
        pytest.skip(f"T = {B * next_n} > T_MAX")
    q, w, cache, table, ctx, max_len = _gpu_batch(B, L, next_n, seed=B + L + next_n)
    logits = _poisoned(B * next_n, max_len)
    paged_mqa_logits(q, w, cache, table, ctx, logits, next_n=next_n, blocks_per_item=blocks_per_item)
    torch.cuda.synchronize()
    lens = reference.visible_lens(ctx, next_n)
    # the reference row by row on the GPU (float64), compared row by row to bound memory
    for t in range(0, B * next_n, max(1, (B * next_n) // 8)):
        b = t // next_n
        sl = slice(t - t % next_n, t - t % next_n + next_n)
        ref, scale, _ = _expected(q[sl], w[sl], cache, table[b:b + 1], ctx[b:b + 1], next_n, max_len)
        _assert_logits(logits[sl], ref, scale, lens[sl], GPU_GAMMA)
