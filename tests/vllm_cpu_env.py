"""The vLLM 0.33.0 CPU environment of the shim's tests (``test_integration_plugin.py``,
``test_integration_forward.py``): fixtures, stand-ins and metadata builders. Not a test module.

What runs as vLLM's own code here (imported from the installed ``vllm`` wheel, nothing copied):
the plugin loader (``vllm.plugins.load_general_plugins`` / ``load_plugins_by_group``), the OOT
registry (``PluggableLayer.register_oot`` / ``PluggableLayer.__new__``), ``VllmConfig`` /
``ModelConfig`` (from a local DSV3.2-shaped ``config.json``, no weights), the distributed state
(gloo, world size 1), ``set_forward_context``, the custom-op helper ``direct_register_custom_op``,
``DeepseekV2MLAAttention.__init__`` building the MLA layer (so the swap happens inside vLLM's own
model code), its ``fused_qkv_a_proj`` / ``q_b_proj`` / ``kv_b_proj`` / ``o_proj`` (``Fp8LinearMethod``
with real FP8 parameters and ``weight_loader``s), RMSNorms, DeepSeek YaRN RoPEs, the real
``Indexer`` (``wq_b``, ``wk_weights_proj``, ``k_norm``, its cache layer and ``SparseAttnIndexer``),
``DeepseekV32IndexerMetadataBuilder.build`` producing the decode metadata (plain decode, padded
requests, native MTP), and the ``DeepseekV32IndexerMetadata`` / ``DeepSeekV32IndexerDecodeMetadata``
/ ``DeepseekV32IndexerPrefillMetadata`` dataclasses.

What cannot run on a CPU and is replaced, each at the narrowest point (the module's fixtures):

* ``MLAAttention`` (the attention core inside the wrapper): vLLM has no sparse-MLA backend on a
  CPU (``get_attn_backend`` raises "Invalid attention backend" / "Sparse Attention is not
  supported on CPU"). A stub records ``(q, kv_c_normed, k_pe)`` and returns zeros.
* the FP8 block GEMM kernel (``init_fp8_linear_kernel``): no CPU kernel exists without AMX and
  DeepGEMM is CUDA-only. A stand-in dequantizes the real FP8 weights and block scales and runs a
  float matmul; the ``Fp8LinearMethod`` and its parameters are vLLM's.
* ``per_token_group_quant_fp8`` (in ``fp8_utils`` and ``deepseek_v2``): vLLM disables Triton on a
  machine without a GPU driver (``vllm/triton_utils/importing.py``), so its Triton fallback cannot
  run; the project's torch twin (``reference.per_token_group_quant``) stands in.
* ``SparseAttnIndexer.forward`` (vLLM's ``sparse_attn_indexer``: ``vllm._C`` CUDA ops and DeepGEMM)
  where the fallback calls it: a recorder of its arguments.
* ``num_compute_units`` in the indexer metadata builder (the CPU platform has no SM count): 8.

Not exercised here (needs a GPU and a CUDA vLLM build): vLLM's CUDA kernels, CUDA-graph capture
of the op, torch.compile of the model, a real vLLM server. The region kernels run in Triton's
interpreter (``TRITON_INTERPRET=1``, H=16).
"""

import contextlib
import json
import os
import tempfile
import types

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001 (any import failure means: no vLLM here)
    pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e}); "
                f"pip install --no-deps vllm==0.33.0 plus its imports (see .ci/run)", allow_module_level=True)

from smpart.integration import plugin  # noqa: E402
from smpart.triton_kernels import dims
from smpart import reference as R  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the region kernels on CPU: needs TRITON_INTERPRET=1")
HIDDEN = 256  # the layer's hidden size (not part of the region); DSV3.2's region dims are kept
H = 16  # MLA heads per rank (DSV3.2 at TP8)
PREFIX = "model.layers.{}.self_attn"


# ---------------------------------------------------------------------------------------------
# vLLM environment (module scope: vLLM config, distributed state, CPU stand-ins)
# ---------------------------------------------------------------------------------------------
class _DequantFp8Kernel:
    """Stand-in for vLLM's FP8 block-scaled GEMM kernel: dequantize the layer's real FP8 weight
    with its 128x128 block scales (``weight_scale_inv``) and run a float matmul."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def process_weights_after_loading(self, layer):
        pass

    def apply_weights(self, layer, x, bias=None):
        w, s = layer.weight.float(), layer.weight_scale_inv
        s = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        return (x.float() @ (w * s).T).to(x.dtype)


class _StubMLAAttention(torch.nn.Module):
    """Stand-in for vLLM's ``MLAAttention`` (no sparse-MLA backend on CPU): records its inputs."""

    def __init__(self, **kwargs):
        super().__init__()
        self.layer_name = kwargs["prefix"]
        self.calls = []
        self.impl = types.SimpleNamespace(record_logical_topk_ready=lambda: None)

    def forward(self, q, kv_c_normed, k_pe, output_shape, q_dcp_replicated=None):
        self.calls.append((q.clone(), kv_c_normed.clone(), k_pe.clone()))
        return torch.zeros(output_shape, dtype=q.dtype, device=q.device)


