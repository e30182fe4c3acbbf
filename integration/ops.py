"""The fused DSV3.2 decode region as ONE torch custom op for vLLM 0.33: ``torch.ops.smpart.dsv32_region``.

Registered the way vLLM registers its own fused ops (``vllm.utils.torch_utils.direct_register_custom_op``,
into a ``smpart`` op library), declaring what it mutates (``q``, ``k_pe``, the indexer ``kv_cache``
and the model's ``topk_indices_buffer``) and with a fake impl, so torch.compile treats it as
opaque. Like ``vllm/model_executor/layers/sparse_attn_indexer.py::sparse_attn_indexer`` it reads
the per-step metadata (``slot_mapping``, the decode ``block_table`` and ``seq_lens``) from
``get_forward_context().attn_metadata[k_cache_prefix]`` (a ``DeepseekV32IndexerMetadata``).

What one call does
------------------
* **Fused**: the step is decode-only (no prefill rows), ``T = num_decode_tokens <= 256``, the
  decode layout is one vLLM 0.33 produces for plain decode (``seq_lens`` ``[B, 1]``), native
  MTP (``[B, 2]``) or per-token flattening (``[T, 1]`` with an expanded block table), and the
  ``q_b_proj`` weights are W8A8 block FP8 with power-of-two (UE8M0) scales. Then a
  :class:`~smpart.region.RegionArgs` is built from **views** of the op's inputs
  and of the metadata (no copy), the :class:`~smpart.workspace.RegionWorkspace`
  is taken from a cache (made once per (rows bucket, max_len, device)), and
  ``run_region(args, path=..., check_values=False)`` writes ``q`` (``q_b_proj`` + interleaved
  RoPE), ``k_pe`` (roped in place), the new indexer keys into ``kv_cache`` and the top-2048 into
  ``topk_indices_buffer[:T]``. The path is ``$SMPART_DSV32_PATH`` when set, else the tuning
  cache's choice for the shape bucket (``smpart.tuning.choose``: the partitioned
  kernel unless a tuned entry says otherwise); nothing is tuned in the forward. A bucket tuned to
  vLLM's own computation (``vllm_*``, ``smpart.tuning.VENDOR_PATHS``) runs the fallback below: vLLM's
  own modules, with vLLM's per-step metadata (``runs_vllm``).
* **Fallback** (prefill or mixed batches, profile/dummy runs, DCP, non-uniform decode lengths,
  ...): exactly the computation of vLLM's ``MultiHeadLatentAttentionWrapper.forward`` for this
  region, with vLLM's own modules of the layer: ``q = q_b_proj(q_c)``, ``rotary_emb`` on
  ``q[..., 128:]`` and ``k_pe``, then ``indexer.indexer_op(hidden_states, q_fp8, k, weights)``
  (vLLM's ``sparse_attn_indexer``, with its ``skip_topk_buffer_clear=False``). One log line per
  reason (``logging.getLogger("vllm.smpart_dsv32")``).

Why the routing lives in the op and not in the layer's Python: vLLM traces the model forward
once with torch.compile (``@support_torch_compile``) and drops guards, so a Python branch on the
step's metadata would be frozen at trace time. Everything metadata-dependent therefore happens
here, at run time, as in vLLM's own ``sparse_attn_indexer``.

CUDA graphs and the eager break (vLLM 0.33, read from ``vllm/compilation/breakable_cudagraph.py``,
``vllm/config/compilation.py``, ``vllm/v1/cudagraph_dispatcher.py``, ``vllm/v1/worker/gpu_model_runner.py``)
-----------------------------------------------------------------------------------------------------
``@eager_break_during_capture`` only acts when ``VLLM_USE_BREAKABLE_CUDAGRAPH=1`` (default 0),
cudagraphs are on and there is no micro-batching: the model is then wrapped in a
``BreakableCUDAGraphWrapper`` for **PIECEWISE** dispatch only, and a decorated op (vLLM's
``sparse_attn_indexer``) ends the capture segment and runs eagerly, launch by launch, at every
replay. In **FULL** runtime mode the decorator calls the function directly, so it is captured.
Without breakable graphs, piecewise capture splits the FX graph at ``splitting_ops``, which by
default include ``vllm::sparse_attn_indexer`` (``CompilationConfig._attention_ops``): the same
effect, the indexer runs eagerly between piecewise graphs. So in vLLM's default
``FULL_AND_PIECEWISE`` mode a uniform decode batch (the only kind we fuse) replays a FULL graph
in which vLLM's indexer is **already captured**; the eager indexer concerns PIECEWISE steps
(mixed batches, ``cudagraph_mode=PIECEWISE``, or FULL graphs unavailable).

Our op reads every length, table and slot on the device and allocates nothing per step, so the
kernels capture. But the fused/fallback choice is a host decision per step, and a PIECEWISE graph
is keyed by token count only (``uniform=False``) and replayed for mixed and decode batches alike,
so the op must not be frozen into one: it is wrapped with ``@eager_break_during_capture`` (eager
under breakable PIECEWISE capture) and ``smpart::dsv32_region`` is added to
``CompilationConfig._attention_ops`` by the plugin (a split point under FX piecewise capture).
Under FULL capture (``cudagraph_runtime_mode == FULL`` and ``batch_descriptor.uniform``: only
uniform decode batches ever replay that graph) the fused path is captured into the graph. When
capture is anything else the op takes the fallback (vLLM's computation), so a captured graph is
never wrong for a batch it may be replayed on. What this saves over vLLM: inside the decode FULL
graph, the region's 7-8 vLLM launches become one fused launch (plus the top-k launch while the
partitioned kernel runs the top-k outside it); it removes no eager break that vLLM takes in its
default configuration (under PIECEWISE dispatch both vLLM's indexer and this op run eagerly).
"""

