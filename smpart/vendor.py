"""vLLM 0.33's own kernels on the region: the ``vllm_sequential`` / ``vllm_dual_stream`` paths.

These paths run exactly the kernels vLLM 0.33.0 launches for the region on Hopper (docs/VENDOR.md;
baseline kernels: docs/RESULTS.md, "Method"), on the same :class:`RegionArgs` as every other path:

* q side (vLLM ``fp8_utils.py::per_token_group_quant_fp8`` as ``QuantFP8`` calls it for the
  DeepGEMM block linear, ``kernels/linear/scaled_mm/deep_gemm.py``; then MLA RoPE):
  ``torch.ops._C.per_token_group_fp8_quant`` (UE8M0 scales, column-major TMA-aligned scale
  layout), DeepGEMM ``fp8_gemm_nt((a, a_s), (w, w_s), out)`` into ``args.q`` viewed
  ``[T, H*192]``, ``torch.ops._C.rotary_embedding(positions, q[..., 128:], k_pe, 64,
  cos_sin_cache, is_neox=False)`` on the strided ``q_pe`` view (vLLM ``layers/mla.py``).
* indexer tail (vLLM ``layers/sparse_attn_indexer.py``, decode branch):
  ``torch.ops._C_cache_ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, 128, "ue8m0")``,
  ``topk_indices[:T] = -1``, DeepGEMM ``fp8_fp4_paged_mqa_logits((q_fp8, None),
  kv_cache.unsqueeze(-2), weights, context_lens_2d, block_table, schedule_meta, max_len)``, and the
  decode top-k as ``layers/indexer_topk.py`` dispatches it on ``auto``: ``cooperative_topk`` for
  <= 64 rows, else ``persistent_topk`` (``top_k_per_row_decode`` if neither op exists).
* ``vllm_dual_stream`` schedules the two chains as ``vllm/utils/multi_stream_utils.py::
  maybe_execute_in_parallel`` does: the indexer tail on the current stream, the q side on an aux
  stream, forked and joined by two events (capture-safe).

What is not per-layer work in vLLM is done outside the timed region, as vLLM does it once per
step in ``v1/attention/backends/mla/indexer.py`` (the metadata builder): ``context_lens_2d``
(visible length per row, int32 ``[B, next_n]``), the paged-logits ``schedule_meta`` (from
``get_paged_mqa_logits_metadata(context_lens_2d, 64, num_sms)``, copied into a persistent buffer)
and the host-side ``max_seq_len``. They are refreshed on every eager call and reused while a
CUDA graph is captured; capturing before any eager call raises ``RuntimeError``.

Buffers: the vendor paths keep their own scratch (activation FP8 + scales, the metadata above,
the 1 MiB radix top-k workspace, the aux stream and events, DeepGEMM-layout weight scales) in a
:class:`VendorWorkspace` made at the first eager call and cached on the region workspace as
``workspace.vendor``. DeepGEMM's paged-logits API returns a fresh ``[T, max_len]`` fp32 tensor
(it takes no output argument), so the logits are allocated per call, as in vLLM (from the graph's
private pool under capture); ``workspace.logits`` is not used here.

Optional dependencies load lazily, one helper each: :func:`load_deep_gemm`,
:func:`load_vllm_ops`; :func:`vendor_available` says whether both paths can run here. Importing
this module imports neither.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings

import torch

from .triton_kernels import dims
from .reference import visible_lens

# vLLM model_executor/layers/indexer_topk.py
RADIX_TOPK_WORKSPACE_SIZE = 1024 * 1024
AUTO_COOPERATIVE_MAX_ROWS = 64

DEFAULT_VLLM_OPS_LIB = "/tmp/vso/_C_stable_libtorch.abi3.so"
VLLM_OPS_LIB_ENV = "SMPART_VLLM_OPS_LIB"

_DEEP_GEMM_API = ("fp8_gemm_nt", "fp8_fp4_paged_mqa_logits", "get_paged_mqa_logits_metadata", "set_num_sms")
# op name -> torch.ops namespace (vLLM 0.33 ``_custom_ops.py``)
_VLLM_REQUIRED_OPS = {
    "per_token_group_fp8_quant": "_C",
    "rotary_embedding": "_C",
    "indexer_k_quant_and_cache": "_C_cache_ops",
}
_VLLM_TOPK_OPS = {"cooperative_topk": "_C", "persistent_topk": "_C", "top_k_per_row_decode": "_C"}

_deep_gemm_module = None
_vllm_ops = None


# --------------------------------------------------------------------------------------
# lazy loaders
# --------------------------------------------------------------------------------------
def load_deep_gemm():
    """Import DeepGEMM (2.8.1 API): ``deep_gemm``, else vLLM's bundled ``vllm.third_party.deep_gemm``.

    Returns
    -------
    The module (cached after the first success).

    Raises
    ------
    RuntimeError : neither imports, or the module lacks the 2.8.1 functions used here; the
        message says what each import attempt raised and how to get DeepGEMM.
    """
    global _deep_gemm_module
    if _deep_gemm_module is not None:
        return _deep_gemm_module
    errors = []
    module = None
    for name in ("deep_gemm", "vllm.third_party.deep_gemm"):
        try:
            module = importlib.import_module(name)
            break
        except Exception as e:  # noqa: BLE001 - DeepGEMM's import can raise anything (JIT init)
            errors.append(f"import {name}: {type(e).__name__}: {e}")
    if module is None:
        raise RuntimeError(
            "DeepGEMM is not importable (" + "; ".join(errors) + "). No registry serves it; vLLM 0.33.0's "
            "wheel ships DeepGEMM 2.8.1: run `scripts/get_deep_gemm.sh .dg` (git-ignore .dg, carry "
            "it to the GPU machine) and `export PYTHONPATH=$PWD/.dg:$PYTHONPATH`, or install vllm==0.33.0."
        )
    missing = [f for f in _DEEP_GEMM_API if not hasattr(module, f)]
    if missing:
        raise RuntimeError(
            f"DeepGEMM at {getattr(module, '__file__', '?')} (version {getattr(module, '__version__', '?')}) lacks "
            f"{missing}: the vendor paths need the 2.8.1 API (the copy in vLLM 0.33.0; "
            "`scripts/get_deep_gemm.sh .dg`, docs/VENDOR.md)."
        )
    _deep_gemm_module = module
    return module


def deep_gemm_version() -> str | None:
    """DeepGEMM's ``__version__`` if it loads here, else ``None`` (never raises)."""
    try:
        return str(getattr(load_deep_gemm(), "__version__", "unknown"))
    except RuntimeError:
        return None


