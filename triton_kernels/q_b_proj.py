"""MLA query side of the DSV3.2 decode step: FP8 ``q_b_proj`` with fused activation quant and RoPE.

One launch computes ``q = q_c @ W^T`` (W8A8, 128x128 block-scaled FP8), applies interleaved RoPE to
``q[..., 128:192]`` of every 192-column head in the GEMM epilogue, and ropes ``k_pe`` in place.

Mirrors, in vLLM 0.33:

* activation quant: ``vllm/model_executor/layers/quantization/utils/fp8_utils.py``
  ``per_token_group_quant_fp8`` (group 128, ``eps = 1e-10``, ``s = max(amax, eps) / 448``, a power
  of two rounded up when UE8M0 is in use, ``x_q = e4m3(clamp(x / s, +-448))``);
* GEMM: DeepGEMM ``fp8_gemm_nt`` as vLLM's block-FP8 linear calls it (``acc += (x_q . w_q)_kb *
  x_s[t, kb] * w_s[n // 128, kb]`` in fp32 per 128-wide K block, bf16 output);
* RoPE: ``vllm/model_executor/layers/rotary_embedding/deepseek_scaling_rope.py`` with
  ``is_neox_style=False`` (``common.py::rotate_gptj``): pairs ``(2i, 2i+1)``,
  ``out_e = x_e cos_i - x_o sin_i``, ``out_o = x_o cos_i + x_e sin_i``, ``cos_i = cache[p, i]``,
  ``sin_i = cache[p, 32 + i]``. With a bf16 ``cos_sin_cache`` (vLLM's) the GEMM output is rounded
  to bf16 first and every product and the sum round to bf16, as vLLM's bf16 math does; with an
  fp32 cache the math is fp32 (each product rounded to fp32 with ``mul.rn``, so no FMA contraction
  can change a bit, then the sum) and rounds once to bf16.

Kernel shape: swap-AB, i.e. weights on the MMA's M side. A work item is one
``(n_tile, t_tile)`` pair: ``BLOCK_N`` weight rows (output columns) x ``BLOCK_T`` tokens, the whole
K = 1536 in a pipelined loop of 12 steps of 128. Each step quantizes its ``[BLOCK_T, 128]`` slice
of ``q_c`` in registers (the same group-of-128 quant as vLLM; ``q_c`` is tiny and L2-resident, so
recomputing it per tile costs issue slots, not bytes). Items are numbered n-tile-major
(``item = n_tile * num_t_tiles + t_tile``) so that concurrently running items share weight tiles
in L2. The items of ``n_tile == 0`` also rope ``k_pe`` for their tokens, so the item count is just
``num_n_tiles * num_t_tiles``. Role function: ``_q_b_proj_item(item, ...)`` (no ``tl.program_id``);
standalone kernel: ``_q_b_proj_kernel``; launcher: :func:`q_b_proj_rope`.

Numerics notes (documented on purpose):

* UE8M0 scales use the exact integer round-up ``fp8.ue8m0_ceil`` (vLLM: ``exp2(ceil(log2(s)))``;
  they differ only within a few ulps above a power of two). With UE8M0, ``x / s`` is computed as
  ``x * 2**-e`` with the exact reciprocal, which is bitwise the IEEE quotient.
* e4m3 bytes come from ``fp8.fp8e4m3_rne`` (torch's RNE bytes, also under the interpreter), or,
  with ``HW_CVT`` (the launcher's default on CUDA), from ``cvt.rn.satfinite.e4m3x2.f32``: the same
  bytes, about 45% fewer instructions in the K loop. The GPU tests assert both give the same ``q``.
* Every fp32 -> bf16 rounding goes through ``_bf16_rne`` (integer RNE), because the interpreter's
  own fp32 -> bf16 cast truncates; on the GPU it costs a few integer ops per output element.
* The fp32 sum over K blocks runs in K order per tile (DeepGEMM's promotion order); the reference
  sums in another order, so outputs may differ from it by one bf16 ulp where fp32 rounding
  crosses a bf16 rounding boundary.

Torch ground truth: ``reference.q_b_proj`` followed by ``reference.mla_rope_``.
"""

