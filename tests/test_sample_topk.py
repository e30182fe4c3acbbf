"""Sampled-cutoff top-2048 (``triton_kernels/sample_topk.py``), checked exactly.

The same contract and cases as ``tests/test_radix_topk.py`` (its helpers build the logits, with
garbage past each row's length, and check the -1 padding, unique in-range positions, the value
multiset against ``torch.topk`` and the tie rule's set): lengths around 2048/4096/16384, 40,000 and
163,840; equal rows, 3,000-way ties, exactly 2048 above a tie, 4 values, negatives, 2^100,
subnormals, +-inf, narrow ranges (the exact fallback when more than ``CAND`` values reach the
cutoff); next_n = 2 rows from ``context_lens`` with padding requests; repeated calls on one
workspace (counters back to zero); both counting modes.

CPU: ``TRITON_INTERPRET=1 python -m pytest --import-mode=importlib -q tests/test_sample_topk.py``.
"""

import pytest
import torch
import triton
import triton.language as tl

from smpart.triton_kernels import radix_topk as rt
from smpart.triton_kernels.sample_topk import _row_cutoff, sample_size, sample_topk

from test_radix_topk import K, check_exact, gpu_large_case, launches, make_logits
from test_radix_topk import run as radix_run

# small chunks take the multi-chunk (sample, reservation, candidates, last arriver) path at CPU sizes
SMALL = rt.RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4)
HIST = rt.RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4, count=0, bits=6)
B3 = rt.RadixTopkConfig(chunk=4096, short_max=4096, bits=3, sample=256)
# fewer programs than chunks per row: one program owns its row (no atomics), or 3 programs take every
# third chunk (the CPU's row counts give one program per chunk in auto mode)
P1 = rt.RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4, programs_per_row=1)
P3 = rt.RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4, programs_per_row=3)
CFGS = [None, SMALL, HIST, B3, P1, P3]
IDS = ["default", "small", "hist6", "bits3", "ppr1", "ppr3"]


def run(lens, width, kind, **kw):
    """``test_radix_topk.run`` with the sampled top-k."""
    return radix_run(lens, width, kind, topk=sample_topk, **kw)


@launches
@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("lens", [[0, 1, 63, 2047, 2048, 2049], [4095, 4096, 4097, 5000],
                                  [16383, 16384, 16385, 20000]], ids=["short", "4k", "16k"])
def test_lengths(lens, cfg, device):
    run(lens, max(lens) + 64, "randn", config=cfg, seed=lens[-1], device=device)


@launches
@pytest.mark.parametrize("L", [40000, 163840])
def test_long_rows(L, device):
    run([L, 3000], L, "randn", seed=L, device=device)


@launches
@pytest.mark.parametrize("cfg", [None, SMALL, P1], ids=["default", "small", "ppr1"])
@pytest.mark.parametrize("kind", ["equal", "tie3000", "exact_k", "four", "negative", "huge", "subnormal", "infs",
                                  "narrow", "distinct", "quantized", "zeros", "heavy", "outliers"])
def test_value_kinds(kind, cfg, device):
    run([6000, 4100, 2500], 6000, kind, config=cfg, seed=3, device=device)


@launches
def test_fallback_when_the_cutoff_passes_too_many(device):
    # 20000 equal or nearly equal values: more than CAND reach the cutoff, the exact fallback runs
    run([20000, 9000], 20000, "narrow", config=SMALL, seed=5, device=device)
    run([20000], 20000, "equal", config=SMALL, seed=5, device=device)
    for cfg in (P1, P3):
        run([20000, 9000], 20000, "narrow", config=cfg, seed=5, device=device)


@launches
def test_sorted_rows_and_a_hot_tail(device):
    # position-ordered values (a strided sample sees them all evenly) and a hot last chunk
    L = 12000
    x = torch.arange(L, dtype=torch.float32)[None].repeat(2, 1)
    x[1] = torch.randn(L)
    x[1, -2500:] += 100.0
    lens = torch.tensor([L, L], dtype=torch.int32, device=device)
    out = torch.full((2, K), -7, dtype=torch.int32, device=device)
    ws = rt.RadixTopkWorkspace(2, device)
    sample_topk(x.to(device), None, out, next_n=1, workspace=ws, row_lens=lens, config=SMALL)
    check_exact(out, x, lens.cpu())
    assert int(ws.counters.abs().sum()) == 0