def _lookup_ops(table: dict) -> dict:
    found = {}
    for name, ns in table.items():
        try:
            found[name] = getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            found[name] = None
    return found


def _ops_complete() -> tuple[dict, list[str]]:
    ops = _lookup_ops(_VLLM_REQUIRED_OPS)
    ops.update(_lookup_ops(_VLLM_TOPK_OPS))
    missing = [n for n in _VLLM_REQUIRED_OPS if ops[n] is None]
    if all(ops[n] is None for n in _VLLM_TOPK_OPS):
        missing.append("one of " + "/".join(_VLLM_TOPK_OPS))
    return ops, missing


def load_vllm_ops(lib_path: str | None = None) -> types.SimpleNamespace:
    """vLLM 0.33's compiled ops used by the vendor paths, as a namespace of callables.

    Tries, in order: ops already registered in this process; ``lib_path`` if given
    (``torch.ops.load_library``); ``import vllm._custom_ops`` (a real vLLM environment); the
    library at ``$SMPART_VLLM_OPS_LIB`` or ``/tmp/vso/_C_stable_libtorch.abi3.so``.

    Returns
    -------
    ``SimpleNamespace`` with ``per_token_group_fp8_quant``, ``rotary_embedding``,
    ``indexer_k_quant_and_cache`` (required) and ``cooperative_topk``, ``persistent_topk``,
    ``top_k_per_row_decode`` (``None`` where absent; at least one is present), plus ``source``
    (where they came from). Cached after the first success.

    Raises
    ------
    RuntimeError : the ops cannot be found; the message lists each attempt and how to get them.
    """
    global _vllm_ops
    if _vllm_ops is not None and lib_path is None:
        return _vllm_ops
    attempts = []

    def done(source: str, record: bool = True):
        global _vllm_ops
        ops, missing = _ops_complete()
        if missing:
            if record:
                attempts.append(f"{source}: still missing {missing}")
            return None
        _vllm_ops = types.SimpleNamespace(source=source, **ops)
        return _vllm_ops

    def load_lib(path: str, label: str):
        if not os.path.isfile(path):
            attempts.append(f"{label} {path}: no such file")
            return None
        try:
            torch.ops.load_library(path)
        except Exception as e:  # noqa: BLE001 - OSError, RuntimeError (ABI), ...
            attempts.append(f"{label} {path}: {type(e).__name__}: {e}")
            return None
        return done(f"{label} {path}")

    if lib_path is None and (r := done("already registered", record=False)) is not None:
        return r
    if lib_path is not None:
        if (r := load_lib(lib_path, "lib_path")) is not None:
            return r
    else:
        try:
            importlib.import_module("vllm._custom_ops")
        except Exception as e:  # noqa: BLE001 - a broken vLLM install can raise anything
            attempts.append(f"import vllm._custom_ops: {type(e).__name__}: {e}")
        else:
            if (r := done("vllm._custom_ops")) is not None:
                return r
        env = os.environ.get(VLLM_OPS_LIB_ENV)
        if env:
            if (r := load_lib(env, f"${VLLM_OPS_LIB_ENV}")) is not None:
                return r
        elif (r := load_lib(DEFAULT_VLLM_OPS_LIB, "default")) is not None:
            return r
    raise RuntimeError(
        "vLLM's compiled ops are not available (" + "; ".join(attempts) + "). Either run in a vLLM 0.33.0 "
        "environment (`import vllm._custom_ops`), or `scripts/get_vllm_ops.sh .vx`, carry .vx, "
        f"`mkdir -p /tmp/vso && xz -dc .vx/_C_stable_libtorch.abi3.so.xz > {DEFAULT_VLLM_OPS_LIB}` "
        f"(or point ${VLLM_OPS_LIB_ENV} at the unpacked library)."
    )


