"""The vLLM shim against the real vLLM 0.33.0 package on a CPU: the custom op on vLLM's metadata vs the
reference path, and the swapped layer's forward inside vLLM's own model code (environment and
stand-ins: ``vllm_cpu_env.py``)."""

import dataclasses
import logging

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001 (any import failure means: no vLLM here)
    pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e}); "
                f"pip install --no-deps vllm==0.33.0 plus its imports (see .ci/run)", allow_module_level=True)

from smpart import checks  # noqa: E402
from smpart.batch import make_decode_batch  # noqa: E402
from smpart.integration import plugin  # noqa: E402
from smpart.region import run_region  # noqa: E402
from smpart.triton_kernels import dims  # noqa: E402
from vllm_cpu_env import (  # noqa: E402,F401 - fixtures and helpers (tests/ is on pytest's pythonpath)
    H, HIDDEN, _build_layer, _decode_metadata, _forward_ctx, _mixed_metadata, flag, needs_interpreter, venv,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


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


def test_bucket_tuned_to_vllm_runs_vllms_own_path(venv, flag, monkeypatch):
    """A decode step whose bucket the tuning file gives to vLLM's own computation (here a production
    pick, ``vllm_v32``, which the generic op maps to ``vllm_sequential``) runs vLLM's modules in the
    op, never ``run_region``: the same ``mla_attn`` inputs and output as vLLM's original forward."""
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    from smpart import tuning
    from smpart.integration import ops
    from smpart.triton_kernels.partitioned import PartitionConfig

    monkeypatch.delenv(ops.PATH_ENV, raising=False)
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: tuning.Choice("vllm_v32", PartitionConfig(), "tuned"))
    plugin.register()
    layer = _build_layer(venv)
    a, hs = _layer_inputs(layer, [70, 130], seed=4)
    prefix = layer.indexer.k_cache.prefix
    md = _decode_metadata(venv, prefix, a)
    _record_indexer_op(layer, monkeypatch)
    monkeypatch.setattr(ops, "run_region", lambda *a, **k: pytest.fail("run_region on a bucket tuned to vLLM"))
    ops.stats.clear()
    with _forward_ctx(venv, {prefix: md}):
        out = layer(a.positions, hs)
        want = MultiHeadLatentAttentionWrapper.forward(layer, a.positions, hs)
    assert ops.stats["vllm dispatched: vllm_sequential"] == 1 and ops.stats["fused"] == 0, dict(ops.stats)
    assert torch.equal(out, want)
    for got, ref in zip(layer.mla_attn.calls[0], layer.mla_attn.calls[-1]):
        assert torch.equal(got, ref)
