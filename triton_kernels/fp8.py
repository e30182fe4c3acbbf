"""FP8 (e4m3fn) and UE8M0 scale helpers shared by every kernel and by the reference.

Two promises (docs/CORRECTNESS.md, "FP8 numerics"):

* ``fp8e4m3_rne`` gives the bytes of ``torch.Tensor.to(torch.float8_e4m3fn)`` after a clamp to
  +-448 (round to nearest even, saturating), on the GPU *and* under ``TRITON_INTERPRET=1``,
  whose own ``.to(tl.float8e4nv)`` rounds ties away from zero.
* ``ue8m0_ceil`` rounds a positive fp32 scale up to a power of two exactly, with integer
  arithmetic. vLLM writes this as ``exp2(ceil(log2(s)))`` (``fp8_utils._ceil_to_ue8m0``,
  ``csrc/cache_kernels.cu``); the two agree except when ``s`` lies within a few ulps above a
  power of two, where ``log2`` rounds down to the integer (probability ~1e-6 per scale).
  Both sides of our tests use this exact form.
"""

import torch
import triton
import triton.language as tl

from .dims import FP8_MAX

FP8_DTYPE = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------
# Triton device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def fp8e4m3_rne(x):
    """fp32 tensor -> uint8 bytes of float8_e4m3fn, RNE, saturating to +-448.

    Integer rounding: normal results drop 20 mantissa bits with round-half-even; results
    below 2**-6 (subnormal e4m3, multiples of 2**-9) round through the float adder
    (``|x| * 512 + 2**23`` has an ulp of exactly one subnormal step).
    """
    b = x.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    # normal range: rebias exponent 127 -> 7 (subtract 120 << 23), RNE on the 20 dropped bits
    t = a - 0x3C000000
    t = t + 0x0007FFFF + ((t >> 20) & 1)
    r_norm = t >> 20
    # subnormal range
    r_sub = ((a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.int32, bitcast=True)
             - 0x4B000000)
    r = tl.where(a >= 0x3C800000, r_norm, r_sub)
    r = tl.minimum(r, 0x7E)  # saturate at 448 (0x7E); 0x7F is NaN in e4m3fn
    return (r | ((b >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def ue8m0_ceil(s):
    """Positive normal fp32 -> smallest power of two >= s (exact)."""
    b = s.to(tl.int32, bitcast=True)
    e = (b >> 23) & 0xFF
    e = tl.where((b & 0x7FFFFF) != 0, e + 1, e)
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def quant_scale(amax, eps, USE_UE8M0: tl.constexpr):
    """vLLM's scale: max(amax, eps) / 448 (IEEE divide), rounded up to 2**k if USE_UE8M0."""
    s = tl.math.div_rn(tl.maximum(amax, eps), tl.full(amax.shape, 448.0, tl.float32))
    if USE_UE8M0:
        s = ue8m0_ceil(s)
    return s


@triton.jit
def quant_fp8_bytes(x, scale):
    """x / scale (IEEE divide), clamped to +-448, as e4m3fn bytes (uint8)."""
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return fp8e4m3_rne(y)


# --------------------------------------------------------------------------------------
# torch twins (reference side)
# --------------------------------------------------------------------------------------
def ue8m0_ceil_torch(s: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`ue8m0_ceil`; ``s`` fp32, positive and normal."""
    if s.dtype != torch.float32:
        raise TypeError(f"s: expected float32, got {s.dtype}")
    b = s.contiguous().view(torch.int32)
    e = (b >> 23) & 0xFF
    e = torch.where((b & 0x7FFFFF) != 0, e + 1, e)
    return (e << 23).view(torch.float32)


def quant_scale_torch(amax: torch.Tensor, eps: float, use_ue8m0: bool) -> torch.Tensor:
    """Torch twin of :func:`quant_scale` (fp32)."""
    a = torch.clamp(amax.float(), min=eps)
    # a tensor divisor: torch turns division by a Python scalar into a multiply by its (rounded)
    # reciprocal on CUDA, while vLLM's kernels divide (IEEE) by 448
    s = a / torch.full_like(a, FP8_MAX)
    return ue8m0_ceil_torch(s) if use_ue8m0 else s


def quant_fp8_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`quant_fp8_bytes`: returns float8_e4m3fn (``x`` fp32, ``scale`` broadcastable)."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
