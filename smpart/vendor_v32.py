"""vLLM 0.33's production DSV3.2 model's own kernels on the region: ``vllm_v32`` / ``vllm_v32_dual_stream``.

What ``vllm/models/deepseek_v32/attention.py::DeepseekV32Attention.forward`` (vLLM 0.33.0) launches
for the region on an sm_90 decode step (docs/VLLM.md, "Which model code"), on :class:`smpart.region.RegionArgs` with the
production options (``smpart.prep``: ``index_q`` etc. given):

1. q side (``q_b_proj``): ``torch.ops._C.per_token_group_fp8_quant`` (UE8M0) + DeepGEMM
   ``fp8_gemm_nt`` into ``q`` (:func:`smpart.vendor.vllm_q_side`'s first two launches). vLLM's
   Hopper op ``dynamic_flashinfer_deepgemm_blockscale_gemm`` takes FlashInfer's swap-AB
   ``fp8_blockscale_gemm_sm90`` for M < 32; FlashInfer is not available on the lent GPU machines
   (no registry, torch 2.11), so DeepGEMM runs at every M here: stated with every result.
2. vLLM's ``fused_q`` (Triton ``_fused_q_kernel``, one launch, ``quantize_mqa`` off: bf16 queries for
   FlashMLA sparse on sm_90): pid 0 the q_pe RoPE, pid 1 the index-q RoPE + FP8 + weight scaling.
   Loaded from vLLM's own file by :mod:`smpart.integration.v32.vllm_kernels` (``$SMPART_VLLM_V32_KERNELS``
   on the GPU machine). It returns fresh ``index_q_fp8`` / weights / ``q_pe`` tensors as in vLLM;
   the logits read them directly, and one extra copy puts the roped ``q_pe`` into ``q[..., 128:]``
   (the region's contract; vLLM passes ``q_pe_out`` on instead). ``args.index_q_fp8`` /
   ``args.index_weights`` are not written by these paths.
3. DeepGEMM ``fp8_fp4_paged_mqa_logits`` and vLLM's decode top-k (``cooperative_topk`` <= 64 rows,
   else ``persistent_topk``), as :func:`smpart.vendor.vllm_indexer_tail` launches them, without the
   key write and the fill (``fused_norm_rope`` did them) unless ``write_keys`` / ``fill`` ask for them.

``vllm_v32``: that order on one stream. ``vllm_v32_dual_stream``: the seed's proposal on this model,
the q side (quant + GEMM + ``fused_q`` pid 0 alone) on an aux stream beside the indexer (``fused_q``
pid 1 alone + logits + top-k); splitting ``fused_q`` costs one extra launch. Unavailable pieces (no CUDA, no DeepGEMM, no vLLM ops, no vLLM kernels file) raise
``RuntimeError`` with the reason, like the generic vendor paths.
"""

from __future__ import annotations

import torch

from .triton_kernels import dims
from .vendor import _config_get, _q_gemm, _vendor_state, _vllm_topk


def load_fused_q():
    """vLLM 0.33's ``fused_q`` (``vllm/models/deepseek_v32/common/kernels.py``) with real Triton kernels.

    Raises
    ------
    RuntimeError : the file is not found (no vLLM and no ``$SMPART_VLLM_V32_KERNELS``) or does not load.
    """
    from smpart.integration.v32 import vllm_kernels

    try:
        return vllm_kernels.load().fused_q
    except Exception as e:  # noqa: BLE001 - reported as "unavailable" (run_region's contract)
        raise RuntimeError(f"vllm_v32*: vLLM's deepseek_v32 kernels.py unavailable ({type(e).__name__}: {e}); "
                           f"set {vllm_kernels.ENV} (python -m smpart.integration.v32.vllm_kernels .vllm_v32)") from e


def v32_available() -> tuple[bool, str]:
    """Whether ``vllm_v32`` / ``vllm_v32_dual_stream`` can run here: CUDA sm_90+, DeepGEMM and vLLM's
    compiled ops (``smpart.vendor.vendor_available``) and vLLM's ``fused_q`` kernels file
    (:func:`load_fused_q`).

    Returns
    -------
    (ok, reason): ``reason`` says what is missing (or where DeepGEMM and the ops came from).
    """
    from .vendor import vendor_available

    ok, why = vendor_available()
    if not ok:
        return False, why
    try:
        load_fused_q()
    except RuntimeError as e:
        return False, str(e)
    return True, why


