"""GPU stress of the partitioned kernel's cross-program protocol (issue 4's acceptance runs).

The interpreter runs programs one at a time, and compute-sanitizer's racecheck sees only shared
memory, so neither can prove the arrival counters, the dynamic queue or the new-key patch sound;
these runs on the GPU do:

* ``test_random_sweep_gpu``: >= 500 seeded decode batches (lengths 1..65536 log-uniform, B 1..8,
  next_n 1 and 2, padding requests, tie-free and random inputs, H 16/32 and every 10th at 128)
  under random static splits (down to 1 indexer or 1 GEMM program), the dynamic schedule and the
  in-launch top-k, each checked against ``reference``;
* ``test_graph_replays_1000_gpu``: one captured graph replayed 1,000 times with the context
  lengths, block tables, slots and positions rewritten in place between replays (static split, and
  the dynamic schedule with the in-launch top-k), every replay checked against ``reference``;
* ``test_concurrency_stress_gpu``: one MTP batch run 1,000 times under ~20 splits and both
  schedules, the top-k fused and not: ``q``, ``k_pe`` and the cache bytes bit-identical to the
  first run and the top-k index sets identical (tie-free batch), every run;
* ``test_memcheck_gpu``: ``compute-sanitizer --tool memcheck`` on a small full-kernel run of every
  schedule (skipped where compute-sanitizer is not on the PATH).

``SMPART_STRESS_SCALE`` (float, default 1) scales the counts (e.g. 0.1 for a quick look).
"""

import math
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from smpart import checks
from smpart.batch import make_decode_batch, redraw_decode_metadata
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.region import run_region
from smpart.workspace import RegionWorkspace

pytestmark = pytest.mark.gpu
SCALE = float(os.environ.get("SMPART_STRESS_SCALE", "1"))


def _n(count: int) -> int:
    return max(1, int(math.ceil(count * SCALE)))


def _random_config(rng: random.Random, total: int) -> PartitionConfig:
    """A random split of ``total`` programs: static (1..total-1 indexer programs, extremes
    included), dynamic (random program count and queue chunk), top-k fused or not. The compiled
    variants are kept few (each costs a compile): ``blocks_per_item`` varies on static unfused
    launches only."""
    kind = rng.random()
    fuse = rng.random() < 0.3
    if kind < 0.3:
        return PartitionConfig(dynamic=True, indexer_programs=rng.randint(1, total), gemm_programs=0,
                               queue_chunk=rng.choice([1, 4, 16]), fuse_topk=fuse)
    n_idx = rng.choice([1, total - 1, rng.randint(1, total - 1), rng.randint(1, total - 1)])
    bpi = 4 if fuse else rng.choice([2, 4, 4, 8])
    tail = {}
    if not fuse and rng.random() < 0.4:  # some or all GEMM tiles beside the top-k in the second launch
        tail = dict(gemm_in_tail=rng.choice([0.5, 1.0]), tail_block_n=rng.choice([128, 256]),
                    tail_gemm_programs=rng.choice([None, 1, rng.randint(1, 132)]),
                    tail_prequant=rng.random() < 0.7, first_programs=rng.choice([None, None, 1, 528]))
    if rng.random() < 0.4:  # GEMM tiles reading q_c quantized by a launch of its own, a register cap
        tail.update(first_prequant=True, maxnreg=rng.choice([None, 128, 168]), dense_first=rng.random() < 0.5)
    return PartitionConfig(indexer_programs=n_idx, gemm_programs=total - n_idx, fuse_topk=fuse, blocks_per_item=bpi,
                           **tail)


def _assert_clean(ws) -> None:
    """The arrival counters and the radix top-k's histograms and counters are back to zero."""
    for name, x in (("counters", ws.counters), ("radix.counters", ws.radix.counters), ("radix.hist", ws.radix.hist)):
        assert int(x.abs().sum()) == 0, f"workspace.{name} not reset"