import os

import torch
import triton
import triton.language as tl

from . import dims
from .fp8 import fp8e4m3_rne, quant_scale


# True when kernels run in Triton's interpreter (read when this module is imported, as Triton reads
# TRITON_INTERPRET when it decorates a kernel); selects Python-side twins of GPU-only intrinsics.
_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _mul_rn(a, b):
    """fp32 ``a * b`` rounded once, never contracted into an FMA with a following add.

    Triton compiles with FP fusion on, so a plain ``a * b - c`` may become ``fma(a, b, -c)`` (one
    rounding instead of two), which changes bits against torch's separately rounded ops; PTX
    ``mul.rn.f32`` is never fused (inline asm: libdevice's ``__nv_fmul_rn`` would be the
    flush-to-zero variant under Triton's FTZ reflect setting). The interpreter (numpy) never fuses.
    """
    if _INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16, round to nearest even, with integer arithmetic (finite or inf inputs).

    Same bits as ``torch.Tensor.to(torch.bfloat16)`` and the GPU's ``cvt.rn.bf16.f32``, also under
    ``TRITON_INTERPRET=1``, whose own fp32->bf16 cast truncates.
    """
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rope_pairs(xe, xo, c, s, CS_FP32: tl.constexpr):
    """Interleaved RoPE of pairs with vLLM's rounding; bf16-exact fp32 ``xe``/``xo`` -> bf16 pair.

    ``c``/``s`` fp32 (their values bf16-exact when ``CS_FP32`` is False).
    """
    if CS_FP32:
        # fp32 math as torch does it: each product rounded to fp32, then the sum (no FMA)
        ec = _mul_rn(xe, c)
        os_ = _mul_rn(xo, s)
        oc = _mul_rn(xo, c)
        es = _mul_rn(xe, s)
        out_e = _bf16_rne(ec - os_)
        out_o = _bf16_rne(oc + es)
    else:
        # bf16 math: bf16 x bf16 is exact in fp32, then each product and the sum round to bf16
        ec = _bf16_rne(xe * c).to(tl.float32)
        os_ = _bf16_rne(xo * s).to(tl.float32)
        oc = _bf16_rne(xo * c).to(tl.float32)
        es = _bf16_rne(xe * s).to(tl.float32)
        out_e = _bf16_rne(ec - os_)
        out_o = _bf16_rne(oc + es)
    return out_e, out_o


# --------------------------------------------------------------------------------------
# role function
# --------------------------------------------------------------------------------------
@triton.jit
def _act_quant(x, USE_UE8M0: tl.constexpr, HW_CVT: tl.constexpr):
    """Quantize activations ``x`` [R, 128] fp32, one group of 128 per row (vLLM
    per_token_group_quant_fp8: s = max(amax, 1e-10) / 448, x_q = e4m3_rne(clamp(x / s, +-448))).
    Returns (x_q float8e4nv [R, 128], s fp32 [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    x_s = quant_scale(amax, 1e-10, USE_UE8M0)  # [R]; dims.ACT_SCALE_EPS
    if USE_UE8M0:
        # s = 2**e exactly: x * 2**-e (exponent-flipped reciprocal) is bitwise the IEEE x / s
        rcp = ((254 - ((x_s.to(tl.int32, bitcast=True) >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)
        y = x * rcp[:, None]
    else:
        y = tl.math.div_rn(x, tl.broadcast_to(x_s[:, None], x.shape))
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if HW_CVT:
        xq = y.to(tl.float8e4nv)  # cvt.rn.satfinite.e4m3x2.f32 on sm_89+: torch's bytes
    else:
        xq = fp8e4m3_rne(y).to(tl.float8e4nv, bitcast=True)
    return xq, x_s


@triton.jit
def _q_b_proj_kstep(acc, w, x, w_s, USE_UE8M0: tl.constexpr, HW_CVT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One 128-wide K step: quantize the activations ``x`` [BLOCK_T, 128] fp32 (:func:`_act_quant`),
    MMA with the FP8 weight tile ``w`` [BLOCK_N, 128], scale and accumulate into ``acc``."""
    xq, x_s = _act_quant(x, USE_UE8M0, HW_CVT)
    return _q_b_proj_acc(acc, w, xq, x_s, w_s, BLOCK_N)


@triton.jit
def _q_b_proj_acc(acc, w, xq, x_s, w_s, BLOCK_N: tl.constexpr):
    """``acc += (w . xq^T) * w_s * x_s`` for one K block (DeepGEMM's per-block promotion)."""
    part = tl.dot(w, tl.trans(xq))  # [BLOCK_N, BLOCK_T] fp32, exact FP8 x FP8 sums
    if BLOCK_N <= 128:
        acc += part * (x_s * w_s)[None, :]
    else:
        acc += part * w_s[:, None] * x_s[None, :]
    return acc


@triton.jit
def _q_c_quant_row(t, q_c_ptr, stride_qc, xq_ptr, xs_ptr, USE_UE8M0: tl.constexpr, HW_CVT: tl.constexpr):
    """Quantize row ``t`` of ``q_c`` once for every GEMM tile (the prequantized GEMM,
    ``_q_b_proj_item(PREQUANT=True)``): ``xq[t]`` fp8 [1536], ``xs[t]`` fp32 [12] (row strides 1536 and
    12), the same bytes and scales as :func:`_act_quant` computes inside the fused K loop."""
    KB: tl.constexpr = 12  # dims.Q_LORA_RANK // dims.QUANT_GROUP
    g = tl.arange(0, 16)
    d = tl.arange(0, 128)
    gm = g < KB
    t64 = t.to(tl.int64)
    x = tl.load(q_c_ptr + t64 * stride_qc + g[:, None] * 128 + d[None, :], mask=gm[:, None], other=0.0)
    xq, x_s = _act_quant(x.to(tl.float32), USE_UE8M0, HW_CVT)
    tl.store(xq_ptr + t64 * 1536 + g[:, None] * 128 + d[None, :], xq, mask=gm[:, None])
    tl.store(xs_ptr + t64 * KB + g, x_s, mask=gm)


@triton.jit
def _q_b_proj_item(
    item,
    q_c_ptr,
    w_ptr,
    ws_ptr,
    positions_ptr,
    cos_sin_ptr,
    k_pe_ptr,
    q_ptr,
    xq_ptr,
    xs_ptr,
    T,
    N,
    max_pos,
    stride_qc,
    stride_q,
    stride_kpe,
    stride_cs,
    USE_UE8M0: tl.constexpr,
    APPLY_ROPE: tl.constexpr,
    HW_CVT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREQUANT: tl.constexpr,
    ROPE_FUSED_Q: tl.constexpr = False,
    ROPE_K_PE: tl.constexpr = True,
):
    """One work item: ``BLOCK_N`` output columns x ``BLOCK_T`` tokens of ``q``, RoPE included.

    Parameters (all pointers to contiguous inner dims)
    ----------
    item : int, in ``[0, q_b_proj_num_items(T, H, BLOCK_N, BLOCK_T))``; ``n_tile = item // nt``,
        ``t_tile = item % nt`` with ``nt = cdiv(T, BLOCK_T)``. Items of ``n_tile == 0`` also rope
        ``k_pe`` rows ``[t_tile*BLOCK_T, ...)``.
    q_c_ptr : bf16 ``[T, 1536]``, row stride ``stride_qc``.
    w_ptr : float8e4nv ``[N, 1536]`` (out x in, row-major); ``ws_ptr`` fp32 ``[N/128, 12]``.
    positions_ptr : int64 ``[T]``; clamped to ``[0, max_pos)`` before indexing the cache.
    cos_sin_ptr : bf16 or fp32 ``[max_pos, 64]`` (cos | sin), row stride ``stride_cs``.
    k_pe_ptr : bf16 ``[T, 1, 64]``, token stride ``stride_kpe``, roped in place.
    q_ptr : bf16 ``[T, N]`` (= ``[T, H, 192]``), row stride ``stride_q``; written.
    xq_ptr, xs_ptr : with ``PREQUANT``, ``q_c`` already quantized by :func:`_q_c_quant_row`
        (float8e4nv ``[T, 1536]`` and fp32 ``[T, 12]``, contiguous); otherwise unused.
    T, N : tokens and output columns (``N = H * 192``); max_pos : ``cos_sin_cache.shape[0]``.
    USE_UE8M0 : power-of-two activation scales. APPLY_ROPE : False = plain GEMM (tests only; k_pe
        untouched). HW_CVT : hardware fp32->e4m3 conversion (``cvt.rn.satfinite``, the same bytes
        as torch; GPU only: the interpreter's own conversion rounds ties away from zero).
    BLOCK_N : 64, 128 or 256 weight rows (<= 128: one weight-scale row per tile, a scalar per K
        step; 256: a per-row scale vector).
    BLOCK_T : tokens per tile, a power of two >= 16 (the MMA's N side).
    NUM_STAGES : software-pipelining depth of the K loop.
    PREQUANT : read the quantized activations (``xq_ptr``/``xs_ptr``) instead of quantizing
        ``q_c`` in the K loop. Same bytes, same sums; both MMA operands then come from memory, so
        the pipeliner turns the loads into async copies, and the quantization is done once per
        token instead of once per (token, output tile): the fused quant is O(T x tiles x K)
        issue slots, which dominates the GEMM at T >= 64 (H200, 2026-11-30: 69 us at T=128, H=128).
    ROPE_FUSED_Q : q_pe RoPE as vLLM 0.33's production DSV3.2 model computes it (``fused_q`` pid 0,
        ``vllm/models/deepseek_v32/common/kernels.py``): fp32 math whatever the table's dtype, written
        as vLLM writes it (``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin``, so the compiler contracts
        it as it contracts vLLM's), rounded once to bf16. False: vLLM's ``rotary_embedding`` rounding
        (the generic model path; see ``_rope_pairs``).
    ROPE_K_PE : rope ``k_pe`` in the ``n_tile == 0`` items (False for the production model, whose
        ``fused_norm_rope`` ropes ``k_pe`` and writes the MLA cache).
    """
    K: tl.constexpr = 1536  # dims.Q_LORA_RANK
    G: tl.constexpr = 128  # dims.QUANT_GROUP
    KB: tl.constexpr = K // G
    HEAD: tl.constexpr = 192  # dims.QK_HEAD_DIM
    NOPE: tl.constexpr = 128  # dims.QK_NOPE_HEAD_DIM
    ROT: tl.constexpr = 64  # dims.QK_ROPE_HEAD_DIM
    HALF: tl.constexpr = ROT // 2
    tl.static_assert((BLOCK_N == 64) | (BLOCK_N == 128) | (BLOCK_N == 256), "BLOCK_N: 64, 128 or 256")
    tl.static_assert(BLOCK_T >= 16, "BLOCK_T: tokens are padded to >= 16 for the MMA")

    num_t_tiles = tl.cdiv(T, BLOCK_T)
    n_tile = item // num_t_tiles
    t_tile = item % num_t_tiles
    n0 = n_tile * BLOCK_N
    t0 = t_tile * BLOCK_T

    offs_n = n0 + tl.arange(0, BLOCK_N)  # weight rows = output columns
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, G)
    n_mask = offs_n < N
    t_mask = offs_t < T

    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BLOCK_N, 128] fp8
    x_ptrs = q_c_ptr + offs_t.to(tl.int64)[:, None] * stride_qc + offs_k[None, :]  # [BLOCK_T, 128]
    if BLOCK_N <= G:
        ws_ptrs = ws_ptr + (tl.minimum(n0, N - 1) // G) * KB  # one scale row per tile: a scalar
    else:
        ws_ptrs = ws_ptr + (tl.minimum(offs_n, N - 1) // G) * KB  # [BLOCK_N], several scale rows

    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if PREQUANT:
        tl.static_assert(NUM_STAGES >= 1, "PREQUANT: NUM_STAGES >= 1 (the pipeliner's async copies)")
        xq_ptrs = xq_ptr + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BLOCK_T, 128] fp8
        xs_ptrs = xs_ptr + offs_t.to(tl.int64) * KB
        for kb in tl.range(0, KB, num_stages=NUM_STAGES):
            w = tl.load(w_ptrs + kb * G, mask=n_mask[:, None], other=0.0)
            xq = tl.load(xq_ptrs + kb * G, mask=t_mask[:, None], other=0.0)
            x_s = tl.load(xs_ptrs + kb, mask=t_mask, other=0.0)
            w_s = tl.load(ws_ptrs + kb)
            acc = _q_b_proj_acc(acc, w, xq, x_s, w_s, BLOCK_N)
    elif NUM_STAGES >= 0:
        for kb in tl.range(0, KB, num_stages=NUM_STAGES):
            w = tl.load(w_ptrs + kb * G, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + kb * G, mask=t_mask[:, None], other=0.0).to(tl.float32)
            w_s = tl.load(ws_ptrs + kb)
            acc = _q_b_proj_kstep(acc, w, x, w_s, USE_UE8M0, HW_CVT, BLOCK_N)
    else:
        # NUM_STAGES < 0: the K loop unrolled with the weight tiles prefetched -NUM_STAGES steps
        # ahead into registers (the pipeliner does not turn these loads into async copies when the
        # other MMA operand comes from registers, as the quantized activations do)
        w0 = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        w1 = tl.load(w_ptrs + G, mask=n_mask[:, None], other=0.0)
        for kb in tl.static_range(KB):
            w = w0
            w0 = w1
            if kb + 2 < KB:
                w1 = tl.load(w_ptrs + (kb + 2) * G, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + kb * G, mask=t_mask[:, None], other=0.0).to(tl.float32)
            w_s = tl.load(ws_ptrs + kb)
            acc = _q_b_proj_kstep(acc, w, x, w_s, USE_UE8M0, HW_CVT, BLOCK_N)

    # ---- epilogue: [BLOCK_T, BLOCK_N] orientation, so column pairs are the last dim ----------
    out = _bf16_rne(tl.trans(acc))  # [BLOCK_T, BLOCK_N] bf16
    q_ptrs = q_ptr + offs_t.to(tl.int64)[:, None] * stride_q + offs_n[None, :]
    st_mask = t_mask[:, None] & n_mask[None, :]
    if APPLY_ROPE:
        CS_FP32: tl.constexpr = cos_sin_ptr.dtype.element_ty == tl.float32
        pos = tl.load(positions_ptr + offs_t, mask=t_mask, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1).to(tl.int64)
        cs_row = cos_sin_ptr + pos[:, None] * stride_cs  # [BLOCK_T, 1]
        # does any column of this tile fall in a head's rope part (c % 192 >= 128)?
        has_rope = (n0 % HEAD) + BLOCK_N > NOPE  # BLOCK_N <= 128 < 192: no wrap into the next head's rope
        if has_rope:
            col_e = n0 + 2 * tl.arange(0, BLOCK_N // 2)  # even column of each pair
            in_head = col_e % HEAD
            is_rope = in_head >= NOPE
            i = tl.where(is_rope, (in_head - NOPE) // 2, 0)  # pair index 0..31
            cs_mask = t_mask[:, None] & is_rope[None, :]
            c = tl.load(cs_row + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
            s = tl.load(cs_row + HALF + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(out.to(tl.float32), (BLOCK_T, BLOCK_N // 2, 2)))
            if ROPE_FUSED_Q:
                re = _bf16_rne(xe * c - xo * s)
                ro = _bf16_rne(xo * c + xe * s)
            else:
                re, ro = _rope_pairs(xe, xo, c, s, CS_FP32)
            roped = tl.reshape(tl.join(re, ro), (BLOCK_T, BLOCK_N))
            rope_col = ((offs_n % HEAD) >= NOPE)[None, :]
            tl.store(q_ptrs, tl.where(rope_col, roped, out), mask=st_mask)
        else:
            tl.store(q_ptrs, out, mask=st_mask)
        if ROPE_K_PE and n_tile == 0:
            # k_pe [T, 1, 64]: the same interleaved rope at the same positions, in place
            offs_i = tl.arange(0, HALF)
            c = tl.load(cs_row + offs_i[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
            s = tl.load(cs_row + HALF + offs_i[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
            k_ptrs = k_pe_ptr + offs_t.to(tl.int64)[:, None] * stride_kpe + tl.arange(0, ROT)[None, :]
            k = tl.load(k_ptrs, mask=t_mask[:, None], other=0.0).to(tl.float32)
            ke, ko = tl.split(tl.reshape(k, (BLOCK_T, HALF, 2)))
            re, ro = _rope_pairs(ke, ko, c, s, CS_FP32)
            tl.store(k_ptrs, tl.reshape(tl.join(re, ro), (BLOCK_T, ROT)), mask=t_mask[:, None])
    else:
        tl.store(q_ptrs, out, mask=st_mask)


@triton.jit
def _q_b_proj_kernel(
    q_c_ptr,
    w_ptr,
    ws_ptr,
    positions_ptr,
    cos_sin_ptr,
    k_pe_ptr,
    q_ptr,
    xq_ptr,
    xs_ptr,
    T,
    N,
    max_pos,
    stride_qc,
    stride_q,
    stride_kpe,
    stride_cs,
    USE_UE8M0: tl.constexpr,
    APPLY_ROPE: tl.constexpr,
    HW_CVT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREQUANT: tl.constexpr,
    ROPE_FUSED_Q: tl.constexpr = False,
    ROPE_K_PE: tl.constexpr = True,
):
    """Standalone kernel: one work item per program (grid = ``q_b_proj_num_items``)."""
    _q_b_proj_item(
        tl.program_id(0), q_c_ptr, w_ptr, ws_ptr, positions_ptr, cos_sin_ptr, k_pe_ptr, q_ptr, xq_ptr, xs_ptr,
        T, N, max_pos, stride_qc, stride_q, stride_kpe, stride_cs,
        USE_UE8M0, APPLY_ROPE, HW_CVT, BLOCK_N, BLOCK_T, NUM_STAGES, PREQUANT, ROPE_FUSED_Q, ROPE_K_PE,
    )


@triton.jit
def _q_c_quant_kernel(q_c_ptr, stride_qc, xq_ptr, xs_ptr, USE_UE8M0: tl.constexpr, HW_CVT: tl.constexpr):
    """Standalone activation quant: one program per token (:func:`_q_c_quant_row`)."""
    _q_c_quant_row(tl.program_id(0), q_c_ptr, stride_qc, xq_ptr, xs_ptr, USE_UE8M0, HW_CVT)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def launch_q_c_quant(q_c: torch.Tensor, q_c_fp8: torch.Tensor, q_c_scale: torch.Tensor, use_ue8m0: bool,
                     hw_cvt: bool) -> None:
    """Quantize ``q_c`` once per token into ``q_c_fp8`` / ``q_c_scale`` (``_q_c_quant_kernel``, one
    program per row of ``q_c``): the activations of the prequantized GEMM (``PREQUANT``).

    q_c : bf16 ``[T, 1536]``, unit column stride. q_c_fp8 : float8_e4m3fn ``[>= T, 1536]`` and
    q_c_scale : fp32 ``[>= T, 12]``, contiguous (checked by the callers,
    :func:`check_prequant_buffers`); rows past ``T`` are not written. use_ue8m0 : power-of-two
    scales. hw_cvt : the hardware FP8 conversion (False under the interpreter). Per-token-group
    quant of vLLM 0.33 ``per_token_group_quant_fp8`` (``_act_quant``).
    """
    _q_c_quant_kernel[(q_c.shape[0],)](q_c, q_c.stride(0), q_c_fp8, q_c_scale, USE_UE8M0=bool(use_ue8m0),
                                       HW_CVT=bool(hw_cvt), num_warps=4)


def check_prequant_buffers(q_c_fp8, q_c_scale, num_tokens: int, prefix: str = "") -> None:
    """Check the buffers of the prequantized GEMM (``q_b_proj_rope(q_c_fp8=...)``, the partitioned
    kernel's ``RegionWorkspace.q_c_fp8`` / ``q_c_scale``) for ``num_tokens`` rows.

    Expected: both given; float8_e4m3fn ``[>= num_tokens, 1536]`` and fp32 ``[>= num_tokens, 12]``,
    each contiguous, on one device. ``prefix`` names their owner in messages (e.g. ``"workspace."``).

    Raises
    ------
    ValueError : only one given, wrong shape, not contiguous, different devices.
    TypeError : wrong dtype.
    """
    a, b = f"{prefix}q_c_fp8", f"{prefix}q_c_scale"
    if (q_c_fp8 is None) != (q_c_scale is None):
        raise ValueError(f"{a}, {b}: pass both (prequantized GEMM) or neither")
    K, KB = dims.Q_LORA_RANK, dims.Q_LORA_RANK // dims.QUANT_GROUP
    for name, x, dt, cols in ((a, q_c_fp8, torch.float8_e4m3fn, K), (b, q_c_scale, torch.float32, KB)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != dt:
            raise TypeError(f"{name}: expected {dt}, got {x.dtype}")
        if x.dim() != 2 or x.shape[0] < num_tokens or x.shape[1] != cols:
            raise ValueError(f"{name}: expected shape [>= {num_tokens}, {cols}], got {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (strides {x.stride()})")
    if q_c_fp8.device != q_c_scale.device:
        raise ValueError(f"{a}, {b}: on different devices ({q_c_fp8.device}, {q_c_scale.device})")


def default_block_t(T: int) -> int:
    """Default token tile: the next power of two >= T, between 16 and 64."""
    return min(max(16, triton.next_power_of_2(max(T, 1))), 64)


def q_b_proj_num_items(T: int, H: int, block_n: int = 64, block_t: int = 16) -> int:
    """Work items of one ``q_b_proj_rope`` call: ``cdiv(H*192, block_n) * cdiv(T, block_t)``."""
    return triton.cdiv(H * dims.QK_HEAD_DIM, block_n) * triton.cdiv(T, block_t)


def q_b_proj_rope(
    q_c: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_pe: torch.Tensor,
    q: torch.Tensor,
    *,
    use_ue8m0: bool = True,
    block_n: int = 64,
    block_t: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
    apply_rope: bool = True,
    hw_cvt: bool | None = None,
    q_c_fp8: torch.Tensor | None = None,
    q_c_scale: torch.Tensor | None = None,
    rope_fused_q: bool = False,
    rope_k_pe: bool = True,
) -> None:
    """``q = rope(q_c @ weight^T)`` (W8A8 block FP8) into ``q``; ``k_pe`` roped in place. One launch.

    Parameters
    ----------
    q_c : bf16 ``[T, 1536]`` (after ``q_a_layernorm``), unit column stride.
    weight : float8_e4m3fn ``[H*192, 1536]`` (out x in, contiguous); with ``apply_rope=False`` any row
        count N (``q`` is then ``[T, N]``), else ValueError.
    weight_scale : fp32 ``[H*192/128, 12]`` (one scale per 128x128 weight block, contiguous).
    positions : int64 ``[T]`` (token positions; validated ``< max_pos``, clamped in the kernel).
    cos_sin_cache : bf16 (vLLM's) or fp32 ``[max_pos, 64]``, cos in columns 0..31, sin in 32..63.
    k_pe : bf16 ``[T, 1, 64]``, unit stride on the last dim (any token stride); roped in place.
    q : bf16 ``[T, H, 192]`` contiguous, preallocated; fully overwritten.
    use_ue8m0 : power-of-two activation scales (vLLM 0.33 on Hopper: DeepGEMM E8M0).
    block_n : weight rows per tile, 64, 128 or 256. block_t : tokens per tile (power of two >= 16;
        default :func:`default_block_t`). num_warps, num_stages : launch parameters.
    apply_rope : False skips both RoPEs (plain GEMM; used by tests to check the epilogue).
    hw_cvt : use the hardware fp32->e4m3 conversion (``cvt.rn.satfinite.e4m3x2.f32``, the same
        bytes as torch) in the activation quant instead of the integer helper
        ``fp8.fp8e4m3_rne``: about 45% fewer instructions in the K loop. Default ``None``: on for
        CUDA tensors, off under ``TRITON_INTERPRET=1`` (whose conversion rounds differently).
    q_c_fp8, q_c_scale : optional float8_e4m3fn ``[>= T, 1536]`` and fp32 ``[>= T, 12]`` contiguous
        buffers (e.g. ``RegionWorkspace.q_c_fp8`` / ``q_c_scale``; checked by
        :func:`check_prequant_buffers`, which raises ValueError/TypeError): given, the call is two launches,
        the activation quant once per token into them (``_q_c_quant_kernel``) then the GEMM reading
        them (``PREQUANT``; ``num_stages >= 1``); the same ``q`` bytes as the fused quant.
    rope_fused_q : q_pe RoPE rounded as vLLM 0.33's production DSV3.2 model's ``fused_q`` (pid 0):
        fp32 math for any table dtype (``_q_b_proj_item``'s ``ROPE_FUSED_Q``). rope_k_pe : False leaves
        ``k_pe`` untouched (that model ropes it in ``fused_norm_rope``).

    Math: ``x_s[t,kb] = max(amax, 1e-10)/448``; ``acc[t,n] = sum_kb (e4m3(x/x_s) . w)_kb *
    x_s[t,kb] * w_s[n//128,kb]``; ``q = bf16(acc)``, then interleaved RoPE on ``q[..., 128:]``
    (see the module docstring for the rounding). No validation, allocation or host sync here
    (``smpart.validate`` checks inputs).
    """
    T = q_c.shape[0]
    prequant = q_c_fp8 is not None or q_c_scale is not None
    if prequant:  # bad buffers are refused even for an empty batch
        check_prequant_buffers(q_c_fp8, q_c_scale, T)
    if T == 0:
        return
    N = weight.shape[0]
    if apply_rope and N % dims.QK_HEAD_DIM:
        raise ValueError(f"weight: {N} rows is not a whole number of 192-column heads (RoPE needs H*192)")
    if block_t is None:
        block_t = default_block_t(T)
    if hw_cvt is None:
        hw_cvt = q_c.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    if prequant:
        if num_stages < 1:
            raise ValueError(f"num_stages: the prequantized GEMM needs >= 1, got {num_stages}")
        launch_q_c_quant(q_c, q_c_fp8, q_c_scale, use_ue8m0, hw_cvt)
    else:
        q_c_fp8, q_c_scale = q_c, q_c  # unused by the fused-quant kernel
    # every weight row gets a tile: cdiv(N, block_n), not cdiv(H*192, block_n), so a plain GEMM
    # (apply_rope=False) with N not a multiple of 192 (e.g. the indexer's wq_b, N = 8192) writes all of q
    grid = (triton.cdiv(N, block_n) * triton.cdiv(T, block_t),)
    _q_b_proj_kernel[grid](
        q_c, weight, weight_scale, positions, cos_sin_cache, k_pe, q, q_c_fp8, q_c_scale,
        T, N, cos_sin_cache.shape[0], q_c.stride(0), q.stride(0), k_pe.stride(0), cos_sin_cache.stride(0),
        USE_UE8M0=bool(use_ue8m0), APPLY_ROPE=bool(apply_rope), HW_CVT=bool(hw_cvt),
        BLOCK_N=block_n, BLOCK_T=block_t, NUM_STAGES=num_stages, PREQUANT=prequant,
        ROPE_FUSED_Q=bool(rope_fused_q), ROPE_K_PE=bool(rope_k_pe),
        num_warps=num_warps, num_stages=num_stages,
    )
