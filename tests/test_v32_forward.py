"""The swapped ``DeepseekV32Attention`` forward vs vLLM 0.33's own, H=16, on a CPU (interpreter).

Both forwards run on one vLLM-built layer (``DeepseekV32Attention.__init__``, real parameters) with
the same inputs, caches and vLLM metadata; the oracle is vLLM's ``DeepseekV32Attention.forward``.
vLLM's own code and the stand-ins are listed in ``tests/test_v32_model.py``'s docstring (the same
ones, built here): stub sparse-MLA backend, smpart's W8A8 GEMM (RoPE off) for DeepGEMM, the torch
reference for ``sparse_attn_indexer``, RNE for the interpreter's truncating bf16 cast, seeded
``W_UK_T``/``W_UV``, 8 compute units. Compared: what the sparse MLA receives (``ql_nope``, roped
``q_pe``, ``topk_indices``), both caches' bytes, the output.
"""

import os
import types

import numpy as np
import pytest
import torch

try:
    import vllm  # noqa: F401
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention
except Exception as e:  # noqa: BLE001
    pytest.skip(f"vLLM 0.33.0 is not importable here ({type(e).__name__}: {e})", allow_module_level=True)

from smpart import reference as R  # noqa: E402
from smpart.batch import make_decode_batch  # noqa: E402
from smpart.checks import check_topk  # noqa: E402
from smpart.triton_kernels import dims  # noqa: E402
from vllm_cpu_env import _decode_metadata, dsv32_vllm_config  # noqa: E402 - tests/ is on pytest's pythonpath

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs vLLM's and smpart's Triton kernels on CPU: needs TRITON_INTERPRET=1")]
HIDDEN = 256
H = 16
PREFIX = "model.layers.{}.self_attn"


class _StubImpl:
    """Stand-in for the sparse-MLA impl (no CPU backend): records ``forward_mqa``'s inputs."""

    is_sparse = True
    supports_dense_mha_prefill = False
    supports_quant_query_input = False
    dcp_world_size = 1
    pcp_world_size = 1

    def __init__(self, **kw):
        self.topk_indices_buffer = kw.get("topk_indices_buffer")
        self.calls = []
        self.topk_ready = 0

    def prepare_for_batch(self, md):
        pass

    def record_logical_topk_ready(self):
        self.topk_ready += 1

    def forward_mqa(self, q, kv_cache, attn_metadata, layer):
        ql_nope, q_pe = q
        n = ql_nope.shape[0]
        self.calls.append((ql_nope.clone(), q_pe.clone(), self.topk_indices_buffer[:n].clone()))
        return torch.zeros(n, ql_nope.shape[1], ql_nope.shape[2], dtype=ql_nope.dtype), None


class _StubBackend:
    @staticmethod
    def is_mla():
        return True

    @staticmethod
    def get_name():
        return "SMPART_CPU_STUB_MLA_SPARSE"

    @staticmethod
    def get_impl_cls():
        return _StubImpl


class _GemmStandIn:
    """Stand-in for DeepGEMM behind ``Fp8LinearMethod``: smpart's W8A8 GEMM (RoPE off) for K=1536."""

    def __init__(self, **kw):
        pass

    def process_weights_after_loading(self, layer):
        pass

    def apply_weights(self, layer, x, bias=None):
        from smpart.triton_kernels.q_b_proj import q_b_proj_rope

        w, s = layer.weight, layer.weight_scale_inv
        if x.shape[-1] == dims.Q_LORA_RANK and w.shape[0] % 64 == 0:
            T, N = x.shape[0], w.shape[0]
            out = torch.empty(T, N, dtype=torch.bfloat16)
            dummy = torch.zeros(T, 1, 64, dtype=torch.bfloat16)
            q_b_proj_rope(x.contiguous(), w, s, torch.zeros(T, dtype=torch.int64), torch.zeros(1, 64), dummy,
                          out, apply_rope=False)
            return out
        s = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        return (x.float() @ (w.float() * s).T).to(x.dtype)


def _rne_bf16_convert(orig):
    """The interpreter's float conversion with fp32 -> bf16 rounded to nearest even (the GPU's cvt.rn)."""
    import triton.language as tl

    def conv(inp, in_dt, out_dt, mode):
        if in_dt == tl.float32 and out_dt == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(inp).view(np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16).reshape(inp.shape)
        return orig(inp, in_dt, out_dt, mode)

    return conv