def _log_uniform_len(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


SWEEP_CHUNKS = 5  # 5 x 100 seeds: separate tests, so ``pytest -n`` compiles and runs them in parallel


@pytest.mark.parametrize("chunk", range(SWEEP_CHUNKS))
def test_random_sweep_gpu(chunk):
    """>= 500 random batches (100 per chunk) x random splits/schedules, each against ``reference``."""
    total = torch.cuda.get_device_properties(0).multi_processor_count * 2
    failures = []
    per_chunk = _n(500) // SWEEP_CHUNKS + 1
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        rng = random.Random(seed)
        next_n = rng.choice([1, 2])
        B = rng.choice([1, 1, 3, 4, 8])
        lens = [max(next_n, min(65536, _log_uniform_len(rng, 1, 65536))) for _ in range(B)]
        pad = rng.randint(0, 1) if B > 1 else 0
        H = 128 if seed % 10 == 0 else rng.choice([16, 32])
        cfg = _random_config(rng, total)
        b = make_decode_batch(lens, num_heads=H, next_n=next_n, num_padding=pad, tie_free=rng.random() < 0.3,
                              seed=seed, device="cuda")
        ref = b.clone()
        run_region(ref.args, path="reference")
        out = b.clone()
        ws = RegionWorkspace.for_args(out.args)
        try:
            run_region(out.args, path="partitioned", workspace=ws, config=cfg)
            checks.check_region(out.args, ref.args, b)
            _assert_clean(ws)
        except AssertionError as e:
            failures.append(f"seed {seed} (B={B} lens={lens} next_n={next_n} pad={pad} H={H} {cfg}): {e}")
            print(f"FAILED {failures[-1]}", flush=True)  # visible at once with -s, even if the run is cut short
            if len(failures) >= 5:
                break
        done = seed - chunk * per_chunk + 1
        if done % 10 == 0 or done == per_chunk:  # progress, visible with -s even if the run is cut short
            print(f"sweep chunk {chunk}: {done}/{per_chunk} batches checked, {len(failures)} failed", flush=True)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("config", [None, PartitionConfig(dynamic=True, fuse_topk=True, queue_chunk=4),
                                    PartitionConfig(gemm_in_tail=1.0),
                                    PartitionConfig(first_prequant=True, dense_first=True, maxnreg=128,
                                                    gemm_programs=264, blocks_per_item=8)],
                         ids=["tuned-static", "dynamic-fusedtopk", "gemm-in-tail", "dense-first"])
def test_graph_replays_1000_gpu(config):
    """One graph, 1,000 replays (250 for the fused top-k), metadata rewritten in place between
    replays; every replay equals ``reference`` on the same inputs."""
    B, H, next_n, max_len = 8, 32, 2, 4096
    mb = max_len // 64
    # a pool of B*mb blocks of random keys (+ spares); every replay draws a fresh table from it
    base = make_decode_batch(max_len, batch_size=B, num_heads=H, next_n=next_n, spare_blocks=B * mb, seed=7,
                             device="cuda")
    pool = base.args.kv_cache.shape[0]
    live = base.clone()
    pristine = {k: getattr(live.args, k).clone() for k in ("kv_cache", "k_pe")}
    ws = RegionWorkspace.for_args(live.args)
    run_region(live.args, path="partitioned", workspace=ws, config=config)  # compile + warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_region(live.args, path="partitioned", workspace=ws, config=config, check_values=False)
    g = torch.Generator().manual_seed(11)
    n = _n(1000 if config is None else 250)  # 1,000 for the shipped config, 250 for each variant
    for step in range(n):
        redraw_decode_metadata(live.args, pool, max_len, g)
        for k, v in pristine.items():
            getattr(live.args, k).copy_(v)
        live.args.q.fill_(float("nan"))
        live.args.topk_indices.fill_(-7)
        ref = live.clone()
        run_region(ref.args, path="reference")
        graph.replay()
        try:
            checks.check_region(live.args, ref.args, live)
        except AssertionError as e:
            raise AssertionError(f"replay {step} (lens {live.args.context_lens.tolist()}): {e}") from None
    _assert_clean(ws)


def test_concurrency_stress_gpu():
    """The same MTP batch 1,000 times under different splits and both schedules: bit-identical
    q / k_pe / cache bytes, identical top-k index sets (tie-free keys), every run."""
    lens = [65536, 40000, 17, 2049, 9000, 1, 300, 65536]
    lens = [max(2, L) for L in lens]
    b = make_decode_batch(lens, num_heads=128, next_n=2, num_padding=1, tie_free=True, seed=5, device="cuda")
    total = torch.cuda.get_device_properties(0).multi_processor_count * 2
    configs = [PartitionConfig(indexer_programs=i, gemm_programs=total - i, fuse_topk=f)
               for i in (1, 2, 7, 33, 66, 132, 200, total - 1) for f in (False, True)]
    configs += [PartitionConfig(dynamic=True, indexer_programs=p, gemm_programs=0, queue_chunk=c, fuse_topk=f)
                for p, c in ((total, 1), (total, 4), (total, 16), (37, 4), (1, 2)) for f in (False, True)]
    configs += [PartitionConfig(indexer_programs=i, gemm_programs=total - i, gemm_in_tail=g, tail_block_n=bn,
                                tail_gemm_programs=tg, tail_prequant=pq)
                for i, g, bn, tg, pq in ((66, 1.0, 128, None, True), (7, 0.5, 256, 1, False),
                                         (200, 1.0, 256, 100, True), (33, 0.5, 128, 5, False))]
    configs += [PartitionConfig(indexer_programs=i, gemm_programs=total - i, gemm_in_tail=g, first_prequant=True,
                                maxnreg=r, dense_first=d)
                for i, g, r, d in ((200, 0.0, 128, False), (66, 0.5, 168, True), (33, 0.0, None, False),
                                   (1, 0.0, 168, True))]
    work = b.clone()
    a = work.args
    pristine = {k: getattr(a, k).clone() for k in ("kv_cache", "k_pe")}
    ws = RegionWorkspace.for_args(a)
    first = None
    n = _n(1000)
    for i in range(n):
        cfg = configs[i % len(configs)]
        for k, v in pristine.items():
            getattr(a, k).copy_(v)
        a.q.fill_(float("nan"))
        a.topk_indices.fill_(-7)
        run_region(a, path="partitioned", workspace=ws, config=cfg, check_values=False)
        got = {"q": a.q.clone(), "k_pe": a.k_pe.clone(), "kv_cache": a.kv_cache.clone(),
               "topk": torch.sort(a.topk_indices, dim=1).values}
        if first is None:
            ref = b.clone()
            run_region(ref.args, path="reference")
            checks.check_region(a, ref.args, b)  # the first run is right...
            first = got
            continue
        for k in ("q", "k_pe", "kv_cache", "topk"):  # ...and every later one is identical to it
            if not torch.equal(got[k].view(torch.uint8) if k != "topk" else got[k],
                               first[k].view(torch.uint8) if k != "topk" else first[k]):
                bad = (got[k] != first[k]).nonzero()[0].tolist()
                raise AssertionError(f"run {i} ({cfg}): {k} differs from run 0, first at {bad}")
    _assert_clean(ws)


_MEMCHECK_CHILD = textwrap.dedent("""
    import torch
    from smpart import checks
    from smpart.batch import make_decode_batch
    from smpart.triton_kernels.partitioned import PartitionConfig
    from smpart.region import run_region
    from smpart.workspace import RegionWorkspace
    b = make_decode_batch([70, 3000, 2, 2049], num_heads=32, next_n=2, num_padding=1, seed=3, device="cuda")
    ref = b.clone(); run_region(ref.args, path="reference")
    for cfg in (PartitionConfig(indexer_programs=3, gemm_programs=5),
                PartitionConfig(indexer_programs=1, gemm_programs=1, fuse_topk=True),
                PartitionConfig(dynamic=True, indexer_programs=6, gemm_programs=0, fuse_topk=True),
                PartitionConfig(indexer_programs=2, gemm_programs=2, gemm_in_tail=0.5, tail_gemm_programs=3)):
        out = b.clone(); ws = RegionWorkspace.for_args(out.args)
        run_region(out.args, path="partitioned", workspace=ws, config=cfg)
        torch.cuda.synchronize()
        checks.check_region(out.args, ref.args, b)
    # the standalone top-k over long rows: chunk programs, candidate buffers, the exact fallback
    # (row 2: four values, far more than 8192 candidates at the cutoff), an empty row
    from smpart.triton_kernels import radix_topk as rt
    from smpart.triton_kernels.topk import topk
    lens = torch.tensor([20000, 5000, 40000, 0, 9000], dtype=torch.int32, device="cuda")
    x = torch.randn(5, 40000, device="cuda")
    x[1, :5000] = 1.0
    x[2] = torch.randint(0, 4, (40000,), device="cuda").float()
    ws = rt.RadixTopkWorkspace(5, "cuda")
    for cfg in (rt.RadixTopkConfig(), rt.RadixTopkConfig(algo="radix"), rt.RadixTopkConfig(chunk=2048, short_max=2048)):
        out = torch.full((5, 2048), -7, dtype=torch.int32, device="cuda")
        topk(x, None, out, next_n=1, workspace=ws, row_lens=lens, config=cfg)
        torch.cuda.synchronize()
        for t, L in enumerate(lens.tolist()):
            n = min(L, 2048)
            assert bool((out[t, n:] == -1).all()), (cfg, t)
            if n:
                got = x[t, out[t, :n].long()].sort().values
                assert torch.equal(got, torch.topk(x[t, :L], n).values.sort().values), (cfg, t)
    print("MEMCHECK_CHILD_OK")
""")


def test_memcheck_gpu():
    """``compute-sanitizer --tool memcheck`` reports no error on a small full-kernel run (static,
    1+1 with the fused top-k, dynamic with the fused top-k) and on the standalone top-k over long
    rows (both algorithms, 2K chunks, the exact fallback); PyTorch's caching allocator is off so
    every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on the PATH")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    p = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "97", "--leak-check", "no",
                        sys.executable, "-c", _MEMCHECK_CHILD], env=env, capture_output=True, text=True,
                       timeout=900)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0 and "MEMCHECK_CHILD_OK" in p.stdout, f"rc={p.returncode}\n{tail}"
    assert "ERROR SUMMARY: 0 errors" in p.stdout + p.stderr, tail
