"""Issue 18: no workspace, alias, config or stale state makes a path crash, hang, write out of bounds
or silently skip rows. Each bad call raises a ValueError/TypeError naming the argument or field
before any kernel runs, and every output buffer (``kv_cache``, ``topk_indices``, ``q``, ``k_pe``, the
workspace's counters) is byte-identical afterwards."""

import copy
import dataclasses

import pytest
import torch

from smpart import checks
from smpart.triton_kernels.aliasing import has_internal_overlap, overlap
from smpart.batch import make_decode_batch
from smpart.region import run_region
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.triton_kernels.radix_topk import RadixTopkWorkspace
from smpart.validate import _TENSOR_FIELDS, validate_region_args
from smpart.workspace import RegionWorkspace


@pytest.fixture(scope="module")
def batch():
    return make_decode_batch([70, 130], num_heads=16, next_n=1, seed=11)


def _snapshot(a, ws=None) -> list:
    bufs = [a.kv_cache, a.topk_indices, a.q, a.k_pe]
    if ws is not None:
        bufs += [ws.counters, ws.logits]
        if isinstance(ws.radix, RadixTopkWorkspace):
            bufs += [x for x in vars(ws.radix).values() if isinstance(x, torch.Tensor)]
    return [(b, b.clone()) for b in bufs if isinstance(b, torch.Tensor) and b.device.type in ("cpu", "cuda")]


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(torch.uint8)


def _unchanged(snap) -> bool:
    """Byte-identical (NaN poison included)."""
    return all(torch.equal(_bytes(b), _bytes(s)) for b, s in snap)


def _refused(a, path, ws, exc, match, **kw):
    """Run and expect ``exc`` matching ``match``; every output and workspace buffer unchanged."""
    snap = _snapshot(a, ws)
    with pytest.raises(exc, match=match):
        run_region(a, path=path, workspace=ws, **kw)
    assert _unchanged(snap), "a refused call wrote an output or workspace buffer"


def _replace_radix(ws, **attrs):
    rw = copy.copy(ws.radix)
    for k, v in attrs.items():
        setattr(rw, k, v)
    return dataclasses.replace(ws, radix=rw)


# -- item 1: every workspace buffer is checked (metadata, eager and capture alike) ----------------------
BAD_WS = [
    ("logits-1-row", lambda ws: dataclasses.replace(ws, logits=ws.logits[:1].clone()), ValueError, "workspace.logits"),
    ("logits-3x64", lambda ws: dataclasses.replace(ws, logits=torch.zeros(3, 64)), ValueError, "workspace.logits"),
    ("logits-fp16", lambda ws: dataclasses.replace(ws, logits=ws.logits.half()), TypeError, "workspace.logits"),
    ("logits-strided", lambda ws: dataclasses.replace(ws, logits=ws.logits.t().contiguous().t()), ValueError,
     "workspace.logits"),
    ("counters-dtype", lambda ws: dataclasses.replace(ws, counters=ws.counters.long()), TypeError,
     "workspace.counters"),
    ("counters-device", lambda ws: dataclasses.replace(ws, counters=ws.counters.to("meta")), ValueError,
     "workspace.counters"),
    ("counters-short", lambda ws: dataclasses.replace(ws, counters=ws.counters[:10].clone()), ValueError,
     "workspace.counters"),
    ("radix-missing", lambda ws: dataclasses.replace(ws, radix=None), TypeError, "workspace.radix"),
    ("radix-type", lambda ws: dataclasses.replace(ws, radix="big"), TypeError, "workspace.radix"),
    ("radix-rows", lambda ws: dataclasses.replace(ws, radix=RadixTopkWorkspace(1, "cpu")), ValueError,
     "workspace.radix.max_tokens"),
    ("radix-counters-dtype", lambda ws: _replace_radix(ws, counters=ws.radix.counters.long()), TypeError,
     "workspace.radix.counters"),
    ("radix-counters-cols", lambda ws: _replace_radix(ws, counters=ws.radix.counters[:, :1].contiguous()),
     ValueError, "workspace.radix.counters"),
    ("radix-cand-pos-short", lambda ws: _replace_radix(ws, cand_pos=ws.radix.cand_pos[:, :100].contiguous()),
     ValueError, "workspace.radix.cand_pos"),
    ("radix-cand-geometry", lambda ws: _replace_radix(ws, cand=16384), ValueError, "workspace.radix.cand_key"),
    ("radix-cand-range", lambda ws: _replace_radix(ws, cand=2048), ValueError, r"workspace.radix.cand: expected"),
    ("radix-cp-type", lambda ws: _replace_radix(ws, cp=256.0), TypeError, "workspace.radix.cp"),
    ("radix-hist-short", lambda ws: _replace_radix(ws, hist=ws.radix.hist[:, :1024].contiguous()), ValueError,
     "workspace.radix.hist"),
    ("radix-scratch-rows", lambda ws: _replace_radix(ws, scratch=ws.radix.scratch[:1].clone()), ValueError,
     "workspace.radix.scratch"),
    ("radix-cand-dtype", lambda ws: _replace_radix(ws, cand_key=ws.radix.cand_key.float()), TypeError,
     "workspace.radix.cand_key"),
    ("radix-cp", lambda ws: _replace_radix(ws, cp=100), ValueError, "workspace.radix.cp"),
    ("max-len", lambda ws: dataclasses.replace(ws, max_len=ws.max_len - 1), ValueError, "workspace.max_len"),
    ("max-len-type", lambda ws: dataclasses.replace(ws, max_len=float(ws.max_len)), TypeError, "workspace.max_len"),
]


