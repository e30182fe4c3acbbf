"""The region with vLLM 0.33's production-model options (``smpart.prep``), every path, H=16.

Production setting: the index-q prep from a bf16 ``index_q`` + raw weights (the prep's bytes are
checked against vLLM's own ``_fused_q_kernel`` in tests/test_v32_index_q.py; here every path must give
the standalone launcher's bytes), keys already in the cache and ``topk_indices`` already -1 (vLLM's
``fused_norm_rope``), ``k_pe`` untouched, the q_pe RoPE rounded as ``fused_q``. ``index_k`` is set to
values that differ from the cached keys, so a path that wrote or patched keys from it would change the
cache bytes or the new tokens' logits. Plus the validation of the new fields.
"""

import dataclasses

import pytest
import torch

from smpart import checks, reference
from smpart.batch import make_decode_batch
from smpart.prep import production_defaults
from smpart.region import run_region
from smpart.triton_kernels import dims
from smpart.triton_kernels.index_q import index_q_prep, index_q_prep_torch
from smpart.triton_kernels.q_b_proj import q_b_proj_rope
from smpart.workspace import RegionWorkspace

H = 16


def _production(b, seed: int, interleave: bool = False):
    """RegionArgs of ``b`` as the production model hands them over (see the module docstring)."""
    a = b.args
    T, dev = a.num_tokens, a.q_c.device
    g = torch.Generator().manual_seed(seed)
    kv = a.kv_cache.clone()
    reference.indexer_k_quant_and_cache(a.index_k, kv, a.slot_mapping, b.use_ue8m0)  # fused_norm_rope's write
    ics = reference.make_cos_sin_cache(a.cos_sin_cache.shape[0], dtype=torch.float32, device=dev)
    return dataclasses.replace(
        a, kv_cache=kv, topk_indices=torch.full_like(a.topk_indices, -1), k_pe=a.k_pe.clone(), q=a.q.clone(),
        index_k=(10 * torch.randn(a.index_k.shape, generator=g)).bfloat16().to(dev),
        index_q=torch.randn(T, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM, generator=g).bfloat16().to(dev),
        index_weights_raw=torch.randn(T, dims.INDEX_N_HEADS, generator=g).bfloat16().to(dev),
        index_cos_sin_cache=ics, index_rope_interleave=interleave,
        index_q_fp8=torch.full_like(a.index_q_fp8.view(torch.uint8), 0x7F).view(torch.float8_e4m3fn),
        index_weights=torch.full_like(a.index_weights, float("nan")), **production_defaults(),
    )


def _clone(p):
    return dataclasses.replace(p, **{n: getattr(p, n).clone() for n in (
        "kv_cache", "topk_indices", "k_pe", "q", "index_q_fp8", "index_weights")})


@pytest.mark.parametrize("path", ["reference", "sequential", "partitioned"])
def test_production_options(path, device):
    b = make_decode_batch([2100, 70, 3], num_heads=H, seed=11, device=device)
    p = _production(b, seed=5, interleave=(path == "sequential"))
    T = p.num_tokens
    # expected: the standalone prep and q_b_proj launches on the same inputs
    q8 = torch.empty_like(p.index_q_fp8)
    w = torch.empty_like(p.index_weights)
    index_q_prep(p.positions, p.index_q, p.index_cos_sin_cache, p.index_weights_raw, q8, w,
                 rope_interleave=p.index_rope_interleave)
    q_want = torch.empty_like(p.q)
    q_b_proj_rope(p.q_c, p.q_b_proj_weight, p.q_b_proj_weight_scale, p.positions, p.cos_sin_cache, p.k_pe.clone(),
                  q_want, rope_fused_q=True, rope_k_pe=False)

    out = _clone(p)
    ws = None if path == "reference" else RegionWorkspace.for_args(out)
    run_region(out, path=path, workspace=ws, use_ue8m0=b.use_ue8m0)

    assert torch.equal(out.kv_cache, p.kv_cache), "write_keys=False: the cache must be untouched"
    assert torch.equal(out.k_pe.view(torch.int16), p.k_pe.view(torch.int16)), "rope_k_pe=False: k_pe untouched"
    if path == "reference":  # the torch twin (torch's fp8 cast; the interpreter's differs, see test_v32_index_q)
        t8, tw, _ = index_q_prep_torch(p.positions, p.index_q, p.index_cos_sin_cache, p.index_weights_raw,
                                       rope_interleave=p.index_rope_interleave)
        assert torch.equal(out.index_q_fp8.view(torch.uint8), t8.view(torch.uint8)), "index_q_fp8 vs the torch twin"
        assert torch.equal(out.index_weights, tw), "index weights vs the torch twin"
        assert checks.calc_diff(out.q.float(), q_want.float()) < 1e-5
        q8, w = out.index_q_fp8, out.index_weights
    else:
        assert torch.equal(out.index_q_fp8.view(torch.uint8), q8.view(torch.uint8)), "index_q_fp8 bytes"
        assert torch.equal(out.index_weights, w), "index weights"
        assert torch.equal(out.q.view(torch.int16), q_want.view(torch.int16)), "q (fused_q-rounded q_pe)"
    lens = reference.visible_lens(p.context_lens, p.next_n)
    logits64 = reference.paged_mqa_logits(q8, w, p.kv_cache, p.block_table, p.context_lens, p.next_n,
                                          int(lens.max()), dtype=torch.float64)
    want = dataclasses.replace(p, index_q_fp8=q8, index_weights=w)
    tol = checks.logits_tolerance(want, lens)
    checks.check_topk(out.topk_indices, logits64, lens, tol)
    if ws is not None:  # the new tokens' logits come from the cache, not from index_k (no patch)
        for t in range(T):
            L = int(lens[t])
            got = ws.logits[t, :L].double().cpu()
            bad = (got - logits64[t, :L].cpu()).abs() > tol[t, :L].cpu()
            assert not bad.any(), f"row {t}: logit at {bad.nonzero()[0].tolist()} differs from the cache's"


