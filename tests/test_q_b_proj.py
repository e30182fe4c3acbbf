"""MLA query side (``q_b_proj.py``): FP8 ``q_b_proj`` with fused activation quant and RoPE.

Checks, DeepGEMM-style (two tiers of the normalized difference ``calc_diff``):

* the GEMM (kernel run with ``apply_rope=False``) against ``reference.q_b_proj`` and against the
  fp64 product of the dequantized FP8 operands (tight, < 1e-5, plus at most one bf16 ulp per
  element), and against the bf16 matmul of the unquantized weight (loose, < 2e-3);
* the RoPE epilogue bit for bit: the roped ``q`` must equal ``reference.mla_rope_`` applied to the
  kernel's own un-roped output (nope columns untouched, rope columns with vLLM's rounding);
* ``k_pe`` bit for bit against the reference rope;
* ``q`` fully written (poisoned with NaN), nothing written outside ``q`` / ``k_pe``'s rows, tiles
  with ``T`` not a multiple of ``BLOCK_T``, positions at the last row of ``cos_sin_cache``, and
  out-of-range positions clamped instead of read out of bounds.

Run on CPU with ``TRITON_INTERPRET=1`` (an H=16 call costs 1 to 4 s there, H=128 about 10 s).
"""

import dataclasses
import functools
import os

import pytest
import torch

from smpart.triton_kernels import dims
from smpart import reference
from smpart.batch import make_decode_batch
from smpart.triton_kernels.fp8 import quant_fp8_torch, quant_scale_torch
from smpart.triton_kernels.q_b_proj import q_b_proj_num_items, q_b_proj_rope

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1", allow_module_level=True)

TIGHT = 1e-5  # vs the reference fed the same FP8 operands (only fp32 order and bf16 rounding differ)
LOOSE = 2e-3  # vs the bf16 full-precision matmul (FP8 quantization error of both operands)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM ``calc_diff``: ``1 - 2 sum(x y) / sum(x^2 + y^2)`` in float64 (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)


def _first_bad(bad: torch.Tensor) -> str:
    idx = tuple(int(v) for v in bad.nonzero()[0])
    return f"{int(bad.sum())} of {bad.numel()} differ; first at {idx}"