import collections
import logging
import os
import threading
import weakref

import torch

from smpart.triton_kernels import dims
from smpart.triton_kernels.topk_config import is_capturing as _is_capturing
from smpart.region import PATHS, RegionArgs, run_region
from smpart.workspace import RegionWorkspace

OP_NAMESPACE = "smpart"
OP_NAME = "dsv32_region"
OP_QUALNAME = f"{OP_NAMESPACE}::{OP_NAME}"
PATH_ENV = "SMPART_DSV32_PATH"

logger = logging.getLogger("vllm.smpart_dsv32")

_lock = threading.Lock()
_registered = False
_lib = None  # torch.library.Library holding the op (its lifetime is the op's)
_LAYERS: dict[str, "weakref.ReferenceType"] = {}  # layer name -> wrapper (the fallback runs its modules)
_WORKSPACES: dict[tuple, RegionWorkspace] = {}  # (max_tokens, max_len, device) -> workspace
_WEIGHTS_CHECKED: dict[tuple, str | None] = {}  # (data_ptr, shape, stride, device, version) -> reason
_LOGGED: set[str] = set()
stats: collections.Counter = collections.Counter()  # "fused", "fallback", "fallback: <reason>" (host calls)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def log_off_once(reason: str) -> None:
    """Log, once per reason per process, why the fused region is off."""
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.info("smpart DSV3.2 fused region off: %s; running vLLM's own path", reason)


def register_layer(name: str, layer) -> None:
    """Make ``layer`` (the MLA wrapper) findable by the op's fallback under ``name``."""
    _LAYERS[name] = weakref.ref(layer)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def workspace_for(num_tokens: int, max_len: int, device) -> RegionWorkspace:
    """The cached workspace for ``num_tokens`` rows of up to ``max_len`` positions on ``device``.

    Any cached workspace with as many rows or more (same ``max_len`` and device) is reused, so
    after the profile run has reserved the largest bucket no step allocates. Otherwise one is made
    for the power-of-two bucket of ``num_tokens`` (<= 256), with the buffers of vLLM's top-k
    (``RegionWorkspace.ensure_vllm_topk``) where vLLM's ops are registered.
    """
    device = torch.device(device)
    max_len = _round_up(min(max(int(max_len), 1), dims.MAX_MODEL_LEN), dims.CACHE_BLOCK_SIZE)
    best = None
    for (rows, L, dev), ws in _WORKSPACES.items():
        if L == max_len and dev == str(device) and rows >= num_tokens and (best is None or rows < best.max_tokens):
            best = ws
    if best is not None:
        return best
    rows = min(1 << max(int(num_tokens) - 1, 0).bit_length(), dims.T_MAX)
    if _is_capturing():
        logger.warning("smpart: allocating a %d x %d region workspace during CUDA-graph capture "
                       "(no profile run reserved it)", rows, max_len)
    ws = RegionWorkspace.for_shape(rows, max_len, device)
    from smpart.vendor import vllm_topk_registered

    if vllm_topk_registered() and not _is_capturing():
        ws.ensure_vllm_topk()  # the hybrid's buffers (tuning.model_config), allocated with the workspace
    _WORKSPACES[(rows, max_len, str(device))] = ws
    return ws