def _bad(p, **kw):
    return dataclasses.replace(p, **kw)


def test_production_fields_validated():
    b = make_decode_batch([70, 5], num_heads=H, seed=2)
    p = _production(b, seed=1)
    ws = RegionWorkspace.for_args(p)
    cases = [
        (dict(write_keys=1), TypeError, "write_keys"),
        (dict(rope_fused_q="yes"), TypeError, "rope_fused_q"),
        (dict(index_rope_interleave=None), TypeError, "index_rope_interleave"),
        (dict(index_q=p.index_q.float()), ValueError, "index_q"),
        (dict(index_q=p.index_q[:1]), ValueError, "index_q"),
        (dict(index_weights_raw=None), ValueError, "index_weights_raw"),
        (dict(index_cos_sin_cache=[1.0]), TypeError, "index_cos_sin_cache"),
        (dict(index_q=None, index_weights_raw=None, index_cos_sin_cache=None, index_rope_interleave=True,
              index_q_fp8=b.args.index_q_fp8, index_weights=b.args.index_weights), ValueError, "index_rope_interleave"),
        # without index_q the fp8 queries are inputs again: the poisoned buffers are refused
        (dict(index_q=None, index_weights_raw=None, index_cos_sin_cache=None), ValueError, "index_q_fp8"),
        (dict(index_cos_sin_cache=p.index_cos_sin_cache[:3]), ValueError, "positions"),
        (dict(index_weights=p.index_weights.double()), TypeError, "index_weights"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            run_region(_bad(p, **kw), path="sequential", workspace=ws)
    # an output of the prep may not alias its input
    with pytest.raises(ValueError, match="index_q_fp8|index_q"):
        run_region(_bad(p, index_q_fp8=p.index_q.view(torch.float8_e4m3fn)[..., :dims.INDEX_HEAD_DIM]),
                   path="sequential", workspace=ws)


def test_vendor_paths_need_matching_args():
    """vLLM's generic baselines refuse the production options and vllm_v32* refuse generic args (ValueError
    naming ``path``, before any launch); on a CPU vllm_v32* are unavailable (RuntimeError, run_region's
    contract for vendor paths)."""
    b = make_decode_batch([70, 5], num_heads=H, seed=2)
    p = _production(b, seed=1)
    ws = RegionWorkspace.for_args(p)
    for path in ("vllm_sequential", "vllm_dual_stream"):
        with pytest.raises(ValueError, match="path"):
            run_region(p, path=path, workspace=ws)
    for path in ("vllm_v32", "vllm_v32_dual_stream"):
        with pytest.raises(ValueError, match="path"):
            run_region(b.args, path=path, workspace=ws)
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError):
                run_region(p, path=path, workspace=ws)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with DeepGEMM and vLLM's ops")
@pytest.mark.parametrize("path", ["vllm_v32", "vllm_v32_dual_stream"])
def test_vllm_v32_paths_gpu(path):
    """vLLM's own kernels on the production region agree with the reference (q by normalized difference,
    top-k by the rule of docs/CORRECTNESS.md), and with smpart's partitioned path's index-q bytes."""
    from smpart.vendor import vendor_available

    ok, why = vendor_available()
    if not ok:
        pytest.skip(f"vendor kernels unavailable: {why}")
    try:
        from smpart.vendor_v32 import load_fused_q

        load_fused_q()
    except RuntimeError as e:
        pytest.skip(str(e))
    b = make_decode_batch([4000, 70, 3000, 1], num_heads=H, seed=4, device="cuda")
    p = _production(b, seed=3)
    ref = _clone(p)
    run_region(ref, path="reference")
    out = _clone(p)
    ws = RegionWorkspace.for_args(out)
    run_region(out, path=path, workspace=ws)
    torch.cuda.synchronize()
    assert torch.equal(out.kv_cache, p.kv_cache) and torch.equal(out.k_pe, p.k_pe)
    assert checks.calc_diff(out.q.float(), ref.q.float()) < 1e-5
    lens = reference.visible_lens(p.context_lens, p.next_n)
    logits64 = reference.paged_mqa_logits(ref.index_q_fp8, ref.index_weights, p.kv_cache, p.block_table,
                                          p.context_lens, p.next_n, int(lens.max()), dtype=torch.float64)
    checks.check_topk(out.topk_indices, logits64, lens, checks.logits_tolerance(ref, lens))