def assert_bitwise(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bitwise equality (NaN bits included), reporting the first differing coordinate."""
    a = out.contiguous().view(torch.int16) if out.dtype == torch.bfloat16 else out
    b = ref.contiguous().view(torch.int16) if ref.dtype == torch.bfloat16 else ref
    bad = a != b
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{what}: {_first_bad(bad)}: got {out[i].item()}, expected {ref[i].item()}")


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor, what: str, abs_ref: torch.Tensor | None = None) -> None:
    """|out - ref| <= one bf16 ulp of max(|out|, |ref|) + 1e-5 max|ref| everywhere.

    Both sides round fp32 sums of the same exact FP8 products, in different orders: they differ by
    at most one bf16 ulp, or by fp32 rounding noise (~1e-7 of the row's scale) where a sum cancels
    to nearly zero. On sm_90 the FP8 MMA accumulates with ~14 mantissa bits inside each 128-wide
    K step (DeepSeek-V3 report, 3.3.2), so GPU callers pass ``abs_ref`` = the product of the
    absolute dequantized operands and the bound gains ``2**-12 * abs_ref`` (4x that precision).
    """
    o, r = out.float(), ref.float()
    mag = torch.maximum(o.abs(), r.abs()).clamp(min=2.0**-126)
    tol = torch.exp2(torch.floor(torch.log2(mag)) - 7) + 1e-5 * r.abs().max()
    if abs_ref is not None:
        tol = tol + 2.0**-12 * abs_ref.float()
    bad = ~((o - r).abs() <= tol)  # NaN counts as bad
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{what}: {_first_bad(bad)}: got {o[i].item()}, expected {r[i].item()}")


def dequant_reference(q_c, weight, weight_scale, use_ue8m0, absolute: bool = False) -> torch.Tensor:
    """fp64 product of the dequantized FP8 operands: [T, N] float64 (of their absolute values if
    ``absolute``: the magnitude that bounds any summation order's rounding)."""
    x_q, x_s = reference.per_token_group_quant(q_c, use_ue8m0)
    T, K = q_c.shape
    x = (x_q.double().view(T, -1, dims.QUANT_GROUP) * x_s.double()[..., None]).view(T, K)
    w_s = weight_scale.double().repeat_interleave(dims.QUANT_GROUP, 0).repeat_interleave(dims.QUANT_GROUP, 1)
    w = weight.double() * w_s[: weight.shape[0], :K]
    if absolute:
        x, w = x.abs(), w.abs()
    return x @ w.T


@functools.lru_cache(maxsize=32)  # the GPU cases share batches; callers never mutate them
def make_batch(T: int, H: int, use_ue8m0: bool, rope_dtype: torch.dtype, seed: int):
    """Decode batch of T single-token requests; positions up to the cache's last row.

    ``make_decode_batch`` sizes ``cos_sin_cache`` to the longest context, so the request with the
    longest context has its position at the cache's last row. Every 128-column group of ``q_c`` and
    every 128x128 weight block is then scaled by its own power of two (exact in bf16 and in the
    scales), so that activation or weight scales taken from the wrong group / block cannot agree
    by accident (randn data alone gives nearly equal UE8M0 scales everywhere).
    """
    g = torch.Generator().manual_seed(1000 + seed)
    lens = torch.randint(1, 300, (T,), generator=g).tolist()
    lens[T // 2] = 317  # the longest: position 316 = last row of the [317, 64] cache
    b = make_decode_batch(lens, num_heads=H, use_ue8m0=use_ue8m0, rope_dtype=rope_dtype,
                          seed=seed, device=DEVICE)
    a = b.args
    K, G = dims.Q_LORA_RANK, dims.QUANT_GROUP
    x_exp = torch.randint(-3, 4, (T, K // G), generator=g).float().to(DEVICE)
    q_c = (a.q_c.float().view(T, K // G, G) * torch.exp2(x_exp)[..., None]).view(T, K).to(torch.bfloat16)
    nb, kb = a.q_b_proj_weight_scale.shape
    w_exp = torch.exp2(torch.randint(-3, 4, (nb, kb), generator=g).float()).to(DEVICE)
    w_bf16 = (b.q_b_proj_weight_bf16.float().view(nb, G, kb, G) * w_exp[:, None, :, None]).view(nb * G, K)
    w_s = (a.q_b_proj_weight_scale * w_exp).contiguous()
    args = dataclasses.replace(a, q_c=q_c, q_b_proj_weight_scale=w_s)
    return dataclasses.replace(b, args=args, q_b_proj_weight_bf16=w_bf16.to(torch.bfloat16))


def run(a, q, k_pe, **kw):
    q_b_proj_rope(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, a.positions, a.cos_sin_cache,
                  k_pe, q, **kw)


# --------------------------------------------------------------------------------------
# CPU (interpreter) and GPU
# --------------------------------------------------------------------------------------
# (T, use_ue8m0, cos_sin_cache dtype, block_n, block_t, epilogue): T in {1, 5, 16, 33}, both scale
# modes and both cache dtypes; 64-row tiles (rope-only and rope-free tiles), 128-row tiles
# (straddling heads), 256-row tiles (cheapest under the interpreter); T below / not a multiple of
# block_t (two token tiles: ``test_bounds_and_strided_k_pe``). ``epilogue=True`` runs the kernel
# twice (without and with RoPE) and checks the RoPE bit for bit; the other cases run it once and
# compare with the reference pipeline (an interpreter call costs 1.7 to 5 s of CPU, so not every
# case pays for two; the GPU cases below all do).
CASES = [
    (1, True, torch.bfloat16, 256, None, True),
    (1, False, torch.float32, 128, None, True),
    (5, False, torch.float32, 256, None, True),
    (5, True, torch.bfloat16, 64, None, False),
    (16, True, torch.float32, 256, 16, True),
    (33, False, torch.bfloat16, 256, None, False),
]


def _case_id(c):
    T, ue, cs, bn, bt, epi = c
    return (f"T{T}-{'ue8m0' if ue else 'fp32scale'}-cs{'bf16' if cs == torch.bfloat16 else 'fp32'}"
            f"-bn{bn}-bt{bt or 'auto'}{'-epilogue' if epi else ''}")


def _check_gemm(gemm: torch.Tensor, b, use_ue8m0: bool) -> None:
    """Two-tier check of an un-roped [T, N] GEMM output."""
    a = b.args
    ref = reference.q_b_proj(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0)
    assert calc_diff(gemm, ref) < TIGHT
    assert_within_one_ulp(gemm, ref, "GEMM vs reference.q_b_proj")
    deq = dequant_reference(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0)
    assert calc_diff(gemm, deq) < TIGHT
    full = a.q_c.float() @ b.q_b_proj_weight_bf16.float().T
    assert calc_diff(gemm, full) < LOOSE


def _check_against_pipeline(q, k_pe, a, use_ue8m0, positions=None) -> None:
    """One roped kernel run vs reference q_b_proj + mla_rope_ (rope bits are checked elsewhere)."""
    T, H, _ = q.shape
    positions = a.positions if positions is None else positions
    q_ref = reference.q_b_proj(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0).view(T, H, -1)
    k_ref = a.k_pe.clone()
    reference.mla_rope_(q_ref, k_ref, positions, a.cos_sin_cache)
    assert calc_diff(q, q_ref) < TIGHT
    nope = dims.QK_NOPE_HEAD_DIM
    assert_within_one_ulp(q[..., :nope], q_ref[..., :nope], "nope columns vs reference")
    assert calc_diff(q[..., nope:], q_ref[..., nope:]) < TIGHT
    assert_bitwise(k_pe, k_ref, "k_pe vs reference rope")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_q_b_proj_rope(case):
    T, use_ue8m0, cs_dtype, block_n, block_t, epilogue = case
    H = 16
    b = make_batch(T, H, use_ue8m0, cs_dtype, seed=T)
    a = b.args
    N = H * dims.QK_HEAD_DIM
    kw = dict(use_ue8m0=use_ue8m0, block_n=block_n, block_t=block_t)

    q1 = torch.full_like(a.q, float("nan"))
    k1 = a.k_pe.clone()
    run(a, q1, k1, **kw)
    assert not q1.isnan().any(), f"q not fully written: {_first_bad(q1.isnan())}"
    if not epilogue:
        _check_against_pipeline(q1, k1, a, use_ue8m0)
        return

    # un-roped GEMM: two-tier check
    q0 = torch.full_like(a.q, float("nan"))
    k0 = a.k_pe.clone()
    run(a, q0, k0, apply_rope=False, **kw)
    assert not q0.isnan().any(), f"q not fully written: {_first_bad(q0.isnan())}"
    assert_bitwise(k0, a.k_pe, "k_pe must be untouched with apply_rope=False")
    _check_gemm(q0.view(T, N), b, use_ue8m0)

    # roped: must equal the reference rope of the kernel's own GEMM output, bit for bit
    q_ref, k_ref = q0.clone(), a.k_pe.clone()
    reference.mla_rope_(q_ref, k_ref, a.positions, a.cos_sin_cache)
    assert_bitwise(q1, q_ref, "roped q vs reference rope of the kernel's GEMM")
    assert_bitwise(k1, k_ref, "k_pe vs reference rope")
    # the rope really rotated something (guards against a test that compares nothing)
    assert not torch.equal(q1[..., dims.QK_NOPE_HEAD_DIM:], q0[..., dims.QK_NOPE_HEAD_DIM:])


def test_smoke_h128():
    """H=128 (the full per-rank head count at TP1), one token, default tiles."""
    T, H = 1, 128
    b = make_batch(T, H, True, torch.bfloat16, seed=7)
    a = b.args
    q = torch.full_like(a.q, float("nan"))
    k = a.k_pe.clone()
    run(a, q, k, block_n=256 if INTERPRET else 64)
    assert not q.isnan().any(), f"q not fully written: {_first_bad(q.isnan())}"
    _check_against_pipeline(q, k, a, True)


def test_bounds_and_strided_k_pe():
    """Writes stay inside q's and k_pe's elements; k_pe with vLLM's token stride (576, a slice of
    the kv_a output); positions past the cache are clamped to its last row, never read beyond."""
    T, H, block_t = 17, 16, 16  # two token tiles, the second with one row
    b = make_batch(T, H, True, torch.bfloat16, seed=3)
    a = b.args
    N = H * dims.QK_HEAD_DIM
    guard = 4096
    buf = torch.full((guard + T * N + guard,), -3.0, dtype=torch.bfloat16, device=DEVICE)
    q = buf[guard : guard + T * N].view(T, H, dims.QK_HEAD_DIM)
    q.fill_(float("nan"))
    kv = torch.full((T + 1, dims.KV_LORA_RANK + dims.QK_ROPE_HEAD_DIM), -5.0, dtype=torch.bfloat16,
                    device=DEVICE)
    kv[:T, dims.KV_LORA_RANK:] = a.k_pe[:, 0]
    k_pe = kv[:T, dims.KV_LORA_RANK:].unsqueeze(1)  # [T, 1, 64], token stride 576
    max_pos = a.cos_sin_cache.shape[0]
    positions = a.positions.clone()
    positions[3] = max_pos + 100  # invalid (validation would reject it): must clamp, not read OOB
    positions[16] = max_pos - 1
    a_bad = dataclasses.replace(a, positions=positions)
    run(a_bad, q, k_pe, block_n=256 if INTERPRET else 64, block_t=block_t)

    assert (buf[:guard] == -3.0).all() and (buf[guard + T * N :] == -3.0).all(), "write outside q"
    assert (kv[:, : dims.KV_LORA_RANK] == -5.0).all() and (kv[T] == -5.0).all(), "write outside k_pe"
    assert not q.isnan().any(), f"q not fully written: {_first_bad(q.isnan())}"
    _check_against_pipeline(q, k_pe, a, True, positions=positions.clamp(max=max_pos - 1))


def _prequant_buffers(T: int):
    K, KB = dims.Q_LORA_RANK, dims.Q_LORA_RANK // dims.QUANT_GROUP
    xq = torch.full((T + 2, K), float("nan"), device=DEVICE).to(torch.float8_e4m3fn)  # 2 rows it must not touch
    xs = torch.full((T + 2, KB), -1.0, device=DEVICE)
    return xq, xs


def _check_prequant(a, xq, xs, use_ue8m0: bool) -> None:
    """The quant buffers hold vLLM's per-token-group quant of ``q_c`` (``fp8.quant_*_torch``) in
    rows ``[0, T)`` and are untouched past them."""
    T = a.q_c.shape[0]
    G = dims.QUANT_GROUP
    x = a.q_c.float().view(T, -1, G)
    s_ref = quant_scale_torch(x.abs().amax(-1), 1e-10, use_ue8m0)
    q_ref = quant_fp8_torch(x, s_ref[..., None]).view(T, -1)
    assert torch.equal(xs[:T], s_ref), "activation scales differ from vLLM's rule"
    assert torch.equal(xq[:T].view(torch.uint8), q_ref.view(torch.uint8)), "activation bytes differ"
    assert (xs[T:] == -1.0).all() and xq[T:].float().isnan().all(), "write past the batch's rows"


@pytest.mark.parametrize("use_ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
def test_prequant_matches_fused(use_ue8m0):
    """``q_c_fp8``/``q_c_scale`` given: quant once per token, then the GEMM reads it (the tail
    launch's GEMM tiles do this): the same q and k_pe bytes as the fused quant, vLLM's quant bytes."""
    T, H = 5, 16
    b = make_batch(T, H, use_ue8m0, torch.bfloat16, seed=11)
    a = b.args
    kw = dict(use_ue8m0=use_ue8m0, block_n=256)
    q1, k1 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q1, k1, **kw)
    xq, xs = _prequant_buffers(T)
    q2, k2 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q2, k2, q_c_fp8=xq, q_c_scale=xs, **kw)
    assert_bitwise(q2, q1, "prequantized GEMM vs fused quant")
    assert_bitwise(k2, k1, "k_pe, prequantized GEMM")
    _check_prequant(a, xq, xs, use_ue8m0)


def test_prequant_bad_buffers():
    T, H = 2, 16
    a = make_batch(T, H, True, torch.bfloat16, seed=12).args
    xq, xs = _prequant_buffers(T)
    q, k = torch.empty_like(a.q), a.k_pe.clone()
    with pytest.raises(ValueError, match="pass both"):
        run(a, q, k, q_c_fp8=xq)
    with pytest.raises(ValueError, match="pass both"):
        run(a, q, k, q_c_scale=xs)
    with pytest.raises(TypeError, match="q_c_fp8: expected torch.float8_e4m3fn"):
        run(a, q, k, q_c_fp8=xq.float(), q_c_scale=xs)
    with pytest.raises(TypeError, match="q_c_scale: expected torch.float32"):
        run(a, q, k, q_c_fp8=xq, q_c_scale=xs.double())
    with pytest.raises(ValueError, match="q_c_fp8: expected shape"):
        run(a, q, k, q_c_fp8=xq[:1], q_c_scale=xs)
    with pytest.raises(ValueError, match="q_c_scale: expected shape"):
        run(a, q, k, q_c_fp8=xq, q_c_scale=xs[:, :6])
    with pytest.raises(ValueError, match="q_c_scale: expected a contiguous"):
        run(a, q, k, q_c_fp8=xq, q_c_scale=torch.zeros(12, T + 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="num_stages"):
        run(a, q, k, q_c_fp8=xq, q_c_scale=xs, num_stages=-2)
    # an empty batch still refuses a half-given pair
    with pytest.raises(ValueError, match="pass both"):
        q_b_proj_rope(a.q_c[:0], a.q_b_proj_weight, a.q_b_proj_weight_scale, a.positions[:0], a.cos_sin_cache,
                      a.k_pe[:0], a.q[:0], q_c_fp8=xq)


def test_num_items():
    assert q_b_proj_num_items(1, 128, 64, 16) == 384
    assert q_b_proj_num_items(33, 16, 128, 32) == 24 * 2
    assert q_b_proj_num_items(256, 32, 256, 64) == 24 * 4


def test_plain_gemm_any_n():
    """apply_rope=False with N not a multiple of 192 (the indexer's wq_b has N = 8192 = 42.67 heads) writes
    every column: the grid once covered only floor(N/192)*192 columns and left the rest as torch.empty garbage.
    Here N = 320 = 1 head + 128 columns; RoPE on such a weight is refused."""
    T, N = 3, 320
    b = make_batch(T, 16, True, torch.bfloat16, seed=7)
    a = b.args
    w, ws = a.q_b_proj_weight[:N].contiguous(), a.q_b_proj_weight_scale[: N // 128 + 1].contiguous()
    out = torch.full((T, N), float("nan"), dtype=torch.bfloat16, device=a.q.device)
    q_b_proj_rope(a.q_c, w, ws, a.positions, a.cos_sin_cache, a.k_pe.clone(), out, apply_rope=False)
    assert not out.isnan().any(), f"q not fully written: {_first_bad(out.isnan())}"
    ref = reference.q_b_proj(a.q_c, w, ws, True)
    assert_within_one_ulp(out, ref, "GEMM (N=320) vs reference.q_b_proj")
    with pytest.raises(ValueError, match="weight"):
        q_b_proj_rope(a.q_c, w, ws, a.positions, a.cos_sin_cache, a.k_pe.clone(), out)


# --------------------------------------------------------------------------------------
# GPU only: full sizes, both tile shapes, num_warps 4 and 8, hardware FP8 conversion
# --------------------------------------------------------------------------------------
GPU_CASES = [
    (T, H, bn, bt, nw)
    for T in (1, 16, 64, 128, 256)
    for H in (128, 32)
    for bn, bt, nw in ((64, None, 4), (128, None, 4), (128, 64, 8))
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,H,block_n,block_t,num_warps", GPU_CASES,
                         ids=[f"T{c[0]}-H{c[1]}-bn{c[2]}-bt{c[3] or 'auto'}-w{c[4]}" for c in GPU_CASES])
@pytest.mark.parametrize("use_ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
def test_q_b_proj_rope_gpu(T, H, block_n, block_t, num_warps, use_ue8m0):
    b = make_batch(T, H, use_ue8m0, torch.bfloat16, seed=T + H)
    a = b.args
    N = H * dims.QK_HEAD_DIM
    kw = dict(use_ue8m0=use_ue8m0, block_n=block_n, block_t=block_t, num_warps=num_warps)

    q0 = torch.full_like(a.q, float("nan"))
    run(a, q0, a.k_pe.clone(), apply_rope=False, hw_cvt=False, **kw)
    assert not q0.isnan().any(), f"q not fully written: {_first_bad(q0.isnan())}"
    ref = reference.q_b_proj(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0)
    assert calc_diff(q0.view(T, N), ref) < TIGHT
    abs_ref = dequant_reference(a.q_c, a.q_b_proj_weight, a.q_b_proj_weight_scale, use_ue8m0, absolute=True)
    assert_within_one_ulp(q0.view(T, N), ref, "GEMM vs reference.q_b_proj", abs_ref=abs_ref)
    full = a.q_c.float() @ b.q_b_proj_weight_bf16.float().T
    assert calc_diff(q0.view(T, N), full) < LOOSE

    q1, k1 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q1, k1, hw_cvt=False, **kw)
    q_ref, k_ref = q0.clone(), a.k_pe.clone()
    reference.mla_rope_(q_ref, k_ref, a.positions, a.cos_sin_cache)
    assert_bitwise(q1, q_ref, "roped q vs reference rope of the kernel's GEMM")
    assert_bitwise(k1, k_ref, "k_pe vs reference rope")

    # the hardware e4m3 conversion must give the integer helper's bytes, hence the same q
    q2, k2 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q2, k2, hw_cvt=True, **kw)
    assert_bitwise(q2, q1, "hw_cvt=True vs hw_cvt=False")
    assert_bitwise(k2, k1, "k_pe with hw_cvt=True")
    # reruns are bitwise identical
    q3, k3 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q3, k3, hw_cvt=True, **kw)
    assert_bitwise(q3, q2, "rerun")
    # the prequantized GEMM (quant once per token, then pipelined FP8 loads): the same bytes
    xq, xs = _prequant_buffers(T)
    q4, k4 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q4, k4, hw_cvt=True, q_c_fp8=xq, q_c_scale=xs, **kw)
    assert_bitwise(q4, q2, "prequantized GEMM vs fused quant")
    assert_bitwise(k4, k2, "k_pe, prequantized GEMM")
    _check_prequant(a, xq, xs, use_ue8m0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 37, 256])
def test_fp32_cache_gpu(T):
    """fp32 cos_sin_cache on the GPU: fp32 math with each product rounded once (no FMA)."""
    b = make_batch(T, 32, True, torch.float32, seed=T)
    a = b.args
    q0 = torch.full_like(a.q, float("nan"))
    run(a, q0, a.k_pe.clone(), apply_rope=False)
    q1, k1 = torch.full_like(a.q, float("nan")), a.k_pe.clone()
    run(a, q1, k1)
    q_ref, k_ref = q0.clone(), a.k_pe.clone()
    reference.mla_rope_(q_ref, k_ref, a.positions, a.cos_sin_cache)
    assert_bitwise(q1, q_ref, "roped q (fp32 cache)")
    assert_bitwise(k1, k_ref, "k_pe (fp32 cache)")
