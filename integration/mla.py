"""``SmpartDSV32MLAWrapper``: vLLM 0.33's ``MultiHeadLatentAttentionWrapper`` with the DSV3.2
decode region fused into one op (``torch.ops.smpart.dsv32_region``, see ``ops.py``).

Registered by the plugin (``plugin.py``) through ``PluggableLayer.register_oot(...,
name="MultiHeadLatentAttentionWrapper")``, so every ``MultiHeadLatentAttentionWrapper(...)``
that vLLM builds (``vllm/model_executor/models/deepseek_v2.py::DeepseekV2MLAAttention``) is an
instance of this subclass, constructed by vLLM's own ``__init__``.

Forward (mirrors ``vllm/model_executor/layers/mla.py::MultiHeadLatentAttentionWrapper.forward``):

1. vLLM's own modules up to ``q_c``, ``kv_c``, ``k_pe``: ``fused_qkv_a_proj``, ``q_a_layernorm``,
   ``kv_a_layernorm`` (or vLLM's ``fused_q_kv_rmsnorm`` when the layer fuses them);
2. the indexer's projections, RoPE and FP8 quant exactly as
   ``vllm/model_executor/models/deepseek_v2.py::Indexer.forward`` computes them up to its
   ``self.indexer_op(hidden_states, q_fp8, k, weights)`` call (``wq_b``, ``wk_weights_proj``,
   ``k_norm``, the indexer RoPE, ``fused_indexer_q_rope_quant`` on CUDA or
   ``per_token_group_quant_fp8`` elsewhere);
3. ONE call of ``torch.ops.smpart.dsv32_region``: per step, decode-only batches run the fused
   region (``q_b_proj`` + RoPE || key write + logits + top-2048); anything else runs vLLM's own
   ``q_b_proj``, ``rotary_emb`` and ``indexer_op`` inside the op (the routing must live in the op:
   vLLM compiles this forward once, see ``ops.py``);
4. vLLM's ``mla_attn`` and ``o_proj`` exactly as the original forward.

Layers the region cannot serve call the original ``forward`` unchanged, with one log line per
reason: no indexer (``skip_topk`` layers are built without one), dims other than DSV3.2's, H per
rank not in 128/64/32/16, ``q_b_proj`` not W8A8 block FP8, model dtype not bf16, indexer cache
not the FP8 ``ue8m0`` one, DCP / PCP / candidate blocks, not a CUDA Hopper (sm_9x) GPU, vLLM not
using UE8M0 activation scales, CPU tensors. ``SMPART_DSV32_ALLOW_CPU=1`` is a test hook: it lets
CPU tensors take the fused path (the kernels then need ``TRITON_INTERPRET=1``).
"""

import os

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper
from vllm.platforms import current_platform
from vllm.utils.torch_utils import _encode_layer_name

from smpart.triton_kernels import dims

from . import ops

ALLOW_CPU_ENV = "SMPART_DSV32_ALLOW_CPU"


