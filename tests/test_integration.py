"""The vLLM shim (``SMPART_DSV32=1``) against the real vLLM 0.33.0 package, on a CPU.

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
import dataclasses
import json
import logging
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
from smpart import checks  # noqa: E402
from smpart import reference as R  # noqa: E402
from smpart.batch import make_decode_batch  # noqa: E402
from smpart.region import run_region  # noqa: E402

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


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """vLLM config + distributed state + CPU stand-ins; yields a namespace with ``cfg``."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    model_dir = tmp_path_factory.mktemp("dsv32")
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
    import vllm.model_executor.layers.mla as vllm_mla
    import vllm.model_executor.layers.quantization.fp8 as vllm_fp8
    import vllm.model_executor.layers.quantization.utils.fp8_utils as vllm_fp8_utils
    import vllm.model_executor.models.deepseek_v2 as vllm_dsv2
    import vllm.v1.attention.backends.mla.indexer as vllm_indexer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_mla, "MLAAttention", _StubMLAAttention)
        mp.setattr(vllm_fp8, "init_fp8_linear_kernel", lambda **kw: _DequantFp8Kernel(**kw))
        mp.setattr(vllm_fp8_utils, "per_token_group_quant_fp8", _per_token_group_quant_fp8)
        mp.setattr(vllm_dsv2, "per_token_group_quant_fp8", _per_token_group_quant_fp8)
        mp.setattr(vllm_indexer, "num_compute_units", lambda device_id=None: 8)
        yield types.SimpleNamespace(cfg=cfg, layer_ids=iter(range(1000)))
    destroy_model_parallel()
    destroy_distributed_environment()


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


# ---------------------------------------------------------------------------------------------
# plugin: discovery, flag, idempotence
# ---------------------------------------------------------------------------------------------
def test_entry_point_is_discovered_by_vllms_plugin_loader(venv, flag, monkeypatch):
    import vllm.plugins
    from vllm.model_executor.custom_op import op_registry_oot

    from smpart.integration.mla import SmpartDSV32MLAWrapper

    found = vllm.plugins.load_plugins_by_group(vllm.plugins.DEFAULT_PLUGINS_GROUP)
    assert found.get("smpart_dsv32") is plugin.register, f"vLLM's loader found {sorted(found)}"
    monkeypatch.setenv("VLLM_PLUGINS", "smpart_dsv32")
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()
    assert op_registry_oot.get(plugin.LAYER_NAME) is SmpartDSV32MLAWrapper


def test_without_flag_nothing_changes(venv, no_flag):
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    split_ops = list(CompilationConfig._attention_ops)
    oot = dict(op_registry_oot)
    plugin.register()
    assert dict(op_registry_oot) == oot and plugin.LAYER_NAME not in op_registry_oot
    assert list(CompilationConfig._attention_ops) == split_ops
    assert type(_build_layer(venv)) is MultiHeadLatentAttentionWrapper


def test_flag_swaps_the_class_and_loading_twice_is_harmless(venv, flag):
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.custom_op import op_registry_oot

    from smpart.integration import ops
    from smpart.integration.mla import SmpartDSV32MLAWrapper

    plugin.register()
    plugin.register()  # vLLM may load general plugins more than once per process
    assert op_registry_oot[plugin.LAYER_NAME] is SmpartDSV32MLAWrapper
    assert CompilationConfig._attention_ops.count(ops.OP_QUALNAME) == 1
    assert hasattr(torch.ops.smpart, "dsv32_region")
    layer = _build_layer(venv)  # vLLM's DeepseekV2MLAAttention.__init__ builds the wrapper
    assert type(layer) is SmpartDSV32MLAWrapper and layer._smpart_off is None, layer._smpart_off