@launches
@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default", "small"])
def test_next_n2_rows_from_context_lens_with_padding(cfg, device):
    from smpart.reference import visible_lens

    ctx = torch.tensor([5000, 2049, 0, 0], dtype=torch.int32)
    vis = visible_lens(ctx, 2)
    logits = make_logits(vis.tolist(), 5000, "randn", seed=2).to(device)
    out = torch.full((8, K), -7, dtype=torch.int32, device=device)
    ws = rt.RadixTopkWorkspace(8, device)
    sample_topk(logits, ctx.to(device), out, next_n=2, workspace=ws, config=cfg)
    check_exact(out, logits, vis)
    assert bool((out[4:] == -1).all())


@launches
def test_repeated_calls_one_workspace(device):
    ws = rt.RadixTopkWorkspace(3, device)
    for i, (lens, kind) in enumerate([([9000, 3000, 5000], "randn"), ([2049, 9000, 100], "four"),
                                      ([8000, 8000, 8000], "tie3000"), ([1, 2, 9000], "randn")]):
        run(lens, 9000, kind, config=SMALL, seed=i, ws=ws, device=device)
        run(lens, 9000, kind, seed=i, ws=ws, device=device)
        run(lens, 9000, kind, config=P3, seed=i, ws=ws, device=device)