class SmpartDSV32MLAWrapper(MultiHeadLatentAttentionWrapper):
    """``MultiHeadLatentAttentionWrapper`` whose DSV3.2 decode region runs as one fused op.

    Constructed by vLLM exactly like the class it replaces (same arguments); see the module
    docstring for the forward and the conditions under which it falls back to vLLM's forward.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._smpart_name = f"{self.prefix}.smpart_dsv32_region"
        self._smpart_allow_cpu = os.environ.get(ALLOW_CPU_ENV) == "1"
        self._smpart_off = self._smpart_static_off_reason()
        if self._smpart_off is None:
            ops.register_op()
            ops.register_layer(self._smpart_name, self)
        else:
            ops.log_off_once(self._smpart_off)
        if self.skip_topk:
            ops.log_off_once("skip_topk layer (reuses an earlier layer's top-k; no indexer to fuse)")

    # ------------------------------------------------------------------ eligibility (static)
    def _smpart_static_off_reason(self) -> str | None:
        """Why this layer can never take the fused path (None if it can, per step)."""
        ind = self.indexer
        if not self.is_sparse or ind is None:
            return "not a DSV3.2 sparse-attention layer with an indexer"
        if self.q_lora_rank != dims.Q_LORA_RANK or self.q_b_proj is None or self.fused_qkv_a_proj is None:
            return f"q_lora_rank {self.q_lora_rank} (the region is DSV3.2's {dims.Q_LORA_RANK})"
        if (self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank) != (
                dims.QK_NOPE_HEAD_DIM, dims.QK_ROPE_HEAD_DIM, dims.KV_LORA_RANK):
            return "MLA head dims differ from DSV3.2's 128/64/512"
        if self.num_heads not in dims.SUPPORTED_H:
            return f"{self.num_heads} MLA heads per rank (the region takes {dims.SUPPORTED_H})"
        if self.dcp_q_replicate:
            return "DCP query replication"
        if self.rotary_emb is None or getattr(self.rotary_emb, "is_neox_style", True):
            return "MLA RoPE is not interleaved (DeepSeek YaRN)"
        if (getattr(ind, "topk_tokens", None), getattr(ind, "n_head", None), getattr(ind, "head_dim", None),
                getattr(ind, "quant_block_size", None)) != (dims.INDEX_TOPK, dims.INDEX_N_HEADS,
                                                            dims.INDEX_HEAD_DIM, dims.QUANT_GROUP):
            return "indexer dims differ from DSV3.2's top-2048 / 64 heads / 128 dims"
        if getattr(ind, "scale_fmt", None) != "ue8m0":
            return f"indexer scale_fmt {getattr(ind, 'scale_fmt', None)!r} (the region writes ue8m0 keys)"
        op = getattr(ind, "indexer_op", None)
        if op is None:
            return "indexer has no indexer_op"
        if getattr(op, "use_fp4_cache", False):
            return "MXFP4 indexer cache"
        if getattr(op, "dcp_world_size", 1) > 1 or getattr(op, "use_pcp", False):
            return "decode/prefill context parallelism"
        if getattr(op, "skip_k_cache_insert", False):
            return "indexer skips its key write (PCP)"
        if getattr(op, "candidate_blocks", None) is not None:
            return "two-level candidate blocks (DSV4.1)"
        buf = self.topk_indices_buffer
        if buf is None or buf.dtype != torch.int32 or buf.dim() != 2 or buf.shape[1] != dims.INDEX_TOPK:
            return "topk_indices_buffer is not int32 [*, 2048]"
        w = getattr(self.q_b_proj, "weight", None)
        if (w is None or w.dtype != torch.float8_e4m3fn or getattr(self.q_b_proj, "weight_scale_inv", None) is None
                or list(getattr(self.q_b_proj, "weight_block_size", None) or []) != [128, 128]):
            return "q_b_proj is not W8A8 block FP8 with 128x128 scales"
        cfg = get_current_vllm_config_or_none()
        model_dtype = getattr(getattr(cfg, "model_config", None), "dtype", None)
        if model_dtype is not None and model_dtype != torch.bfloat16:
            return f"model dtype {model_dtype} (the region is bf16)"
        if w.device.type != "cuda":
            if not self._smpart_allow_cpu:
                return f"{w.device.type.upper()} tensors (the fused kernels need a CUDA GPU)"
            return None
        if not current_platform.is_cuda():
            return "not a CUDA platform"
        major, minor = torch.cuda.get_device_capability(w.device)
        if major != 9:
            return (f"GPU sm_{major}{minor}: the region mirrors Hopper's layouts (vLLM uses MXFP8 "
                    f"indexer keys and packed scales on sm_100)")
        from vllm.utils.deep_gemm import is_deep_gemm_e8m0_used

        if not is_deep_gemm_e8m0_used():
            return "vLLM does not use UE8M0 activation scales (DeepGEMM E8M0 off)"
        return None

    # ------------------------------------------------------------------ indexer inputs
    def _smpart_indexer_inputs(self, hidden_states: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor):
        """``Indexer.forward`` (vLLM 0.33, ``models/deepseek_v2.py``) up to its ``indexer_op`` call.

        Returns
        -------
        (q_fp8 float8_e4m3fn [T, 64, 128], k bf16 [T, 128], weights fp32 [T, 64]): what vLLM
        passes to ``indexer_op(hidden_states, q_fp8, k, weights)``.
        """
        from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
        from vllm.model_executor.layers.sparse_attn_indexer import fused_indexer_q_rope_quant

        ind = self.indexer
        rotary_emb = self.indexer_rope_emb
        q, _ = ind.wq_b(qr)
        q = q.view(-1, ind.n_head, ind.head_dim)
        kw, _ = ind.wk_weights_proj(hidden_states)
        k = kw[:, : ind.head_dim]
        weights = kw[:, ind.head_dim:]
        k = ind.k_norm(k)
        if ind.use_fused_indexer_q and q.dtype == torch.bfloat16:
            k_pe, k_nope = torch.split(k, [ind.rope_dim, ind.head_dim - ind.rope_dim], dim=-1)
            q_fp8, weights = fused_indexer_q_rope_quant(
                positions, q, rotary_emb.cos_sin_cache, weights, ind.softmax_scale, ind.n_head_scale,
                rotary_emb.is_neox_style,
            )
            k_pe = k_pe.unsqueeze(1)
            q_dummy = torch.empty_like(k_pe)
            _, k_pe = rotary_emb(positions, q_dummy, k_pe)
            k_pe = k_pe.reshape(-1, ind.rope_dim)
            k = torch.cat([k_pe, k_nope], dim=-1)
            return q_fp8, k, weights
        q_pe, q_nope = torch.split(q, [ind.rope_dim, ind.head_dim - ind.rope_dim], dim=-1)
        k_pe, k_nope = torch.split(k, [ind.rope_dim, ind.head_dim - ind.rope_dim], dim=-1)
        q_pe, k_pe = rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        q_pe = q_pe.reshape(-1, ind.n_head, ind.rope_dim)
        k_pe = k_pe.reshape(-1, ind.rope_dim)
        q = torch.cat([q_pe, q_nope], dim=-1)
        k = torch.cat([k_pe, k_nope], dim=-1)
        q = q.view(-1, ind.head_dim)
        q_fp8, q_scale = per_token_group_quant_fp8(
            q, ind.quant_block_size, column_major_scales=False, use_ue8m0=ind.scale_fmt is not None,
        )
        q_fp8 = q_fp8.view(-1, ind.n_head, ind.head_dim)
        q_scale = q_scale.view(-1, ind.n_head)
        weights = weights * q_scale * ind.softmax_scale * ind.n_head_scale
        return q_fp8, k, weights

    def _smpart_cos_sin_cache(self, like: torch.Tensor) -> torch.Tensor:
        """The MLA RoPE table in the dtype vLLM's rotary kernel reads it (fp32 for FlashInfer, else
        the query dtype, as ``RotaryEmbeddingBase._match_cos_sin_cache_dtype``)."""
        rope = self.rotary_emb
        if getattr(rope, "use_flashinfer", False):
            return rope.cos_sin_cache
        return rope._match_cos_sin_cache_dtype(like)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        llama_4_scaling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._smpart_off is not None or self.skip_topk or llama_4_scaling is not None:
            if llama_4_scaling is not None and not torch.compiler.is_compiling():
                ops.log_off_once("llama_4_scaling is set")
            return super().forward(positions, hidden_states, llama_4_scaling)

        # 1. vLLM's modules up to q_c, kv_c, k_pe (MultiHeadLatentAttentionWrapper.forward)
        qkv_lora = self.fused_qkv_a_proj(hidden_states)[0]
        q_c, kv_lora = qkv_lora.split([self.q_lora_rank, self.kv_lora_rank + self.qk_rope_head_dim], dim=-1)
        if not self.fuse_qkv_rmsnorm:
            q_c = self.q_a_layernorm(q_c)
        kv_c, k_pe = kv_lora.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.fuse_qkv_rmsnorm:
            from vllm.models.common.ops import fused_q_kv_rmsnorm

            q_c, kv_c_normed = fused_q_kv_rmsnorm(
                q_c, kv_c, self.q_a_layernorm.weight.data, self.kv_a_layernorm.weight.data,
                self.q_a_layernorm.variance_epsilon,
            )
        else:
            kv_c_normed = self.kv_a_layernorm(kv_c)
        k_pe = k_pe.unsqueeze(1)

        # 2. the indexer's projections, RoPE and quant (Indexer.forward up to indexer_op)
        index_q_fp8, index_k, index_weights = self._smpart_indexer_inputs(hidden_states, q_c, positions)

        # 3. the region: one op (fused on decode-only steps, vLLM's modules otherwise)
        num_tokens = hidden_states.shape[0]
        q = torch.empty((num_tokens, self.num_heads, self.qk_head_dim), dtype=q_c.dtype, device=q_c.device)
        torch.ops.smpart.dsv32_region(
            hidden_states, q_c.contiguous(), positions,
            self.q_b_proj.weight, self.q_b_proj.weight_scale_inv, self._smpart_cos_sin_cache(q_c),
            index_q_fp8, index_k.contiguous(), index_weights.contiguous(),
            q, k_pe, self.indexer.k_cache.kv_cache, self.topk_indices_buffer,
            _encode_layer_name(self._smpart_name), _encode_layer_name(self.indexer.k_cache.prefix),
            self.indexer.max_model_len, False,
        )
        if self.is_sparse:
            self.mla_attn.impl.record_logical_topk_ready()  # type: ignore[attr-defined]

        # 4. vLLM's attention and output projection, as the original forward
        attn_out = self.mla_attn(
            q, kv_c_normed, k_pe,
            output_shape=(num_tokens, self.num_heads * self.v_head_dim),
            q_dcp_replicated=None,
        )
        if self.g_proj is not None:
            attn_out = attn_out * self.g_proj(hidden_states)[0].sigmoid()
        return self.o_proj(attn_out)[0]


__all__ = ["SmpartDSV32MLAWrapper", "ALLOW_CPU_ENV"]
