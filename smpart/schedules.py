"""Triton execution paths of the region: ``sequential``, ``dual_stream``, ``green_ctx``.

All three run the same standalone kernels; only the scheduling differs (docs/ARCHITECTURE.md):

* ``sequential``: indexer tail then q side, one stream (vLLM's order).
* ``dual_stream``: q side on an aux stream, indexer tail on the current stream, fork/join with
  events (vLLM ``vllm/utils/multi_stream_utils.py::maybe_execute_in_parallel``; SGLang's
  alt-stream pattern). Capturable: the fork joins inside the captured region.
* ``green_ctx``: the same two chains, each on the stream of a ``torch.cuda.green_contexts``
  context with a fixed SM count (``config``: ``(indexer_sms, gemm_sms)``; the driver rounds SM
  counts up to multiples of 8 and may grant fewer).
"""

from __future__ import annotations

import torch

from .prep import index_q_side
from .triton_kernels.fill import fill_topk_indices
from .triton_kernels.indexer_cache import indexer_k_quant_and_cache
from .triton_kernels.mqa_logits import paged_mqa_logits
from .triton_kernels.q_b_proj import q_b_proj_rope
from .triton_kernels.radix_topk import hist_fed
from .triton_kernels.topk import topk


def indexer_tail(args, ws, use_ue8m0: bool) -> None:
    """[Index-q prep,] key write, fill, logits, top-k on the current stream (``RegionArgs``'s
    ``index_q`` / ``write_keys`` / ``fill`` switch the optional launches; ``smpart.prep``).

    The logits and the top-k: :func:`logits_and_topk`.
    """
    T = args.num_tokens
    index_q_side(args)  # index-q prep first when RegionArgs.index_q is given (smpart.prep)
    if args.write_keys:
        indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping, use_ue8m0=use_ue8m0)
    if args.fill:
        fill_topk_indices(args.topk_indices, T)
    logits_and_topk(args, ws)


def logits_and_topk(args, ws) -> None:
    """Paged logits into ``ws.logits``, then the top-k (``topk.topk`` with the default
    ``RadixTopkConfig``: the sampled top-k) into ``args.topk_indices`` (the part of
    :func:`indexer_tail` after the key write and the fill; ``smpart.bench.kernels`` times it).

    With ``algo="radix"``, up to ``radix_topk.FED_MAX_POSITIONS`` rows x positions (``hist_fed``) the logits kernel also
    fills ``ws.radix``'s histograms and the top-k (``hist_ready=True``) selects from them and
    zeroes them; above it the top-k builds them in a pass of its own.
    """
    # each row's length is clamped (in the top-k kernel) to the workspace and to the block table's
    # capacity: the logits kernel never wrote past the table, whatever context_lens says
    cap = ws.visible_cols(args)
    cfg = None  # RadixTopkConfig's defaults: the sampled top-k
    fed = hist_fed(args.num_tokens, cap, cfg)  # radix only; large shapes: its own histogram pass is cheaper
    paged_mqa_logits(args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table, args.context_lens,
                     ws.logits, next_n=args.next_n, hist=ws.radix.hist if fed else None)
    # check_values=False: run_region checked the workspace's clean state before the first launch
    topk(ws.logits, args.context_lens, args.topk_indices, next_n=args.next_n, workspace=ws.radix,
         max_len=cap, hist_ready=fed, config=cfg, check_values=False)