def _per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                               tma_aligned_scales=False, out_q=None, use_ue8m0=None):
    assert group_size == dims.QUANT_GROUP and not column_major_scales and out_q is None
    return R.per_token_group_quant(x, use_ue8m0=bool(use_ue8m0))


@contextlib.contextmanager
def dsv32_vllm_config(tmp_path_factory, name: str = "dsv32"):
    """vLLM's ``VllmConfig`` for a DSV3.2-shaped model (``config.json`` written to a fresh
    ``tmp_path_factory`` folder ``name``: DSV3.2's region dims, ``HIDDEN`` hidden size, ``H`` heads,
    no weights; CPU device, block size 64, ``max_model_len`` 4096) with vLLM's distributed state
    initialized (gloo, world size 1). Yields the config; tears the distributed state down on exit."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    model_dir = tmp_path_factory.mktemp(name)
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "torch_dtype": "bfloat16",
        "hidden_size": HIDDEN, "intermediate_size": 512, "moe_intermediate_size": 256, "num_hidden_layers": 61,
        "num_attention_heads": H, "num_key_value_heads": H, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 3, "vocab_size": 1024,
        "q_lora_rank": dims.Q_LORA_RANK, "kv_lora_rank": dims.KV_LORA_RANK, "qk_nope_head_dim": dims.QK_NOPE_HEAD_DIM,
        "qk_rope_head_dim": dims.QK_ROPE_HEAD_DIM, "v_head_dim": 128, "index_topk": dims.INDEX_TOPK,
        "index_n_heads": dims.INDEX_N_HEADS, "index_head_dim": dims.INDEX_HEAD_DIM, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }))
    mc = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096)
    cfg = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), cache_config=CacheConfig(block_size=64))
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp(prefix='smpart-dist-')}")
        initialize_model_parallel(1, 1)
    try:
        yield cfg
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """vLLM config + distributed state + CPU stand-ins; yields a namespace with ``cfg``."""
    import vllm.model_executor.layers.mla as vllm_mla
    import vllm.model_executor.layers.quantization.fp8 as vllm_fp8
    import vllm.model_executor.layers.quantization.utils.fp8_utils as vllm_fp8_utils
    import vllm.model_executor.models.deepseek_v2 as vllm_dsv2
    import vllm.v1.attention.backends.mla.indexer as vllm_indexer

    with dsv32_vllm_config(tmp_path_factory) as cfg, pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_mla, "MLAAttention", _StubMLAAttention)
        mp.setattr(vllm_fp8, "init_fp8_linear_kernel", lambda **kw: _DequantFp8Kernel(**kw))
        mp.setattr(vllm_fp8_utils, "per_token_group_quant_fp8", _per_token_group_quant_fp8)
        mp.setattr(vllm_dsv2, "per_token_group_quant_fp8", _per_token_group_quant_fp8)
        mp.setattr(vllm_indexer, "num_compute_units", lambda device_id=None: 8)
        yield types.SimpleNamespace(cfg=cfg, layer_ids=iter(range(1000)))


@pytest.fixture
def flag(monkeypatch):
    """``SMPART_DSV32=1`` (CPU tensors allowed on the fused path: the interpreter runs the kernels);
    unregisters the layer afterwards so each test starts from vLLM's own registry."""
    from smpart.integration import ops

    monkeypatch.setenv(plugin.FLAG_ENV, "1")
    monkeypatch.setenv("SMPART_DSV32_ALLOW_CPU", "1")
    ops._LOGGED.clear()
    ops.stats.clear()
    yield
    plugin.unregister()


@pytest.fixture
def no_flag(monkeypatch):
    monkeypatch.delenv(plugin.FLAG_ENV, raising=False)
    plugin.unregister()
    yield