def _indexer_standin(topk_buf_holder):
    """Stand-in for ``sparse_attn_indexer`` (DeepGEMM + vLLM CUDA top-k): the torch reference."""

    def sparse_attn_indexer(hidden_states, k_cache_prefix, kv_cache, q_fp8, q_scale, k, weights, *a, **kw):
        from vllm.forward_context import get_forward_context

        md = get_forward_context().attn_metadata[k_cache_prefix]
        dec = md.decode
        n = md.num_decode_tokens
        next_n = dec.seq_lens.shape[1] if dec.seq_lens.dim() == 2 else 1
        ctx = md.seq_lens[: md.num_decodes]
        logits = R.paged_mqa_logits(q_fp8[:n], weights[:n], kv_cache, dec.block_table[: md.num_decodes], ctx,
                                    next_n=next_n, max_len=int(ctx.max()))
        lens = R.visible_lens(ctx, next_n)
        topk_buf_holder["buf"][:n] = R.topk_indices(logits, lens)
        topk_buf_holder["calls"] += 1
        topk_buf_holder["logits64"] = R.paged_mqa_logits(
            q_fp8[:n], weights[:n], kv_cache, dec.block_table[: md.num_decodes], ctx, next_n=next_n,
            max_len=int(ctx.max()), dtype=torch.float64)
        topk_buf_holder["lens"] = lens

    return sparse_attn_indexer


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    import triton.runtime.interpreter as interp
    import vllm.model_executor.layers.quantization.fp8 as vllm_fp8
    import vllm.models.deepseek_v32.attention as A
    import vllm.v1.attention.backends.mla.indexer as vllm_indexer

    from smpart.integration.v32 import vllm_kernels

    holder = {"buf": None, "calls": 0}
    with dsv32_vllm_config(tmp_path_factory, "dsv32p") as cfg, pytest.MonkeyPatch.context() as mp:
        vk = vllm_kernels.load()
        mp.setattr(vllm_fp8, "init_fp8_linear_kernel", lambda **kw: _GemmStandIn(**kw))
        mp.setattr(A, "fused_norm_rope", vk.fused_norm_rope)
        mp.setattr(A, "fused_q", vk.fused_q)
        mp.setattr(A, "sparse_attn_indexer", _indexer_standin(holder))
        mp.setattr(interp, "_convert_float", _rne_bf16_convert(interp._convert_float))
        mp.setattr(vllm_indexer, "num_compute_units", lambda device_id=None: 8)
        mp.setenv("SMPART_DSV32_ASSUME_SM90", "1")
        yield types.SimpleNamespace(cfg=cfg, holder=holder, layer_ids=iter(range(100)))


def _build_layer(venv):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    layer_id = next(venv.layer_ids) + 3
    hf = venv.cfg.model_config.hf_config
    venv.cfg.quant_config = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                                      weight_block_size=[128, 128])
    buf = torch.full((64, dims.INDEX_TOPK), -9, dtype=torch.int32)
    venv.holder["buf"] = buf
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with set_current_vllm_config(venv.cfg):
            layer = DeepseekV32Attention(venv.cfg, hf, PREFIX.format(layer_id), topk_indices_buffer=buf,
                                         attn_backend=_StubBackend)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(layer_id)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                val = (torch.randn(p.shape, generator=g) * 64).clamp(-448, 448)
            elif name.endswith("weight_scale_inv"):
                val = 2.0 ** torch.randint(-14, -10, p.shape, generator=g).float()
            elif name.endswith("bias"):
                val = torch.zeros(p.shape)
            elif "norm" in name:
                val = 1 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                val = 0.05 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))
    layer.W_UK_T = (0.05 * torch.randn(H, dims.QK_NOPE_HEAD_DIM, dims.KV_LORA_RANK, generator=g)).bfloat16()
    layer.W_UV = (0.05 * torch.randn(H, dims.KV_LORA_RANK, 128, generator=g)).bfloat16()
    return layer


def _run(venv, layer, forward, positions, hidden, idx_md, slots, mla_cache, idx_cache, mode):
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    layer.kv_cache = mla_cache
    layer.indexer.k_cache.kv_cache = idx_cache
    layer.impl.calls.clear()
    mla_md = types.SimpleNamespace(num_actual_tokens=hidden.shape[0], prefill=None)
    md = {layer.layer_name: mla_md, layer.indexer.k_cache.prefix: idx_md}
    sm = {layer.layer_name: slots, layer.indexer.k_cache.prefix: slots}
    with set_current_vllm_config(venv.cfg), set_forward_context(md, venv.cfg, slot_mapping=sm,
                                                                cudagraph_runtime_mode=mode):
        out = forward(positions, hidden)
    return out, layer.impl.calls[-1]