def q_side(args, use_ue8m0: bool, ws=None) -> None:
    """q_b_proj with activation quant and RoPE epilogue, plus k_pe RoPE (``args.rope_k_pe``; the q_pe
    RoPE rounded as vLLM's ``fused_q`` with ``args.rope_fused_q``).

    With a workspace (``ws.q_c_fp8``): two launches, ``q_c`` quantized once per token, then the
    GEMM on the FP8 activations (``q_b_proj_rope(q_c_fp8=...)``); else one launch that quantizes in
    every tile's K loop. Same bytes; on the H200 (2026-11-30, H=128, cold L2) the two launches took
    17.6 / 19.3 / 22.4 / 34.7 us at T = 1 / 32 / 64 / 128 against 18.0 / 25.0 / 41.7 / 69.6 for the
    one launch.
    """
    xq = getattr(ws, "q_c_fp8", None)
    xs = getattr(ws, "q_c_scale", None)
    q_b_proj_rope(args.q_c, args.q_b_proj_weight, args.q_b_proj_weight_scale, args.positions, args.cos_sin_cache,
                  args.k_pe, args.q, use_ue8m0=use_ue8m0, q_c_fp8=xq, q_c_scale=xs,
                  rope_fused_q=args.rope_fused_q, rope_k_pe=args.rope_k_pe)


def run_sequential(args, ws, config, use_ue8m0):
    """The ``sequential`` path: :func:`indexer_tail` then :func:`q_side` on the current stream.

    Parameters
    ----------
    args : RegionArgs
        Validated region tensors (``smpart.validate.validate_region_args``); outputs written in
        place: ``args.topk_indices`` (int32 ``[T, 2048]``), ``args.q`` (bf16 ``[T, H, 192]``),
        ``args.k_pe`` (RoPE in place) and, with ``write_keys``, the FP8 indexer cache.
    ws : RegionWorkspace
        Scratch for ``args``' shape (``smpart.workspace``).
    config : None
        Unused (the path has no tunables); accepted for the ``PATHS`` call signature.
    use_ue8m0 : bool
        Power-of-two (UE8M0) FP8 scales, as vLLM's ``use_ue8m0`` (DeepGEMM on Blackwell).

    Returns
    -------
    None
    """
    indexer_tail(args, ws, use_ue8m0)
    q_side(args, use_ue8m0, ws)


def _two_streams(args, ws, use_ue8m0, idx_stream, aux_stream):
    cur = torch.cuda.current_stream()
    fork = torch.cuda.Event()
    fork.record(cur)
    aux_stream.wait_event(fork)
    idx_stream.wait_event(fork)
    with torch.cuda.stream(aux_stream):
        q_side(args, use_ue8m0, ws)
    with torch.cuda.stream(idx_stream):
        indexer_tail(args, ws, use_ue8m0)
    for s in {aux_stream, idx_stream}:
        if s is not cur:
            done = torch.cuda.Event()
            done.record(s)
            cur.wait_event(done)


def run_dual_stream(args, ws, config, use_ue8m0):
    """The ``dual_stream`` path: :func:`q_side` on an aux stream, :func:`indexer_tail` on the current one.

    Fork/join with CUDA events (vLLM ``vllm/utils/multi_stream_utils.py::maybe_execute_in_parallel``);
    the aux stream is created once and cached in ``ws.extra["aux_stream"]``. On a non-CUDA device
    it runs :func:`run_sequential` (one stream is all a CPU has).

    Parameters
    ----------
    args, ws, use_ue8m0
        As :func:`run_sequential`.
    config : None
        Unused (no tunables); accepted for the ``PATHS`` call signature.

    Returns
    -------
    None
    """
    if args.q_c.device.type != "cuda":
        run_sequential(args, ws, config, use_ue8m0)  # one stream is all a CPU has
        return
    aux = ws.extra.get("aux_stream")
    if aux is None:
        aux = ws.extra["aux_stream"] = torch.cuda.Stream(device=args.q_c.device)
    _two_streams(args, ws, use_ue8m0, torch.cuda.current_stream(), aux)