def test_programs_per_row():
    """The sampled top-k's programs per row: ``num_sms // T`` within [1, chunks], or the config's
    bound (``config.algo`` is not read: ``sample_topk`` ignores it); arguments checked."""
    from smpart.triton_kernels.topk_config import INTERPRETER_SMS, programs_per_row

    assert programs_per_row(rt.RadixTopkConfig(algo="radix", programs_per_row=1), 128, 16, "cpu") == 1
    assert programs_per_row(None, 128, 16, "cpu") == max(INTERPRETER_SMS // 128, 1) == 1
    assert programs_per_row(None, 32, 4, "cpu") == 4
    assert programs_per_row(None, 1, 80, "cpu") == 80
    assert programs_per_row(None, 8, 40, "cpu") == INTERPRETER_SMS // 8
    assert programs_per_row(P3, 1, 2, "cpu") == 2 and programs_per_row(P3, 1, 9, "cpu") == 3
    with pytest.raises(ValueError, match="config.programs_per_row"):
        rt.RadixTopkConfig(programs_per_row=-1)
    with pytest.raises(TypeError, match="config.programs_per_row"):
        rt.RadixTopkConfig(programs_per_row=1.0)
    for args, exc, match in (((None, 1, 0, "cpu"), ValueError, "n_chunks"), ((None, -1, 4, "cpu"), ValueError,
                             "num_rows"), (("x", 1, 3, "cpu"), TypeError, "config"),
                             ((None, 1, 3, "bogus"), ValueError, "device"), ((None, True, 3, "cpu"), TypeError,
                             "num_rows")):
        with pytest.raises(exc, match=match):
            programs_per_row(*args)
    ws = rt.RadixTopkWorkspace(2, "cpu")
    for args, exc, match in (((-1, "cpu"), ValueError, "num_rows"), ((True, "cpu"), TypeError, "num_rows"),
                             (("2", "cpu"), TypeError, "num_rows"), ((2, "bogus"), ValueError, "device")):
        with pytest.raises(exc, match=match):
            ws.check(*args)


@launches
def test_sample_topk_honours_programs_per_row_whatever_algo_says(device, monkeypatch):
    """``sample_topk`` is the sampled top-k whatever ``config.algo`` says, and its grid follows
    ``programs_per_row`` (one program for a five-chunk row here)."""
    from smpart.triton_kernels import sample_topk as st

    grids = []
    kernel = st._sample_topk_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(st, "_sample_topk_kernel", Spy())
    x = torch.randn(1, 9000, device=device)
    out = torch.full((1, K), -7, dtype=torch.int32, device=device)
    lens = torch.tensor([9000], dtype=torch.int32, device=device)
    cfg = rt.RadixTopkConfig(chunk=2048, short_max=2048, num_warps=4, programs_per_row=1, algo="radix")
    sample_topk(x, None, out, next_n=1, workspace=rt.RadixTopkWorkspace(1, device), row_lens=lens, config=cfg)
    assert grids == [(1,)]
    check_exact(out, x, lens.cpu())


def test_sample_size_and_config_checks():
    assert [sample_size(n) for n in (0, 4096, 65536, 163840, 1 << 22)] == [512, 512, 2048, 4096, 4096]
    for bad, name in ((dict(bits=5), "bits"), (dict(count=2), "count"), (dict(sample=100), "sample"),
                      (dict(bits=7, count=0), "bits"), (dict(sample=3000), "sample"),
                      # bits=1 loops forever on a bracket whose span rounds up to a power of two in
                      # fp32 (e.g. keys of 1.0 and FLT_MAX: span 2**30 - 1): one sub-range holds it all
                      (dict(bits=1, count=0), "bits")):
        with pytest.raises(ValueError, match=f"config.{name}"):
            rt.RadixTopkConfig(**bad)


def test_direct_calls_refuse_what_the_kernels_cannot_take():
    """Found by a fresh user: strided lengths were read as their storage (a wrong top-k); next_n 3,
    a non-bool hist_ready, a bad device, and the dirty-counter reset."""
    from smpart.triton_kernels.topk import topk

    ws = rt.RadixTopkWorkspace(2, "cpu")
    out = torch.full((2, K), -7, dtype=torch.int32)
    x = torch.randn(2, 5000)
    strided = torch.tensor([5000, 111, 3000, 222], dtype=torch.int32)[::2]
    with pytest.raises(ValueError, match="context_lens: expected a contiguous"):
        topk(x, strided, out, next_n=1, workspace=ws)
    with pytest.raises(ValueError, match="row_lens: expected a contiguous"):
        sample_topk(x, None, out, next_n=1, workspace=ws, row_lens=strided)
    with pytest.raises(ValueError, match="next_n"):
        topk(x, torch.tensor([5000], dtype=torch.int32), out, next_n=3, workspace=ws)
    with pytest.raises(TypeError, match="hist_ready"):
        topk(x, torch.tensor([5000, 3000], dtype=torch.int32), out, next_n=1, workspace=ws, hist_ready=1)
    with pytest.raises(TypeError, match="hist_ready"):
        rt.radix_topk(x, torch.tensor([5000, 3000], dtype=torch.int32), out, next_n=1, workspace=ws,
                      hist_ready="yes")
    assert bool((out == -7).all()), "a refused call wrote"
    with pytest.raises(ValueError, match="device"):
        rt.RadixTopkWorkspace(2, "bogus")
    ws.counters.fill_(5)
    ws.hist.fill_(1)
    ws.reset()
    assert int(ws.counters.abs().sum()) == 0 and int(ws.hist.abs().sum()) == 0


def test_direct_calls_refuse_a_bad_workspace_or_aliasing():
    """``topk()`` checks what ``run_region`` checks for it: the workspace's buffers as they are now
    (a replaced buffer too small for the batch would be written past its end) and outputs that share
    memory with an input or each other. Nothing is written on a refused call."""
    from smpart.triton_kernels.topk import topk

    x = torch.randn(2, 5000)
    lens = torch.tensor([5000, 3000], dtype=torch.int32)
    out = torch.full((2, K), -7, dtype=torch.int32)
    cases = []
    ws = rt.RadixTopkWorkspace(2, "cpu")
    ws.counters = torch.zeros(1, 2, dtype=torch.int32)  # one row for a two-row batch
    cases.append((dict(workspace=ws), ValueError, "workspace.counters: expected shape"))
    ws = rt.RadixTopkWorkspace(2, "cpu")
    ws.cand_key = ws.cand_key.to(torch.int64)
    cases.append((dict(workspace=ws), TypeError, "workspace.cand_key: expected dtype"))
    ws = rt.RadixTopkWorkspace(2, "cpu")
    ws.cand = 3000
    cases.append((dict(workspace=ws), ValueError, "workspace.cand: expected a power of two"))
    ws = rt.RadixTopkWorkspace(2, "cpu")
    buf = torch.zeros(2, 5000)
    cases.append((dict(workspace=ws, logits=buf, topk_indices=buf[:, :K].view(torch.int32)), ValueError,
                  "topk_indices: shares memory with logits"))
    cases.append((dict(workspace=ws, topk_indices=ws.cand_key[:, :K]), ValueError,
                  "topk_indices: shares memory with workspace.cand_key"))
    cases.append((dict(workspace=ws, context_lens=ws.scratch[0, :2]), ValueError,
                  "workspace.scratch: shares memory with context_lens"))
    big = torch.zeros(2, 1200000)  # views of one allocation over 4 MiB: refused, and the message says why
    cases.append((dict(workspace=ws, logits=big[:, :600000], topk_indices=big[:, 700000:700000 + K].view(torch.int32)),
                  ValueError, r"topk_indices: shares memory with logits \(or may"))
    ws = rt.RadixTopkWorkspace(2, "cpu")
    ws.hist[1, 7] = 1
    cases.append((dict(workspace=ws, config=rt.RadixTopkConfig(algo="radix")), ValueError,
                  "workspace.hist: 1 entries are not zero"))
    cases.append((dict(workspace=ws, config=rt.RadixTopkConfig(algo="radix"), check_values=1), TypeError,
                  "check_values"))
    for kw, exc, match in cases:
        args = dict(logits=x, context_lens=lens, topk_indices=out, next_n=1) | kw
        before = {k: v.clone() for k, v in vars(kw["workspace"]).items() if isinstance(v, torch.Tensor)}
        before["topk_indices"] = args["topk_indices"].clone()
        with pytest.raises(exc, match=match):
            topk(**args)
        after = {k: v for k, v in vars(kw["workspace"]).items() if isinstance(v, torch.Tensor)}
        after["topk_indices"] = args["topk_indices"]
        assert all(torch.equal(before[k], after[k]) for k in before), f"a refused call wrote ({match})"
    ws = rt.RadixTopkWorkspace(2, "cpu")
    ws.hist[0, 3] = 2
    with pytest.raises(ValueError, match="workspace.hist"):  # radix_topk runs the radix algorithm whatever config says
        rt.radix_topk(x, lens, out, next_n=1, workspace=ws)
    assert bool((out == -7).all())


@launches
def test_dirty_counters_never_write_out_of_bounds(device):
    """Counters left dirty (negative or huge reservations) make the selection wrong, never a store
    outside the row's 2048 columns or its candidate slots (both algorithms)."""
    from smpart.triton_kernels.topk import topk

    L = 9000
    for algo in ("sample", "radix"):
        for dirty in (-100000, 1 << 20):
            x = torch.randn(2, L, device=device)
            ws = rt.RadixTopkWorkspace(2, device)
            ws.counters[0, 0] = dirty
            buf = torch.full((3, K + 64), -7, dtype=torch.int32, device=device)
            # the candidate buffers inside guard bands of 64 slots on either side
            n = 2 * ws.cand
            guards = [torch.full((n + 128,), -7, dtype=torch.int32, device=device) for _ in range(2)]
            ws.cand_key, ws.cand_pos = (g[64:64 + n].view(2, ws.cand) for g in guards)
            lens = torch.tensor([L, L], dtype=torch.int32, device=device)
            cfg = rt.RadixTopkConfig(chunk=2048, short_max=2048, algo=algo)
            with pytest.raises(ValueError, match="workspace.counters: 1 entries are not zero"):
                topk(x, None, buf[:2, :K], next_n=1, workspace=ws, row_lens=lens, config=cfg)
            assert bool((buf == -7).all()), "a refused call wrote"
            # past the eager check (as under a CUDA graph): wrong rows, never a store out of bounds
            topk(x, None, buf[:2, :K], next_n=1, workspace=ws, row_lens=lens, config=cfg, check_values=False)
            assert bool((buf[:2, K:] == -7).all()) and bool((buf[2] == -7).all()), (algo, dirty)
            for g in guards:
                assert bool((g[:64] == -7).all()) and bool((g[64 + n:] == -7).all()), (algo, dirty, "candidates")


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,next_n", [(128, 8192, 1), (128, 32768, 1), (64, 32768, 2), (1, 163840, 1),
                                        (4, 163840, 2)])
