"""Every Triton path against the PyTorch reference (interpreter on CPU, compiled on a GPU).

Foundation cases: edge lengths (1, 63, 64, 65, 2047, 2048, 2049), next_n 1 and 2, shuffled block
tables, padding requests, tie-free batches (exact index sets), UE8M0 and fp32 scales; plus the
partitioned kernel's seeded random sweep (mixed lengths, random splits, both schedules, top-k
fused or as a second launch) and CUDA-graph replays with lengths and tables changed in between.
"""

import dataclasses
import random

import pytest
import torch

from smpart import checks, reference
from smpart.batch import make_decode_batch
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.region import run_region
from smpart.triton_kernels.radix_topk import RadixTopkConfig
from smpart.workspace import RegionWorkspace

FOUNDATION = [
    # (context_lens, next_n, num_padding, tie_free, use_ue8m0)
    ([1, 63, 64, 65], 1, 0, False, True),
    ([2047, 2048, 2049], 1, 1, True, True),
    ([2, 65, 700], 2, 1, False, False),
    ([2049, 3], 2, 0, True, True),
]
# 2048-position top-k items: rows of a few thousand positions take the multi-chunk radix path
# (one reservation per item, threshold-bin candidates, the row's last arriver resolving)
SMALL_TOPK = RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4)
IDS = [f"lens{'-'.join(map(str, c[0]))}-n{c[1]}-pad{c[2]}{'-tiefree' if c[3] else ''}{'' if c[4] else '-fp32'}"
       for c in FOUNDATION]


def _run_and_check(batch, path, device, config=None):
    batch = batch if device == "cpu" else _to(batch, device)
    ref = batch.clone()
    run_region(ref.args, path="reference", use_ue8m0=batch.use_ue8m0)
    out = batch.clone()
    ws = RegionWorkspace.for_args(out.args)
    run_region(out.args, path=path, workspace=ws, config=config, use_ue8m0=batch.use_ue8m0)
    checks.check_region(out.args, ref.args, batch)
    _assert_clean(ws)


def _assert_clean(ws):
    """Every arrival counter and the radix top-k's histograms and counters are back to zero."""
    for name, x in (("counters", ws.counters), ("radix.counters", ws.radix.counters), ("radix.hist", ws.radix.hist)):
        assert int(x.abs().sum()) == 0, f"workspace.{name} not reset"


def _to(batch, device):
    return dataclasses.replace(batch, args=batch.args.to(device))


@pytest.mark.parametrize("case", FOUNDATION, ids=IDS)
@pytest.mark.parametrize("path", ["sequential", "dual_stream", "partitioned"])
def test_path_matches_reference(case, path, device):
    if path == "dual_stream" and device == "cpu":
        pytest.skip("dual_stream is sequential without CUDA streams (paths.run_dual_stream); covered on the GPU")
    lens, next_n, pad, tie_free, ue8m0 = case
    b = make_decode_batch(lens, num_heads=16, next_n=next_n, num_padding=pad, tie_free=tie_free,
                          use_ue8m0=ue8m0, seed=len(lens) * 7 + next_n)
    _run_and_check(b, path, device)


def test_partitioned_h128_smoke(device):
    b = make_decode_batch([70], num_heads=128, seed=3)
    _run_and_check(b, "partitioned", device, PartitionConfig(indexer_programs=2, gemm_programs=3, block_n=128))


