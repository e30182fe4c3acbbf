"""The benchmark harness and the vendor adapters, as far as a CPU machine can check them.

* ``smpart-bench`` CPU mode: the interpreter comparison of the Triton paths with the reference.
* ``floor_bytes`` against hand-computed byte counts.
* The vendor loaders fail with a message that says what to install.
* The vendor paths' glue (views, strides, argument order, which buffer goes where) with stand-ins
  for DeepGEMM and vLLM's ops that implement the documented semantics through the reference.
* The CSV / Markdown / PNG writers on synthetic rows.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

from smpart.bench import harness
from smpart import checks, reference as R, vendor
from smpart.batch import make_decode_batch
from smpart.triton_kernels.fp8 import FP8_DTYPE


# --------------------------------------------------------------------------------------
# CPU mode of the CLI
# --------------------------------------------------------------------------------------
def test_cli_cpu_mode_matches_reference():
    code = ("import sys; from smpart.bench.__main__ import main; "
            "sys.exit(main(['--paths', 'sequential']))")  # partitioned: its own tests
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    # 'sequential' is always in PATHS: a "skipped: sequential" line is a failure, not a skip
    assert "skipped: sequential" not in out, out
    assert proc.returncode == 0, out
    assert "sequential: OK" in out, out
    assert "Timings need a CUDA GPU" in out, out


# --------------------------------------------------------------------------------------
# floor_bytes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("next_n, want", [
    # H=16: N = 3072, K = 1536. T = 2 (next_n 1) or 4 (next_n 2).
    # weight 3072*1536 = 4718592; scales 24*12*4 = 1152; cache (100 + 300) * 132 = 52800 both ways
    # (next_n 2: the rows of a request see 99/100 and 299/300 positions, keys counted once).
    # next_n 1: q_c 2*1536*2 = 6144, q 2*3072*2 = 12288, k_pe 2*64*2*2 = 512,
    #           index_q 2*64*128 + 2*64*4 = 16896, topk 2*2048*4 = 16384  -> 4824768
    (1, 4718592 + 1152 + 52800 + 6144 + 12288 + 512 + 16896 + 16384),
    # next_n 2: q_c 12288, q 24576, k_pe 1024, index_q 33792, topk 32768  -> 4876992
    (2, 4718592 + 1152 + 52800 + 12288 + 24576 + 1024 + 33792 + 32768),
])
def test_floor_bytes_hand_computed(next_n, want):
    b = make_decode_batch([100, 300], num_heads=16, next_n=next_n, seed=1)
    assert harness.floor_bytes(b.args) == want
    terms = harness.floor_bytes(b.args, breakdown=True)
    assert terms["total"] == want
    assert sum(v for k, v in terms.items() if k != "total") == want
    assert terms["indexer_cache"] == 400 * 132


def test_floor_bytes_padding_rows_read_no_cache():
    b = make_decode_batch([100, 300, 50], num_heads=16, num_padding=1, seed=1)
    assert harness.floor_bytes(b.args, breakdown=True)["indexer_cache"] == 400 * 132


# --------------------------------------------------------------------------------------
# vendor loaders
# --------------------------------------------------------------------------------------
def test_vendor_loaders_fail_cleanly(monkeypatch, tmp_path):
    if not vendor._ops_complete()[1]:
        pytest.skip("vLLM's ops are already registered in this process")
    for name in ("deep_gemm", "vllm", "vllm.third_party", "vllm.third_party.deep_gemm", "vllm._custom_ops"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    monkeypatch.setattr(vendor, "_deep_gemm_module", None)
    monkeypatch.setattr(vendor, "_vllm_ops", None)
    missing_lib = tmp_path / "absent.so"
    monkeypatch.setenv(vendor.VLLM_OPS_LIB_ENV, str(missing_lib))

    with pytest.raises(RuntimeError) as e:
        vendor.load_deep_gemm()
    msg = str(e.value)
    assert "import deep_gemm" in msg and "vllm.third_party.deep_gemm" in msg
    assert "get_deep_gemm.sh" in msg and "PYTHONPATH" in msg

    with pytest.raises(RuntimeError) as e:
        vendor.load_vllm_ops()
    msg = str(e.value)
    assert "import vllm._custom_ops" in msg and str(missing_lib) in msg
    assert "get_vllm_ops.sh" in msg and vendor.VLLM_OPS_LIB_ENV in msg

    ok, reason = vendor.vendor_available()
    assert not ok and reason
    assert vendor.deep_gemm_version() is None


def test_vendor_paths_registered():
    from smpart import region

    assert region.load_path("vllm_sequential") is vendor.run_vllm_sequential
    assert region.load_path("vllm_dual_stream") is vendor.run_vllm_dual_stream


def test_vendor_paths_refuse_cpu_tensors():
    b = make_decode_batch([64], num_heads=16, seed=2)
    ws = types.SimpleNamespace(max_tokens=1, max_len=64)
    with pytest.raises(RuntimeError, match="CUDA"):
        vendor.run_vllm_sequential(b.args, ws, None, True)


# --------------------------------------------------------------------------------------
# vendor glue, with stand-ins implementing the documented semantics through the reference
# --------------------------------------------------------------------------------------
def _align4(x):
    return (x + 3) // 4 * 4


class _FakeOps:
    """vLLM 0.33 op signatures (``_custom_ops.py``, ``indexer_topk.py``); asserts the argument layouts."""

    def __init__(self):
        self.calls = []
        self.top_k_per_row_decode = None
        self.persistent_topk = None
        self.source = "stand-in"

    def per_token_group_fp8_quant(self, x, x_q, x_s, group, eps, fp8_min, fp8_max, ue8m0, col_major, tma_aligned):
        self.calls.append("per_token_group_fp8_quant")
        T = x.shape[0]
        assert (group, eps, fp8_min, fp8_max, col_major, tma_aligned) == (128, 1e-10, -448.0, 448.0, True, True)
        assert x_q.shape == x.shape and x_q.dtype == FP8_DTYPE
        assert x_s.shape == (T, 12) and x_s.stride() == (1, _align4(T)) and x_s.dtype == torch.float32
        q, s = R.per_token_group_quant(x, ue8m0)
        x_q.copy_(q)
        x_s.copy_(s)

    def rotary_embedding(self, positions, query, key, head_size, cos_sin_cache, is_neox):
        self.calls.append("rotary_embedding")
        T, H = query.shape[:2]
        assert head_size == 64 and not is_neox and cos_sin_cache.shape[1] == 64
        assert query.shape == (T, H, 64) and query.stride() == (H * 192, 192, 1)
        assert key.shape == (T, 1, 64)
        cs = cos_sin_cache[positions]
        cos, sin = cs[:, None, :32], cs[:, None, 32:]
        query.copy_(R.rope_interleaved(query, cos, sin))
        key.copy_(R.rope_interleaved(key, cos, sin))

    def indexer_k_quant_and_cache(self, k, kv_cache, slot_mapping, quant_block_size, scale_fmt):
        self.calls.append("indexer_k_quant_and_cache")
        assert quant_block_size == 128 and scale_fmt in ("ue8m0", "fp32")
        R.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, scale_fmt == "ue8m0")

    def cooperative_topk(self, logits, seq_lens, topk_indices, workspace, topk_tokens, max_seq_len):
        self.calls.append("cooperative_topk")
        assert workspace.numel() == vendor.RADIX_TOPK_WORKSPACE_SIZE and workspace.dtype == torch.uint8
        assert topk_tokens == 2048 and seq_lens.dtype == torch.int32 and seq_lens.dim() == 2
        assert max_seq_len == int(seq_lens.max())  # next_n = 1 here: visible == seq_lens
        topk_indices.copy_(R.topk_indices(logits, seq_lens.reshape(-1)))


class _FakeDeepGemm:
    """DeepGEMM 2.8.1 signatures (``deep_gemm/_C.py``); asserts the argument layouts."""

    __version__ = "stand-in"

    def __init__(self, num_sms):
        self.num_sms = num_sms
        self.calls = []

    def set_num_sms(self, n):
        self.num_sms = n

    def get_paged_mqa_logits_metadata(self, context_lens, block_size, num_sms):
        assert context_lens.dtype == torch.int32 and context_lens.dim() == 2 and block_size == 64
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32)

    def fp8_gemm_nt(self, a, b, d, disable_ue8m0_cast=False):
        self.calls.append("fp8_gemm_nt")
        (x_q, x_s), (w, w_s) = a, b
        T, K = x_q.shape
        N = w.shape[0]
        assert d.shape == (T, N) and d.dtype == torch.bfloat16 and d.is_contiguous()
        assert w_s.shape == (N // 128, K // 128)
        xq = x_q.float().view(T, K // 128, 128)
        wq = w.float().view(N, K // 128, 128)
        partial = torch.einsum("tgk,ngk->tng", xq, wq)
        w_s_full = w_s.repeat_interleave(128, dim=0)
        d.copy_((partial * x_s[:, None, :] * w_s_full[None]).sum(-1).to(torch.bfloat16))

    def fp8_fp4_paged_mqa_logits(self, q, kv_cache, weights, context_lens, block_table, schedule_meta,
                                 max_context_len):
        self.calls.append("fp8_fp4_paged_mqa_logits")
        q_fp8, q_sf = q
        B, n = context_lens.shape
        assert q_sf is None and q_fp8.shape == (B, n, 64, 128) and q_fp8.dtype == FP8_DTYPE
        assert kv_cache.dim() == 4 and kv_cache.shape[1:] == (64, 1, 132) and kv_cache.dtype == torch.uint8
        assert weights.shape == (B * n, 64) and weights.dtype == torch.float32
        assert schedule_meta.shape == (self.num_sms + 1, 2)
        assert int(context_lens.max()) <= max_context_len
        T = B * n
        out = torch.full((T, max_context_len), 3.0e38)  # DeepGEMM leaves garbage past each row's length
        lens = context_lens.reshape(-1)
        for t in range(T):
            L = int(lens[t])
            if L:
                k, ks = R.gather_keys(kv_cache.squeeze(-2), block_table[t // n], L)
                s = q_fp8.view(T, 64, 128)[t].float() @ k.float().T
                out[t, :L] = (s.relu() * weights[t][:, None]).sum(0) * ks
        return out


@pytest.mark.parametrize("use_ue8m0", [True, False])
def test_vendor_glue_with_stand_ins(use_ue8m0):
    b = make_decode_batch([300, 70, 2200], num_heads=16, use_ue8m0=use_ue8m0, seed=5)
    ref = b.clone()
    R.run_region(ref.args, use_ue8m0=use_ue8m0)
    out = b.clone()
    dg, ops = _FakeDeepGemm(num_sms=8), _FakeOps()
    vs = vendor.VendorWorkspace(max_tokens=4, max_len=64 * b.args.block_table.shape[1], device="cpu", dg=dg, ops=ops,
                                num_sms=8)
    vs.prepare(out.args, use_ue8m0)
    assert vs.max_seq_len == 2200
    assert vs.context_lens_view(3, 1).flatten().tolist() == [300, 70, 2200]
    vendor.vllm_indexer_tail(out.args, vs, use_ue8m0, {"topk_backend": "cooperative"})
    vendor.vllm_q_side(out.args, vs, use_ue8m0)
    assert ops.calls == ["indexer_k_quant_and_cache", "cooperative_topk", "per_token_group_fp8_quant",
                         "rotary_embedding"]
    assert dg.calls == ["fp8_fp4_paged_mqa_logits", "fp8_gemm_nt"]
    checks.check_region(out.args, ref.args, b)


def test_vendor_capture_needs_prepared_batch():
    b = make_decode_batch([100, 50], num_heads=16, seed=6)
    vs = vendor.VendorWorkspace(2, 128, "cpu", _FakeDeepGemm(4), _FakeOps(), num_sms=4)
    with pytest.raises(RuntimeError, match="eagerly"):
        vs.check_prepared(b.args, True)
    vs.prepare(b.args, True)
    vs.check_prepared(b.args, True)
    b.args.context_lens[0] = 99  # contents changed after the eager call: stale metadata
    with pytest.raises(RuntimeError, match="eagerly"):
        vs.check_prepared(b.args, True)


# --------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------
def _rows():
    from smpart.bench.__main__ import CSV_FIELDS

    rows = []
    for B, (p, t) in [(b, pt) for b in (1, 8) for pt in (("dual_stream", 30.0), ("sequential", 40.0))]:
        rows.append({k: None for k in CSV_FIELDS} | dict(
            gpu="stand-in", num_heads=16, batch_size=B, context=4096, next_n=1, num_tokens=B, path=p, status="ok",
            median_us=t + B, p10_us=t + B - 1, p90_us=t + B + 1, floor_us=9.0, ratio_to_baseline=1.0,
            ratio_to_floor=(t + B) / 9.0, gbps=1000.0, note=""))
    rows.append({k: None for k in CSV_FIELDS} | dict(num_heads=16, batch_size=1, context=4096, next_n=1,
                                                     path="vllm_sequential", status="skipped", floor_us=9.0,
                                                     note="needs a CUDA GPU"))
    return rows


def test_writers(tmp_path):
    main_mod = pytest.importorskip("smpart.bench.__main__")
    tabulate = pytest.importorskip("tabulate").tabulate
    pytest.importorskip("matplotlib")
    rows = _rows()
    csv_path = tmp_path / "results.csv"
    main_mod._write_csv(str(csv_path), rows)
    main_mod._write_csv(str(csv_path), rows)  # appends, one header
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == main_mod.CSV_FIELDS and len(lines) == 1 + 2 * len(rows)
    table = main_mod._table(rows, tabulate)
    assert "dual_stream" in table and "skipped" in table
    png = tmp_path / "latency.png"
    main_mod._plot(rows, str(png))
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv,flag", [(["--heads", "7"], "--heads"), (["--paths", "nonsense"], "--paths"),
                                       (["--batch", "0"], "--batch"), (["--batch", "200", "--next-n", "2"], "--batch"),
                                       (["--next-n", "3"], "--next-n"), (["--context", "-1"], "--context"),
                                       (["--replays", "0"], "--replays")])
def test_grid_flags_are_checked_in_every_mode(argv, flag, capsys):
    main_mod = pytest.importorskip("smpart.bench.__main__")
    with pytest.raises(SystemExit) as ei:
        main_mod.main(argv)
    assert ei.value.code == 2 and flag in capsys.readouterr().err


def test_cpu_mode_with_no_cpu_path_fails(capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU machine: the grid runs")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    main_mod = pytest.importorskip("smpart.bench.__main__")
    assert main_mod.main(["--paths", "dual_stream"]) == 2
    assert "nothing was checked" in capsys.readouterr().out


def test_mixed_contexts_and_auto_path_parse(tmp_path):
    main_mod = pytest.importorskip("smpart.bench.__main__")
    pytest.importorskip("matplotlib")
    a = main_mod.build_parser().parse_args(["--context", "4096,mixed", "--paths", "auto,dual_stream"])
    assert a.context == [4096, "mixed"] and a.paths == ["auto", "dual_stream"]
    with pytest.raises(SystemExit):
        main_mod.build_parser().parse_args(["--context", "4096,lots"])
    lens = main_mod.mixed_lens(8, 2, seed=0)
    assert len(lens) == 8 and lens[0] == 65536 and all(2 <= L <= 65536 for L in lens)
    assert lens == main_mod.mixed_lens(8, 2, seed=0) and lens != main_mod.mixed_lens(8, 2, seed=1)
    rows = _rows() + [dict(r, context="mixed") for r in _rows()]
    png = tmp_path / "latency.png"
    main_mod._plot(rows, str(png))  # int and "mixed" panels side by side
    assert png.stat().st_size > 1000


# --------------------------------------------------------------------------------------
# GPU only: the harness primitives and the vendor paths on the real kernels
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_harness_primitives_gpu():
    dev = torch.device("cuda")
    flush = harness.l2_flush_buffer(dev)
    assert flush.nbytes >= 2 * torch.cuda.get_device_properties(dev).L2_cache_size
    bw = harness.copy_bandwidth(dev, nbytes=2**28, replays=5)
    assert 1e11 < bw < 2e13, bw
    x = torch.randn(1 << 20, device=dev)
    y = torch.empty_like(x)
    t = harness.time_graph(lambda: torch.mul(x, 2.0, out=y), flush, replays=10)
    assert 0 < t["p10_us"] <= t["median_us"] <= t["p90_us"] and len(t["times_us"]) == 10
    assert torch.equal(y, x * 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["vllm_sequential", "vllm_dual_stream"])
@pytest.mark.parametrize("next_n", [1, 2])
def test_vendor_path_gpu(path, next_n):
    ok, why = vendor.vendor_available()
    if not ok:
        pytest.skip(f"vendor kernels unavailable: {why}")
    from smpart.bench.__main__ import check_path
    from smpart import region
    from smpart.workspace import RegionWorkspace

    b = make_decode_batch([300, 2100, 4096, 64], num_heads=32, next_n=next_n, seed=7, device="cuda")
    ref = b.clone()
    region.run_region(ref.args, "reference")
    out = b.clone()
    ws = RegionWorkspace.for_args(out.args)
    region.run_region(out.args, path, workspace=ws)
    torch.cuda.synchronize()
    check_path(path, out.args, ref.args, b)
    # captured and replayed: same outputs as the eager run (q, k_pe, cache bitwise; top-k by the rule)
    rep = b.clone()  # the eager run above prepared the per-step metadata of this batch
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        region.run_region(rep.args, path, workspace=ws)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(rep.args.q.view(torch.uint8), out.args.q.view(torch.uint8))
    assert torch.equal(rep.args.k_pe.view(torch.uint8), out.args.k_pe.view(torch.uint8))
    assert torch.equal(rep.args.kv_cache, out.args.kv_cache)
    check_path(path, rep.args, ref.args, b)