def choose_path(num_tokens: int, num_heads: int, next_n: int, max_len: int, device, production: bool = False) -> str:
    """The path of one step: ``$SMPART_DSV32_PATH`` when set (and not ``auto``), else the tuning
    cache's path for the bucket (``smpart.tuning.choose``), else ``"partitioned"``.

    A pick of vLLM's own computation (``smpart.tuning.VENDOR_PATHS``) is returned as the calling
    region's vendor path (``tuning.path_for_region``: ``vllm_sequential`` / ``vllm_dual_stream`` on the
    generic region, ``vllm_v32`` / ``vllm_v32_dual_stream`` when ``production``); the callers then run
    vLLM's own code for the step (:func:`runs_vllm`).

    Parameters
    ----------
    num_tokens, num_heads, next_n, max_len : the step's T, H, rows per request and the workspace's
        length. device : the CUDA device. production : bool, the production model's region (``smpart.prep``).
    """
    from smpart import tuning

    env = os.environ.get(PATH_ENV, "").strip()
    if env and env != "auto":
        if env in PATHS:
            return tuning.path_for_region(env, production) if env in tuning.VENDOR_PATHS else env
        log_off_once(f"{PATH_ENV}={env!r} is not one of {PATHS}; using 'partitioned'")
        return "partitioned"
    try:
        path = tuning.choose(num_tokens, num_heads, next_n, max_len, device).path
    except ValueError:
        return "partitioned"
    return tuning.path_for_region(path, production) if path in tuning.VENDOR_PATHS else path


def runs_vllm(path: str) -> bool:
    """Is ``path`` vLLM's own computation (``smpart.tuning.VENDOR_PATHS``)? Inside vLLM such a pick runs
    vLLM's own code for the step (the generic op's fallback, the production layer's own ``forward``):
    that is the computation the vendor paths time, with vLLM's per-step metadata. The vendor paths of
    ``run_region`` build their DeepGEMM schedule eagerly, which a FULL CUDA graph would freeze at
    capture."""
    from smpart import tuning

    return path in tuning.VENDOR_PATHS