def test_another_oot_replacement_is_left_alone(venv, flag):
    from vllm.model_executor.custom_op import op_registry_oot

    class Other:
        pass

    op_registry_oot[plugin.LAYER_NAME] = Other
    try:
        plugin.register()
        assert op_registry_oot[plugin.LAYER_NAME] is Other
    finally:
        del op_registry_oot[plugin.LAYER_NAME]


def test_generic_model_route_is_opt_in(venv, flag, monkeypatch):
    """``SMPART_DSV32_GENERIC_MODEL=1`` maps DeepseekV32ForCausalLM to vLLM's generic deepseek_v2
    model (whose MLA layer is the swapped wrapper) through ``ModelRegistry.register_model``."""
    from vllm import ModelRegistry

    old = ModelRegistry.models["DeepseekV32ForCausalLM"]
    try:
        plugin.register()
        assert ModelRegistry.models["DeepseekV32ForCausalLM"] is old  # not without the second flag
        monkeypatch.setenv(plugin.GENERIC_MODEL_ENV, "1")
        plugin.register()
        new = ModelRegistry.models["DeepseekV32ForCausalLM"]
        assert (new.module_name, new.class_name) == ("vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM")
    finally:
        ModelRegistry.models["DeepseekV32ForCausalLM"] = old


# ---------------------------------------------------------------------------------------------
# per-step routing on vLLM's metadata objects
# ---------------------------------------------------------------------------------------------
def _routing_cases():
    return ["decode", "decode-padded", "mtp-next_n2", "flattened", "prefill", "mixed", "profile-run",
            "no-layer-metadata", "non-uniform", "dcp", "too-many-rows"]


@pytest.mark.parametrize("case", _routing_cases())
def test_routing_on_vllm_metadata(venv, case):
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadata, DeepSeekV32IndexerDecodeMetadata

    from smpart.integration import ops

    prefix = "routing.k_cache"
    next_n = 2 if case == "mtp-next_n2" else 1  # rows per request the plan must report
    batch_next_n = 2 if case in ("mtp-next_n2", "flattened") else 1
    batch = make_decode_batch([70, 130, 5], num_heads=H, next_n=batch_next_n,
                              num_padding=1 if case == "decode-padded" else 0)
    a = batch.args
    T = a.q_c.shape[0]
    want = None  # fused
    if case in ("decode", "decode-padded", "mtp-next_n2"):
        md = _decode_metadata(venv, prefix, a, next_n)
    elif case == "flattened":
        # vLLM's per-token flattening (spec decode with adaptive verification, or a next_n with no
        # native kernel): each MTP row is its own request with its own visible length and a copy of
        # its request's block-table row, as DeepseekV32IndexerMetadataBuilder._prepare_decode_tensors
        # lays them out (its Triton kernel cannot run on CPU, so the layout is built here)
        lens = R.visible_lens(a.context_lens, batch_next_n)
        md = DeepseekV32IndexerMetadata(
            seq_lens=a.context_lens, max_seq_len=int(a.context_lens.max()), slot_mapping=a.slot_mapping,
            num_decodes=3, num_decode_tokens=T, num_prefills=0, num_prefill_tokens=0,
            decode=DeepSeekV32IndexerDecodeMetadata(
                block_table=a.block_table.repeat_interleave(batch_next_n, dim=0), seq_lens=lens.unsqueeze(-1),
                decode_lens=torch.ones(T, dtype=torch.int32), requires_padding=False,
                schedule_metadata=torch.empty(0, dtype=torch.int32)))
    elif case in ("prefill", "mixed"):
        md = _mixed_metadata(a.slot_mapping, num_decodes=0 if case == "prefill" else 1,
                             num_decode_tokens=0 if case == "prefill" else 1, num_prefill_tokens=2)
        want = "prefill batch" if case == "prefill" else "mixed prefill/decode batch"
    elif case == "profile-run":
        md, want = None, "no attention metadata (profile or dummy run)"
    elif case == "no-layer-metadata":
        md, want = None, "no indexer metadata for this layer (profile or dummy run)"
    else:
        md = _decode_metadata(venv, prefix, a, next_n)
        if case == "non-uniform":
            md.decode.requires_padding, want = True, "non-uniform decode lengths (packed decode path)"
        elif case == "dcp":
            md.decode.global_seq_lens, want = md.decode.seq_lens.clone(), "decode context parallelism (DCP)"
        else:
            md.num_decode_tokens, want = 300, f"300 decode rows > {dims.T_MAX}"
    attn_metadata = None if case == "profile-run" else ({} if md is None else {prefix: md})
    plan = ops.plan_region(attn_metadata, prefix, T)
    if want is not None:
        assert plan == want
        return
    assert isinstance(plan, ops.RegionPlan), plan
    assert (plan.num_tokens, plan.next_n) == (T, next_n)
    # views of vLLM's metadata, no copies
    assert plan.slot_mapping.data_ptr() == md.slot_mapping.data_ptr()
    assert plan.block_table.data_ptr() == md.decode.block_table.data_ptr()
    if next_n == 1:
        assert plan.context_lens.data_ptr() == md.decode.seq_lens.data_ptr()
    else:
        assert plan.context_lens.data_ptr() == md.seq_lens.data_ptr()
    vis = R.visible_lens(plan.context_lens, plan.next_n)
    assert torch.equal(vis, R.visible_lens(a.context_lens, batch_next_n)), "visible lengths differ from the batch's"