# "long": a row past 2048 visible keys (real top-k selection, not just padding); it once failed on
# head 63 of index_q: the GEMM stand-in's wq_b (N = 8192, not a multiple of 192) left the last 128
# columns of its torch.empty output unwritten, so each forward read different garbage (fixed in
# q_b_proj_rope's grid)
@pytest.mark.parametrize("lens", [[70, 5], [300, 64, 1], [2100, 130]], ids=["two", "three", "long"])
def test_swapped_forward_matches_vllm(venv, lens):
    from vllm.config import CUDAGraphMode

    from smpart.integration import ops
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention

    layer = _build_layer(venv)
    b = make_decode_batch(lens, num_heads=H, seed=len(lens) + lens[0])
    a = b.args
    T = a.q_c.shape[0]
    positions = (a.context_lens.long() - 1)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, HIDDEN, generator=g).bfloat16()
    num_blocks = a.kv_cache.shape[0]
    mla_cache = torch.zeros(num_blocks, 64, dims.KV_LORA_RANK + dims.QK_ROPE_HEAD_DIM, dtype=torch.bfloat16)
    idx_md = _decode_metadata(venv, layer.indexer.k_cache.prefix, a)

    venv.holder["calls"] = 0
    out_v, (ql_v, qpe_v, topk_v) = _run(venv, layer, DeepseekV32Attention.forward.__get__(layer), positions, hidden,
                                        idx_md, a.slot_mapping, mla_cache.clone(), a.kv_cache.clone(),
                                        CUDAGraphMode.FULL)
    assert venv.holder["calls"] == 1
    mla_v, idx_v = layer.kv_cache, layer.indexer.k_cache.kv_cache

    layer.__class__ = SmpartDeepseekV32Attention
    layer.smpart_setup()
    assert layer._smpart_off is None, layer._smpart_off
    ops.stats.clear()
    try:
        out_s, (ql_s, qpe_s, topk_s) = _run(venv, layer, layer.forward, positions, hidden, idx_md, a.slot_mapping,
                                            mla_cache.clone(), a.kv_cache.clone(), CUDAGraphMode.FULL)
    finally:
        layer.__class__ = DeepseekV32Attention
    assert ops.stats["v32 region"] == 1 and venv.holder["calls"] == 1, dict(ops.stats)
    assert torch.equal(layer.kv_cache, mla_v), "MLA cache bytes differ"
    assert torch.equal(layer.indexer.k_cache.kv_cache, idx_v), "indexer cache bytes differ"
    assert torch.equal(qpe_s.contiguous().view(torch.int16), qpe_v.contiguous().view(torch.int16)), "roped q_pe differs"
    assert torch.equal(ql_s.view(torch.int16), ql_v.view(torch.int16)), "ql_nope differs"
    # top-k: smpart's Triton logits and the stand-in's torch logits round differently, so the rule of
    # docs/CORRECTNESS.md "The top-k rule": valid indices and padding, each selected logit within fp32 rounding of the 2048th
    logits64, lens = venv.holder["logits64"], venv.holder["lens"]
    tol = 1e-5 * logits64.masked_fill(torch.isinf(logits64), 0).abs().amax(dim=1, keepdim=True).expand_as(logits64)
    check_topk(topk_s, logits64, lens, tol=tol)
    check_topk(topk_v, logits64, lens, tol=tol)
    short = lens <= dims.INDEX_TOPK
    assert torch.equal(topk_s[short].sort(dim=1).values, topk_v[short].sort(dim=1).values)
    assert torch.equal(out_s, out_v)


def _one_decode_step(venv, layer, mode):
    """One decode step of one request (70 tokens, seed 3) through ``layer.forward`` under the graph
    mode ``mode``, with ``ops.stats`` and the indexer stand-in's call count cleared first."""
    from smpart.integration import ops

    a = make_decode_batch([70], num_heads=H, seed=3).args
    idx_md = _decode_metadata(venv, layer.indexer.k_cache.prefix, a)
    hidden = torch.randn(1, HIDDEN).bfloat16()
    ops.stats.clear()
    venv.holder["calls"] = 0
    mla_cache = torch.zeros(a.kv_cache.shape[0], 64, 576, dtype=torch.bfloat16)
    _run(venv, layer, layer.forward, a.context_lens.long() - 1, hidden, idx_md, a.slot_mapping, mla_cache,
         a.kv_cache.clone(), mode)


def test_piecewise_and_prefill_fall_back_to_vllm(venv):
    from vllm.config import CUDAGraphMode

    from smpart.integration import ops
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention

    layer = _build_layer(venv)
    layer.__class__ = SmpartDeepseekV32Attention
    layer.smpart_setup()
    _one_decode_step(venv, layer, CUDAGraphMode.PIECEWISE)
    assert ops.stats["v32 fallback"] == 1 and venv.holder["calls"] == 1
    assert any("PIECEWISE" in k for k in ops.stats), dict(ops.stats)


def test_bucket_tuned_to_vllm_runs_vllms_forward(venv, monkeypatch):
    """A FULL-graph decode step whose bucket the tuning file gives to vLLM's own computation (a generic
    pick, ``vllm_dual_stream``, mapped to ``vllm_v32_dual_stream``) runs vLLM's own ``forward``."""
    from vllm.config import CUDAGraphMode

    from smpart import tuning
    from smpart.integration import ops
    from smpart.integration.v32.attention import SmpartDeepseekV32Attention
    from smpart.triton_kernels.partitioned import PartitionConfig

    monkeypatch.delenv(ops.PATH_ENV, raising=False)
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: tuning.Choice("vllm_dual_stream", PartitionConfig(), "tuned"))
    layer = _build_layer(venv)
    layer.__class__ = SmpartDeepseekV32Attention
    layer.smpart_setup()
    monkeypatch.setattr(SmpartDeepseekV32Attention, "_smpart_forward",
                        lambda *a, **k: pytest.fail("the region ran on a bucket tuned to vLLM"))
    _one_decode_step(venv, layer, CUDAGraphMode.FULL)
    assert ops.stats["v32 vllm dispatched: vllm_v32_dual_stream"] == 1 and venv.holder["calls"] == 1, dict(ops.stats)
    assert ops.stats["v32 region"] == 0
