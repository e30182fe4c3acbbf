"""``SmpartDeepseekV32Attention``: vLLM 0.33's ``DeepseekV32Attention`` with the DSV3.2 region in its decode step.

vLLM's production CUDA model (``vllm/models/deepseek_v32/attention.py::DeepseekV32Attention.forward``)
runs, per layer and step: ``fused_qkv_a_proj`` and the indexer's ``wk_weights_proj``;
``fused_norm_rope`` (norms, both key RoPEs, the MLA and indexer cache writes, the ``topk_indices``
-1 fill); ``q_b_proj``; the ``W_UK_T`` bmm; the indexer's ``wq_b``; ``fused_q`` (q_pe RoPE, index-q
RoPE + FP8 quant + weight scaling); then ``_sparse_indexer_and_attn``: ``sparse_attn_indexer``
(DeepGEMM paged logits + vLLM's top-k), ``record_logical_topk_ready``, the sparse MLA, ``W_UV``, and
``o_proj``.

On an eligible step this class runs the same calls in the same order except that the region
replaces ``q_b_proj`` + ``fused_q`` + the indexer's logits/top-k: :func:`run_v32_region` computes
``q`` (``q_b_proj`` with the q_pe RoPE rounded as ``fused_q`` rounds it), the index-q prep (byte-exact
``fused_q`` pid 1) and the top-2048 into ``topk_indices_buffer``. ``fused_norm_rope`` stays vLLM's
(it writes both caches and the fill), the ``W_UK_T`` bmm, ``wq_b`` and ``o_proj`` stay vLLM's, and
the attention half of vLLM's own ``_sparse_indexer_and_attn`` runs unchanged: it is called with the
layer's ``skip_topk`` set for the duration of the call, which is exactly vLLM's branch that skips
``sparse_attn_indexer`` (the top-k buffer is already written) and goes on to
``record_logical_topk_ready`` and the attention.

Eligible (else vLLM's own ``forward``, one log line per reason, counted in ``ops.stats``): a layer
with an indexer computing its own top-k; no PCP/DCP; no hisparse cache; bf16 sparse-MLA queries
(not ``quantize_mqa``); DSV3.2 dims with H per rank in 128/64/32/16; ``q_b_proj`` W8A8 block FP8
with UE8M0 scales; the indexer cache in the plain layout; an sm_90 GPU; and per step a decode-only
batch (``ops.plan_region``: no prefill rows, T <= 256, a layout vLLM produces for plain decode or
MTP) that is not being captured into a PIECEWISE graph (FULL graphs are replayed only for uniform
decode batches; eager steps decide each time). A step whose bucket the tuning dispatch gives to vLLM's
own computation (``vllm_v32*``, ``ops.runs_vllm``) runs vLLM's ``forward`` too. ``SMPART_DSV32_ASSUME_SM90=1`` is a test hook that
stands in for the sm_90 check and lets CPU tensors through (kernels then need ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.models.deepseek_v32 import attention as vllm_attention
from vllm.models.deepseek_v32.attention import DeepseekV32Attention

from smpart.integration import ops
from smpart.triton_kernels import dims

ASSUME_SM90_ENV = "SMPART_DSV32_ASSUME_SM90"


def assume_sm90() -> bool:
    """The test hook: ``SMPART_DSV32_ASSUME_SM90=1`` stands in for an sm_90 GPU (CPU tests)."""
    return os.environ.get(ASSUME_SM90_ENV, "0").strip() == "1"


def _step_buffers(ws, T: int, device) -> dict:
    """Buffers the region needs but this model does not hand over, made once per workspace (``ws.extra``):
    the prep's outputs ``index_q_fp8`` [rows, 64, 128] / ``index_weights`` [rows, 64], and inert
    ``k_pe`` / ``index_k`` / ``slot_mapping`` (-1: write nothing) for the switched-off key write and
    ``k_pe`` RoPE."""
    key = ("v32", str(device))
    bufs = ws.extra.get(key)
    rows = ws.max_tokens
    if bufs is None:
        bufs = ws.extra[key] = dict(
            index_q_fp8=torch.zeros(rows, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM, dtype=torch.float8_e4m3fn,
                                    device=device),
            index_weights=torch.zeros(rows, dims.INDEX_N_HEADS, dtype=torch.float32, device=device),
            k_pe=torch.zeros(rows, 1, dims.QK_ROPE_HEAD_DIM, dtype=torch.bfloat16, device=device),
            index_k=torch.zeros(rows, dims.INDEX_HEAD_DIM, dtype=torch.bfloat16, device=device),
            slot_mapping=torch.full((rows,), -1, dtype=torch.int64, device=device),
        )
    return {n: t[:T] for n, t in bufs.items()}


def run_v32_region(layer, positions, q_c, index_q, index_weights, q, topk_indices, plan, workspace) -> None:
    """The region as vLLM 0.33's production model needs it: writes ``q[:T]`` and ``topk_indices[:T]``.

    Parameters
    ----------
    layer : the attention layer (weights, RoPE tables, ``_index_rope_interleave``, the indexer cache).
    positions : int64 [T]. q_c : bf16 [T, 1536] (``fused_norm_rope``'s output).
    index_q : bf16 [T, 64, 128] (``indexer.wq_b(q_c)``). index_weights : bf16 [T, 64], raw.
    q : bf16 [T, H, 192], written (``q_b_proj`` + q_pe RoPE as ``fused_q`` pid 0).
    topk_indices : int32 [T, 2048], written (the -1 padding is ``fused_norm_rope``'s fill).
    plan : ``ops.RegionPlan``. workspace : ``smpart.workspace.RegionWorkspace``.

    One call of :func:`smpart.region.run_region` with the production options (``smpart.prep``):
    index-q prep from ``index_q``, key write / fill / ``k_pe`` RoPE off (``fused_norm_rope`` did
    them), q_pe RoPE rounded as ``fused_q``. The path is the tuning dispatch's
    (``ops.choose_path(..., production=True)``: ``$SMPART_DSV32_PATH``, else the tuned bucket, else
    ``partitioned``); vLLM's generic baselines map to this model's (``vllm_v32`` / ``vllm_v32_dual_stream``).
    (The layer's ``forward`` runs vLLM's own ``forward`` for a bucket dispatched to vLLM's computation
    before it gets here: ``ops.runs_vllm``.)
    Value checks are off (no host sync; capturable), as in the generic shim.
    """
    from smpart.prep import production_defaults
    from smpart.region import RegionArgs, run_region

    T = plan.num_tokens
    qb = layer.q_b_proj
    bufs = _step_buffers(workspace, T, q_c.device)
    args = RegionArgs(
        q_c=q_c[:T], q_b_proj_weight=qb.weight, q_b_proj_weight_scale=qb.weight_scale_inv,
        positions=positions[:T], cos_sin_cache=layer.rotary_emb.cos_sin_cache, k_pe=bufs["k_pe"], q=q[:T],
        index_q_fp8=bufs["index_q_fp8"], index_weights=bufs["index_weights"], index_k=bufs["index_k"],
        kv_cache=layer.indexer.k_cache.kv_cache, slot_mapping=bufs["slot_mapping"], block_table=plan.block_table,
        context_lens=plan.context_lens, topk_indices=topk_indices[:T], next_n=plan.next_n,
        index_q=index_q[:T], index_weights_raw=index_weights[:T],
        index_cos_sin_cache=layer.indexer_rope_emb.cos_sin_cache,
        index_rope_interleave=bool(layer._index_rope_interleave), **production_defaults(),
    )
    path = ops.choose_path(T, args.num_heads, plan.next_n, workspace.max_len, q_c.device, production=True)
    run_region(args, path=path, workspace=workspace, use_ue8m0=True, check_values=False)
    ops.stats[f"v32 region: {path}"] += 1
    if q.shape[0] > T:  # padding rows of an eager step: defined values
        q[T:].zero_()


class SmpartDeepseekV32Attention(DeepseekV32Attention):
    """``DeepseekV32Attention`` whose eligible decode steps run the smpart region (module docstring).

    Instances are vLLM-built ``DeepseekV32Attention`` objects re-classed by
    :func:`smpart.integration.v32.model.swap_attention` (so vLLM's own ``__init__`` and weight loading
    run unchanged), then :meth:`smpart_setup` is called once.
    """

    region_fn = staticmethod(run_v32_region)

    def smpart_setup(self) -> None:
        """Decide once whether this layer can ever take the region (reason logged when not)."""
        self._smpart_off = self._smpart_static_off_reason()
        if self._smpart_off is not None:
            ops.log_off_once(self._smpart_off)

    def _smpart_static_off_reason(self) -> str | None:
        ind = self.indexer
        if ind is None:
            return "layer without an indexer (reuses an earlier layer's top-k)"
        if self.use_pcp or getattr(self.impl, "dcp_world_size", 1) > 1:
            return "DCP/PCP (context parallelism)"
        if self.hisparse_cache is not None:
            return "hisparse cache"
        if self._fp8_query:
            return "quantize_mqa (FP8 sparse-MLA queries)"
        if (self.q_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank) != (
                dims.Q_LORA_RANK, dims.QK_NOPE_HEAD_DIM, dims.QK_ROPE_HEAD_DIM, dims.KV_LORA_RANK):
            return "untuned shape: MLA dims differ from DSV3.2's 1536/128/64/512"
        if self.num_local_heads not in dims.SUPPORTED_H:
            return f"untuned shape: {self.num_local_heads} MLA heads per rank (the region takes {dims.SUPPORTED_H})"
        if (ind.topk_tokens, ind.n_head, ind.head_dim, ind.rope_dim) != (
                dims.INDEX_TOPK, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM, dims.QK_ROPE_HEAD_DIM):
            return "untuned shape: indexer dims differ from DSV3.2's top-2048 / 64 x 128 / rope 64"
        if getattr(ind.k_cache, "uses_shuffled_layout", False):
            return "shuffled indexer cache layout"
        qb = self.q_b_proj
        w = getattr(qb, "weight", None)
        if (w is None or w.dtype != torch.float8_e4m3fn or getattr(qb, "weight_scale_inv", None) is None
                or list(getattr(qb, "weight_block_size", None) or []) != [128, 128]):
            return "q_b_proj is not W8A8 block FP8 with 128x128 scales"
        buf = self.topk_indices_buffer
        if buf is None or buf.dtype != torch.int32 or buf.dim() != 2 or buf.shape[1] != dims.INDEX_TOPK:
            return "topk_indices_buffer is not int32 [*, 2048]"
        if assume_sm90():
            return None
        if w.device.type != "cuda":
            return f"non-sm_90: {w.device.type} tensors"
        major, minor = torch.cuda.get_device_capability(w.device)
        if (major, minor) != (9, 0):
            return f"non-sm_90 GPU (sm_{major}{minor})"
        return None

    def _smpart_step_plan(self, num_rows: int):
        """A ``RegionPlan`` for this step, or the reason to run vLLM's forward."""
        if self._smpart_off is not None:
            return self._smpart_off
        if self.skip_topk:
            return "layer reuses the top-k of an earlier MTP step (skip_topk)"
        fc = get_forward_context()
        mode = fc.cudagraph_runtime_mode
        if mode == CUDAGraphMode.PIECEWISE:
            return "PIECEWISE CUDA-graph step (the graph may be replayed for mixed batches)"
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing and mode != CUDAGraphMode.FULL:
            return f"captured in a {getattr(mode, 'name', mode)} graph"
        plan = ops.plan_region(fc.attn_metadata, self.indexer.k_cache.prefix, num_rows)
        if isinstance(plan, str):
            return plan
        reason = ops.check_weights(self.q_b_proj.weight, self.q_b_proj.weight_scale_inv)
        return plan if reason is None else reason

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """vLLM's ``DeepseekV32Attention.forward`` (``vllm/models/deepseek_v32/attention.py``, 0.33.0)
        with the smpart region on eligible decode steps (the module docstring lists them).

        Parameters
        ----------
        positions : int64 [T] token positions.
        hidden_states : bf16 [T, hidden_size].

        Returns
        -------
        torch.Tensor : bf16 [T, hidden_size], the layer's output after ``o_proj`` (as vLLM's).

        Notes
        -----
        Falls back to vLLM's own forward (counted in ``integration.ops.stats``, logged once per
        reason) when the step is not eligible (prefill, mixed or PIECEWISE-captured batches, an
        unsupported cache or weight layout) or the tuned dispatch picks vLLM's computation.
        """
        plan = self._smpart_step_plan(hidden_states.shape[0])
        if isinstance(plan, str):
            ops.stats["v32 fallback"] += 1
            ops.stats[f"v32 fallback: {plan}"] += 1
            ops.log_off_once(plan)
            return super().forward(positions, hidden_states)
        ws = ops.workspace_for(plan.num_tokens, self.indexer.max_model_len, hidden_states.device)
        path = ops.choose_path(plan.num_tokens, self.num_local_heads, plan.next_n, ws.max_len, hidden_states.device,
                               production=True)
        if ops.runs_vllm(path):  # the bucket is tuned to vLLM's own computation: run it
            ops.stats["v32 vllm dispatched"] += 1
            ops.stats[f"v32 vllm dispatched: {path}"] += 1
            ops.log_off_once(f"the tuned dispatch picked vLLM's own computation ({path}) for a bucket")
            return super().forward(positions, hidden_states)
        ops.stats["v32 region"] += 1
        return self._smpart_forward(positions, hidden_states, plan)

    def _smpart_forward(self, positions, hidden_states, plan) -> torch.Tensor:
        """vLLM's ``DeepseekV32Attention.forward`` (0.33.0) on a decode step with an indexer, no PCP/DCP,
        no hisparse cache and bf16 queries, with the region in place of q_b_proj + fused_q + the
        indexer's logits/top-k. Statement order pinned by tests/test_v32_model.py."""
        qkv_lora = self.fused_qkv_a_proj(hidden_states)[0]
        q_c, kv_c, k_pe = qkv_lora.split([self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kw = self.indexer.wk_weights_proj(hidden_states)[0]
        index_k = kw[:, : self.indexer.head_dim]
        index_weights = kw[:, self.indexer.head_dim:]

        num_tokens = hidden_states.shape[0]
        output = torch.empty((num_tokens, self.num_local_heads * self.v_head_dim), dtype=hidden_states.dtype,
                             device=hidden_states.device)
        forward_context = get_forward_context()
        slot_mapping = forward_context.slot_mapping
        assert isinstance(slot_mapping, dict)
        mla_slot = slot_mapping.get(self.layer_name)
        indexer_slot = slot_mapping.get(self.indexer.k_cache.prefix)
        layer_attn_metadata, _, _, _ = get_attention_context(self.layer_name)
        self.impl.prepare_for_batch(layer_attn_metadata)

        kv_c_out = torch.empty_like(kv_c)
        k_pe_out = torch.empty_like(k_pe)
        q_c = vllm_attention.fused_norm_rope(
            positions, q_c, self.q_a_layernorm.weight, self.q_a_layernorm.variance_epsilon,
            kv_c, self.kv_a_layernorm.weight, self.kv_a_layernorm.variance_epsilon,
            k_pe, self.rotary_emb.cos_sin_cache,
            index_k, self.indexer.k_norm.weight, self.indexer.k_norm.bias, self.indexer.k_norm.eps,
            self.indexer_rope_emb.cos_sin_cache, self.topk_indices_buffer,
            slot_mapping=mla_slot, indexer_slot_mapping=indexer_slot,
            indexer_k_cache=self.indexer.k_cache.kv_cache,
            indexer_cache_shuffled=self.indexer.k_cache.uses_shuffled_layout,
            mla_kv_cache=self.kv_cache, mla_kv_cache_dtype=self.kv_cache_dtype, mla_k_scale=self._k_scale,
            skip_scale=self._k_scale_float == 1.0, has_indexer=True,
            index_rope_interleave=self._index_rope_interleave,
            kv_c_out=kv_c_out, k_pe_out=k_pe_out, index_k_out=None,
        )

        # vLLM: q = q_b_proj(q_c); ql_nope = bmm(q_nope, W_UK_T); index_q = wq_b(q_c); fused_q(...);
        # sparse_attn_indexer(...). Here: wq_b (vLLM's), then the region, then vLLM's bmm.
        index_q = self.indexer.wq_b(q_c)[0].view(-1, self.indexer.n_head, self.indexer.head_dim)
        q = torch.empty((num_tokens, self.num_local_heads, self.qk_head_dim), dtype=q_c.dtype, device=q_c.device)
        ws = ops.workspace_for(plan.num_tokens, self.indexer.max_model_len, q_c.device)
        type(self).region_fn(self, positions, q_c, index_q, index_weights, q, self.topk_indices_buffer, plan, ws)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)
        mqa_q = q_pe  # roped (vLLM: fused_q's q_pe_out)

        # vLLM's own _sparse_indexer_and_attn with its indexer branch off (skip_topk): the top-k
        # buffer is written; record_logical_topk_ready, the sparse MLA and W_UV run as vLLM has them
        self.skip_topk = True
        try:
            self._sparse_indexer_and_attn(positions, q_c, q_nope, q_pe, None, None, None, kv_c_out, k_pe_out,
                                          ql_nope, mqa_q, output)
        finally:
            self.skip_topk = False
        return self.o_proj(output)[0]


__all__ = ["SmpartDeepseekV32Attention", "run_v32_region", "ASSUME_SM90_ENV", "assume_sm90"]