@pytest.mark.parametrize("kind", ["randn", "quantized", "narrow"])
def test_gpu_large(B, L, next_n, kind):
    gpu_large_case(B, L, next_n, kind, sample_topk)


# -- the sample: the kernel's cutoff equals its PyTorch twin; the twin's cutoff keeps the candidates
# -- within [2048, CAND] on rows with structure (the design's claim; a fixed stride once aliased with
# -- periodic rows and sent every long row to the exact fallback)
def _structured(kind, L, g):
    x = torch.randn(L, generator=g)
    if kind == "recent":
        x[-2500:] += 3
    elif kind == "sink":
        x[:64] += 10
        x[-256:] += 2
    elif kind == "period64":
        x = 0.3 * x + 2 * torch.sin(torch.arange(L) * 2 * torch.pi / 64)
    elif kind == "period128":
        x = 0.1 * x + 3 * (torch.arange(L) % 128 < 8).float()
    elif kind == "smooth":
        x = torch.nn.functional.conv1d(x[None, None], torch.ones(1, 1, 255) / 16, padding=127)[0, 0]
    elif kind == "quantized":
        x = torch.round(x * 4) / 4
    elif kind == "relu":
        x = x.clamp(min=0)
    return x.float()



@triton.jit
def _cutoff_kernel(x_ptr, lens_ptr, out_ptr, stride, S: tl.constexpr):
    """Row ``program_id``'s sampled cutoff key (``sample_topk._row_cutoff``) into ``out_ptr``."""
    t = tl.program_id(0)
    tl.store(out_ptr + t, _row_cutoff(x_ptr + t * stride, tl.load(lens_ptr + t), 2048, S, 4, 1))


