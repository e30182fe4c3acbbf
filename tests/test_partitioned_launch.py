"""Host side of the partitioned path: what ``partitioned_region`` hands to the launches.

The kernels are replaced by recorders, so these tests check the grid, the role constexprs and
the launch options a ``PartitionConfig`` turns into (the interpreter ignores ``maxnreg``, and a
dropped register cap or a wrong grid would only show as lost time on the GPU). Outputs are
checked elsewhere (``test_paths.py``).
"""

import dataclasses

import pytest

from smpart import partitioned as P  # the host side, whose kernel names the recorders replace
from smpart.batch import make_decode_batch
from smpart.triton_kernels.mqa_logits import mqa_logits_runs_per_row
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.workspace import RegionWorkspace


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.fixture
def launches(monkeypatch):
    rec = dict(first=_Recorder(), tail=_Recorder(), quant=[], topk=[])
    monkeypatch.setattr(P, "_partitioned_kernel", rec["first"])
    monkeypatch.setattr(P, "_topk_gemm_tail_kernel", rec["tail"])
    monkeypatch.setattr(P, "launch_q_c_quant", lambda *a: rec["quant"].append(a))
    monkeypatch.setattr(P, "topk", lambda *a, **k: rec["topk"].append((a, k)))
    return rec


def _batch():
    b = make_decode_batch([70, 4100, 2], num_heads=16, next_n=1, seed=1)
    return b.args, RegionWorkspace.for_args(b.args)


def _runs(a, ws, cfg):
    return mqa_logits_runs_per_row(ws.max_len, a.block_table.shape[1], cfg.blocks_per_item, write_neg_inf=False)


def test_dense_first_launch(launches):
    """GEMM programs numbered first (``GEMM_FIRST``), then one program per logits item; q_c
    quantized by its own launch into the workspace buffers, the tiles reading them; the cap passed."""
    a, ws = _batch()
    cfg = PartitionConfig(first_prequant=True, dense_first=True, maxnreg=128, gemm_programs=3, blocks_per_item=8)
    P.partitioned_region(a, ws, cfg)
    (q_c, xq, xs, _, _), = launches["quant"]
    assert q_c is a.q_c and xq is ws.q_c_fp8 and xs is ws.q_c_scale
    (grid, args, kw), = launches["first"].calls
    assert grid == (3 + a.num_tokens * _runs(a, ws, cfg),)
    assert kw["GEMM_FIRST"] and kw["DENSE"] and kw["GEMM_PREQUANT"] and not kw["QUANT_Q_C"]
    assert kw["ROLES"] == 11 and kw["maxnreg"] == 128
    assert args[7] is ws.q_c_fp8 and args[8] is ws.q_c_scale  # xq_ptr, xs_ptr
    assert len(launches["topk"]) == 1 and not launches["tail"].calls


def test_dense_first_gemm_programs_capped_to_tiles(launches):
    a, ws = _batch()
    cfg = PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=100000)
    P.partitioned_region(a, ws, cfg)
    (grid, args, kw), = launches["first"].calls
    n_gemm = args[-3]  # n_gemm_items, num_idx_programs, num_gemm_programs
    assert args[-1] == n_gemm and grid == (n_gemm + a.num_tokens * _runs(a, ws, cfg),)


def test_no_cap_no_option_and_no_buffers_no_prequant(launches):
    """``maxnreg=None`` passes no option (ptxas decides); a workspace without the quant buffers
    falls back to the tiles quantizing q_c themselves (no extra launch)."""
    a, ws = _batch()
    ws = dataclasses.replace(ws, q_c_fp8=None, q_c_scale=None)
    P.partitioned_region(a, ws, PartitionConfig(first_prequant=True, indexer_programs=2, gemm_programs=2))
    (grid, args, kw), = launches["first"].calls
    assert "maxnreg" not in kw and not kw["GEMM_PREQUANT"] and not kw["GEMM_FIRST"] and grid == (4,)
    assert not launches["quant"]