@pytest.mark.parametrize("mode,uniform,fused", [("FULL", True, True), ("FULL", False, False),
                                                 ("PIECEWISE", False, False), ("NONE", False, True)])
def test_capture_rule(venv, monkeypatch, mode, uniform, fused):
    """While a CUDA graph is being captured the fused path is taken only for a FULL graph of a
    uniform-decode batch descriptor (the only batches that graph replays); vLLM's ForwardContext."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor, get_forward_context, set_forward_context

    from smpart.integration import ops

    monkeypatch.setattr(ops, "_is_capturing", lambda: mode != "NONE")
    with set_forward_context({}, venv.cfg, cudagraph_runtime_mode=getattr(CUDAGraphMode, mode),
                             batch_descriptor=BatchDescriptor(num_tokens=8, num_reqs=8, uniform=uniform)):
        reason = ops._capture_reason(get_forward_context())
    assert (reason is None) == fused, reason


def test_weight_check():
    from smpart.integration import ops

    w = torch.zeros(H * dims.QK_HEAD_DIM, dims.Q_LORA_RANK, dtype=torch.float8_e4m3fn)
    s = torch.full((H * dims.QK_HEAD_DIM // 128, dims.Q_LORA_RANK // 128), 2.0 ** -9)
    assert ops.check_weights(w, s) is None
    assert "not powers of two" in ops.check_weights(w, s * 0.3)
    assert "contiguous float32" in ops.check_weights(w, s.t().contiguous().t())
    assert "float8_e4m3fn" in ops.check_weights(w.to(torch.bfloat16), s)


# ---------------------------------------------------------------------------------------------
# the custom op on vLLM metadata vs the reference path
# ---------------------------------------------------------------------------------------------
OP_CASES = [  # (lens, next_n, padding requests, path)
    ([70, 130, 5], 1, 1, "sequential"),
    ([70, 130, 5], 1, 1, "partitioned"),
    ([2049, 66], 2, 0, "partitioned"),
]


@needs_interpreter
@pytest.mark.parametrize("case", OP_CASES, ids=[f"n{c[1]}-pad{c[2]}-{c[3]}" for c in OP_CASES])
def test_custom_op_matches_reference(venv, case, monkeypatch):
    """``torch.ops.smpart.dsv32_region`` (registered through vLLM's ``direct_register_custom_op``)
    reading decode metadata built by vLLM's builder from a real forward context writes the
    ``reference`` path's q, k_pe, top-k and cache bytes."""
    from vllm.utils.torch_utils import _encode_layer_name

    from smpart.integration import ops

    lens, next_n, pad, path = case
    monkeypatch.setenv(ops.PATH_ENV, path)
    ops.register_op()
    prefix = f"op.{path}.k_cache"
    batch = make_decode_batch(lens, num_heads=H, next_n=next_n, num_padding=pad, seed=len(lens) + next_n)
    md = _decode_metadata(venv, prefix, batch.args, next_n)
    ref = batch.clone()
    run_region(ref.args, path="reference")
    out = batch.clone()
    o = out.args
    T = o.q_c.shape[0]
    buf = torch.full((T + 5, dims.INDEX_TOPK), -9, dtype=torch.int32)  # vLLM's buffer has more rows
    before = ops.stats["fused"]
    with _forward_ctx(venv, {prefix: md}):
        torch.ops.smpart.dsv32_region(
            torch.empty(T, HIDDEN, dtype=torch.bfloat16), o.q_c, o.positions, o.q_b_proj_weight,
            o.q_b_proj_weight_scale, o.cos_sin_cache, o.index_q_fp8, o.index_k, o.index_weights, o.q, o.k_pe,
            o.kv_cache, buf, _encode_layer_name("unused"), _encode_layer_name(prefix), 4096, False,
        )
    assert ops.stats["fused"] == before + 1 and ops.stats[f"fused: {path}"] >= 1
    assert torch.all(buf[T:] == -9), "rows past the batch were touched"
    o.topk_indices.copy_(buf[:T])
    checks.check_region(o, ref.args, batch)


# ---------------------------------------------------------------------------------------------
# the swapped layer's forward (vLLM's layer objects; see the module docstring for stand-ins)
# ---------------------------------------------------------------------------------------------
def _layer_inputs(layer, lens, seed=0):
    """A decode batch for ``layer``: cache, tables and positions from ``make_decode_batch``, the
    cache bound to the layer's real indexer cache layer, random hidden states."""
    batch = make_decode_batch(lens, num_heads=H, seed=seed)
    a = batch.args
    layer.indexer.k_cache.bind_kv_cache(a.kv_cache.clone().unsqueeze(1))  # vLLM: [blocks, 1, 64, 132]
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(a.q_c.shape[0], HIDDEN, generator=g).to(torch.bfloat16)
    return a, hs


def _record_indexer_op(layer, monkeypatch):
    calls = []

    def record(hidden_states, q_fp8, k, weights):
        calls.append((hidden_states, q_fp8.clone(), k.clone(), weights.clone()))
        return layer.topk_indices_buffer

    monkeypatch.setattr(layer.indexer.indexer_op, "forward", record)
    return calls


@needs_interpreter
def test_swapped_layer_decode_forward(venv, flag, monkeypatch):
    """Decode-only step through the swapped layer: one fused op call whose outputs match the
    reference on the layer's own tensors, wired into ``mla_attn``; ``k_pe`` equals vLLM's own
    rotary_emb output and the indexer inputs equal what vLLM's ``Indexer.forward`` hands its op."""
    from vllm.config import set_current_vllm_config

    from smpart.integration import ops

    monkeypatch.setenv(ops.PATH_ENV, "sequential")
    plugin.register()
    layer = _build_layer(venv)
    a, hs = _layer_inputs(layer, [70, 130], seed=1)
    prefix = layer.indexer.k_cache.prefix
    md = _decode_metadata(venv, prefix, a)
    seen = {}
    real_run_region = ops.run_region

    def spy(args, **kw):  # the reference on a snapshot of the op's own RegionArgs, then the real call
        ref = dataclasses.replace(args, kv_cache=args.kv_cache.clone(), k_pe=args.k_pe.clone(), q=args.q.clone(),
                                  topk_indices=args.topk_indices.clone())
        real_run_region(ref, path="reference")
        real_run_region(args, **kw)
        seen.update(out=args, ref=ref, kw=kw)

    monkeypatch.setattr(ops, "run_region", spy)
    with _forward_ctx(venv, {prefix: md}):
        out = layer(a.positions, hs)
    assert out.shape == (hs.shape[0], HIDDEN)
    assert ops.stats["fused"] == 1 and ops.stats["fallback"] == 0, dict(ops.stats)
    assert seen["kw"]["check_values"] is False and seen["kw"]["path"] == "sequential"
    checks.check_region(seen["out"], seen["ref"])
    # the op wrote into the tensors mla_attn received and into the model's topk buffer
    q_attn, kv_c_normed, k_pe_attn = layer.mla_attn.calls[-1]
    T = hs.shape[0]
    assert torch.equal(q_attn[:T], seen["out"].q) and torch.equal(k_pe_attn[:T], seen["out"].k_pe)
    assert seen["out"].topk_indices.data_ptr() == layer.topk_indices_buffer.data_ptr()
    # against vLLM's own modules on the same layer
    with set_current_vllm_config(venv.cfg):
        q_c, kv_lora = layer.fused_qkv_a_proj(hs)[0].split([dims.Q_LORA_RANK, dims.KV_LORA_RANK + 64], dim=-1)
        q_c = layer.q_a_layernorm(q_c)
        kv_c, k_pe = kv_lora.split([dims.KV_LORA_RANK, 64], dim=-1)
        assert torch.equal(kv_c_normed, layer.kv_a_layernorm(kv_c))
        q_vllm = layer.q_b_proj(q_c)[0].view(T, H, dims.QK_HEAD_DIM)
        q_vllm[..., 128:], k_pe_vllm = layer.rotary_emb(a.positions, q_vllm[..., 128:], k_pe.unsqueeze(1))
        assert torch.equal(k_pe_attn, k_pe_vllm), "k_pe differs from vLLM's rotary_emb"
        # q: our W8A8 GEMM quantizes activations per 128-group (as vLLM's DeepGEMM path does); the CPU
        # stand-in GEMM does not, so only quantization error separates them
        assert checks.calc_diff(q_attn.float(), q_vllm.float()) < 2e-3
        calls = _record_indexer_op(layer, monkeypatch)
        layer.indexer(hs, q_c, a.positions, layer.indexer_rope_emb)  # vLLM's Indexer.forward
        mine = layer._smpart_indexer_inputs(hs, q_c, a.positions)
    _, q_fp8, k, w = calls[-1]
    assert torch.equal(q_fp8.view(torch.uint8), mine[0].view(torch.uint8))
    assert torch.equal(k, mine[1]) and torch.equal(w, mine[2])


def test_swapped_layer_mixed_batch_runs_vllms_path(venv, flag, monkeypatch, caplog):
    """A mixed prefill/decode step takes vLLM's own path inside the op: the same ``mla_attn``
    inputs and ``indexer_op`` arguments as vLLM's original ``MultiHeadLatentAttentionWrapper.forward``
    on the same layer, bit for bit, with one log line for the reason."""
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    from smpart.integration import ops

    plugin.register()
    layer = _build_layer(venv)
    a, hs = _layer_inputs(layer, [70, 130, 40, 9], seed=2)
    md = _mixed_metadata(a.slot_mapping, num_decodes=1, num_decode_tokens=1, num_prefill_tokens=3)
    calls = _record_indexer_op(layer, monkeypatch)
    monkeypatch.setattr(ops, "run_region", lambda *a, **k: pytest.fail("fused path taken on a mixed batch"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lg = logging.getLogger("vllm.smpart_dsv32")
    old_level = lg.level
    lg.setLevel(logging.INFO)  # vLLM sets INFO on its "vllm" logger when it configures logging (a server does)
    lg.addHandler(handler)
    try:
        with _forward_ctx(venv, {layer.indexer.k_cache.prefix: md}):
            out = layer(a.positions, hs)
            layer(a.positions, hs)  # the reason is logged once
            want = MultiHeadLatentAttentionWrapper.forward(layer, a.positions, hs)  # vLLM's original
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
    assert ops.stats["fallback: mixed prefill/decode batch"] == 2 and ops.stats["fused"] == 0
    assert sum("mixed prefill/decode batch" in r.getMessage() for r in records) == 1
    assert torch.equal(out, want)
    for got, ref in zip(layer.mla_attn.calls[0], layer.mla_attn.calls[-1]):  # q, kv_c_normed, k_pe
        assert torch.equal(got, ref)
    for got, ref in zip(calls[0][1:], calls[-1][1:]):  # q_fp8, k, weights handed to vLLM's indexer op
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_cpu_tensors_and_skip_topk_layers_keep_vllms_forward(venv, flag, monkeypatch):
    """Layers the region cannot serve call vLLM's original forward: CPU tensors without the test
    hook, and ``skip_topk`` layers (built without an indexer; they reuse an earlier layer's top-k)."""
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    from smpart.integration import ops

    plugin.register()
    monkeypatch.delenv("SMPART_DSV32_ALLOW_CPU")
    cpu_layer = _build_layer(venv)
    assert cpu_layer._smpart_off == "CPU tensors (the fused kernels need a CUDA GPU)"
    skip_layer = _build_layer(venv, skip_pattern=lambda i: "F" * i + "S")
    assert skip_layer.skip_topk and skip_layer.indexer is None and skip_layer._smpart_off is not None
    used = []
    real = MultiHeadLatentAttentionWrapper.forward

    def original(self, *args, **kwargs):
        used.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MultiHeadLatentAttentionWrapper, "forward", original)
    for layer in (cpu_layer, skip_layer):
        a, hs = (_layer_inputs(layer, [70, 9], seed=3) if layer.indexer is not None
                 else (make_decode_batch([70, 9], num_heads=H).args, torch.randn(2, HIDDEN).to(torch.bfloat16)))
        if layer.indexer is not None:
            _record_indexer_op(layer, monkeypatch)
        layer(a.positions, hs)
    assert used == [cpu_layer, skip_layer]
    assert ops.stats["fused"] == 0 and ops.stats["fallback"] == 0


@needs_interpreter
def test_swapped_layer_traces_as_one_graph(venv, flag, monkeypatch):
    """``torch.compile(fullgraph=True)`` traces the swapped layer's forward with no graph break (the
    op is opaque through its fake impl; vLLM compiles model forwards the same way, guard-free), and
    the compiled forward (AOT autograd functionalization of the op's mutated arguments) gives the
    eager forward's results. Backend ``aot_eager``: vLLM's Inductor passes are not run here."""
    from smpart.integration import ops

    monkeypatch.setenv(ops.PATH_ENV, "sequential")
    plugin.register()
    layer = _build_layer(venv)
    a, hs = _layer_inputs(layer, [70, 9], seed=4)
    md = _decode_metadata(venv, layer.indexer.k_cache.prefix, a)
    cache0 = layer.indexer.k_cache.kv_cache.clone()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn in (layer, compiled):
        layer.indexer.k_cache.kv_cache.copy_(cache0)
        layer.topk_indices_buffer.fill_(-9)
        with _forward_ctx(venv, {layer.indexer.k_cache.prefix: md}):
            fn(a.positions, hs)
        q, _, k_pe = layer.mla_attn.calls[-1]
        results.append((q, k_pe, layer.indexer.k_cache.kv_cache.clone(), layer.topk_indices_buffer[:2].clone()))
    assert ops.stats["fused"] == 2 and ops.stats["fallback"] == 0, dict(ops.stats)
    for name, e, c in zip(("q", "k_pe", "kv_cache", "topk"), *results):
        assert torch.equal(e, c), f"{name}: compiled forward differs from eager"