@pytest.mark.parametrize("check_values", [None, False], ids=["eager", "capture-like"])
@pytest.mark.parametrize("path", ["sequential", "partitioned"])
@pytest.mark.parametrize("name,make,exc,match", BAD_WS, ids=[b[0] for b in BAD_WS])
def test_bad_workspace_is_refused(batch, path, name, make, exc, match, check_values):
    a = batch.clone().args
    ws = make(RegionWorkspace.for_args(a))
    _refused(a, path, ws, exc, match, check_values=check_values)


# -- item 2: outputs that overlap themselves, each other or an input ------------------------------------
def _alias_cases(a):
    T = a.num_tokens
    base = torch.zeros(T * 32 + 64, dtype=torch.bfloat16)
    return [
        ("k_pe-stride0", dict(k_pe=a.k_pe[:1].expand(T, 1, 64)), "k_pe: elements overlap"),
        ("k_pe-stride32", dict(k_pe=base.as_strided((T, 1, 64), (32, 64, 1))), "k_pe: elements overlap"),
        ("k_pe-in-q", dict(k_pe=a.q[:, :1, 128:]), "k_pe"),
        ("k_pe-in-q_c", dict(k_pe=a.q_c[:, :64].unsqueeze(1)), "k_pe: shares memory with q_c"),
        ("topk-in-kv_cache", dict(topk_indices=a.kv_cache.view(-1)[: T * 2048 * 4].view(torch.int32).view(T, 2048)),
         "kv_cache: shares memory with topk_indices"),
        ("q-in-index_weights", dict(index_weights=a.q.view(-1)[: T * 128].view(torch.float32).view(T, 64)),
         "q: shares memory with index_weights"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["k_pe-stride0", "k_pe-stride32", "k_pe-in-q", "k_pe-in-q_c",
                                                 "topk-in-kv_cache", "q-in-index_weights"])
@pytest.mark.parametrize("path", ["reference", "sequential", "partitioned"])
def test_aliasing_outputs_are_refused(batch, path, case):
    a = batch.clone().args
    a.q.zero_()  # the poison NaNs would be read as non-finite weights in the q-in-index_weights case
    _, change, match = _alias_cases(a)[case]
    a = dataclasses.replace(a, **change)
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, ValueError, match)


