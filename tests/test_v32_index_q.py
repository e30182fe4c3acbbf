"""Index-q prep (``triton_kernels/index_q.py``) and the q_pe RoPE against vLLM 0.33's own ``fused_q``.

The oracle is vLLM's ``_fused_q_kernel`` itself (``vllm/models/deepseek_v32/common/kernels.py``),
loaded with real Triton by ``smpart.integration.v32.vllm_kernels`` (vLLM swaps Triton for a
placeholder on a machine without a GPU driver): under ``TRITON_INTERPRET=1`` on the CPU it runs in
the interpreter, on a GPU compiled. Bytes must be equal on the same backend.

Stand-in named: the interpreter's own fp32 -> bf16 cast truncates (``triton/runtime/interpreter.py``
``_convert_float`` with no rounding mode), where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest
even; for the q_pe comparison vLLM's kernel therefore writes its fp32 RoPE result into an fp32
buffer (its store casts to the buffer's element type) and torch rounds it to bf16 (RNE), which is
what its bf16 store gives on the GPU.
"""

import os

import numpy as np
import pytest
import torch

from smpart.triton_kernels import dims
from smpart.triton_kernels.index_q import index_q_prep, index_q_prep_torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
H = 16  # MLA heads (only the q_pe part uses them)


@pytest.fixture(scope="module")
def vk():
    pytest.importorskip("triton")
    from smpart.integration.v32 import vllm_kernels

    try:
        return vllm_kernels.load()
    except FileNotFoundError as e:
        pytest.skip(f"vLLM's deepseek_v32 kernels.py is not available here: {e}")


def _device():
    return "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _inputs(T, cs_dtype, seed, dev):
    g = torch.Generator().manual_seed(seed)
    max_pos = 8192
    pos = torch.randint(0, max_pos, (T,), generator=g, dtype=torch.int64)
    cs = torch.randn(max_pos, 64, generator=g).to(cs_dtype)
    iq = (torch.randn(T, 64, 128, generator=g) * torch.rand(T, 64, 1, generator=g) * 8).bfloat16()
    iq[0, 0] = 0  # an all-zero head: amax below the 1e-4 floor
    kw = torch.randn(T, 192, generator=g).bfloat16()  # wk_weights_proj output: [index_k | weights]
    q_pe = torch.randn(T, H, 64, generator=g).bfloat16()
    ql_nope = torch.randn(T, H, 512, generator=g).bfloat16()
    return [t.to(dev) for t in (pos, cs, iq, kw[:, 128:], q_pe, ql_nope)]


