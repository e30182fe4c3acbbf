"""The production-model hook (``integration/v32``) against vLLM 0.33.0's real classes, on a CPU.

What runs as vLLM's own code: ``ModelRegistry``, ``VllmConfig``/``ModelConfig``, the distributed
state (gloo, world size 1), ``DeepseekV32Attention.__init__`` (and ``MLAAttention.__init__``,
``DeepseekV32Indexer``, its cache layer, ``Fp8LinearMethod`` parameters, RoPEs, norms),
``DeepseekV32Attention.forward`` (the oracle) and ``_sparse_indexer_and_attn`` (called by both),
``fused_norm_rope`` and ``fused_q`` (vLLM's Triton source under the interpreter, loaded with real
Triton by ``smpart.integration.v32.vllm_kernels`` because vLLM disables Triton without a GPU driver),
``DeepseekV32IndexerMetadataBuilder.build`` (decode metadata), ``set_forward_context``.

Stand-ins, each where vLLM cannot run on a CPU:

* the sparse-MLA backend (none on CPU): a stub backend class passed as ``attn_backend`` whose impl
  records what ``forward_mqa`` receives (``(ql_nope, q_pe)`` and the top-k buffer) and returns zeros;
* the FP8 block GEMM (DeepGEMM ``fp8_gemm_nt``, CUDA only) behind ``Fp8LinearMethod``: smpart's W8A8
  GEMM with RoPE off (per-token-group UE8M0 activation quant, fp32 sums in DeepGEMM's K order) for
  K = 1536 (``q_b_proj``, ``wq_b``), a dequantize-and-matmul for the others;
* ``sparse_attn_indexer`` (DeepGEMM logits + vLLM's CUDA top-k): the torch reference
  (``smpart.reference.paged_mqa_logits`` + ``topk_indices``) writing ``topk_indices_buffer``;
* the interpreter's fp32 -> bf16 cast (truncation) by round-to-nearest-even, the GPU's
  ``cvt.rn.bf16.f32`` (applies to vLLM's kernels; smpart's round with integer ops anyway);
* ``W_UK_T`` / ``W_UV`` (``process_weights_after_loading`` needs the CUDA path): seeded tensors;
* ``num_compute_units`` in the indexer metadata builder: 8.
"""

import contextlib
import inspect
import json
import os
import re
import tempfile
import types

import pytest
import torch

try:
    import vllm  # noqa: F401
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention
except Exception as e:  # noqa: BLE001
    pytest.skip(f"vLLM 0.33.0 is not importable here ({type(e).__name__}: {e})", allow_module_level=True)

from smpart.integration import plugin  # noqa: E402
from smpart.triton_kernels import dims  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HIDDEN = 256
H = 16


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def registry():
    """vLLM's ModelRegistry, with the two DSV3.2 entries restored afterwards."""
    from vllm import ModelRegistry

    saved = {a: ModelRegistry.models.get(a) for a in plugin.V32_MODEL_CLASSES}
    yield ModelRegistry
    for a, v in saved.items():
        ModelRegistry.models[a] = v


def _entry(registry, arch):
    e = registry.models[arch]
    return getattr(e, "module_name", None), getattr(e, "class_name", None)


@pytest.mark.parametrize("flag,sm90", [(False, True), (True, False), (True, True)])
def test_registry_resolves_to_subclass_only_with_flag_and_sm90(registry, monkeypatch, flag, sm90):
    monkeypatch.setenv(plugin.FLAG_ENV, "1" if flag else "0")
    monkeypatch.setenv(plugin.ASSUME_SM90_ENV, "1" if sm90 else "0")
    monkeypatch.delenv(plugin.GENERIC_MODEL_ENV, raising=False)
    before = {a: _entry(registry, a) for a in plugin.V32_MODEL_CLASSES}
    assert before["DeepseekV32ForCausalLM"] == ("vllm.models.deepseek_v32", "DeepseekV32ForCausalLM")
    assert before["DeepseekV32MTPModel"] == ("vllm.models.deepseek_v32", "DeepseekV32MTP")
    try:
        plugin.register()
        plugin.register()  # vLLM may load plugins more than once
    finally:
        plugin.unregister()
    after = {a: _entry(registry, a) for a in plugin.V32_MODEL_CLASSES}
    if flag and sm90:
        assert after == {a: tuple(c.split(":")) for a, c in plugin.V32_MODEL_CLASSES.items()}
        from vllm.models.deepseek_v32.nvidia.model import DeepseekV32ForCausalLM
        from vllm.models.deepseek_v32.nvidia.mtp import DeepseekV32MTP

        cls = registry._try_load_model_cls("DeepseekV32ForCausalLM")
        mtp = registry._try_load_model_cls("DeepseekV32MTPModel")
        assert issubclass(cls, DeepseekV32ForCausalLM) and cls is not DeepseekV32ForCausalLM
        assert issubclass(mtp, DeepseekV32MTP) and mtp is not DeepseekV32MTP
    else:
        assert after == before


# ---------------------------------------------------------------------------------------------
# what we rely on in vLLM 0.33.0 (fails loudly on an upgrade)
# ---------------------------------------------------------------------------------------------
def _call_order(src: str, calls: list[str]) -> list[int]:
    pos = []
    for c in calls:
        m = re.search(re.escape(c), src)
        assert m is not None, f"{c!r} no longer in the source"
        pos.append(m.start())
    return pos