def vllm_topk_registered() -> bool:
    """Whether vLLM's decode top-k ops (``torch.ops._C.cooperative_topk`` / ``persistent_topk``) are
    already registered in this process on a CUDA machine: in a vLLM process (``vllm._custom_ops``
    imported) or after :func:`load_vllm_ops`. Loads nothing; cheap enough to ask per step.

    Returns
    -------
    bool
    """
    if not torch.cuda.is_available():
        return False
    try:
        ns = torch.ops._C
        return any(hasattr(ns, name) for name in ("cooperative_topk", "persistent_topk"))
    except Exception:  # noqa: BLE001 - no _C namespace at all
        return False


def vendor_available() -> tuple[bool, str]:
    """Whether ``vllm_sequential`` / ``vllm_dual_stream`` can run here.

    Returns
    -------
    (ok, reason): ``reason`` says what is missing, or where DeepGEMM and the ops came from.
    """
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"needs an SM90+ GPU for DeepGEMM's FP8 kernels, got sm_{major}{minor}"
    try:
        dg = load_deep_gemm()
        ops = load_vllm_ops()
    except RuntimeError as e:
        return False, str(e)
    return True, f"DeepGEMM {getattr(dg, '__version__', '?')} ({dg.__name__}); vLLM ops from {ops.source}"