def test_aliasing_workspace_buffers_are_refused(batch):
    a = batch.clone().args
    ws = RegionWorkspace.for_args(a)
    T, W = ws.logits.shape
    bad = dataclasses.replace(ws, logits=ws.radix.cand_key.view(torch.float32).view(-1)[: T * W].view(T, W))
    _refused(a, "sequential", bad, ValueError, "workspace.logits: shares memory with workspace.radix.cand_key")
    bad = dataclasses.replace(ws, counters=a.topk_indices.view(-1)[: ws.counters.numel()])
    _refused(a, "partitioned", bad, ValueError, "topk_indices: shares memory with workspace.counters")


def test_overlap_is_exact_for_views_of_one_buffer(batch):
    buf = torch.zeros(4, 576, dtype=torch.bfloat16)
    assert not overlap(buf[:, :512], buf[:, 512:]) and overlap(buf[:, :513], buf[:, 512:])
    assert has_internal_overlap(torch.zeros(1, 64).expand(4, 64)) and not has_internal_overlap(buf[:, 512:])
    # k_pe as the last 64 columns of vLLM's [T, 576] kv_a output is accepted
    a = batch.clone().args
    kv_a = torch.zeros(a.num_tokens, 576, dtype=torch.bfloat16)
    kv_a[:, 512:] = a.k_pe[:, 0]
    out = dataclasses.replace(a, k_pe=kv_a[:, 512:].unsqueeze(1))
    run_region(out, path="reference")
    ref = batch.clone().args
    run_region(ref, path="reference")
    assert torch.equal(out.k_pe, ref.k_pe) and torch.equal(out.topk_indices, ref.topk_indices)
    assert torch.equal(kv_a[:, :512], torch.zeros(a.num_tokens, 512, dtype=torch.bfloat16))


# -- item 3: a written slot visible to another request, a block twice in one request's table ------------
@pytest.mark.parametrize("path", ["reference", "sequential", "partitioned"])
def test_slot_visible_to_another_request_is_refused(batch, path):
    a = batch.clone().args
    a = dataclasses.replace(a, block_table=a.block_table.clone())  # the fixture's table stays as it is
    a.block_table[1, 0] = int(a.slot_mapping[0]) // 64  # request 1 now sees request 0's new key's block
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, ValueError, r"slot_mapping: row 0 writes slot \d+, which lies inside request 1's visible")


@pytest.mark.parametrize("path", ["reference", "sequential", "partitioned"])
def test_block_twice_in_one_request_is_refused(batch, path):
    a = batch.clone().args
    a = dataclasses.replace(a, block_table=a.block_table.clone())
    a.block_table[1, 0] = a.block_table[1, 1]
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, ValueError, r"block_table: block \d+ is listed twice in request 1's visible range")


def test_mtp_rows_may_see_their_own_requests_new_keys():
    """next_n = 2: row (b, 1) sees row (b, 0)'s new key; that is the same request, so it is valid."""
    b = make_decode_batch([65, 200], num_heads=16, next_n=2, seed=5)
    validate_region_args(b.args)


# -- item 4: launch configs bounded by what the launch can do; config only where read; real bools -------
@pytest.mark.parametrize("bad,name", [
    (dict(indexer_programs=2**31, gemm_programs=1), "indexer_programs"),
    (dict(first_programs=2**31), "first_programs"),
    (dict(gemm_programs=2**31), "gemm_programs"),
    (dict(tail_gemm_programs=2**31), "tail_gemm_programs"),
    (dict(queue_chunk=2**31), "queue_chunk"),
    (dict(num_stages=64), "num_stages"),
])
def test_config_fields_bounded_when_made(bad, name):
    with pytest.raises(ValueError, match=f"config.{name}"):
        PartitionConfig(**bad)


