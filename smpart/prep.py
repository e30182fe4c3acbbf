"""The production-model options of :class:`smpart.region.RegionArgs`: index-q prep and the switches.

vLLM 0.33's production CUDA DSV3.2 model (``vllm/models/deepseek_v32/attention.py::DeepseekV32Attention
.forward``, docs/VLLM.md) already writes the indexer key cache, fills ``topk_indices`` with -1 and ropes
``k_pe`` in ``fused_norm_rope``, and hands the region a bf16 ``index_q`` with raw weights (its
``fused_q`` pid 1 does the index-q RoPE + FP8 quant + weight scaling). So ``RegionArgs`` carries:

* ``index_q`` bf16 ``[T, 64, 128]``, ``index_weights_raw`` bf16/fp32 ``[T, 64]``,
  ``index_cos_sin_cache`` fp32/bf16 ``[max_pos, 64]`` (the indexer RoPE's table, indexed by
  ``positions``), ``index_rope_interleave`` (the model's ``indexer_rope_interleave``): given, every path
  first runs the index-q prep (:func:`smpart.triton_kernels.index_q.index_q_prep`, byte-exact to vLLM's
  ``_fused_q_kernel`` pid 1) into ``index_q_fp8`` / ``index_weights``, which are then outputs;
* ``write_keys`` (indexer key write), ``fill`` (the -1 fill), ``rope_k_pe`` (``k_pe`` roped in place),
  ``rope_fused_q`` (q_pe RoPE rounded as ``fused_q`` pid 0: fp32 math, one rounding): the generic
  model's defaults are ``True, True, True, False``; the production model's ``False, False, False, True``.

:func:`check_prep_args` validates them (TypeError / ValueError naming the field), :func:`index_q_side`
launches the prep, :func:`production_defaults` lists the production model's switch values.
"""

from __future__ import annotations

import torch

SWITCHES = ("write_keys", "fill", "rope_k_pe", "rope_fused_q", "index_rope_interleave")
PREP_TENSORS = ("index_q", "index_weights_raw", "index_cos_sin_cache")


def production_defaults() -> dict:
    """The switch values of vLLM 0.33's production CUDA model (``fused_norm_rope`` does the rest)."""
    return dict(write_keys=False, fill=False, rope_k_pe=False, rope_fused_q=True)


def has_prep(args) -> bool:
    """Does ``args`` ask for the index-q prep (``index_q`` given)?"""
    return getattr(args, "index_q", None) is not None


def check_prep_args(args, check_values: bool = False) -> None:
    """Validate the production-model fields of a ``RegionArgs`` (metadata; positions when ``check_values``).

    Raises
    ------
    TypeError : a switch that is not a bool, a prep field that is not a tensor (message names it).
    ValueError : prep fields given without ``index_q`` (or ``index_q`` without them), wrong dtype /
        shape / device / strides (``index_q`` must have exactly T rows), positions outside
        ``index_cos_sin_cache`` (value checks).
    """
    for name in SWITCHES:
        v = getattr(args, name)
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {v!r}")
    given = {n: getattr(args, n) for n in PREP_TENSORS if getattr(args, n) is not None}
    for n, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor or None, got {type(t).__name__}")
    if not given:
        if args.index_rope_interleave:
            raise ValueError("index_rope_interleave: True without index_q (it only applies to the index-q prep)")
        return
    missing = [n for n in PREP_TENSORS if n not in given]
    if missing:
        raise ValueError(f"{missing[0]}: the index-q prep needs {PREP_TENSORS} together; "
                         f"got only {sorted(given)}")
    from .triton_kernels.index_q import check_index_q_prep_args

    check_index_q_prep_args(args.positions, args.index_q, args.index_cos_sin_cache, args.index_weights_raw,
                            args.index_q_fp8, args.index_weights)
    T = args.num_tokens
    if args.index_q.shape[0] != T:
        raise ValueError(f"index_q: expected {T} rows (the batch's T), got {args.index_q.shape[0]}")
    if args.index_weights_raw.shape[0] != T:
        raise ValueError(f"index_weights_raw: expected {T} rows (the batch's T), got {args.index_weights_raw.shape[0]}")
    if args.index_q.device != args.q_c.device:
        raise ValueError(f"index_q: expected device {args.q_c.device}, got {args.index_q.device}")
    if check_values:
        n = args.index_cos_sin_cache.shape[0]
        pos = args.positions.cpu()
        if T and ((pos < 0).any() or (pos >= n).any()):
            raise ValueError(f"positions: expected values in [0, {n}) (index_cos_sin_cache rows), "
                             f"got [{pos.min().item()}, {pos.max().item()}]")
        bad = ~torch.isfinite(args.index_cos_sin_cache[args.positions])  # index_q etc.: validate._check_finite
        if bad.any():
            raise ValueError(f"index_cos_sin_cache: non-finite value at rows at positions {bad.nonzero()[0].tolist()}; "
                             f"inputs must be finite")


