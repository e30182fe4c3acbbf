"""The vLLM shim against the real vLLM 0.33.0 package on a CPU: plugin discovery, the flag, per-step
routing on vLLM's metadata objects, the capture rule (environment: ``vllm_cpu_env.py``)."""


import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001 (any import failure means: no vLLM here)
    pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e}); "
                f"pip install --no-deps vllm==0.33.0 plus its imports (see .ci/run)", allow_module_level=True)

from smpart import reference as R  # noqa: E402
from smpart.batch import make_decode_batch  # noqa: E402
from smpart.integration import plugin  # noqa: E402
from smpart.triton_kernels import dims  # noqa: E402
from vllm_cpu_env import (  # noqa: E402,F401 - fixtures and helpers (tests/ is on pytest's pythonpath)
    H, _build_layer, _decode_metadata, _mixed_metadata, flag, no_flag, venv,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


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