def check_weights(weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why the fused GEMM cannot use this ``q_b_proj`` (None if it can).

    Metadata (dtype, shape, contiguity) always; the power-of-two (UE8M0) scale check reads the
    device once per weight, never during capture (an unchecked weight during capture falls back).
    """
    n = weight.shape[0] if weight.dim() == 2 else -1
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or weight.shape[1] != dims.Q_LORA_RANK:
        return (f"q_b_proj weight is {weight.dtype} {list(weight.shape)}, the region needs "
                f"float8_e4m3fn [H*192, {dims.Q_LORA_RANK}]")
    want = [n // dims.QUANT_GROUP, dims.Q_LORA_RANK // dims.QUANT_GROUP]
    if scale.dtype != torch.float32 or list(scale.shape) != want or not scale.is_contiguous():
        return (f"q_b_proj scales are {scale.dtype} {list(scale.shape)} strides {scale.stride()}, the region "
                f"reads contiguous float32 {want} (128x128 blocks)")
    try:
        version = scale._version  # bumped by in-place weight updates
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    key = (scale.data_ptr(), tuple(scale.shape), scale.stride(), scale.device.type, version)
    if key in _WEIGHTS_CHECKED:
        return _WEIGHTS_CHECKED[key]
    if _is_capturing():
        return "q_b_proj scales not checked before CUDA-graph capture"
    ok = bool(((scale > 0) & (torch.frexp(scale).mantissa == 0.5)).all())
    reason = None if ok else "q_b_proj block scales are not powers of two (not UE8M0)"
    _WEIGHTS_CHECKED[key] = reason
    return reason


# ---------------------------------------------------------------------------------------------
# per-step routing
# ---------------------------------------------------------------------------------------------
class RegionPlan:
    """What the fused path runs on: ``num_tokens`` rows, ``next_n`` rows per request, and views of
    the metadata (``context_lens`` int32 [B], ``block_table`` int32 [B, W], ``slot_mapping`` int64 [T])."""

    __slots__ = ("num_tokens", "next_n", "context_lens", "block_table", "slot_mapping", "max_seq_len")

    def __init__(self, num_tokens, next_n, context_lens, block_table, slot_mapping, max_seq_len):
        self.num_tokens = num_tokens
        self.next_n = next_n
        self.context_lens = context_lens
        self.block_table = block_table
        self.slot_mapping = slot_mapping
        self.max_seq_len = max_seq_len


def plan_region(attn_metadata, k_cache_prefix: str, num_rows: int) -> RegionPlan | str:
    """Decide from vLLM's per-step metadata whether this step can take the fused path.

    Parameters
    ----------
    attn_metadata : ``get_forward_context().attn_metadata`` (a dict layer name -> metadata in a
        real step; ``None`` or an empty dict in profile / dummy runs).
    k_cache_prefix : the indexer cache's layer name (``indexer.k_cache.prefix``).
    num_rows : rows of the layer's inputs (``hidden_states.shape[0]``; may be padded).

    Returns
    -------
    A :class:`RegionPlan`, or a string saying why the fused path is off for this step.
    """
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadata

    if not isinstance(attn_metadata, dict):
        return "no attention metadata (profile or dummy run)"
    md = attn_metadata.get(k_cache_prefix)
    if md is None:
        return "no indexer metadata for this layer (profile or dummy run)"
    if not isinstance(md, DeepseekV32IndexerMetadata):
        return f"indexer metadata is {type(md).__name__}, not DeepseekV32IndexerMetadata"
    if md.num_prefills > 0:
        return "mixed prefill/decode batch" if md.num_decodes > 0 else "prefill batch"
    n = int(md.num_decode_tokens)
    if n == 0:
        return "empty batch"
    if n > dims.T_MAX:
        return f"{n} decode rows > {dims.T_MAX}"
    if n > num_rows:
        return f"metadata has {n} decode rows, the layer input {num_rows}"
    dec = md.decode
    if dec is None:
        return "decode metadata missing"
    if dec.requires_padding or not dec.decode_is_uniform:
        return "non-uniform decode lengths (packed decode path)"
    if dec.global_seq_lens is not None:
        return "decode context parallelism (DCP)"
    if dec.indices is not None:
        return "varlen decode metadata (SM100 path)"
    seq_lens = dec.seq_lens if dec.seq_lens.dim() == 2 else dec.seq_lens.unsqueeze(-1)
    rows, cols = seq_lens.shape
    if rows * cols != n:
        return f"decode seq_lens {list(dec.seq_lens.shape)} do not cover {n} rows"
    if cols == 1:
        # plain decode (seq_lens = each request's length) or per-token flattening (each row its own
        # request with its own length and block-table row): both are next_n = 1 to the region
        next_n, context_lens, block_table = 1, seq_lens.view(-1), dec.block_table[:n]
    elif cols in dims.SUPPORTED_NEXT_N:
        # native MTP: dec.seq_lens[b, j] = L_b - next_n + j + 1; the region takes L_b itself
        if md.num_decodes != rows:
            return f"{md.num_decodes} decode requests but seq_lens has {rows} rows"
        next_n, context_lens, block_table = cols, md.seq_lens[:rows], dec.block_table[:rows]
    else:
        return f"{cols} decode rows per request (the region takes 1 or 2)"
    slot_mapping = md.slot_mapping
    if slot_mapping.shape[0] < n:
        return f"slot_mapping has {slot_mapping.shape[0]} rows for {n} decode rows"
    slot_mapping = slot_mapping[:n]
    for name, t, dt in (("seq_lens", context_lens, torch.int32), ("block_table", block_table, torch.int32),
                        ("slot_mapping", slot_mapping, torch.int64)):
        if t.dtype != dt or not t.is_contiguous():
            return f"decode {name} is {t.dtype} strides {t.stride()} (needs contiguous {dt}; no copies)"
    return RegionPlan(n, next_n, context_lens, block_table, slot_mapping, int(md.max_seq_len))


def _capture_reason(forward_context) -> str | None:
    """Why the fused path must not be captured now (None: not capturing, or a FULL uniform-decode graph)."""
    if not _is_capturing():
        return None
    from vllm.config import CUDAGraphMode

    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    desc = getattr(forward_context, "batch_descriptor", None)
    if mode == CUDAGraphMode.FULL and desc is not None and desc.uniform:
        return None
    return (f"captured in a {getattr(mode, 'name', mode)} graph that may replay non-decode batches "
            f"(add {OP_QUALNAME} to compilation_config.splitting_ops)")


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------
def _fallback(layer_name: str, hidden_states, q_c, positions, index_q_fp8, index_k, index_weights, q, k_pe):
    """vLLM's own computation of the region (``MultiHeadLatentAttentionWrapper.forward`` and
    ``Indexer.forward``, vLLM 0.33), with the layer's own modules, writing ``q`` and ``k_pe``."""
    ref = _LAYERS.get(layer_name)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"smpart: no MLA layer registered as {layer_name!r} for the region fallback")
    nope = layer.qk_nope_head_dim
    q.copy_(layer.q_b_proj(q_c)[0].view(q.shape))
    q_pe, k_pe_out = layer.rotary_emb(positions, q[..., nope:], k_pe)
    if q_pe.data_ptr() != q[..., nope:].data_ptr():
        q[..., nope:] = q_pe
    if k_pe_out.data_ptr() != k_pe.data_ptr():
        k_pe.copy_(k_pe_out.view(k_pe.shape))
    layer.indexer.indexer_op(hidden_states, index_q_fp8, index_k, index_weights)