@pytest.mark.parametrize("cfg,name", [
    (PartitionConfig(indexer_programs=10**6, gemm_programs=1), "config.indexer_programs"),
    (PartitionConfig(indexer_programs=2, gemm_programs=10**7), "config.gemm_programs"),
    (PartitionConfig(dynamic=True, indexer_programs=10**6), r"config.indexer_programs \+ gemm_programs"),
    (PartitionConfig(gemm_in_tail=1.0, first_programs=10**6), "config.first_programs"),
], ids=["indexer", "gemm", "dynamic", "first"])
def test_config_bounded_by_the_work_at_launch(batch, cfg, name):
    a = batch.clone().args
    _refused(a, "partitioned", RegionWorkspace.for_args(a), ValueError, name, config=cfg)


@pytest.mark.parametrize("path,config,exc", [
    ("reference", PartitionConfig(), ValueError),
    ("sequential", PartitionConfig(), ValueError),
    ("dual_stream", PartitionConfig(), ValueError),
    ("green_ctx", "fast", TypeError),
    ("green_ctx", (8, True), TypeError),
    ("vllm_sequential", PartitionConfig(), TypeError),
    ("vllm_dual_stream", {"topk": "auto"}, ValueError),
    ("vllm_sequential", {"topk_backend": "fastest"}, ValueError),
    ("vllm_v32", {"max_model_len": "163840"}, TypeError),
    ("vllm_v32", {"max_model_len": 0}, ValueError),
    ("partitioned", (8, 8), TypeError),
])
def test_config_refused_where_not_read(batch, path, config, exc):
    a = batch.clone().args
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, exc, "config", config=config)


@pytest.mark.parametrize("kw,name", [
    (dict(use_ue8m0="no"), "use_ue8m0"), (dict(use_ue8m0=1), "use_ue8m0"), (dict(use_ue8m0=None), "use_ue8m0"),
    (dict(check_values="no"), "check_values"), (dict(check_values=0), "check_values"),
])
@pytest.mark.parametrize("path", ["reference", "sequential"])
def test_flags_must_be_bools(batch, kw, name, path):
    a = batch.clone().args
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, TypeError, name, **kw)
    with pytest.raises(TypeError, match="check_values"):
        validate_region_args(a, check_values="yes")


@pytest.mark.parametrize("kw", [dict(tie_free="no"), dict(use_ue8m0=1)])
def test_batch_factory_flags_must_be_bools(kw):
    with pytest.raises(TypeError, match=next(iter(kw))):
        make_decode_batch([70], num_heads=16, **kw)


@pytest.mark.parametrize("field", _TENSOR_FIELDS)
def test_non_tensor_argument_is_a_type_error(batch, field):
    a = batch.clone().args
    bad = dataclasses.replace(a, **{field: [0.0]})
    with pytest.raises(TypeError, match=f"{field}: expected a torch.Tensor"):
        validate_region_args(bad)


# -- item 5: lengths past the block table with value checks off: clamped on every path -----------------
ITEM5_PATHS = [
    ("reference", None), ("sequential", None), ("dual_stream", None),
    ("partitioned", PartitionConfig(indexer_programs=2, gemm_programs=2)),  # top-k as a second launch
    ("partitioned", PartitionConfig(indexer_programs=2, gemm_programs=2, gemm_in_tail=1.0)),  # tail launch
    ("partitioned", PartitionConfig(indexer_programs=2, gemm_programs=2, fuse_topk=True)),  # in-launch top-k
    ("partitioned", PartitionConfig(dynamic=True, indexer_programs=3, gemm_programs=1, fuse_topk=True)),
    ("partitioned", PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=2)),
]
ITEM5_IDS = ["reference", "sequential", "dual_stream", "partitioned-topk-launch", "partitioned-tail",
             "partitioned-fused", "partitioned-dynamic", "partitioned-dense"]