def _build_layer(venv, skip_pattern: str | None = None):
    """vLLM's ``DeepseekV2MLAAttention`` (DSV3.2 config, H=16, W8A8 block FP8); returns its MLA
    wrapper (whatever class vLLM instantiated) with seeded weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLAAttention

    layer_id = next(venv.layer_ids)
    hf = venv.cfg.model_config.hf_config
    old_pattern = getattr(hf, "index_topk_pattern", None)
    if skip_pattern is not None:
        hf.index_topk_pattern = skip_pattern(layer_id)
    qc = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic", weight_block_size=[128, 128])
    buf = torch.full((64, dims.INDEX_TOPK), -9, dtype=torch.int32)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with set_current_vllm_config(venv.cfg):
            attn = DeepseekV2MLAAttention(
                venv.cfg, hf, HIDDEN, H, dims.QK_NOPE_HEAD_DIM, dims.QK_ROPE_HEAD_DIM, 128, dims.Q_LORA_RANK,
                dims.KV_LORA_RANK, max_position_embeddings=163840, cache_config=venv.cfg.cache_config, quant_config=qc,
                prefix=PREFIX.format(layer_id), topk_indices_buffer=buf,
            )
    finally:
        torch.set_default_dtype(old_dtype)
        if skip_pattern is not None:
            hf.index_topk_pattern = old_pattern
    layer = attn.mla_attn
    g = torch.Generator().manual_seed(layer_id)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                val = (torch.randn(p.shape, generator=g) * 64).clamp(-448, 448).to(p.dtype)
            elif name.endswith("weight_scale_inv"):
                val = 2.0 ** torch.randint(-14, -10, p.shape, generator=g).float()  # UE8M0 (powers of two)
            elif name.endswith("bias"):
                val = torch.zeros(p.shape)
            else:
                val = 1 + 0.1 * torch.randn(p.shape, generator=g)
            loader = getattr(p, "weight_loader", None)
            if loader is not None and name.endswith("q_b_proj.weight"):
                loader(p, val.to(p.dtype))  # vLLM's own ColumnParallelLinear weight_loader (TP=1)
            else:
                p.copy_(val.to(p.dtype))
    return layer


@contextlib.contextmanager
def _forward_ctx(venv, attn_metadata):
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    with set_current_vllm_config(venv.cfg), set_forward_context(attn_metadata, venv.cfg):
        yield


def _decode_metadata(venv, prefix, args, next_n=1):
    """``DeepseekV32IndexerMetadata`` built by vLLM's own builder for a decode-only batch of
    ``args`` (RegionArgs); ``next_n=2`` sets the builder's MTP attributes (one draft token)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadataBuilder
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    B = args.context_lens.shape[0]
    T = B * next_n
    with set_current_vllm_config(venv.cfg):
        spec = MLAAttentionSpec(block_size=64, num_kv_heads=1, head_size=dims.CACHE_BYTES_PER_TOKEN, dtype=torch.uint8)
        builder = DeepseekV32IndexerMetadataBuilder(spec, [prefix], venv.cfg, torch.device("cpu"),
                                                    block_table_width=args.block_table.shape[1])
        if next_n > 1:  # as __init__ sets them with speculative_config.num_speculative_tokens = next_n - 1
            builder.num_speculative_tokens = next_n - 1
            builder.decode_threshold = next_n
            builder.offsets_buffer = torch.arange(next_n, dtype=torch.int32)
        qsl = torch.arange(B + 1, dtype=torch.int32) * next_n
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=args.context_lens, num_reqs=B,
            num_actual_tokens=T, max_query_len=next_n, max_seq_len=int(args.context_lens.max()),
            block_table_tensor=args.block_table, slot_mapping=args.slot_mapping,
            seq_lens_cpu_upper_bound=args.context_lens.clone(),
        )
        return builder.build(0, cm)


def _mixed_metadata(slot_mapping, num_decodes=1, num_decode_tokens=1, num_prefill_tokens=3):
    """A mixed (decode + prefill) ``DeepseekV32IndexerMetadata`` (vLLM's dataclasses; the prefill
    chunk builder's Triton kernel cannot run on CPU, and the routing reads only the counts)."""
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadata, DeepseekV32IndexerPrefillMetadata

    n = num_decode_tokens + num_prefill_tokens
    return DeepseekV32IndexerMetadata(
        seq_lens=torch.tensor([70] * (num_decodes + 1), dtype=torch.int32), max_seq_len=70, slot_mapping=slot_mapping[:n],
        num_decodes=num_decodes, num_decode_tokens=num_decode_tokens, num_prefills=1,
        num_prefill_tokens=num_prefill_tokens, decode=None, prefill=DeepseekV32IndexerPrefillMetadata(chunks=[]),
    )