def dsv32_region(
    hidden_states: torch.Tensor,
    q_c: torch.Tensor,
    positions: torch.Tensor,
    q_b_proj_weight: torch.Tensor,
    q_b_proj_weight_scale: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    index_q_fp8: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    q: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    topk_indices_buffer: torch.Tensor,
    layer_name: str,
    k_cache_prefix: str,
    max_model_len: int,
    skip_topk_buffer_clear: bool = False,
) -> None:
    """The DSV3.2 decode region of one layer (see the module docstring); writes ``q``, ``k_pe``,
    ``kv_cache`` and ``topk_indices_buffer``.

    Parameters
    ----------
    hidden_states : bf16 [T, hidden] (rows count; the fallback's indexer op takes it).
    q_c : bf16 [T, 1536] after ``q_a_layernorm``. positions : int64 [T].
    q_b_proj_weight : float8_e4m3fn [H*192, 1536]; q_b_proj_weight_scale : fp32 [H*192/128, 12].
    cos_sin_cache : bf16 or fp32 [max_pos, 64], the MLA ``rotary_emb``'s (cos | sin).
    index_q_fp8 : float8_e4m3fn [T, 64, 128]; index_k : bf16 [T, 128]; index_weights : fp32 [T, 64]
        (the indexer's projections, RoPE and quant, as ``Indexer.forward`` hands them to its op).
    q : bf16 [T, H, 192] (written). k_pe : bf16 [T, 1, 64] (roped in place).
    kv_cache : uint8 [num_blocks, 64, 132], the indexer cache (new keys written).
    topk_indices_buffer : int32 [>= T, 2048] (rows [:T] written).
    layer_name, k_cache_prefix : the MLA wrapper's registered name, the indexer cache's layer name.
    max_model_len : the model's max length (sizes the logits workspace).
    skip_topk_buffer_clear : as vLLM's ``sparse_attn_indexer``: when False, padding rows past the
        decode rows are set to -1 too.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available
    from vllm.utils.torch_utils import _resolve_layer_name

    layer_name = _resolve_layer_name(layer_name)
    k_cache_prefix = _resolve_layer_name(k_cache_prefix)
    num_rows = hidden_states.shape[0]
    fc = get_forward_context() if is_forward_context_available() else None
    reason = check_weights(q_b_proj_weight, q_b_proj_weight_scale)
    plan = plan_region(None if fc is None else fc.attn_metadata, k_cache_prefix, num_rows)
    if reason is None and isinstance(plan, str):
        reason = plan
    if reason is None:
        reason = _capture_reason(fc)
    if reason is None and (kv_cache.dim() != 3 or not kv_cache.is_contiguous()):
        reason = f"indexer cache is {list(kv_cache.shape)} strides {kv_cache.stride()} (needs contiguous [blocks, 64, 132])"
    if reason is not None:
        if not isinstance(fc.attn_metadata if fc is not None else None, dict):
            # profile run: reserve the largest workspace now, so the memory profile sees it
            workspace_for(min(dims.T_MAX, max(num_rows, 1)), max_model_len, q_c.device)
        stats["fallback"] += 1
        stats[f"fallback: {reason}"] += 1
        log_off_once(reason)
        _fallback(layer_name, hidden_states, q_c, positions, index_q_fp8, index_k, index_weights, q, k_pe)
        return
    n = plan.num_tokens
    args = RegionArgs(
        q_c=q_c[:n], q_b_proj_weight=q_b_proj_weight, q_b_proj_weight_scale=q_b_proj_weight_scale,
        positions=positions[:n], cos_sin_cache=cos_sin_cache, k_pe=k_pe[:n], q=q[:n],
        index_q_fp8=index_q_fp8[:n], index_weights=index_weights[:n], index_k=index_k[:n], kv_cache=kv_cache,
        slot_mapping=plan.slot_mapping, block_table=plan.block_table, context_lens=plan.context_lens,
        topk_indices=topk_indices_buffer[:n, : dims.INDEX_TOPK], next_n=plan.next_n,
    )
    ws = workspace_for(n, max_model_len, q_c.device)
    path = choose_path(n, args.num_heads, plan.next_n, ws.max_len, q_c.device)
    if runs_vllm(path):  # the bucket is tuned to vLLM's own computation: run it
        stats["vllm dispatched"] += 1
        stats[f"vllm dispatched: {path}"] += 1
        log_off_once(f"the tuned dispatch picked vLLM's own computation ({path}) for a bucket")
        _fallback(layer_name, hidden_states, q_c, positions, index_q_fp8, index_k, index_weights, q, k_pe)
        return
    try:
        run_region(args, path=path, workspace=ws, use_ue8m0=True, check_values=False)
    except (TypeError, ValueError) as e:  # input validation, raised before any kernel writes
        reason = f"region inputs rejected ({type(e).__name__}: {e})"
        if reason not in _LOGGED:
            logger.error("smpart: %s; running vLLM's own path", reason)
            _LOGGED.add(reason)
        stats["fallback"] += 1
        stats[f"fallback: {reason}"] += 1
        _fallback(layer_name, hidden_states, q_c, positions, index_q_fp8, index_k, index_weights, q, k_pe)
        return
    if num_rows > n:  # padding rows (eager piecewise steps): defined values, as vLLM's path leaves
        q[n:num_rows].zero_()
        if not skip_topk_buffer_clear:
            topk_indices_buffer[n:num_rows].fill_(-1)
    stats["fused"] += 1
    stats[f"fused: {path}"] += 1


def dsv32_region_fake(
    hidden_states: torch.Tensor,
    q_c: torch.Tensor,
    positions: torch.Tensor,
    q_b_proj_weight: torch.Tensor,
    q_b_proj_weight_scale: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    index_q_fp8: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    q: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    topk_indices_buffer: torch.Tensor,
    layer_name: str,
    k_cache_prefix: str,
    max_model_len: int,
    skip_topk_buffer_clear: bool = False,
) -> None:
    return None


def register_op() -> None:
    """Register ``torch.ops.smpart.dsv32_region`` once per process (vLLM's
    ``direct_register_custom_op``; the layer-name arguments use vLLM's ``LayerNameType``)."""
    global _registered, _lib
    with _lock:
        if _registered:
            return
        from torch.library import Library
        from vllm.compilation.breakable_cudagraph import eager_break_during_capture
        from vllm.utils.torch_utils import LayerNameType, direct_register_custom_op

        # layer names as vLLM's LayerName opaque type where vLLM uses it (torch >= 2.11)
        for fn in (dsv32_region, dsv32_region_fake):
            fn.__annotations__["layer_name"] = LayerNameType
            fn.__annotations__["k_cache_prefix"] = LayerNameType
        if _lib is None:
            _lib = Library(OP_NAMESPACE, "FRAGMENT")  # noqa: TOR901
        if not hasattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME):
            impl = eager_break_during_capture(dsv32_region)
            impl.__annotations__ = dict(dsv32_region.__annotations__)
            direct_register_custom_op(
                op_name=OP_NAME,
                op_func=impl,
                mutates_args=["q", "k_pe", "kv_cache", "topk_indices_buffer"],
                fake_impl=dsv32_region_fake,
                target_lib=_lib,
            )
        _registered = True


__all__ = ["OP_QUALNAME", "PATH_ENV", "register_op", "register_layer", "plan_region", "RegionPlan",
           "workspace_for", "choose_path", "runs_vllm", "check_weights", "dsv32_region", "stats", "log_off_once"]