@pytest.mark.parametrize("cfg", [
    PartitionConfig(first_prequant=True, dense_first=True),  # one GEMM program per tile
    PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=1, maxnreg=128, blocks_per_item=8),
    PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=2, gemm_in_tail=0.5, fuse_topk=False),
    PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=3, fuse_topk=True),
    PartitionConfig(first_prequant=True, indexer_programs=2, gemm_programs=1, maxnreg=168),  # strided
    PartitionConfig(dense_first=True, gemm_programs=2),  # GEMM tiles quantizing q_c themselves
], ids=["tiles", "one-gemm-program-cap128", "half-in-tail", "fused-topk", "strided-prequant", "fused-quant"])
def test_partitioned_gemm_first_launch_variants(cfg, device):
    """The first launch with GEMM tiles: q_c quantized by a launch of its own (``first_prequant``),
    GEMM programs numbered first and one program per logits item (``dense_first``), a register cap
    (``maxnreg``, ignored by the interpreter); MTP rows, a padding row, a row longer than a top-k
    chunk (2048-position top-k items here: three chunks, the last arriver resolving). The rows of
    ``q_c_fp8`` past T stay untouched."""
    b = make_decode_batch([70, 4100, 2], num_heads=16, next_n=2, num_padding=1, seed=11)
    b = b if device == "cpu" else _to(b, device)
    ref = b.clone()
    run_region(ref.args, path="reference")
    out = b.clone()
    dev = out.args.q_c.device
    rows = b.args.num_tokens + 3
    ws = RegionWorkspace.for_shape(rows, 4160, dev)
    ws.q_c_fp8.view(torch.uint8).fill_(0x55)
    cfg = dataclasses.replace(cfg, topk_config=SMALL_TOPK)
    run_region(out.args, path="partitioned", workspace=ws, config=cfg)
    checks.check_region(out.args, ref.args, b)
    _assert_clean(ws)
    T = b.args.num_tokens
    assert bool((ws.q_c_fp8[T:].view(torch.uint8) == 0x55).all()), "rows past T written"


def test_partitioned_sampled_topk_fewer_programs_than_chunks(device):
    """The sampled top-k with fewer programs than chunks per row (``programs_per_row``): one program
    owning its row (no atomics) and two programs taking alternate chunks of a three-chunk row, beside
    the GEMM tiles in the tail launch (``tests/test_sample_topk.py`` covers the standalone launch);
    equal to ``reference``, counters back to zero."""
    split = PartitionConfig(gemm_in_tail=1.0, tail_gemm_programs=2)
    b = make_decode_batch([4100, 70, 2], num_heads=16, next_n=2, num_padding=1, seed=17)
    b = b if device == "cpu" else _to(b, device)
    ref = b.clone()
    run_region(ref.args, path="reference")
    for ppr in (1, 2):
        out = b.clone()
        ws = RegionWorkspace.for_args(out.args)
        cfg = dataclasses.replace(split, topk_config=dataclasses.replace(SMALL_TOPK, programs_per_row=ppr))
        run_region(out.args, path="partitioned", workspace=ws, config=cfg)
        checks.check_region(out.args, ref.args, b)
        _assert_clean(ws)


RADIX_SPLITS = [
    PartitionConfig(indexer_programs=2, gemm_programs=3),  # the standalone radix top-k after
    PartitionConfig(gemm_in_tail=1.0, tail_gemm_programs=2),  # radix items beside the GEMM tiles
    PartitionConfig(indexer_programs=2, gemm_programs=1, gemm_in_tail=0.5, blocks_per_item=8),
    PartitionConfig(indexer_programs=3, gemm_programs=2, fuse_topk=True, blocks_per_item=1),  # in-launch
    PartitionConfig(dynamic=True, indexer_programs=4, fuse_topk=True, queue_chunk=2),
    PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=2),
]


@pytest.mark.parametrize("cfg", RADIX_SPLITS, ids=["standalone", "tail", "half-tail", "fused", "fused-dynamic",
                                                   "dense-first"])
def test_partitioned_radix_topk_repeated_calls(cfg, device):
    """The radix top-k in every split, one workspace over three calls whose lengths change: MTP rows
    (next_n=2) with a padding request, a row of several 2048-position top-k items, short rows; every
    call equals ``reference`` and leaves the histograms and counters at zero. The 4100-position row
    sees 4099/4100 positions, the histogram's new-key counts corrected by the patch."""
    cfg = dataclasses.replace(cfg, topk_config=SMALL_TOPK)
    steps = [([4100, 70, 2], 1), ([2, 3000, 4100], 0), ([2049, 2, 2], 1)]
    ws = None
    for i, (lens, pad) in enumerate(steps):
        b = make_decode_batch(lens, num_heads=16, next_n=2, num_padding=pad, tie_free=i == 1, seed=40 + i)
        b = b if device == "cpu" else _to(b, device)
        ref = b.clone()
        run_region(ref.args, path="reference")
        out = b.clone()
        if ws is None:
            ws = RegionWorkspace.for_shape(8, 4160, out.args.q_c.device)
        run_region(out.args, path="partitioned", workspace=ws, config=cfg)
        checks.check_region(out.args, ref.args, b)
        _assert_clean(ws)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["stale-huge", "stale-minus-huge"])