def _interp_fp8_cast(x: torch.Tensor) -> torch.Tensor:
    """The interpreter's ``.to(tl.float8e4nv)`` (``_convert_float`` with RTNE), for the torch twin."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    b = _convert_float(x.contiguous().cpu().numpy(), tl.float32, tl.float8e4nv, ir.ROUNDING_MODE.RTNE)
    return torch.from_numpy(b.astype(np.uint8)).view(torch.float8_e4m3fn)


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = (a != b).nonzero()
    return "equal" if bad.numel() == 0 else f"{bad.shape[0]} differ, first at {bad[0].tolist()}"


@pytest.mark.parametrize("interleave", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("cs_dtype", [torch.float32, torch.bfloat16], ids=["cs_fp32", "cs_bf16"])
@pytest.mark.parametrize("T,block_h", [(3, 8), (2, 64), (1, 1)])
def test_index_q_prep_bytes_equal_vllm_fused_q(vk, cs_dtype, interleave, T, block_h):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
    dev = _device()
    pos, cs, iq, w, q_pe, ql_nope = _inputs(T, cs_dtype, seed=T * 7 + block_h, dev=dev)
    fp8, w_out, _ = vk.fused_q(pos, q_pe, cs, iq, cs, ql_nope, torch.ones(1, device=dev), w,
                               dims.INDEX_HEAD_DIM ** -0.5, dims.INDEX_N_HEADS ** -0.5, has_indexer=True,
                               index_rope_interleave=interleave, quantize_mqa=False)
    out8 = torch.full_like(iq, 0.5, dtype=torch.float8_e4m3fn)
    out_w = torch.full((T, 64), float("nan"), device=dev)
    index_q_prep(pos, iq, cs, w, out8, out_w, rope_interleave=interleave, block_h=block_h)
    assert torch.equal(out8.view(torch.uint8), fp8.view(torch.uint8)), _first_diff(out8.view(torch.uint8),
                                                                                   fp8.view(torch.uint8))
    assert torch.equal(out_w, w_out), _first_diff(out_w, w_out)


@pytest.mark.parametrize("interleave", [False, True], ids=["neox", "interleaved"])
def test_torch_twin_equals_kernel(interleave):
    """The torch twin with the backend's fp8 cast gives the kernel's bytes (fp32 intermediates agree)."""
    if not INTERPRET:
        pytest.skip("the CPU case needs TRITON_INTERPRET=1; the GPU case is test_index_q_prep_gpu_vs_twin")
    pos, cs, iq, w, _, _ = _inputs(4, torch.float32, seed=11, dev="cpu")
    out8 = torch.empty_like(iq, dtype=torch.float8_e4m3fn)
    out_w = torch.empty(4, 64)
    index_q_prep(pos, iq, cs, w, out8, out_w, rope_interleave=interleave)
    r8, rw, scale = index_q_prep_torch(pos, iq, cs, w, rope_interleave=interleave, fp8_cast=_interp_fp8_cast)
    assert torch.equal(out8.view(torch.uint8), r8.view(torch.uint8)), _first_diff(out8.view(torch.uint8),
                                                                                 r8.view(torch.uint8))
    assert torch.equal(out_w, rw)
    assert bool((torch.frexp(scale).mantissa == 0.5).all()), "scales must be powers of two (UE8M0)"
    assert float(scale[0, 0]) == 2.0 ** -22, "all-zero head: scale = ue8m0(1e-4 / 448) = 2**-22"


@pytest.mark.gpu
def test_index_q_prep_gpu_vs_twin():
    """On the GPU: torch's RNE cast; the kernel's FMA may flip a rare byte, never by more than one code."""
    pos, cs, iq, w, _, _ = _inputs(64, torch.float32, seed=3, dev="cuda")
    out8 = torch.empty_like(iq, dtype=torch.float8_e4m3fn)
    out_w = torch.empty(64, 64, device="cuda")
    index_q_prep(pos, iq, cs, w, out8, out_w)
    r8, rw, _ = index_q_prep_torch(pos, iq, cs, w)
    d = (out8.view(torch.uint8).int() - r8.view(torch.uint8).int()).abs()
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3, _first_diff(out8.view(torch.uint8),
                                                                                    r8.view(torch.uint8))
    assert torch.equal(out_w, rw)


@pytest.mark.parametrize("bad,match", [
    (dict(index_q=lambda a: a.float()), "index_q"),
    (dict(index_q=lambda a: a[:, :32]), "index_q"),
    (dict(positions=lambda a: a.int()), "positions"),
    (dict(cos_sin_cache=lambda a: a[:, :32]), "cos_sin_cache"),
    (dict(index_weights=lambda a: a[:, :32]), "index_weights"),
    (dict(index_q_fp8=lambda a: a.view(torch.uint8)), "index_q_fp8"),
    (dict(index_weights_out=lambda a: a.double()), "index_weights_out"),
])
def test_bad_arguments_are_named(bad, match):
    pos, cs, iq, w, _, _ = _inputs(2, torch.float32, seed=1, dev="cpu")
    kw = dict(positions=pos, index_q=iq, cos_sin_cache=cs, index_weights=w,
              index_q_fp8=torch.empty_like(iq, dtype=torch.float8_e4m3fn), index_weights_out=torch.empty(2, 64))
    for k, f in bad.items():
        kw[k] = f(kw[k])
    with pytest.raises((ValueError, TypeError), match=match):
        index_q_prep(**kw)
    with pytest.raises(ValueError, match="block_h"):
        index_q_prep(pos, iq, cs, w, torch.empty_like(iq, dtype=torch.float8_e4m3fn), torch.empty(2, 64), block_h=3)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(block_h=True), TypeError, "block_h"), (dict(block_h=False), TypeError, "block_h"),
    (dict(block_h=8.0), TypeError, "block_h"), (dict(block_h="8"), TypeError, "block_h"),
    (dict(block_h=0), ValueError, "block_h"), (dict(block_h=-8), ValueError, "block_h"),
    (dict(block_h=128), ValueError, "block_h"), (dict(num_warps=True), TypeError, "num_warps"),
    (dict(num_warps=4.0), TypeError, "num_warps"), (dict(num_warps=3), ValueError, "num_warps"),
    (dict(num_warps=64), ValueError, "num_warps"), (dict(num_warps=0), ValueError, "num_warps"),
])
def test_bad_launch_parameters_are_named(kw, exc, match):
    """block_h / num_warps: a bool or non-int is a TypeError, a bad int a ValueError, before any launch
    (outputs untouched)."""
    pos, cs, iq, w, _, _ = _inputs(2, torch.float32, seed=1, dev="cpu")
    out8, out_w = torch.zeros_like(iq, dtype=torch.float8_e4m3fn), torch.full((2, 64), 7.0)
    with pytest.raises(exc, match=match):
        index_q_prep(pos, iq, cs, w, out8, out_w, **kw)
    assert int(out8.view(torch.uint8).abs().sum()) == 0 and bool((out_w == 7.0).all())


# ---------------------------------------------------------------------------------------------
# q_pe RoPE: our q_b_proj epilogue vs fused_q pid 0 (bf16 query path, quantize_mqa=False)
# ---------------------------------------------------------------------------------------------
def _vllm_q_pe_rope_fp32(vk, pos, q_pe, cs):
    """vLLM's pid-0 RoPE of ``q_pe`` in fp32 (its kernel, launched as ``fused_q`` launches it,
    with an fp32 ``q_pe_out`` so the interpreter's truncating bf16 cast is not applied)."""
    T, nh, _ = q_pe.shape
    out = torch.empty(q_pe.shape, dtype=torch.float32, device=q_pe.device)
    iq = torch.empty(1, 1, 1, dtype=q_pe.dtype, device=q_pe.device)
    w = torch.empty(1, 1, dtype=torch.float32, device=q_pe.device)
    vk._fused_q_kernel[(T, 3, (nh + 1) // 2)](
        pos, q_pe, q_pe.stride(0), q_pe.stride(1), nh, cs, cs.stride(0), cs.shape[-1] // 2,
        iq, iq.stride(0), iq.stride(1), 1, cs, cs.stride(0), cs.shape[-1] // 2,
        iq, 0, 0, 1, q_pe, q_pe.stride(0), q_pe.stride(1), out, out.stride(0), out.stride(1),
        torch.ones(1, device=q_pe.device), 512, 512, out, out.stride(0), out.stride(1),
        w, 0, 1.0, 1.0, w, 0,
        HAS_INDEXER=False, INDEX_ROPE_INTERLEAVE=False, QUANTIZE_MQA=False, USE_PDL=False, FP8_MAX=448.0,
        USE_FNUZ=False, num_warps=1,
    )
    return out


@pytest.mark.parametrize("mode,cs_dtype", [("generic", torch.float32), ("fused_q", torch.float32),
                                           ("fused_q", torch.bfloat16)])
def test_q_b_proj_epilogue_rope_equals_fused_q_pid0(vk, mode, cs_dtype):
    """Our epilogue RoPE (on the bf16 GEMM output) gives vLLM's ``fused_q`` pid-0 bytes, RNE-rounded:
    with ``rope_fused_q=True`` for vLLM's fp32 (FlashInfer on CUDA) and bf16 tables, and in the
    generic mode (``rotary_embedding`` rounding) for the fp32 table only (with a bf16 table that mode
    rounds each product to bf16, as vLLM's generic path does, and differs). ``rope_k_pe=False``
    leaves ``k_pe`` untouched. On the GPU (fused_q mode only) vLLM's compiled kernel contracts
    ``x1 * cos - x2 * sin`` into an FMA (seen in its sm_90 PTX), as the fused_q mode's identical
    expression is expected to; this case checks that on the device."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
    if not INTERPRET and mode == "generic":
        pytest.skip("on the GPU vLLM's kernel contracts into FMAs, which the generic mode avoids on purpose")
    from smpart.triton_kernels.q_b_proj import q_b_proj_rope

    g = torch.Generator().manual_seed(5)
    T = 3
    N = H * dims.QK_HEAD_DIM
    q_c = torch.randn(T, dims.Q_LORA_RANK, generator=g).bfloat16()
    w = (torch.randn(N, dims.Q_LORA_RANK, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = 2.0 ** torch.randint(-14, -10, (N // 128, dims.Q_LORA_RANK // 128), generator=g).float()
    pos = torch.tensor([0, 77, 4095], dtype=torch.int64)
    cs = torch.randn(4096, 64, generator=g).to(cs_dtype)
    k_pe = torch.randn(T, 1, 64, generator=g).bfloat16()
    dev = _device()
    q_c, w, ws, pos, cs, k_pe = (t.to(dev) for t in (q_c, w, ws, pos, cs, k_pe))
    plain = torch.empty(T, H, dims.QK_HEAD_DIM, dtype=torch.bfloat16, device=dev)
    roped = torch.empty_like(plain)
    q_b_proj_rope(q_c, w, ws, pos, cs, k_pe.clone(), plain, apply_rope=False)
    k_pe_out = k_pe.clone()
    fq = mode == "fused_q"
    q_b_proj_rope(q_c, w, ws, pos, cs, k_pe_out, roped, apply_rope=True, rope_fused_q=fq, rope_k_pe=not fq)
    if INTERPRET:
        want = _vllm_q_pe_rope_fp32(vk, pos, plain[..., dims.QK_NOPE_HEAD_DIM:], cs).to(torch.bfloat16)
    else:  # the GPU: vLLM's compiled fused_q with its own bf16 store
        T_ = plain.shape[0]
        _, _, want = vk.fused_q(pos, plain[..., dims.QK_NOPE_HEAD_DIM:], cs, None, None,
                                torch.zeros(T_, H, 512, dtype=torch.bfloat16, device=dev),
                                torch.ones(1, device=dev), None, 0.0, 0.0, has_indexer=False, quantize_mqa=False)
    got = roped[..., dims.QK_NOPE_HEAD_DIM:]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), _first_diff(got.float(), want.float())
    assert torch.equal(roped[..., : dims.QK_NOPE_HEAD_DIM], plain[..., : dims.QK_NOPE_HEAD_DIM])
    assert torch.equal(k_pe_out, k_pe) == fq, "rope_k_pe=False must leave k_pe untouched, True must rope it"


def test_out_of_range_positions_are_clamped():
    """With value checks off (graph capture) a position past the RoPE table (or negative) reads its
    last (first) row, never past the table: kernel and twin agree with the clamped positions."""
    if not INTERPRET:
        pytest.skip("the CPU case needs TRITON_INTERPRET=1")
    pos, cs, iq, w, _, _ = _inputs(4, torch.float32, seed=12, dev="cpu")
    bad = pos.clone()
    bad[0], bad[1] = cs.shape[0] + 1000, -5
    clamped = bad.clamp(0, cs.shape[0] - 1)
    outs = []
    for p in (bad, clamped):
        out8 = torch.empty_like(iq, dtype=torch.float8_e4m3fn)
        out_w = torch.empty(4, 64)
        index_q_prep(p, iq, cs, w, out8, out_w, rope_interleave=False)
        outs.append(out8.view(torch.uint8))
    assert torch.equal(outs[0], outs[1]), _first_diff(outs[0], outs[1])
    r8, _, _ = index_q_prep_torch(bad, iq, cs, w, rope_interleave=False, fp8_cast=_interp_fp8_cast)
    assert torch.equal(outs[0], r8.view(torch.uint8)), _first_diff(outs[0], r8.view(torch.uint8))