# --------------------------------------------------------------------------------------
# workspace
# --------------------------------------------------------------------------------------
def _align(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class VendorWorkspace:
    """Scratch of the vendor paths for up to ``max_tokens`` rows (made eagerly, reused in graphs).

    Attributes
    ----------
    x_q : float8_e4m3fn [max_tokens, 1536], activation FP8 of ``q_c``.
    x_s_storage : fp32 [align(max_tokens, 4) * 12], backing the column-major, TMA-aligned
        activation scales ``[T, 12]`` with strides ``(1, align(T, 4))`` (vLLM
        ``per_token_group_quant_fp8(column_major_scales=True, tma_aligned_scales=True)``).
    context_lens_2d : int32 [max_tokens], viewed ``[B, next_n]``: visible length per row.
    schedule_meta : int32 [num_sms + 1, 2], DeepGEMM's paged-logits schedule.
    topk_workspace : uint8 [1 MiB] (vLLM ``RADIX_TOPK_WORKSPACE_SIZE``).
    max_seq_len : host int, ``max(context_lens)`` of the prepared batch (vLLM
        ``attn_metadata.max_seq_len``, the top-k's long-row gate).
    aux_stream, event0, event1 : ``maybe_execute_in_parallel``'s stream and events.
    num_sms : SMs of the device (vLLM's metadata builder uses the device's count).

    Parameters
    ----------
    max_tokens, max_len : rows and logits width (the region workspace's). device : a CUDA device.
    dg, ops : :func:`load_deep_gemm` and :func:`load_vllm_ops` results.
    num_sms : default: the device's multiprocessor count.
    """

    def __init__(self, max_tokens: int, max_len: int, device, dg, ops, num_sms: int | None = None):
        device = torch.device(device)
        is_cuda = device.type == "cuda"
        self.device = device
        self.dg = dg
        self.ops = ops
        self.max_tokens = int(max_tokens)
        self.max_len = int(max_len)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.num_sms = int(num_sms)
        self.x_q = torch.empty(self.max_tokens, dims.Q_LORA_RANK, dtype=torch.float8_e4m3fn, device=device)
        self.x_s_storage = torch.empty(_align(self.max_tokens, 4) * (dims.Q_LORA_RANK // dims.QUANT_GROUP),
                                       dtype=torch.float32, device=device)
        self.context_lens_2d = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)
        self.schedule_meta = torch.zeros(self.num_sms + 1, 2, dtype=torch.int32, device=device)
        self.topk_workspace = torch.empty(RADIX_TOPK_WORKSPACE_SIZE, dtype=torch.uint8, device=device)
        self.max_seq_len = 0
        # (a CPU instance, with stand-in dg/ops, only serves the glue tests: no streams there)
        self.aux_stream = torch.cuda.Stream(device=device) if is_cuda else None
        self.event0 = torch.cuda.Event() if is_cuda else None
        self.event1 = torch.cuda.Event() if is_cuda else None
        self._prepared_key = None
        self._pinned = ()
        self._weight_key = None
        self.weight_scale = None
        self._cos_sin_key = None
        self.cos_sin_cache = None
        # vLLM utils/deep_gemm.py::_lazy_init enables PDL on SM90+ (is_arch_support_pdl).
        if is_cuda and torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(dg, "set_pdl"):
            dg.set_pdl(True)

    # ---- helpers ------------------------------------------------------------------------
    def act_scales(self, T: int) -> torch.Tensor:
        """fp32 [T, 12] view with strides (1, align(T, 4)) (no allocation)."""
        return torch.as_strided(self.x_s_storage, (T, dims.Q_LORA_RANK // dims.QUANT_GROUP), (1, _align(T, 4)))

    def context_lens_view(self, T: int, next_n: int) -> torch.Tensor:
        return self.context_lens_2d[:T].view(T // next_n, next_n)

    @staticmethod
    def _key(t: torch.Tensor, *extra):
        return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, *extra)

    def _batch_key(self, args, use_ue8m0: bool):
        return (self._key(args.context_lens), args.num_tokens, args.next_n, self._key(args.q_b_proj_weight_scale),
                self._key(args.cos_sin_cache), bool(use_ue8m0))

    # ---- eager preparation (vLLM: weight loading and the per-step metadata builder) ---------
    def prepare(self, args, use_ue8m0: bool) -> None:
        """Refresh everything that vLLM computes outside the layer's forward (eager only).

        Weight scales in DeepGEMM's layout (vLLM ``deepgemm_post_process_fp8_weight_block`` at load),
        ``cos_sin_cache`` in the query dtype (``_match_cos_sin_cache_dtype``), ``context_lens_2d``,
        ``schedule_meta`` and ``max_seq_len`` (the metadata builder). Reads ``context_lens`` on the
        host (one sync).
        """
        dg = self.dg
        T, next_n = args.num_tokens, args.next_n
        wkey = self._key(args.q_b_proj_weight_scale, bool(use_ue8m0))
        if wkey != self._weight_key:
            ws = args.q_b_proj_weight_scale
            N, K = args.q_b_proj_weight.shape
            transform = getattr(dg, "transform_sf_into_required_layout", None)
            if transform is None:
                self.weight_scale = ws
            else:
                try:
                    self.weight_scale = transform(sf=ws.unsqueeze(0), mn=N, k=K, recipe=(1, 128, 128), num_groups=1,
                                                  is_sfa=False, disable_ue8m0_cast=not use_ue8m0).squeeze(0)
                except Exception as e:  # noqa: BLE001 - signature drift across DeepGEMM versions
                    warnings.warn(f"vendor: DeepGEMM transform_sf_into_required_layout failed ({type(e).__name__}: "
                                  f"{e}); passing the raw [N/128, K/128] fp32 scales to fp8_gemm_nt", stacklevel=2)
                    self.weight_scale = ws
            self._weight_key = wkey
        ckey = self._key(args.cos_sin_cache, args.q.dtype)
        if ckey != self._cos_sin_key:
            cs = args.cos_sin_cache
            self.cos_sin_cache = cs if cs.dtype == args.q.dtype else cs.to(args.q.dtype)
            self._cos_sin_key = ckey
        self.context_lens_2d[:T].copy_(visible_lens(args.context_lens, next_n))
        meta = dg.get_paged_mqa_logits_metadata(self.context_lens_view(T, next_n), dims.CACHE_BLOCK_SIZE,
                                                self.num_sms)
        if meta.shape != self.schedule_meta.shape or meta.dtype != self.schedule_meta.dtype:
            self.schedule_meta = torch.empty_like(meta)
        self.schedule_meta.copy_(meta)
        self.max_seq_len = int(args.context_lens.max().item()) if args.context_lens.numel() else 0
        self._prepared_key = self._batch_key(args, use_ue8m0)
        # keep the keyed tensors alive, so that no other tensor can reuse their addresses (keys)
        self._pinned = (args.context_lens, args.q_b_proj_weight_scale, args.cos_sin_cache)

    def check_prepared(self, args, use_ue8m0: bool) -> None:
        """While capturing: the last eager :meth:`prepare` must have seen this very batch."""
        if self._prepared_key != self._batch_key(args, use_ue8m0):
            raise RuntimeError(
                "vllm_*: run the path once eagerly on this batch before capturing a CUDA graph (the per-step "
                "metadata, context_lens_2d / schedule_meta / max_seq_len, is built in eager mode, as vLLM's "
                "metadata builder does, and context_lens or the weights changed since)"
            )


def _vendor_state(args, workspace, use_ue8m0: bool) -> VendorWorkspace:
    if args.q_c.device.type != "cuda":
        raise RuntimeError("vllm_*: vLLM's and DeepGEMM's kernels need CUDA tensors")
    capturing = torch.cuda.is_current_stream_capturing()
    vs = getattr(workspace, "vendor", None)
    if vs is None or vs.max_tokens < args.num_tokens or vs.device != args.q_c.device:
        if capturing:
            raise RuntimeError("vllm_*: the vendor workspace is made at the first eager call; run the path "
                               "once eagerly before capturing a CUDA graph")
        dg, ops = load_deep_gemm(), load_vllm_ops()
        max_tokens = max(getattr(workspace, "max_tokens", args.num_tokens), args.num_tokens)
        vs = VendorWorkspace(max_tokens, workspace.max_len, args.q_c.device, dg, ops)
        workspace.vendor = vs
    if capturing:
        vs.check_prepared(args, use_ue8m0)
    else:
        vs.prepare(args, use_ue8m0)
    return vs


# --------------------------------------------------------------------------------------
# the two chains, as vLLM 0.33 launches them
# --------------------------------------------------------------------------------------
def _config_get(config, key, default):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _q_gemm(args, vs: VendorWorkspace, use_ue8m0: bool) -> None:
    """vLLM's activation quant of ``q_c`` (into ``vs.x_q`` / its scales) and DeepGEMM ``fp8_gemm_nt``
    into ``q`` viewed as [T, N]: two launches on the current stream (the q side of every vendor path)."""
    T, N = args.num_tokens, args.q_b_proj_weight.shape[0]
    x_q, x_s = vs.x_q[:T], vs.act_scales(T)
    # torch.ops._C.per_token_group_fp8_quant(x, x_q, x_s, group_size, eps, fp8_min, fp8_max, use_ue8m0,
    #                                        column_major_scales, tma_aligned_scales)
    vs.ops.per_token_group_fp8_quant(args.q_c, x_q, x_s, dims.QUANT_GROUP, dims.ACT_SCALE_EPS, -dims.FP8_MAX,
                                     dims.FP8_MAX, bool(use_ue8m0), True, True)
    # vllm.utils.deep_gemm.fp8_gemm_nt: disable_ue8m0_cast = not is_deep_gemm_e8m0_used()
    vs.dg.fp8_gemm_nt((x_q, x_s), (args.q_b_proj_weight, vs.weight_scale), args.q.view(T, N),
                      disable_ue8m0_cast=not use_ue8m0)


def vllm_q_side(args, vs: VendorWorkspace, use_ue8m0: bool) -> None:
    """Activation quant, DeepGEMM ``fp8_gemm_nt`` into ``q``, MLA RoPE on ``q[..., 128:]`` and ``k_pe``.

    Three launches on the current stream (vLLM ``fp8_utils.py::per_token_group_quant_fp8``,
    ``kernels/linear/scaled_mm/deep_gemm.py::_fp8_gemm_nt_op``, ``_custom_ops.py::rotary_embedding``).
    """
    _q_gemm(args, vs, use_ue8m0)
    # layers/mla.py: rotary_emb(positions, q[..., qk_nope_head_dim:], k_pe); head_size = 64
    vs.ops.rotary_embedding(args.positions, args.q[..., dims.QK_NOPE_HEAD_DIM:], args.k_pe, dims.QK_ROPE_HEAD_DIM,
                            vs.cos_sin_cache, False)


def _resolve_topk(vs: VendorWorkspace, logits: torch.Tensor, num_rows: int, backend: str) -> str:
    """vLLM ``indexer_topk.py::SparseIndexerTopk._resolve_auto`` (CUDA, SM90: cooperative, persistent, per_row)."""
    if backend != "auto":
        return backend
    cap = torch.cuda.get_device_capability(vs.device)
    cooperative_ok = (num_rows <= AUTO_COOPERATIVE_MAX_ROWS and logits.stride(0) % 4 == 0 and cap[0] >= 9
                      and cap[0] != 12 and vs.ops.cooperative_topk is not None)
    if cooperative_ok:
        return "cooperative"
    if vs.ops.persistent_topk is not None:
        return "persistent"
    return "per_row"


def vllm_indexer_tail(args, vs: VendorWorkspace, use_ue8m0: bool, config=None) -> None:
    """Key write, ``-1`` fill, DeepGEMM paged logits, vLLM decode top-k, on the current stream.

    ``config`` keys (dict or attributes, all optional): ``topk_backend`` (``auto`` (default),
    ``cooperative``, ``persistent``, ``per_row``); ``max_model_len`` (logits width passed to
    DeepGEMM; default the workspace's ``max_len``; vLLM passes the model's 163840, which changes only
    the row stride of the logits).
    """
    T, next_n = args.num_tokens, args.next_n
    B = T // next_n
    # sparse_attn_indexer.py: ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)
    vs.ops.indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping, dims.INDEX_HEAD_DIM,
                                     "ue8m0" if use_ue8m0 else "fp32")
    args.topk_indices.fill_(-1)  # topk_indices_buffer[: hidden_states.shape[0]] = -1
    ctx2d = vs.context_lens_view(T, next_n)
    max_model_len = int(_config_get(config, "max_model_len", vs.max_len))
    q = args.index_q_fp8.view(B, next_n, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM)
    logits = vs.dg.fp8_fp4_paged_mqa_logits((q, None), args.kv_cache.unsqueeze(-2), args.index_weights, ctx2d,
                                            args.block_table, vs.schedule_meta, max_model_len)
    _vllm_topk(vs, logits, ctx2d, args.topk_indices, next_n, config, "vllm_*")


def _vllm_topk(vs, logits, ctx2d, topk_indices, next_n: int, config, who: str) -> None:
    """vLLM's decode top-k on its own logits (``indexer_topk.py``: the ``config`` key ``topk_backend``,
    ``auto`` resolved as :func:`_resolve_topk`). ``who`` names the paths in the errors.

    Raises
    ------
    RuntimeError : ``per_row`` without ``top_k_per_row_decode`` in the loaded ops.
    ValueError : an unknown ``config.topk_backend``.
    """
    backend = _resolve_topk(vs, logits, logits.shape[0], _config_get(config, "topk_backend", "auto"))
    if backend == "cooperative":
        vs.ops.cooperative_topk(logits, ctx2d, topk_indices, vs.topk_workspace, dims.INDEX_TOPK, vs.max_seq_len)
    elif backend == "persistent":
        vs.ops.persistent_topk(logits, ctx2d, topk_indices, vs.topk_workspace, dims.INDEX_TOPK, vs.max_seq_len)
    elif backend == "per_row":
        if vs.ops.top_k_per_row_decode is None:
            raise RuntimeError(f"{who}: top_k_per_row_decode is not in the loaded vLLM ops")
        vs.ops.top_k_per_row_decode(logits, next_n, ctx2d, topk_indices, logits.shape[0], logits.stride(0),
                                    logits.stride(1), dims.INDEX_TOPK)
    else:
        raise ValueError(f"config.topk_backend: expected auto/cooperative/persistent/per_row, got {backend!r}")


def run_vllm_sequential(args, workspace, config, use_ue8m0):
    """vLLM's order on one stream: indexer tail, then the q side (7 launches + the logits allocation)."""
    vs = _vendor_state(args, workspace, use_ue8m0)
    vs.dg.set_num_sms(vs.num_sms)  # process-wide in DeepGEMM; vLLM leaves it at the device's count
    vllm_indexer_tail(args, vs, use_ue8m0, config)
    vllm_q_side(args, vs, use_ue8m0)


def run_vllm_dual_stream(args, workspace, config, use_ue8m0):
    """``maybe_execute_in_parallel(fn0=indexer tail, fn1=q side, event0, event1, aux_stream)``.

    ``event0`` recorded on the current stream, indexer tail on the current stream, the aux stream
    waits on ``event0`` and runs the q side, records ``event1``, the current stream waits on it.
    """
    vs = _vendor_state(args, workspace, use_ue8m0)
    vs.dg.set_num_sms(vs.num_sms)
    vs.event0.record()
    vllm_indexer_tail(args, vs, use_ue8m0, config)
    with torch.cuda.stream(vs.aux_stream):
        vs.event0.wait()
        vllm_q_side(args, vs, use_ue8m0)
        vs.event1.record()
    vs.event1.wait()


__all__ = [
    "load_deep_gemm", "deep_gemm_version", "load_vllm_ops", "vendor_available", "VendorWorkspace",
    "vllm_q_side", "vllm_indexer_tail", "run_vllm_sequential", "run_vllm_dual_stream",
]
