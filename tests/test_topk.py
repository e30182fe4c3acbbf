"""Top-2048 per decode row (``triton_kernels/topk.py``), checked exactly (DESIGN.md 7a, STYLE.md 7).

Every row: the -1 entries are exactly the columns ``[min(L, 2048), 2048)``; the selected positions
are unique and in ``[0, L)``; the multiset of selected logits equals ``torch.topk``'s values
exactly (the top-k runs on the same logits); and where the 2048th and 2049th largest logits differ
(no tie at the threshold) the position sets are equal. Logits past each row's length are garbage
(NaN, +inf, huge) so that any read past ``L`` changes the result.

CPU: ``TRITON_INTERPRET=1 pytest --import-mode=importlib tests/test_topk.py``.
"""

import os

import pytest
import torch
import triton

from smpart.triton_kernels import topk as tk
from smpart.reference import visible_lens

K = tk.TOPK_K
GUARD = 64  # guard columns after every output row
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# tests that launch kernels need a GPU or the interpreter (the sm_90 compile check needs neither)
launches = pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="no CUDA device: run with TRITON_INTERPRET=1")

# (chunk, TopkConfig): the standalone defaults, and a small configuration that takes the
# multi-chunk, streaming and no-compaction paths at CPU-friendly sizes (and two launches).
CONFIGS = {
    "default": (tk.TOPK_CHUNK, tk.TopkConfig()),
    "small": (4096, tk.TopkConfig(block=512, cap=1024, num_warps=4)),
    "small-2launch": (4096, tk.TopkConfig(block=512, cap=1024, num_warps=4, fused_merge=False)),
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_values(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """fp32 [n] visible logits of a given character."""
    if kind == "randn":
        return torch.randn(n, generator=gen)
    if kind == "distinct":  # tie-free, well separated, both signs
        return (torch.randperm(n, generator=gen).float() - n / 3) * 0.25
    if kind == "quantized":  # few distinct values: many exact ties at the threshold
        return torch.randint(-3, 4, (n,), generator=gen).float() * 0.5
    if kind == "equal":
        return torch.full((n,), 0.75)
    if kind == "exact_k":  # exactly K values of 3.0 above a bin holding two smaller values
        v = torch.tensor([0.0, 0.25, 0.5])[torch.randint(0, 3, (n,), generator=gen)]
        v[torch.randperm(n, generator=gen)[:K]] = 3.0
        return v
    if kind == "zeros":  # -0.0 and +0.0 (equal values) among a few +-1
        v = torch.zeros(n)
        v[torch.rand(n, generator=gen) < 0.5] = -0.0
        r = torch.rand(n, generator=gen)
        v[r < 0.05] = 1.0
        v[r > 0.95] = -1.0
        return v
    if kind == "heavy":  # many binades, both signs: key-mode narrowing
        return torch.randn(n, generator=gen).sign() * torch.exp(torch.randn(n, generator=gen) * 12)
    if kind == "outliers":  # dense body plus extremes: the first bin keeps almost everything
        v = torch.randn(n, generator=gen)
        v[torch.randint(0, n, (3,), generator=gen)] = torch.tensor([1e30, -1e30, 3e29])
        return v
    if kind == "infs":  # +-inf inside the visible range
        v = torch.randn(n, generator=gen)
        v[torch.randint(0, n, (4,), generator=gen)] = torch.tensor([float("inf"), float("-inf"), float("inf"), 1e38])
        return v
    raise ValueError(kind)


def make_logits(lens: list[int], width: int, kind: str, seed: int = 0, garbage: str = "mixed") -> torch.Tensor:
    """fp32 [T, width]: row t holds ``make_values(L_t)`` then garbage past ``L_t``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(len(lens), width)
    for t, L in enumerate(lens):
        L = min(L, width)
        x[t, :L] = make_values(L, kind, gen)
        tail = width - L
        if garbage == "mixed":  # NaN, +inf and huge finite values: reading any of them breaks the result
            x[t, L:] = torch.tensor([float("nan"), float("inf"), 3e38])[torch.arange(tail) % 3]
        else:  # "-inf", the reference kernels' padding
            x[t, L:] = float("-inf")
    return x


def check_topk_exact(out: torch.Tensor, logits: torch.Tensor, lens: torch.Tensor) -> None:
    """Assert the top-k contract row by row; the message names the first bad row and column."""
    out, logits, lens = out.cpu(), logits.cpu(), lens.cpu()
    assert out.dtype == torch.int32 and out.shape[1] == K
    for t in range(out.shape[0]):
        L = int(lens[t])
        n = min(L, K)
        row = out[t]
        bad = (row[n:] != -1).nonzero()
        assert bad.numel() == 0, f"row {t} (L={L}): column {n + int(bad[0])} = {int(row[n + int(bad[0])])}, want -1"
        sel = row[:n].long()
        bad = ((sel < 0) | (sel >= L)).nonzero()
        assert bad.numel() == 0, f"row {t} (L={L}): column {int(bad[0])} = {int(sel[int(bad[0])])} outside [0, {L})"
        assert torch.unique(sel).numel() == n, f"row {t} (L={L}): {n - torch.unique(sel).numel()} duplicate positions"
        if n == 0:
            continue
        vals = logits[t, :L]
        got = vals[sel].sort().values
        ref = torch.topk(vals, n).values
        want = ref.sort().values
        diff = (got != want).nonzero()
        assert diff.numel() == 0, (f"row {t} (L={L}): selected values differ from torch.topk at sorted rank "
                                   f"{int(diff[0])}: {float(got[int(diff[0])])} vs {float(want[int(diff[0])])}")
        if L > K and torch.topk(vals, K + 1).values[K] == ref[-1]:
            continue  # a tie at the threshold: either member may be chosen
        want_idx = set(torch.topk(vals, n).indices.tolist())
        missing = want_idx - set(sel.tolist())
        assert not missing, f"row {t} (L={L}): position set differs, e.g. missing {sorted(missing)[:5]}"


def run_topk(lens: list[int], width: int, kind: str, config_name: str, *, device: str = "cpu", next_n: int = 1,
             seed: int = 0, garbage: str = "mixed", use_context_lens: bool = False, max_len: int | None = None):
    """Launch :func:`topk_decode` on ``make_logits(lens)``; return (out, logits, visible lens)."""
    chunk, cfg = CONFIGS[config_name]
    logits = make_logits(lens, width, kind, seed, garbage).to(device)
    T = len(lens)
    ws = tk.TopkWorkspace(T, width, device, chunk=chunk)
    # rows strided past K with a guard gap (and a guard row): a write past a row's K slots shows up
    buf = torch.full((T + 1, K + GUARD), -7, dtype=torch.int32, device=device)
    out = buf[:T, :K]
    if use_context_lens:  # rows (b, j) of requests of seq_len context_lens[b]
        assert T % next_n == 0
        ctx = torch.tensor([lens[b * next_n + next_n - 1] for b in range(T // next_n)], dtype=torch.int32)
        vis = visible_lens(ctx, next_n)
        tk.topk_decode(logits, ctx.to(device), out, next_n=next_n, workspace=ws, max_len=max_len, config=cfg)
    else:
        vis = torch.tensor(lens, dtype=torch.int32)
        tk.topk_decode(logits, None, out, next_n=1, workspace=ws, row_lens=vis.to(device), max_len=max_len,
                       config=cfg)
    assert int(ws.counters.abs().sum()) == 0, "row counters not reset to 0 in-kernel"
    assert bool((buf[:T, K:] == -7).all()) and bool((buf[T:] == -7).all()), "write outside the rows' K columns"
    return out, logits, vis.clamp(max=width)


# --------------------------------------------------------------------------------------
# CPU (interpreter) and GPU
# --------------------------------------------------------------------------------------
LENGTHS = [0, 1, 63, 2047, 2048, 2049, 5000, 20000]


@launches
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("L", LENGTHS)
def test_lengths_next_n1(L, config_name, device):
    lens = [L, max(L - 1, 0), L // 2 + 1]
    out, logits, vis = run_topk(lens, max(lens) + 64, "randn", config_name, device=device, seed=L)
    check_topk_exact(out, logits, vis)


@launches
@pytest.mark.parametrize("config_name", ["default", "small"])
@pytest.mark.parametrize("L", LENGTHS)
def test_lengths_next_n2_context_lens(L, config_name, device):
    # requests of seq_len L and L//3 + 1: rows see L-1, L, L//3, L//3 + 1 positions
    lens = [L - 1, L, L // 3, L // 3 + 1]
    out, logits, vis = run_topk([max(x, 0) for x in lens], max(L, 1) + 64, "distinct", config_name,
                                device=device, next_n=2, seed=L, use_context_lens=True)
    check_topk_exact(out, logits, vis)


@launches
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["quantized", "equal", "exact_k", "zeros", "heavy", "outliers", "infs",
                                  "distinct"])
def test_value_kinds(kind, config_name, device):
    lens = [20000, 5000, 2049, 4096, 1500]
    out, logits, vis = run_topk(lens, 20000, kind, config_name, device=device, seed=7)
    check_topk_exact(out, logits, vis)


@launches
@pytest.mark.parametrize("garbage", ["mixed", "-inf"])
def test_garbage_past_len_is_ignored(garbage, device):
    lens = [3000, 9000, 2100]
    out, logits, vis = run_topk(lens, 9984, "randn", "small", device=device, seed=3, garbage=garbage)
    check_topk_exact(out, logits, vis)


@launches
def test_lengths_clamped_to_buffers(device):
    # context lengths beyond the logits width / max_len are clamped: no read past the buffers
    logits = make_logits([6000, 6000], 6000, "randn", seed=5).to(device)
    ws = tk.TopkWorkspace(2, 6000, device, chunk=4096)
    out = torch.full((2, K), -7, dtype=torch.int32, device=device)
    tk.topk_decode(logits, torch.tensor([100000], dtype=torch.int32, device=device), out, next_n=2, workspace=ws,
                   config=CONFIGS["small"][1])
    check_topk_exact(out, logits, torch.tensor([6000, 6000]))
    out2 = torch.full((2, K), -7, dtype=torch.int32, device=device)
    tk.topk_decode(logits, None, out2, next_n=1, workspace=ws, row_lens=torch.tensor([5000, 3000], dtype=torch.int32,
                   device=device), max_len=4500, config=CONFIGS["small"][1])
    check_topk_exact(out2, logits, torch.tensor([4500, 3000]))


@launches
def test_replay_is_identical(device):
    # the fused launch leaves its counters at 0, so a second launch (a graph replay) behaves the same
    chunk, cfg = CONFIGS["small"]
    logits = make_logits([20000, 12000, 4100], 20000, "quantized", seed=11).to(device)
    lens = torch.tensor([20000, 12000, 4100], dtype=torch.int32, device=device)
    ws = tk.TopkWorkspace(3, 20000, device, chunk=chunk)
    outs = []
    for _ in range(2):
        out = torch.full((3, K), -7, dtype=torch.int32, device=device)
        tk.topk_decode(logits, None, out, next_n=1, workspace=ws, row_lens=lens, config=cfg)
        assert int(ws.counters.abs().sum()) == 0
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    check_topk_exact(outs[0], logits, lens)


@launches
def test_long_row_163840(device):
    out, logits, vis = run_topk([163840], 163840, "randn", "default", device=device, seed=1)
    check_topk_exact(out, logits, vis)


def test_torch_twin_matches():
    logits = make_logits([0, 5, 3000], 3000, "distinct", seed=2)
    lens = torch.tensor([0, 5, 3000])
    check_topk_exact(tk.topk_decode_torch(logits.nan_to_num(), lens), logits, lens)


def test_workspace_layout_and_cap_check():
    ws = tk.TopkWorkspace(4, 40000, "cpu", chunk=16384)
    assert ws.max_chunks == 3
    assert ws.cand_vals.shape == (4, 3 * K) and ws.cand_vals.dtype == torch.float32
    assert ws.cand_idx.shape == (4, 3 * K + 4 * tk.TOPK_CAP_MAX) and ws.cand_idx.dtype == torch.int32
    assert ws.counters.shape == (4,) and int(ws.counters.abs().sum()) == 0
    small = tk.TopkWorkspace(1, 4096, "cpu", cap=1024)
    out = torch.empty(1, K, dtype=torch.int32)
    with pytest.raises(ValueError, match="config.cap"):
        tk.topk_decode(torch.zeros(1, 4096), None, out, next_n=1, workspace=small,
                       row_lens=torch.tensor([10], dtype=torch.int32), config=tk.TopkConfig(cap=2048))
    with pytest.raises(ValueError, match="chunk"):
        tk.TopkWorkspace(1, 100, "cpu", chunk=1024)


# --------------------------------------------------------------------------------------
# sm_90 compile check (CPU: Triton's bundled ptxas; no GPU needed)
# --------------------------------------------------------------------------------------
_CHUNK_SIG = {"logits_ptr": "*fp32", "lens_ptr": "*i32", "topk_ptr": "*i32", "cand_vals_ptr": "*fp32",
              "cand_idx_ptr": "*i32", "counters_ptr": "*i32", "stride_logits": "i32", "stride_topk": "i32",
              "num_rows": "i32", "next_n": "i32", "lmax": "i32", "max_chunks": "i32"}


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels; the interpreter "
                    "replaces triton.jit functions (run this file without TRITON_INTERPRET for the compile check)")
@pytest.mark.parametrize("num_warps,block,cap", [(4, tk.TOPK_BLOCK, tk.TOPK_CAP), (8, 2048, tk.TOPK_CAP_MAX)])
def test_compiles_for_sm90(num_warps, block, cap):
    from triton.backends.compiler import GPUTarget

    const = dict(CHUNK=tk.TOPK_CHUNK, PER_ROW_LENS=False, FUSED_MERGE=True, K=K, BLOCK=block,
                 LOG2_NB=tk.TOPK_LOG2_BINS, CAP=cap)
    src = triton.compiler.ASTSource(fn=tk._topk_chunk_kernel, signature=_CHUNK_SIG, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert "histogram" not in compiled.asm["ptx"]  # lowered, not an unresolved op
    assert compiled.asm["cubin"]


# --------------------------------------------------------------------------------------
# GPU-only: production sizes
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,L,next_n", [(128, 8192, 1), (128, 32768, 1), (64, 32768, 2), (1, 163840, 1),
                                        (4, 163840, 2)])
@pytest.mark.parametrize("kind", ["randn", "quantized"])
def test_gpu_large(B, L, next_n, kind):
    T = B * next_n
    gen = torch.Generator().manual_seed(B + L)
    seq = torch.randint(max(L // 2, 1), L + 1, (B,), generator=gen).to(torch.int32)
    seq[0] = L
    vis = visible_lens(seq, next_n)
    logits = make_logits(vis.tolist(), L, kind, seed=L).cuda()
    ws = tk.TopkWorkspace(T, L, "cuda")
    out = torch.full((T, K), -7, dtype=torch.int32, device="cuda")
    tk.topk_decode(logits, seq.cuda(), out, next_n=next_n, workspace=ws, max_len=L)
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0
    check_topk_exact(out, logits, vis)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    B, L = 8, 40000
    seq = torch.full((B,), L, dtype=torch.int32)
    seq[1::2] = 9000
    logits = make_logits(seq.tolist(), L, "randn", seed=9).cuda()
    ws = tk.TopkWorkspace(B, L, "cuda")
    out = torch.full((B, K), -7, dtype=torch.int32, device="cuda")
    seq_d = seq.cuda()
    tk.topk_decode(logits, seq_d, out, next_n=1, workspace=ws)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tk.topk_decode(logits, seq_d, out, next_n=1, workspace=ws)
    for trial in range(3):
        out.fill_(-7)
        logits.copy_(make_logits(seq.tolist(), L, "randn", seed=100 + trial).cuda())
        g.replay()
        torch.cuda.synchronize()
        check_topk_exact(out, logits, seq)
    assert int(ws.counters.abs().sum()) == 0