@launches
def test_kernel_cutoff_equals_the_torch_twin(device):
    from smpart import reference

    g = torch.Generator().manual_seed(7)
    lens = [5000, 9000, 20000, 40000]
    W = max(lens)
    x = torch.stack([_structured(k, W, g) for k in ("randn", "period64", "quantized", "smooth")])
    out = torch.zeros(len(lens), dtype=torch.int32, device=device)
    S = sample_size(W)
    _cutoff_kernel[(len(lens),)](x.to(device), torch.tensor(lens, dtype=torch.int32, device=device), out, W, S=S)
    want = [reference.sample_cutoff_torch(x[t, :L], S) for t, L in enumerate(lens)]
    assert out.cpu().tolist() == want


@pytest.mark.parametrize("L", [9000, 16384, 65536, 163840])
def test_sampled_cutoff_keeps_the_candidates_in_range(L):
    from smpart import reference

    g = torch.Generator().manual_seed(L)
    bad = []
    for kind in ("randn", "recent", "sink", "period64", "period128", "smooth", "quantized", "relu"):
        for trial in range(4):
            x = _structured(kind, L, g)
            n = int((reference.order_keys(x) >= reference.sample_cutoff_torch(x, sample_size(L))).sum())
            if not rt.TOPK_K <= n <= rt.RADIX_CAND:
                bad.append((kind, trial, n))
    assert not bad, f"rows whose sampled cutoff leaves candidates outside [2048, {rt.RADIX_CAND}]: {bad}"