def _past_the_table(device):
    """Request 0 claims 5000 positions with a 128-position table (2 blocks) and a workspace for
    8192; its slot is -1 so that no new key is involved. What a CUDA graph sees with a stale length."""
    b = make_decode_batch([70, 100], num_heads=16, seed=21, device=device)
    a = b.args
    assert a.block_table.shape[1] * 64 == 128
    a.context_lens[0] = 5000
    a.slot_mapping[0] = -1
    return b, RegionWorkspace.for_shape(a.num_tokens, 8192, a.q_c.device)


def _assert_clamped(a, cap):
    lens = [min(int(n), cap) for n in a.context_lens.cpu()]
    for t, L in enumerate(lens):
        row = a.topk_indices[t].cpu()
        sel = row[row >= 0]
        assert sorted(sel.tolist()) == list(range(min(L, 2048))), f"row {t}: not the {L} visible positions"
        assert int((row == -1).sum()) == 2048 - min(L, 2048)


@pytest.mark.parametrize("path,cfg", ITEM5_PATHS, ids=ITEM5_IDS)
def test_lengths_past_the_table_are_clamped(path, cfg):
    b, ws = _past_the_table("cpu")
    a = b.clone().args
    run_region(a, path=path, workspace=None if path == "reference" else ws, config=cfg, check_values=False)
    _assert_clamped(a, 128)
    assert all(int(x.abs().sum()) == 0 for x in (ws.counters, ws.radix.counters, ws.radix.hist))


@pytest.mark.gpu
@pytest.mark.parametrize("path,cfg", ITEM5_PATHS, ids=ITEM5_IDS)
def test_lengths_past_the_table_are_clamped_gpu(path, cfg):
    b, ws = _past_the_table("cuda")
    a = b.clone().args
    run_region(a, path=path, workspace=None if path == "reference" else ws, config=cfg, check_values=False)
    torch.cuda.synchronize()
    _assert_clamped(a, 128)
    assert all(int(x.abs().sum()) == 0 for x in (ws.counters, ws.radix.counters, ws.radix.hist))


# -- item 6: stale arrival counters: refused in eager mode, reset() clears them ----------------------
@pytest.mark.parametrize("path,dirty", [
    ("partitioned", "counters"), ("partitioned", "radix"), ("sequential", "radix"), ("sequential", "hist"),
])
def test_dirty_workspace_is_refused_then_reset(batch, path, dirty):
    a = batch.clone().args
    ws = RegionWorkspace.for_args(a)
    if dirty == "counters":
        ws.counters[64 + 1] = 3
        match = "workspace.counters"
    elif dirty == "hist":
        ws.radix.hist[1, 7] = 2
        match = "workspace.radix.hist"
    else:
        ws.radix.counters.view(-1)[0] = 5
        match = "workspace.radix.counters"
    _refused(a, path, ws, ValueError, match + r".*reset\(\)")
    ws.reset()
    cfg = PartitionConfig(indexer_programs=2, gemm_programs=2, fuse_topk=True) if path == "partitioned" else None
    run_region(a, path=path, workspace=ws, config=cfg)
    ref = batch.clone()
    run_region(ref.args, path="reference")
    checks.check_region(a, ref.args, batch)


# -- item 7: non-finite inputs are refused in eager mode ------------------------------------------------
def _poison(a, field):
    x = getattr(a, field).clone()
    if field == "index_q_fp8":
        x.view(torch.uint8)[1, 3, 5] = 0x7F  # e4m3fn NaN
    elif field == "cos_sin_cache":
        x[int(a.positions[1])] = float("nan")
    else:
        x.view(-1)[5] = float("inf") if field in ("q_c", "k_pe") else float("nan")
    return dataclasses.replace(a, **{field: x})


@pytest.mark.parametrize("field", ["q_c", "k_pe", "index_q_fp8", "index_weights", "index_k", "cos_sin_cache"])
@pytest.mark.parametrize("path", ["reference", "sequential"])
def test_non_finite_inputs_are_refused(batch, field, path):
    a = _poison(batch.clone().args, field)
    ws = None if path == "reference" else RegionWorkspace.for_args(a)
    _refused(a, path, ws, ValueError, f"{field}: non-finite")