def test_vllm_forward_call_order_and_signatures_are_pinned():
    import vllm as v
    from vllm.models.deepseek_v32 import attention as A
    from vllm.models.deepseek_v32.nvidia.model import DeepseekV32DecoderLayer

    assert v.__version__.split("+")[0] == plugin.VLLM_VERSION
    fwd = inspect.getsource(DeepseekV32Attention.forward)
    order = ["self.fused_qkv_a_proj(hidden_states)", "self.indexer.wk_weights_proj(hidden_states)",
             "get_attention_context(self.layer_name)", "self.impl.prepare_for_batch(", "fused_norm_rope(",
             "self.q_b_proj(q_c)", "torch.bmm(q_nope.transpose(0, 1), self.W_UK_T)", "self.indexer.wq_b(q_c)",
             "fused_q(", "self._sparse_indexer_and_attn(", "self.o_proj(output)"]
    pos = _call_order(fwd, order)
    assert pos == sorted(pos), f"vLLM's DeepseekV32Attention.forward call order changed: {order}"
    sia = inspect.getsource(DeepseekV32Attention._sparse_indexer_and_attn)
    order = ["if self.indexer is not None and not self.skip_topk:", "sparse_attn_indexer(",
             "skip_topk_buffer_clear=True", "self.impl.record_logical_topk_ready()",
             "get_attention_context(", "self.impl.forward_mqa("]
    pos = _call_order(sia, order)
    assert pos == sorted(pos), "vLLM's _sparse_indexer_and_attn changed (we call it with skip_topk set)"
    assert "eager_break_during_capture" in inspect.getsource(A).split("def _sparse_indexer_and_attn")[0][-200:]
    assert list(inspect.signature(DeepseekV32Attention._sparse_indexer_and_attn).parameters) == [
        "self", "positions", "q_c", "q_nope", "q_pe", "index_q_fp8", "index_k", "index_weights_out", "kv_c",
        "k_pe", "ql_nope", "mqa_q", "output"]
    nr = inspect.signature(A.fused_norm_rope).parameters
    for name in ("slot_mapping", "indexer_slot_mapping", "indexer_k_cache", "indexer_cache_shuffled", "mla_kv_cache",
                 "mla_kv_cache_dtype", "mla_k_scale", "skip_scale", "has_indexer", "index_rope_interleave",
                 "kv_c_out", "k_pe_out", "index_k_out"):
        assert name in nr, f"fused_norm_rope lost {name!r}"
    assert list(inspect.signature(A.fused_q).parameters)[:10] == [
        "positions", "q_pe", "q_pe_cos_sin_cache", "index_q", "index_q_cos_sin_cache", "ql_nope", "q_scale",
        "index_weights", "index_weights_softmax_scale", "index_weights_head_scale"]
    assert "DeepseekV32Attention(" in inspect.getsource(DeepseekV32DecoderLayer.__init__)


def test_our_forward_keeps_vllms_order():
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention

    src = inspect.getsource(SmpartDeepseekV32Attention._smpart_forward)
    order = ["self.fused_qkv_a_proj(hidden_states)", "self.indexer.wk_weights_proj(hidden_states)",
             "get_attention_context(self.layer_name)", "self.impl.prepare_for_batch(", "fused_norm_rope(",
             "self.indexer.wq_b(q_c)", "region_fn(", "torch.bmm(q_nope.transpose(0, 1), self.W_UK_T)",
             "self._sparse_indexer_and_attn(", "self.o_proj(output)"]
    pos = _call_order(src, order)
    assert pos == sorted(pos)


# ---------------------------------------------------------------------------------------------
# swap_attention: all or nothing
# ---------------------------------------------------------------------------------------------
def _bare(cls):
    """An instance of ``cls`` with only ``nn.Module``'s state (swap_attention reads nothing else)."""
    m = cls.__new__(cls)
    torch.nn.Module.__init__(m)
    return m


def test_swap_attention_reclasses_every_layer(monkeypatch):
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention
    from smpart.integration.v32.model import swap_attention

    setups = []
    monkeypatch.setattr(SmpartDeepseekV32Attention, "smpart_setup", lambda self: setups.append(self))
    model = torch.nn.Sequential(_bare(DeepseekV32Attention), torch.nn.Linear(2, 2), _bare(DeepseekV32Attention))
    assert swap_attention(model) == 2
    assert type(model[0]) is SmpartDeepseekV32Attention and type(model[2]) is SmpartDeepseekV32Attention
    assert setups == [model[0], model[2]]
    assert swap_attention(model) == 0  # already ours: left as is, not set up twice
    assert len(setups) == 2


def test_swap_attention_refuses_before_reclassing_any_layer(monkeypatch):
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention
    from smpart.integration.v32.model import swap_attention

    class OtherPluginAttention(DeepseekV32Attention):
        pass

    monkeypatch.setattr(SmpartDeepseekV32Attention, "smpart_setup", lambda self: None)
    # the foreign layer comes after a plain one: the old loop had re-classed layer 0 before raising
    model = torch.nn.Sequential(_bare(DeepseekV32Attention), _bare(OtherPluginAttention), _bare(DeepseekV32Attention))
    with pytest.raises(TypeError, match=r"1 \(.*OtherPluginAttention\).*re-classed no layer"):
        swap_attention(model)
    assert [type(m) for m in model] == [DeepseekV32Attention, OtherPluginAttention, DeepseekV32Attention]