def _fused_q(args, vs, fused_q, part: str = "both"):
    """vLLM's call (attention.py, ``quantize_mqa`` off); returns (index_q_fp8, index_weights_out).

    ``part``: ``both`` (the model's one launch), ``q_pe`` (``has_indexer=False``: pid 0 only, vLLM's
    shared-layer call) or ``index`` (zero MLA heads: pid 1 only; the same kernel, a grid whose pid-0
    programs have no head to do)."""
    from .triton_kernels.index_q import HEAD_SCALE, SOFTMAX_SCALE

    q_nope, q_pe = args.q.split([dims.QK_NOPE_HEAD_DIM, dims.QK_ROPE_HEAD_DIM], dim=-1)
    if getattr(vs, "v32_q_scale", None) is None:
        vs.v32_q_scale = torch.ones(1, dtype=torch.float32, device=args.q.device)  # layer._q_scale
    if part == "index":
        q_nope, q_pe = q_nope[:, :0], q_pe[:, :0]
    has_indexer = part != "q_pe"
    q8, w, q_pe_out = fused_q(args.positions, q_pe, vs.cos_sin_cache, args.index_q if has_indexer else None,
                              args.index_cos_sin_cache if has_indexer else None, q_nope, vs.v32_q_scale,
                              args.index_weights_raw if has_indexer else None, SOFTMAX_SCALE, HEAD_SCALE,
                              has_indexer=has_indexer, index_rope_interleave=args.index_rope_interleave,
                              quantize_mqa=False)
    if part != "index":
        q_pe.copy_(q_pe_out)  # the region's contract: roped q_pe in q (vLLM hands q_pe_out on)
    return q8, w


def _indexer(args, vs, q8, w, use_ue8m0: bool, config) -> None:
    T, next_n = args.num_tokens, args.next_n
    B = T // next_n
    if args.write_keys:
        vs.ops.indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping, dims.INDEX_HEAD_DIM,
                                         "ue8m0" if use_ue8m0 else "fp32")
    if args.fill:
        args.topk_indices.fill_(-1)
    ctx2d = vs.context_lens_view(T, next_n)
    max_model_len = int(_config_get(config, "max_model_len", vs.max_len))
    q = q8.view(B, next_n, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM)
    logits = vs.dg.fp8_fp4_paged_mqa_logits((q, None), args.kv_cache.unsqueeze(-2), w, ctx2d, args.block_table,
                                            vs.schedule_meta, max_model_len)
    _vllm_topk(vs, logits, ctx2d, args.topk_indices, next_n, config, "vllm_v32*")


def _check(args) -> None:
    if args.rope_k_pe:
        raise ValueError("rope_k_pe: vllm_v32* run the production model's fused_q, which does not rope k_pe "
                         "(its fused_norm_rope does): pass rope_k_pe=False")


def run_vllm_v32(args, workspace, config, use_ue8m0):
    """q_b_proj (quant + DeepGEMM), ``fused_q``, paged logits, top-k: the model's order on one stream
    (vLLM 0.33 ``vllm/models/deepseek_v32/attention.py::DeepseekV32Attention.forward``).

    Parameters
    ----------
    args : RegionArgs
        The production region (``index_q`` / ``index_weights_raw`` / ``index_cos_sin_cache`` given,
        ``rope_k_pe=False``; ``smpart.prep.to_production``), CUDA tensors; outputs as ``run_region``.
    workspace : RegionWorkspace
        Holds the vendor state (DeepGEMM schedule metadata, streams, events) between calls.
    config : dict or None
        ``topk_backend`` (vLLM's top-k kernel choice) and ``max_model_len`` (DeepGEMM's logits width;
        default the workspace's ``max_len``).
    use_ue8m0 : bool
        Power-of-two FP8 scales (vLLM's ``use_ue8m0``).

    Raises
    ------
    ValueError
        ``args.rope_k_pe`` is True (the production ``fused_q`` does not rope ``k_pe``).
    RuntimeError
        vLLM's ``fused_q`` kernels file, DeepGEMM or vLLM's compiled ops are unavailable
        (:func:`load_fused_q`, :func:`v32_available`).
    """
    _check(args)
    fused_q = load_fused_q()
    vs = _vendor_state(args, workspace, use_ue8m0)
    vs.dg.set_num_sms(vs.num_sms)
    _q_gemm(args, vs, use_ue8m0)
    q8, w = _fused_q(args, vs, fused_q)
    _indexer(args, vs, q8, w, use_ue8m0, config)


def run_vllm_v32_dual_stream(args, workspace, config, use_ue8m0):
    """The seed's proposal on this model: the q side (quant + GEMM + ``fused_q`` pid 0, vLLM's
    ``has_indexer=False`` call) on the aux stream, beside the indexer (``fused_q`` pid 1 alone, logits,
    top-k) on the current stream; forked and joined by two events (vLLM
    ``vllm/utils/multi_stream_utils.py::maybe_execute_in_parallel``).

    Parameters and Raises: as :func:`run_vllm_v32` (same arguments, same errors).
    """
    _check(args)
    fused_q = load_fused_q()
    vs = _vendor_state(args, workspace, use_ue8m0)
    vs.dg.set_num_sms(vs.num_sms)
    vs.event0.record()
    q8, w = _fused_q(args, vs, fused_q, part="index")
    _indexer(args, vs, q8, w, use_ue8m0, config)
    with torch.cuda.stream(vs.aux_stream):
        vs.event0.wait()
        _q_gemm(args, vs, use_ue8m0)
        _fused_q(args, vs, fused_q, part="q_pe")
        vs.event1.record()
    vs.event1.wait()


__all__ = ["load_fused_q", "v32_available", "run_vllm_v32", "run_vllm_v32_dual_stream"]