def test_tail_split_has_no_quant_launch(launches):
    """With every GEMM tile in the tail, the first launch's per-token items quantize q_c (no
    launch of its own, whatever ``first_prequant`` says) and the tail's tiles read it."""
    a, ws = _batch()
    P.partitioned_region(a, ws, PartitionConfig(gemm_in_tail=1.0, first_prequant=True, maxnreg=168))
    (grid, args, kw), = launches["first"].calls
    assert kw["QUANT_Q_C"] and not kw["GEMM_PREQUANT"] and kw["ROLES"] == 3 and kw["maxnreg"] == 168
    assert not launches["quant"]
    (tgrid, targs, tkw), = launches["tail"].calls
    assert tkw["PREQUANT"]


@pytest.mark.parametrize("cfg", [
    PartitionConfig(indexer_programs=2, gemm_programs=2),  # standalone radix top-k after
    PartitionConfig(gemm_in_tail=1.0),  # the radix items beside the GEMM tiles
    PartitionConfig(gemm_in_tail=0.5, indexer_programs=2, gemm_programs=2),
    PartitionConfig(indexer_programs=2, gemm_programs=2, fuse_topk=True),  # in the first launch
    PartitionConfig(dynamic=True, indexer_programs=3, fuse_topk=True),
    PartitionConfig(first_prequant=True, dense_first=True, gemm_programs=2),
], ids=["standalone", "tail", "half-tail", "fused", "fused-dynamic", "dense-first"])
@pytest.mark.parametrize("algo", ["radix", "sample"])
def test_every_split_feeds_the_topk(cfg, algo, launches):
    """Every split runs the configured top-k: in the first launch (``fuse_topk``), the tail's
    items, or ``radix_topk`` after it on the workspace's radix buffers, with the rows' length bound
    clamped to the block table (``min(max_len, max_blocks * 64)``). With ``algo="radix"`` the first
    launch's logits role fills ``ws.radix.hist`` (``HIST``) and the top-k reads it (``TOPK_S`` 0, or
    ``hist_ready=True``); with ``"sample"`` no histogram is built and the items sample
    (``TOPK_S`` > 0)."""
    import dataclasses

    from smpart.triton_kernels.radix_topk import RadixTopkConfig

    cfg = dataclasses.replace(cfg, topk_config=RadixTopkConfig(algo=algo))
    a, ws = _batch()
    rw = ws.radix
    P.partitioned_region(a, ws, cfg)
    (grid, args, kw), = launches["first"].calls
    assert bool(kw["HIST"]) == (algo == "radix") and any(x is rw.counters for x in args)
    assert (kw["TOPK_S"] == 0) == (algo == "radix")
    if algo == "radix":
        assert any(x is rw.hist for x in args)
    assert bool(kw["ROLES"] & 4) == cfg.fuse_topk
    cols = min(ws.max_len, a.block_table.shape[1] * 64)
    if cfg.fuse_topk:
        assert not launches["tail"].calls and not launches["topk"]
    elif cfg.gemm_in_tail:
        (tgrid, targs, tkw), = launches["tail"].calls
        assert targs[3] is rw.hist and targs[4] is rw.counters and tkw["CHUNK"] == kw["TOPK_CHUNK"]
        assert tkw["TOPK_S"] == kw["TOPK_S"]
        assert targs[10] == cols and targs[11] == a.num_tokens * -(-cols // tkw["CHUNK"])  # lmax, top-k items
        assert not launches["topk"]
    else:
        (targs, tkw), = launches["topk"]
        assert tkw["hist_ready"] == (algo == "radix") and tkw["workspace"] is rw and tkw["max_len"] == cols
        assert tkw["config"].algo == algo
        assert not launches["tail"].calls


def test_no_topk_role_no_histogram(launches):
    """Without the top-k role (a benchmark knob) the logits fill no histogram: nothing would zero it."""
    a, ws = _batch()
    P.partitioned_region(a, ws, PartitionConfig(indexer_programs=2, gemm_programs=2, roles=11))
    (grid, args, kw), = launches["first"].calls
    assert not kw["HIST"] and not launches["topk"]