@pytest.mark.parametrize("cfg", [PartitionConfig(gemm_in_tail=1.0), PartitionConfig(indexer_programs=2, gemm_programs=2,
                                                                                   fuse_topk=True)],
                         ids=["tail", "fused"])
def test_partitioned_patch_moves_histogram_counts(cfg, sign, device):
    """The new-key patch must move its logit's histogram count: with the key write left out
    (``roles=14``) the cache's new-token slots hold stale keys whose scale is +-1e30, so the logits
    items count a +-huge value (an end bin); the patch writes the right logit from ``index_k`` and
    moves the count, else the row's threshold bin and above-count are off by one and the index set
    is wrong. Tie-free batch: exact sets against ``reference``."""
    b = make_decode_batch([4100, 3000, 2500], num_heads=16, next_n=2, tie_free=True, seed=23)
    b = b if device == "cpu" else _to(b, device)
    ref = b.clone()
    run_region(ref.args, path="reference")
    out = b.clone()
    a = out.args
    slots = a.slot_mapping[a.slot_mapping >= 0].long()
    blocks = a.kv_cache.view(a.kv_cache.shape[0], -1)
    scale = blocks[:, 64 * 128:].view(torch.float32)  # [num_blocks, 64] fp32 key scales
    scale[slots // 64, slots % 64] = sign * 1e30
    ws = RegionWorkspace.for_shape(a.num_tokens, 4160, a.q_c.device)
    run_region(a, path="partitioned", workspace=ws, config=dataclasses.replace(cfg, roles=14, topk_config=SMALL_TOPK))
    lens = reference.visible_lens(ref.args.context_lens, ref.args.next_n)
    logits64 = reference.paged_mqa_logits(ref.args.index_q_fp8, ref.args.index_weights, ref.args.kv_cache,
                                          ref.args.block_table, ref.args.context_lens, ref.args.next_n,
                                          int(lens.max()), dtype=torch.float64)
    checks.check_topk(a.topk_indices, logits64, lens, exact_sets=True)
    _assert_clean(ws)


@pytest.mark.parametrize("roles", [3, 4, 8, 12])
def test_partitioned_roles_with_gemm_in_tail(roles, device):
    """``roles`` (a benchmark knob) leaves the schedule of a tail split as it is: the roles it
    keeps are right, the others are not run, and no counter is left set."""
    b = make_decode_batch([70, 2000], num_heads=16, seed=4)
    ref = b.clone()
    run_region(ref.args, path="reference")
    out = b.clone()
    if device != "cpu":
        out = _to(out, device)
    a = out.args
    a.q.fill_(float("nan"))
    a.topk_indices.fill_(-7)
    ws = RegionWorkspace.for_args(a)
    run_region(a, path="partitioned", workspace=ws,
               config=PartitionConfig(gemm_in_tail=1.0, roles=roles, indexer_programs=2, gemm_programs=0))
    q_ran = not torch.isnan(a.q.float()).any()
    assert q_ran == bool(roles & 8)
    if roles & 8:
        assert torch.equal(a.k_pe.cpu(), ref.args.k_pe)
    assert bool((a.topk_indices != -7).any()) == bool(roles & 4)
    _assert_clean(ws)


def _random_case(seed: int):
    rng = random.Random(seed)
    next_n = rng.choice([1, 2])
    B = rng.randint(1, 4)
    lens = [rng.choice([next_n, rng.randint(next_n, 300), rng.randint(next_n, 4096)]) for _ in range(B)]
    pad = rng.randint(0, 1) if B > 1 else 0
    dynamic = rng.random() < 0.3
    fuse = rng.random() < 0.5
    cfg = PartitionConfig(
        indexer_programs=rng.choice([1, 2, 5]),
        gemm_programs=0 if dynamic else rng.choice([1, 3]),
        dynamic=dynamic,
        fuse_topk=fuse,
        blocks_per_item=rng.choice([1, 2, 4, 8]),
        block_n=rng.choice([64, 128]),
        # the GEMM (none, some or all of it) beside the top-k in the second launch
        gemm_in_tail=0.0 if fuse else rng.choice([0.0, 0.3, 1.0]),
        tail_block_n=rng.choice([64, 128, 256]),
        tail_gemm_programs=rng.choice([None, 1, 3]),
        tail_prequant=rng.random() < 0.7,
        first_programs=rng.choice([None, None, 1, 3]),
        first_prequant=rng.random() < 0.4,
        maxnreg=rng.choice([None, None, 128]),
        dense_first=not dynamic and rng.random() < 0.4,
    )
    return lens, next_n, pad, rng.random() < 0.3, cfg


@pytest.mark.parametrize("seed", range(30))
def test_partitioned_random_sweep(seed, device):
    lens, next_n, pad, tie_free, cfg = _random_case(seed)
    b = make_decode_batch(lens, num_heads=16, next_n=next_n, num_padding=pad, tie_free=tie_free, seed=seed)
    _run_and_check(b, "partitioned", device, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sequential", "dual_stream", "partitioned"])
@pytest.mark.parametrize("H,B,L,next_n", [(128, 1, 4096, 1), (128, 32, 8192, 1), (32, 128, 16384, 1),
                                           (128, 8, 65536, 2), (32, 1, 163840, 1)])
def test_path_full_shapes_gpu(path, H, B, L, next_n):
    b = make_decode_batch(L, batch_size=B, num_heads=H, next_n=next_n, seed=B + L)
    _run_and_check(b, path, "cuda")


def load_into(live, nb) -> None:
    """Copy batch ``nb``'s inputs into the captured buffers of ``live`` (same shapes; the block table
    and the cache zero-padded past ``nb``'s): what a graph replay with new metadata reads."""
    for name in ("q_c", "q_b_proj_weight", "q_b_proj_weight_scale", "positions", "k_pe", "index_q_fp8",
                 "index_weights", "index_k", "slot_mapping", "context_lens", "cos_sin_cache"):
        src, dst = getattr(nb.args, name), getattr(live.args, name)
        dst[: src.shape[0]].copy_(src) if name == "cos_sin_cache" else dst.copy_(src)
    live.args.block_table.zero_()
    live.args.block_table[:, : nb.args.block_table.shape[1]].copy_(nb.args.block_table)
    live.args.kv_cache.zero_()
    live.args.kv_cache[: nb.args.kv_cache.shape[0]].copy_(nb.args.kv_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sequential", "partitioned"])
def test_graph_replays_with_changing_metadata_gpu(path):
    """One captured graph, replayed with context lengths and block tables rewritten in place."""
    B, H, max_len = 8, 32, 4096
    base = make_decode_batch(max_len, batch_size=B, num_heads=H, seed=1, device="cuda")
    live = base.clone()
    ws = RegionWorkspace.for_args(live.args)
    run_region(live.args, path=path, workspace=ws)  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_region(live.args, path=path, workspace=ws)
    for step in range(20):
        lens = torch.randint(1, max_len + 1, (B,)).tolist()
        nb = make_decode_batch(lens, num_heads=H, seed=100 + step, device="cuda")
        load_into(live, nb)  # same shapes as the captured batch: every input into the captured buffers
        ref = nb.clone()
        run_region(ref.args, path="reference")
        graph.replay()
        torch.cuda.synchronize()
        out = live.args
        checks.assert_equal_bytes("kv_cache", out.kv_cache[: nb.args.kv_cache.shape[0]], ref.args.kv_cache)
        checks.assert_equal_bytes("k_pe", out.k_pe, ref.args.k_pe)
        assert checks.calc_diff(out.q.float(), ref.args.q.float()) < 1e-5
        lensv = ref.args.context_lens
        l64 = None
        from smpart import reference

        l64 = reference.paged_mqa_logits(ref.args.index_q_fp8, ref.args.index_weights, ref.args.kv_cache,
                                         ref.args.block_table, lensv, 1, max(int(lensv.max()), 1), dtype=torch.float64)
        checks.check_topk(out.topk_indices, l64, reference.visible_lens(lensv, 1),
                          checks.logits_tolerance(ref.args, reference.visible_lens(lensv, 1)))


def test_green_ctx_needs_cuda_on_cpu():
    """Without CUDA, green_ctx says why it cannot run (RuntimeError) and writes nothing."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU test below covers green_ctx")
    b = make_decode_batch([70], num_heads=16, seed=1)
    a = b.clone().args
    before = a.kv_cache.clone()
    with pytest.raises(RuntimeError, match="green_ctx"):
        run_region(a, path="green_ctx", workspace=RegionWorkspace.for_args(a))
    assert torch.equal(a.kv_cache, before)


@pytest.mark.parametrize("num_sms, want", [(132, (32, 100)), (78, (16, 62)), (32, (8, 24))])
def test_green_split_default(num_sms, want):
    """A quarter of the SMs for the indexer, in multiples of 8; the GEMM the rest."""
    from smpart.schedules import green_split

    assert green_split(num_sms) == want
    assert green_split(num_sms, (8, 16)) == (8, 16)  # an explicit split is taken as given


@pytest.mark.parametrize("num_sms", [1, 16, 31])
def test_green_split_refuses_zero_indexer_sms(num_sms):
    """Below 32 SMs the default split would give the indexer 0 SMs (a driver error later): refused."""
    from smpart.schedules import green_split

    with pytest.raises(ValueError, match=rf"config: green_ctx's default split .*0 of this device's {num_sms} SMs"):
        green_split(num_sms)
    assert green_split(num_sms, (1, num_sms)) == (1, num_sms)  # an explicit split still works


def test_green_split_refuses_more_sms_than_the_device_has():
    from smpart.schedules import green_split

    with pytest.raises(ValueError, match=r"config: green_ctx SM counts \(8, 200\) exceed the device's 132 SMs"):
        green_split(132, (8, 200))


@pytest.mark.gpu
def test_green_ctx_matches_reference_gpu():
    b = make_decode_batch(4096, batch_size=8, num_heads=32, seed=2)
    try:
        _run_and_check(b, "green_ctx", "cuda")
    except RuntimeError as e:  # driver without green-context support: say so, do not hide it
        pytest.skip(f"green contexts unavailable here: {e}")


def test_redraw_decode_metadata_steps(device):
    """Three steps of redrawn metadata (lengths, tables, slots, positions) on one batch's
    buffers: each agrees with ``reference`` (what the GPU replay stress relies on); bad sizes raise."""
    from smpart.batch import redraw_decode_metadata

    B, max_len = 3, 256
    base = make_decode_batch(max_len, batch_size=B, num_heads=16, next_n=2, spare_blocks=B * 4, seed=7)
    base = base if device == "cpu" else _to(base, device)
    pool = base.args.kv_cache.shape[0]
    pristine = base.args.kv_cache.clone()
    g = torch.Generator().manual_seed(11)
    seen = set()
    for _ in range(3):
        redraw_decode_metadata(base.args, pool, max_len, g)
        base.args.kv_cache.copy_(pristine)
        seen.add(tuple(base.args.context_lens.tolist()))
        _run_and_check(base, "partitioned", device, PartitionConfig(indexer_programs=2, gemm_programs=3))
    assert len(seen) == 3
    with pytest.raises(ValueError, match="max_len"):
        redraw_decode_metadata(base.args, pool, 4 * 64 + 1, g)
    with pytest.raises(ValueError, match="num_blocks"):
        redraw_decode_metadata(base.args, B * 4 - 1, max_len, g)


@pytest.mark.parametrize("path,cfg", [("sequential", None), ("partitioned", PartitionConfig()),
                                      ("partitioned", PartitionConfig(gemm_in_tail=1.0))],
                         ids=["sequential", "partitioned-standalone-topk", "partitioned-tail"])
def test_top_k_without_producer_histogram(path, cfg, device, monkeypatch):
    """Above ``radix_topk.FED_MAX_POSITIONS`` the logits build no histogram and the standalone top-k
    runs its own pass (the tail's items still need the producer's): forced here with a threshold of
    0, every row equals ``reference`` and the workspace is clean after two calls."""
    from smpart import partitioned as part_host
    from smpart import schedules

    seen = []

    def never(num_rows, lmax, config=None):
        seen.append((num_rows, lmax))
        return False

    monkeypatch.setattr(schedules, "hist_fed", never)
    monkeypatch.setattr(part_host, "hist_fed", never)
    cfg = None if cfg is None else dataclasses.replace(cfg, topk_config=SMALL_TOPK)
    ws = None
    for i, lens in enumerate(([4100, 70], [2, 3000, 2049])):
        b = make_decode_batch(lens, num_heads=16, next_n=1, seed=60 + i)
        b = b if device == "cpu" else _to(b, device)
        ref = b.clone()
        run_region(ref.args, path="reference")
        out = b.clone()
        if ws is None:
            ws = RegionWorkspace.for_shape(4, 4160, out.args.q_c.device)
        run_region(out.args, path=path, workspace=ws, config=cfg)
        checks.check_region(out.args, ref.args, b)
        _assert_clean(ws)
    assert seen or cfg.gemm_in_tail, "the rule was not consulted"