def green_contexts(ws, indexer_sms: int, gemm_sms: int, device):
    """Two green contexts (indexer, GEMM) cached on the workspace; returns their streams.

    Raises
    ------
    RuntimeError : green contexts unsupported by this torch/driver (the message says why).
    """
    key = ("green", indexer_sms, gemm_sms)
    if key in ws.extra:
        return ws.extra[key]
    try:
        from torch.cuda.green_contexts import GreenContext
    except ImportError as e:  # pragma: no cover - torch without the module
        raise RuntimeError(f"green_ctx: torch.cuda.green_contexts unavailable ({e})") from e
    dev = torch.device(device).index or 0
    try:
        ctxs = [GreenContext.create(num_sms=n, device_id=dev) for n in (indexer_sms, gemm_sms)]
    except Exception as e:  # noqa: BLE001 - report the driver's reason
        raise RuntimeError(f"green_ctx: cannot create green contexts ({type(e).__name__}: {e})") from e
    streams = tuple(c.Stream() for c in ctxs)
    ws.extra[key] = (ctxs, streams)
    return ws.extra[key]


def green_split(num_sms: int, config=None) -> tuple[int, int]:
    """The ``(indexer_sms, gemm_sms)`` the ``green_ctx`` path asks the driver for; pure, no device.

    Parameters
    ----------
    num_sms : int
        The device's SM count (``multi_processor_count``).
    config : tuple of (int, int) or None
        An explicit split (each count >= 1, checked by ``run_region``); ``None`` gives the indexer a
        quarter of the SMs rounded down to a multiple of 8 (green contexts come in multiples of 8)
        and the GEMM the rest: 32 of 132 on an H100 / H200.

    Returns
    -------
    tuple of (int, int)
        ``(indexer_sms, gemm_sms)``.

    Raises
    ------
    ValueError
        A count exceeds ``num_sms``; or ``config`` is ``None`` and ``num_sms < 32``, where the
        default split would give the indexer 0 SMs (the driver would then fail creating the
        context): pass ``config=(indexer_sms, gemm_sms)`` explicitly.
    """
    if config is None:
        indexer_sms = num_sms // 4 // 8 * 8
        if indexer_sms < 1:
            raise ValueError(f"config: green_ctx's default split (a quarter of the SMs, in multiples of 8) gives the "
                             f"indexer 0 of this device's {num_sms} SMs (it needs >= 32); pass "
                             f"config=(indexer_sms, gemm_sms) explicitly")
        config = (indexer_sms, num_sms - indexer_sms)
    indexer_sms, gemm_sms = config
    if indexer_sms > num_sms or gemm_sms > num_sms:
        raise ValueError(f"config: green_ctx SM counts {(indexer_sms, gemm_sms)} exceed the device's {num_sms} SMs")
    return indexer_sms, gemm_sms


def run_green_ctx(args, ws, config, use_ue8m0):
    """The ``green_ctx`` path: the two chains of :func:`run_dual_stream`, each on the stream of a
    ``torch.cuda.green_contexts`` context with a fixed SM count.

    Parameters
    ----------
    args, ws, use_ue8m0
        As :func:`run_sequential`.
    config : tuple of (int, int) or None
        ``(indexer_sms, gemm_sms)``; ``None`` gives the indexer a quarter of the SMs (rounded down
        to a multiple of 8) and the GEMM the rest. The driver rounds SM counts up to multiples of
        8 and may grant fewer.

    Returns
    -------
    None

    Raises
    ------
    RuntimeError
        Not a CUDA device, or green contexts unsupported by this torch/driver (:func:`green_contexts`).
    ValueError
        ``config`` asks for more SMs than the device has, or ``config`` is ``None`` on a device with
        fewer than 32 SMs (:func:`green_split`); raised before any green context is made.
    """
    if args.q_c.device.type != "cuda":
        raise RuntimeError("green_ctx: needs a CUDA device")
    num_sms = torch.cuda.get_device_properties(args.q_c.device).multi_processor_count
    indexer_sms, gemm_sms = green_split(num_sms, config)
    _, (idx_stream, gemm_stream) = green_contexts(ws, indexer_sms, gemm_sms, args.q_c.device)
    _two_streams(args, ws, use_ue8m0, idx_stream, gemm_stream)
