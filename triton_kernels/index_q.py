"""Index-q prep of vLLM 0.33's production DSV3.2 model: indexer-q RoPE, FP8 UE8M0 quant, weight scaling.

What vLLM's ``_fused_q_kernel`` does for ``pid == 1`` (``vllm/models/deepseek_v32/common/kernels.py``,
vLLM 0.33.0, called from ``vllm/models/deepseek_v32/attention.py::DeepseekV32Attention.forward``
as ``fused_q(...)``), per token ``t`` and indexer head ``h`` (64 heads of 128):

1. RoPE on the first 64 dims of ``index_q[t, h]`` (bf16 -> fp32) with the indexer's
   ``cos_sin_cache`` row ``positions[t]``: NeoX style (DeepSeek-V3.2: ``indexer_rope_interleave``
   false; pairs ``(i, i + 32)``) or interleaved (GLM-5.2; pairs ``(2i, 2i + 1)``), written as vLLM
   writes it: ``roped = x * cos + sign * partner * sin`` (``sign = -1`` for the first of a pair);
   the last 64 dims pass through;
2. FP8 quant with one UE8M0 scale per head (``_fp8_ue8m0_quantize``):
   ``scale = exp2(ceil(log2(div_rn(max(amax, 1e-4), 448))))``, ``q_fp8 = e4m3(div_rn(x, scale))``;
3. ``weights_out[t, h] = ((float(weights[t, h]) * scale) * softmax_scale) * head_scale`` with
   ``softmax_scale = 128 ** -0.5`` and ``head_scale = 64 ** -0.5`` (three fp32 multiplies, in that order).

The device code mirrors vLLM's Triton expressions literally (same operations in the same order, the
same ``tl.div_rn``, ``tl.math.log2/ceil/exp2`` and ``.to(tl.float8e4nv)``), so that the compiler
makes the same choices for both kernels (on sm_90 it contracts ``x * cos + (sign * partner) * sin``
into an FMA, and casts with ``cvt.rn.satfinite.e4m3x2.f32``), and under ``TRITON_INTERPRET=1`` both
run the same numpy operations. Bytes therefore equal vLLM's kernel's on the same backend; this is
tested against vLLM's own kernel (interpreter on the CPU, compiled on the GPU).

Differences from the torch twin :func:`index_q_prep_torch` (which rounds as torch does): on the GPU
the FMA rounds once where torch rounds twice (rarely a different fp8 byte); under the interpreter
``.to(tl.float8e4nv)`` rounds ties away from zero where torch rounds to even. The twin takes a
``fp8_cast`` to reproduce the latter exactly.

Role function ``_index_q_prep_item`` (one token x ``BLOCK_H`` heads; no ``tl.program_id``), standalone
kernel ``_index_q_prep_kernel``, launcher :func:`index_q_prep`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dims

SOFTMAX_SCALE = dims.INDEX_HEAD_DIM ** -0.5  # DeepseekV32Indexer.softmax_scale
HEAD_SCALE = dims.INDEX_N_HEADS ** -0.5  # DeepseekV32Attention.forward: self.indexer.n_head ** -0.5
INDEX_ROPE_DIM = dims.QK_ROPE_HEAD_DIM  # the indexer ropes its first 64 dims (config.qk_rope_head_dim)


@triton.jit
def _index_q_prep_item(
    item,
    positions_ptr,
    index_q_ptr,
    stride_iq_t,
    stride_iq_h,
    cos_sin_ptr,
    stride_cs,
    max_pos,
    index_w_ptr,
    stride_w,
    q_fp8_ptr,
    stride_qf_t,
    stride_qf_h,
    w_out_ptr,
    stride_wo,
    softmax_scale,
    head_scale,
    N_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_ROT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    """One work item: token ``item // (N_HEADS // BLOCK_H)``, heads ``BLOCK_H * (item % ...)`` + [0, BLOCK_H).

    Parameters
    ----------
    positions_ptr : int64 ``[T]``.
    index_q_ptr : bf16 ``[T, N_HEADS, HEAD_DIM]``, strides ``(stride_iq_t, stride_iq_h, 1)``.
    cos_sin_ptr : fp32 or bf16 ``[max_pos, 2 * HALF_ROT]`` (cos | sin), row stride ``stride_cs``;
        ``positions[t]`` is clamped to ``[0, max_pos)`` before indexing it (validation refuses such
        positions in eager mode; with value checks off no read leaves the table).
    index_w_ptr : bf16 / fp32 ``[T, N_HEADS]`` raw indexer weights, row stride ``stride_w``.
    q_fp8_ptr : float8e4nv ``[T, N_HEADS, HEAD_DIM]`` (written). w_out_ptr : fp32 ``[T, N_HEADS]`` (written).
    softmax_scale, head_scale : fp32 scalars.
    INTERLEAVE : RoPE pairs ``(2i, 2i+1)`` (True) or NeoX ``(i, i + HALF_ROT)`` (False).
    """
    tl.static_assert(N_HEADS % BLOCK_H == 0, "BLOCK_H must divide the indexer heads")
    n_hb: tl.constexpr = N_HEADS // BLOCK_H
    tok = (item // n_hb).to(tl.int64)
    heads = (item % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    block = tl.arange(0, HEAD_DIM)  # vLLM: index_q_block

    pos = tl.minimum(tl.maximum(tl.load(positions_ptr + tok), 0), max_pos - 1)
    iq_base = index_q_ptr + tok * stride_iq_t + heads[:, None].to(tl.int64) * stride_iq_h  # [BLOCK_H, 1]
    index_q = tl.load(iq_base + block[None, :]).to(tl.float32)  # [BLOCK_H, HEAD_DIM]

    # RoPE in registers, partner gathered from the read-only input (vLLM's order of operations)
    in_rope = block < 2 * HALF_ROT
    if INTERLEAVE:
        cos_idx = block // 2
        partner_offs = tl.where(in_rope, block ^ 1, block)
        sign = tl.where(block % 2 == 0, -1.0, 1.0)
    else:
        cos_idx = block % HALF_ROT
        partner_offs = tl.where(in_rope, block ^ HALF_ROT, block)
        sign = tl.where(block < HALF_ROT, -1.0, 1.0)
    cos_full = tl.load(cos_sin_ptr + pos * stride_cs + cos_idx, mask=in_rope, other=1.0).to(tl.float32)
    sin_full = tl.load(cos_sin_ptr + pos * stride_cs + HALF_ROT + cos_idx, mask=in_rope, other=0.0).to(tl.float32)
    partner = tl.load(iq_base + partner_offs[None, :]).to(tl.float32)
    roped = index_q * cos_full[None, :] + sign[None, :] * partner * sin_full[None, :]
    index_q = tl.where(in_rope[None, :], roped, index_q)

    # FP8 quant, one UE8M0 scale per head (vLLM _fp8_ue8m0_quantize, per row)
    amax = tl.max(tl.abs(index_q), axis=1)  # [BLOCK_H]
    scale = tl.div_rn(tl.maximum(amax, 1e-4), 448.0)
    scale = tl.math.exp2(tl.math.ceil(tl.math.log2(scale)))
    q_fp8 = tl.div_rn(index_q, scale[:, None]).to(tl.float8e4nv)
    tl.store(q_fp8_ptr + tok * stride_qf_t + heads[:, None].to(tl.int64) * stride_qf_h + block[None, :], q_fp8)

    # weights x q_scale x softmax_scale x n_head^-0.5, in vLLM's order
    w = tl.load(index_w_ptr + tok * stride_w + heads).to(tl.float32)
    w *= scale
    w *= softmax_scale
    w *= head_scale
    tl.store(w_out_ptr + tok * stride_wo + heads, w)


@triton.jit
def _index_q_prep_kernel(
    positions_ptr, index_q_ptr, stride_iq_t, stride_iq_h, cos_sin_ptr, stride_cs, max_pos, index_w_ptr, stride_w,
    q_fp8_ptr, stride_qf_t, stride_qf_h, w_out_ptr, stride_wo, softmax_scale, head_scale,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    _index_q_prep_item(tl.program_id(0), positions_ptr, index_q_ptr, stride_iq_t, stride_iq_h, cos_sin_ptr, stride_cs,
                       max_pos, index_w_ptr, stride_w, q_fp8_ptr, stride_qf_t, stride_qf_h, w_out_ptr, stride_wo, softmax_scale,
                       head_scale, N_HEADS, HEAD_DIM, HALF_ROT, BLOCK_H, INTERLEAVE)


def check_index_q_prep_args(positions, index_q, cos_sin_cache, index_weights, index_q_fp8, index_weights_out) -> None:
    """Metadata checks of :func:`index_q_prep` (raise TypeError / ValueError naming the argument)."""
    for name, t in (("positions", positions), ("index_q", index_q), ("cos_sin_cache", cos_sin_cache),
                    ("index_weights", index_weights), ("index_q_fp8", index_q_fp8),
                    ("index_weights_out", index_weights_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    H, D = dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM
    if index_q.dtype != torch.bfloat16 or index_q.dim() != 3 or tuple(index_q.shape[1:]) != (H, D):
        raise ValueError(f"index_q: expected bfloat16 [T, {H}, {D}], got {index_q.dtype} {list(index_q.shape)}")
    if index_q.stride(2) != 1:
        raise ValueError(f"index_q: last dim must be unit-stride, got strides {index_q.stride()}")
    T = index_q.shape[0]
    if positions.dtype != torch.int64 or positions.dim() != 1 or positions.shape[0] < T:
        raise ValueError(f"positions: expected int64 [>= {T}], got {positions.dtype} {list(positions.shape)}")
    if (cos_sin_cache.dtype not in (torch.float32, torch.bfloat16) or cos_sin_cache.dim() != 2
            or cos_sin_cache.shape[1] != INDEX_ROPE_DIM or cos_sin_cache.stride(1) != 1):
        raise ValueError(f"cos_sin_cache: expected fp32/bf16 [max_pos, {INDEX_ROPE_DIM}] with unit last stride, got "
                         f"{cos_sin_cache.dtype} {list(cos_sin_cache.shape)} strides {cos_sin_cache.stride()}")
    if (index_weights.dtype not in (torch.bfloat16, torch.float32) or index_weights.dim() != 2
            or index_weights.shape[0] < T or index_weights.shape[1] != H or index_weights.stride(1) != 1):
        raise ValueError(f"index_weights: expected bf16/fp32 [>= {T}, {H}] with unit last stride, got "
                         f"{index_weights.dtype} {list(index_weights.shape)} strides {index_weights.stride()}")
    if (index_q_fp8.dtype != torch.float8_e4m3fn or index_q_fp8.dim() != 3 or index_q_fp8.shape[0] < T
            or tuple(index_q_fp8.shape[1:]) != (H, D) or index_q_fp8.stride(2) != 1):
        raise ValueError(f"index_q_fp8: expected float8_e4m3fn [>= {T}, {H}, {D}] with unit last stride, got "
                         f"{index_q_fp8.dtype} {list(index_q_fp8.shape)} strides {index_q_fp8.stride()}")
    if (index_weights_out.dtype != torch.float32 or index_weights_out.dim() != 2 or index_weights_out.shape[0] < T
            or index_weights_out.shape[1] != H or index_weights_out.stride(1) != 1):
        raise ValueError(f"index_weights_out: expected float32 [>= {T}, {H}] with unit last stride, got "
                         f"{index_weights_out.dtype} {list(index_weights_out.shape)} strides {index_weights_out.stride()}")
    devs = {t.device for t in (positions, index_q, cos_sin_cache, index_weights, index_q_fp8, index_weights_out)}
    if len(devs) != 1:
        raise ValueError(f"index_q_prep: all tensors must be on one device, got {sorted(map(str, devs))}")


def index_q_prep(positions: torch.Tensor, index_q: torch.Tensor, cos_sin_cache: torch.Tensor,
                 index_weights: torch.Tensor, index_q_fp8: torch.Tensor, index_weights_out: torch.Tensor, *,
                 rope_interleave: bool = False, softmax_scale: float = SOFTMAX_SCALE, head_scale: float = HEAD_SCALE,
                 block_h: int = 8, num_warps: int = 4) -> None:
    """vLLM's ``fused_q`` pid 1 (see the module docstring): writes ``index_q_fp8`` and ``index_weights_out``.

    Parameters
    ----------
    positions : int64 ``[T]``.
    index_q : bf16 ``[T, 64, 128]`` (``indexer.wq_b(q_c)`` viewed per head; unit last stride).
    cos_sin_cache : fp32 or bf16 ``[max_pos, 64]``, the indexer RoPE's ``cos_sin_cache`` (cos | sin).
    index_weights : bf16 or fp32 ``[T, 64]``, the raw ``weights_proj`` output (any row stride).
    index_q_fp8 : float8_e4m3fn ``[T, 64, 128]`` (written). index_weights_out : fp32 ``[T, 64]`` (written).
    rope_interleave : the model's ``indexer_rope_interleave`` (DeepSeek-V3.2: False, NeoX pairs).
    softmax_scale, head_scale : ``128 ** -0.5`` and ``64 ** -0.5`` (as vLLM passes them).
    block_h : heads per program, an int dividing 64 (1, 2, 4, ..., 64).
    num_warps : warps per program, an int power of two in [1, 32].

    Raises
    ------
    TypeError / ValueError : bad tensor arguments (before any launch; :func:`check_index_q_prep_args`).
    TypeError : ``block_h`` or ``num_warps`` not an int (a bool included).
    ValueError : ``block_h`` not a positive divisor of 64; ``num_warps`` not a power of two in [1, 32].
    """
    check_index_q_prep_args(positions, index_q, cos_sin_cache, index_weights, index_q_fp8, index_weights_out)
    for name, v in (("block_h", block_h), ("num_warps", num_warps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if block_h <= 0 or dims.INDEX_N_HEADS % block_h:
        raise ValueError(f"block_h: expected a power of two dividing {dims.INDEX_N_HEADS}, got {block_h!r}")
    if not 1 <= num_warps <= 32 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps: expected a power of two in [1, 32], got {num_warps!r}")
    T = index_q.shape[0]
    if T == 0:
        return
    grid = (T * (dims.INDEX_N_HEADS // block_h),)
    _index_q_prep_kernel[grid](
        positions, index_q, index_q.stride(0), index_q.stride(1), cos_sin_cache, cos_sin_cache.stride(0),
        cos_sin_cache.shape[0], index_weights, index_weights.stride(0), index_q_fp8, index_q_fp8.stride(0), index_q_fp8.stride(1),
        index_weights_out, index_weights_out.stride(0), float(softmax_scale), float(head_scale),
        N_HEADS=dims.INDEX_N_HEADS, HEAD_DIM=dims.INDEX_HEAD_DIM, HALF_ROT=INDEX_ROPE_DIM // 2, BLOCK_H=block_h,
        INTERLEAVE=bool(rope_interleave), num_warps=num_warps,
    )


def index_q_prep_torch(positions: torch.Tensor, index_q: torch.Tensor, cos_sin_cache: torch.Tensor,
                       index_weights: torch.Tensor, *, rope_interleave: bool = False,
                       softmax_scale: float = SOFTMAX_SCALE, head_scale: float = HEAD_SCALE, fp8_cast=None):
    """Torch twin of :func:`index_q_prep` (fp32, each operation rounded as torch rounds it).

    Parameters
    ----------
    As :func:`index_q_prep`; ``fp8_cast`` maps an fp32 tensor to float8_e4m3fn (default: torch's
    ``.to(torch.float8_e4m3fn)``, round to nearest even, which is what ``cvt.rn.satfinite`` gives).

    Returns
    -------
    (index_q_fp8 float8_e4m3fn [T, 64, 128], index_weights_out fp32 [T, 64], scale fp32 [T, 64]).
    """
    check_index_q_prep_args(positions, index_q, cos_sin_cache, index_weights,
                            torch.empty_like(index_q, dtype=torch.float8_e4m3fn),
                            torch.empty(index_q.shape[:2], dtype=torch.float32, device=index_q.device))
    T = index_q.shape[0]
    half = INDEX_ROPE_DIM // 2
    x = index_q.float()  # [T, 64, 128]
    cs = cos_sin_cache[positions[:T].clamp(0, cos_sin_cache.shape[0] - 1)].float()  # [T, 64], clamped as the kernel
    cos, sin = cs[:, :half], cs[:, half:]
    block = torch.arange(dims.INDEX_HEAD_DIM, device=x.device)
    rope = block[: 2 * half]
    if rope_interleave:
        cos_idx, partner_idx = rope // 2, rope ^ 1
        sign = torch.where(rope % 2 == 0, -1.0, 1.0)
    else:
        cos_idx, partner_idx = rope % half, rope ^ half
        sign = torch.where(rope < half, -1.0, 1.0)
    c = cos[:, cos_idx][:, None, :]  # [T, 1, 64]
    s = sin[:, cos_idx][:, None, :]
    xr = x[..., : 2 * half]
    roped = xr * c + (sign.to(x.device) * x[..., partner_idx]) * s
    y = torch.cat([roped, x[..., 2 * half:]], dim=-1)
    amax = y.abs().amax(dim=-1)  # [T, 64]
    scale = torch.clamp(amax, min=1e-4) / torch.full_like(amax, dims.FP8_MAX)  # IEEE divide, as tl.div_rn
    scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = y / scale[..., None]
    q_fp8 = fp8_cast(q) if fp8_cast is not None else q.to(torch.float8_e4m3fn)
    w = index_weights[:T].float()
    w = w * scale
    w = w * torch.tensor(softmax_scale, dtype=torch.float32, device=w.device)
    w = w * torch.tensor(head_scale, dtype=torch.float32, device=w.device)
    return q_fp8, w, scale


__all__ = ["index_q_prep", "index_q_prep_torch", "check_index_q_prep_args", "SOFTMAX_SCALE", "HEAD_SCALE"]
