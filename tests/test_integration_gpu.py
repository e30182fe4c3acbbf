"""The shim's custom op on the GPU: registered through vLLM 0.33's own ``direct_register_custom_op``,
called as the swapped layer calls it (``torch.ops.smpart.dsv32_region`` inside vLLM's
``set_forward_context`` with ``DeepseekV32IndexerMetadata``), captured in a CUDA graph under vLLM's
FULL uniform-decode mode, replayed with the per-step metadata rewritten in place, and compared
with ``reference`` every replay and with vLLM's own kernels (``vllm_sequential``: DeepGEMM and
vLLM's compiled ops) on the same inputs.

Needs a GPU and an importable vLLM 0.33.0 (its Python modules plus the compiled
``_C_stable_libtorch``); skipped with the reason otherwise. The metadata dataclasses are vLLM's,
filled the way ``DeepseekV32IndexerMetadataBuilder.build`` fills them for plain decode and native
MTP (the builder itself runs in ``tests/test_integration_forward.py`` on the CPU).
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN = 7168
MAX_MODEL_LEN = 16384


def _vllm_or_skip():
    try:
        from vllm.config import CUDAGraphMode, VllmConfig, set_current_vllm_config  # noqa: F401
        from vllm.forward_context import BatchDescriptor, set_forward_context  # noqa: F401
        from vllm.utils.torch_utils import _encode_layer_name  # noqa: F401
        from vllm.v1.attention.backends.mla.indexer import (DeepseekV32IndexerMetadata,  # noqa: F401
                                                             DeepSeekV32IndexerDecodeMetadata)
    except Exception as e:  # noqa: BLE001 (any import failure: no vLLM here)
        pytest.skip(f"vLLM 0.33.0 is not importable here ({type(e).__name__}: {e})")


def _metadata(args, next_n):
    """vLLM's decode metadata over views of ``args`` (what the builder produces for uniform decode:
    1-D ``seq_lens`` for plain decode, 2-D ``[B, next_n]`` with ``L - next_n + j + 1`` for MTP)."""
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadata, DeepSeekV32IndexerDecodeMetadata

    B = args.context_lens.shape[0]
    T = B * next_n
    if next_n == 1:
        dec_lens = args.context_lens
    else:
        dec_lens = torch.empty(B, next_n, dtype=torch.int32, device=args.q_c.device)
    dec = DeepSeekV32IndexerDecodeMetadata(
        block_table=args.block_table, seq_lens=dec_lens,
        decode_lens=torch.full((B,), next_n, dtype=torch.int32, device=args.q_c.device), requires_padding=False,
        schedule_metadata=torch.empty(0, dtype=torch.int32, device=args.q_c.device),
    )
    md = DeepseekV32IndexerMetadata(
        seq_lens=args.context_lens, max_seq_len=MAX_MODEL_LEN, slot_mapping=args.slot_mapping, num_decodes=B,
        num_decode_tokens=T, num_prefills=0, num_prefill_tokens=0, decode=dec,
    )
    return md, dec_lens


def _sync_mtp_lens(args, dec_lens, next_n):
    if next_n > 1:
        j = torch.arange(next_n, device=dec_lens.device, dtype=torch.int32)
        dec_lens.copy_(args.context_lens[:, None] - next_n + j + 1)


@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("path", ["partitioned", "auto"])
def test_registered_op_in_cuda_graph_matches_reference_and_vllm_gpu(path, next_n, monkeypatch):
    _vllm_or_skip()
    from vllm.config import CUDAGraphMode, VllmConfig, set_current_vllm_config
    from vllm.forward_context import BatchDescriptor, set_forward_context
    from vllm.utils.torch_utils import _encode_layer_name

    from smpart.bench.__main__ import check_path
    from smpart.integration import ops
    from smpart.triton_kernels import dims
    from smpart import checks, vendor
    from smpart.batch import make_decode_batch, redraw_decode_metadata
    from smpart.region import run_region
    from smpart.workspace import RegionWorkspace

    monkeypatch.setenv(ops.PATH_ENV, path)
    ops.register_op()
    B, H, max_len = 8, 128, 8192
    base = make_decode_batch(max_len, batch_size=B, num_heads=H, next_n=next_n, spare_blocks=B * max_len // 64,
                             seed=21 + next_n, device="cuda")
    pool = base.args.kv_cache.shape[0]
    live = base.clone()
    o = live.args
    T = o.q_c.shape[0]
    pristine = {k: getattr(o, k).clone() for k in ("kv_cache", "k_pe")}
    buf = torch.full((T + 4, dims.INDEX_TOPK), -9, dtype=torch.int32, device="cuda")  # vLLM's buffer has spare rows
    hidden = torch.empty(T, HIDDEN, dtype=torch.bfloat16, device="cuda")
    prefix = "model.layers.3.self_attn.indexer.k_cache"
    md, dec_lens = _metadata(o, next_n)
    _sync_mtp_lens(o, dec_lens, next_n)
    cfg = VllmConfig()

    def op():
        torch.ops.smpart.dsv32_region(
            hidden, o.q_c, o.positions, o.q_b_proj_weight, o.q_b_proj_weight_scale, o.cos_sin_cache, o.index_q_fp8,
            o.index_k, o.index_weights, o.q, o.k_pe, o.kv_cache, buf, _encode_layer_name("unused"),
            _encode_layer_name(prefix), MAX_MODEL_LEN, False,
        )

    vendor_ok, vendor_why = vendor.vendor_available()
    g = torch.Generator().manual_seed(5)
    graph = torch.cuda.CUDAGraph()
    with set_current_vllm_config(cfg), set_forward_context(
            {prefix: md}, cfg, cudagraph_runtime_mode=CUDAGraphMode.FULL,
            batch_descriptor=BatchDescriptor(num_tokens=T, uniform=True)):
        op()  # eager: checks the weights once, makes the workspace, compiles
        torch.cuda.synchronize()
        fused = ops.stats["fused"]
        with torch.cuda.graph(graph):
            op()
        assert ops.stats["fused"] == fused + 1, f"the capture took the fallback: {dict(ops.stats)}"
        for step in range(12):
            redraw_decode_metadata(o, pool, max_len, g)
            _sync_mtp_lens(o, dec_lens, next_n)
            for k, v in pristine.items():
                getattr(o, k).copy_(v)
            o.q.fill_(float("nan"))
            buf.fill_(-9)
            ref = live.clone()
            run_region(ref.args, path="reference")
            graph.replay()
            torch.cuda.synchronize()
            assert torch.all(buf[T:] == -9), "rows past the batch were touched"
            o.topk_indices.copy_(buf[:T])
            try:
                checks.check_region(o, ref.args, live)
            except AssertionError as e:
                raise AssertionError(f"replay {step} ({path}, lens {o.context_lens.tolist()}): {e}") from None
            if vendor_ok and step % 4 == 0:  # vLLM's own kernels on the same inputs, against the op's outputs
                ven = live.clone()
                for k, v in pristine.items():
                    getattr(ven.args, k).copy_(v)
                run_region(ven.args, "vllm_sequential", workspace=RegionWorkspace.for_args(ven.args))
                torch.cuda.synchronize()
                check_path("vllm_sequential", ven.args, o, live)
    if not vendor_ok:
        print(f"vLLM kernels not loaded ({vendor_why}): compared with reference only")
    assert os.environ.get(ops.PATH_ENV) == path