def index_q_side(args) -> None:
    """Launch the index-q prep of ``args`` (no-op without ``index_q``): writes ``index_q_fp8`` and
    ``index_weights`` (vLLM ``fused_q`` pid 1 bytes; DSV3.2 scales ``128**-0.5`` and ``64**-0.5``)."""
    if not has_prep(args):
        return
    from .triton_kernels.index_q import index_q_prep

    index_q_prep(args.positions, args.index_q, args.index_cos_sin_cache, args.index_weights_raw,
                 args.index_q_fp8, args.index_weights, rope_interleave=args.index_rope_interleave)


def to_production(args, use_ue8m0: bool = True, seed: int = 0):
    """A copy of a generic ``RegionArgs`` set up as the production model hands the region over.

    The new keys are written into a copy of ``kv_cache`` first (as vLLM's ``fused_norm_rope`` does),
    ``topk_indices`` is a -1-filled copy, ``index_q`` / ``index_weights_raw`` are seeded bf16 randoms,
    ``index_cos_sin_cache`` is DSV3.2's YaRN table in fp32, the prep's outputs ``index_q_fp8`` /
    ``index_weights`` are fresh buffers, and the switches are :func:`production_defaults`. For
    benchmarks and tests (allocates; not for the decode step).
    """
    import dataclasses

    from . import reference

    T, dev = args.num_tokens, args.q_c.device
    g = torch.Generator().manual_seed(seed)
    kv = args.kv_cache.clone()
    reference.indexer_k_quant_and_cache(args.index_k, kv, args.slot_mapping, use_ue8m0)
    H_I, D_I = args.index_q_fp8.shape[1], args.index_q_fp8.shape[2]
    return dataclasses.replace(
        args, kv_cache=kv, topk_indices=torch.full_like(args.topk_indices, -1), k_pe=args.k_pe.clone(),
        q=args.q.clone(), index_q_fp8=torch.zeros_like(args.index_q_fp8),
        index_weights=torch.zeros_like(args.index_weights),
        index_q=torch.randn(T, H_I, D_I, generator=g).to(torch.bfloat16).to(dev),
        index_weights_raw=torch.randn(T, H_I, generator=g).to(torch.bfloat16).to(dev),
        index_cos_sin_cache=reference.make_cos_sin_cache(args.cos_sin_cache.shape[0], dtype=torch.float32,
                                                         device=dev),
        index_rope_interleave=False, **production_defaults(),
    )


def is_generic(args) -> bool:
    """No production option in use (the generic model's region: what ``vllm_sequential`` /
    ``vllm_dual_stream`` run)."""
    return (not has_prep(args) and args.write_keys and args.fill and args.rope_k_pe and not args.rope_fused_q
            and not args.index_rope_interleave)


__all__ = ["SWITCHES", "PREP_TENSORS", "production_defaults", "has_prep", "check_prep_args", "index_q_side",
           "to_production", "is_generic"]
