"""``PartitionConfig(topk_impl="vllm")``: the partitioned path's fused launch, then vLLM 0.33's own
decode top-k (the hybrid).

On a CPU the fused launch runs in Triton's interpreter and vLLM's ``cooperative_topk`` /
``persistent_topk`` are stand-ins with vLLM's signature ``(logits, lengths, topk_indices, workspace,
k, max_seq_len)`` (``vllm/model_executor/layers/indexer_topk.py``), written from
``smpart.reference``'s top-k rule; they check the argument layouts vLLM's ops require and, like
vLLM's trivial and exact paths, write the selected slots (the worst case: here they leave the
padding to the -1 fill). The ``gpu`` tests run vLLM's real ops.
"""

import dataclasses
import os
import types
import warnings

import pytest
import torch

from smpart import checks, reference, tuning, vendor
from smpart import partitioned as P
from smpart.batch import make_decode_batch
from smpart.region import run_region
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.workspace import RegionWorkspace
from test_partitioned_launch import _Recorder  # tests/ is on pytest's path
from test_paths import load_into

HYBRID = PartitionConfig(topk_impl="vllm", indexer_programs=2, gemm_programs=2)
# the kernels on CPU tensors: Triton's interpreter (a GPU run without it covers the real ops below)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")


# -- (1) the field, checked when a config is made -------------------------------------------------
def test_default_is_smpart_and_vllm_is_accepted():
    assert PartitionConfig().topk_impl == "smpart"
    assert PartitionConfig(topk_impl="vllm", dense_first=True, first_prequant=True).topk_impl == "vllm"


@pytest.mark.parametrize("bad", [None, 1, b"vllm", ("vllm",)])
def test_non_str_topk_impl_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"config\.topk_impl"):
        PartitionConfig(topk_impl=bad)


@pytest.mark.parametrize("bad", ["VLLM", "torch", "", "cooperative"])
def test_unknown_topk_impl_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"config\.topk_impl"):
        PartitionConfig(topk_impl=bad)


@pytest.mark.parametrize("kw,field", [
    (dict(fuse_topk=True), "fuse_topk"),
    (dict(gemm_in_tail=1.0), "gemm_in_tail"),
    (dict(gemm_in_tail=0.25, first_prequant=True), "gemm_in_tail"),
])
def test_vllm_needs_the_standalone_split(kw, field):
    with pytest.raises(ValueError, match=rf"config\.{field}"):
        PartitionConfig(topk_impl="vllm", **kw)


# -- stand-ins for vLLM's compiled ops ------------------------------------------------------------
def _standin_topk(name, calls):
    """vLLM's ``cooperative_topk`` / ``persistent_topk`` signature and argument rules; the selection is
    ``reference.topk_indices`` on ``logits[t, :lengths[t]]``; only slots ``[0, min(L, k))`` are written."""

    def op(logits, lengths, topk_indices, workspace, k, max_seq_len):
        calls.append(dict(name=name, logits=logits, lengths=lengths, out=topk_indices, workspace=workspace, k=k,
                          max_seq_len=max_seq_len))
        T = logits.shape[0]
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
        assert logits.stride(0) % 4 == 0  # cooperative_topk's TMA row alignment
        assert lengths.dtype == torch.int32 and lengths.dim() in (1, 2) and lengths.is_contiguous()
        assert lengths.numel() == T and topk_indices.shape == (T, k) and topk_indices.is_contiguous()
        assert workspace.dtype == torch.uint8 and workspace.numel() >= vendor.RADIX_TOPK_WORKSPACE_SIZE
        assert k == 2048 and isinstance(max_seq_len, int) and max_seq_len > 0
        lens = lengths.reshape(-1)
        # vLLM's ops trust these lengths: one past the row would read another row's logits
        assert int(lens.min()) >= 0 and int(lens.max()) <= min(max_seq_len, logits.shape[1]), lens.tolist()
        want = reference.topk_indices(logits, lens, k)
        for t in range(T):
            n = min(int(lens[t]), k)
            topk_indices[t, :n] = want[t, :n]

    return op


@pytest.fixture
def vllm_ops(monkeypatch):
    """The loaded-ops namespace replaced by the stand-ins (``vendor.load_vllm_ops`` returns it), on a
    device that reports sm_90 (``vendor._resolve_topk``'s gate for ``cooperative_topk``)."""
    calls = []
    ops = types.SimpleNamespace(
        source="stand-in", cooperative_topk=_standin_topk("cooperative_topk", calls),
        persistent_topk=_standin_topk("persistent_topk", calls), top_k_per_row_decode=None,
        per_token_group_fp8_quant=None, rotary_embedding=None, indexer_k_quant_and_cache=None, calls=calls)
    monkeypatch.setattr(vendor, "_vllm_ops", ops)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # the batches are on the CPU
    return ops


def _no_vllm_ops(monkeypatch):
    def fail(lib_path=None):
        raise RuntimeError("vLLM's compiled ops are not available (stand-in: nothing to load)")

    monkeypatch.setattr(vendor, "load_vllm_ops", fail)
    monkeypatch.setattr(P, "_vllm_topk_missing", None)


# -- (2a) the launches, recorded (no kernel runs) --------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    rec = dict(first=_Recorder(), tail=_Recorder(), prep=[], topk=[])
    monkeypatch.setattr(P, "_partitioned_kernel", rec["first"])
    monkeypatch.setattr(P, "_topk_gemm_tail_kernel", rec["tail"])
    monkeypatch.setattr(P, "launch_vllm_topk_prep", lambda *a: rec["prep"].append(a))
    monkeypatch.setattr(P, "topk", lambda *a, **k: rec["topk"].append((a, k)))
    return rec


@pytest.mark.parametrize("next_n,rows,backend", [(1, 3, "cooperative_topk"), (2, 66, "persistent_topk")])
def test_hybrid_launches_fused_then_vllm_topk(launches, vllm_ops, next_n, rows, backend):
    """The fused launch without the top-k role and without the histogram, the prep (lengths + -1
    fill) on the workspace's buffers, then vLLM's op (cooperative for <= 64 rows) on ``ws.logits[:T]``
    with ``[B, next_n]`` lengths, the 1 MiB workspace and ``max_seq_len`` = the rows' column bound."""
    lens = [70, 4100, 2] if rows == 3 else [70] * (rows // next_n)
    a = make_decode_batch(lens, num_heads=16, next_n=next_n, seed=1).args
    ws = RegionWorkspace.for_args(a)
    assert ws.vllm_topk_workspace is None and ws.vllm_topk_lens is None  # made on first use
    P.partitioned_region(a, ws, HYBRID)
    (grid, args, kw), = launches["first"].calls
    assert not kw["HIST"] and not kw["ROLES"] & 4 and kw["ROLES"] & 11 == 11
    assert not launches["topk"] and not launches["tail"].calls
    cols = ws.visible_cols(a)
    (ctx, lens_buf, out, nn, lmax), = launches["prep"]
    assert ctx is a.context_lens and lens_buf is ws.vllm_topk_lens and out is a.topk_indices
    assert (nn, lmax) == (next_n, cols)
    (call,) = vllm_ops.calls
    T = a.num_tokens
    assert call["name"] == backend and call["out"] is a.topk_indices and call["workspace"] is ws.vllm_topk_workspace
    assert call["logits"].data_ptr() == ws.logits.data_ptr() and call["logits"].shape == (T, ws.max_len)
    assert call["lengths"].data_ptr() == ws.vllm_topk_lens.data_ptr()
    assert call["lengths"].shape == (T // next_n, next_n) and call["max_seq_len"] == cols
    assert ws.vllm_topk_workspace.numel() == vendor.RADIX_TOPK_WORKSPACE_SIZE
    bufs = (ws.vllm_topk_workspace, ws.vllm_topk_lens)
    P.partitioned_region(a, ws, HYBRID)  # the buffers are made once
    assert ws.vllm_topk_workspace is bufs[0] and ws.vllm_topk_lens is bufs[1]


def test_without_the_topk_role_no_vllm_topk(launches, vllm_ops):
    a = make_decode_batch([70, 2], num_heads=16, seed=1).args
    P.partitioned_region(a, RegionWorkspace.for_args(a), dataclasses.replace(HYBRID, roles=11))
    assert not launches["prep"] and not vllm_ops.calls and len(launches["first"].calls) == 1


@interpreted
def test_missing_ops_raise_before_any_launch(monkeypatch):
    """vLLM's ops do not load: RuntimeError naming ``config.topk_impl``, every output untouched."""
    _no_vllm_ops(monkeypatch)
    b = make_decode_batch([70, 130], num_heads=16, seed=2)
    out = b.clone()
    ws = RegionWorkspace.for_args(out.args)
    with pytest.raises(RuntimeError, match=r"config\.topk_impl"):
        run_region(out.args, path="partitioned", workspace=ws, config=HYBRID)
    for name in ("kv_cache", "topk_indices", "q", "k_pe"):  # q starts NaN: compare bytes
        checks.assert_equal_bytes(name, getattr(out.args, name), getattr(b.args, name))


def test_tuned_vllm_config_runs_smpart_where_ops_do_not_load(monkeypatch, launches):
    """A tuning file's ``topk_impl="vllm"`` on a machine without vLLM's ops: smpart's top-k, one
    warning per process (the load is not retried every step)."""
    _no_vllm_ops(monkeypatch)
    tuned = dataclasses.replace(HYBRID, indexer_programs=3)
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: tuning.Choice("partitioned", tuned, "tuned"))
    a = make_decode_batch([70, 2], num_heads=16, seed=1).args
    ws = RegionWorkspace.for_args(a)
    with pytest.warns(UserWarning, match="topk_impl='vllm' runs as 'smpart'"):
        P.partitioned_region(a, ws, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.partitioned_region(a, ws, None)
    assert len(launches["topk"]) == 2 and not launches["prep"] and ws.vllm_topk_workspace is None
    # the split as usual: a histogram fed only where the standalone top-k reads it (algo radix)
    assert [kw["HIST"] for _, _, kw in launches["first"].calls] == [k["hist_ready"] for _, k in launches["topk"]]



def test_tuned_vllm_config_under_capture_without_buffers_runs_smpart(monkeypatch, launches, vllm_ops):
    """The default in a vLLM server (the cost model's hybrid) on a workspace made during CUDA-graph
    capture (``integration.ops.workspace_for`` when no profile run reserved one: nothing allocates vLLM's
    top-k buffers there): smpart's top-k, not a RuntimeError that would abort the capture. With the
    buffers made beforehand the hybrid runs under capture; an explicit hybrid config is still refused."""
    from smpart import validate

    monkeypatch.setattr(tuning, "choose", lambda *a, **k: tuning.Choice("partitioned", HYBRID, "model"))
    monkeypatch.setattr(P, "_is_capturing", lambda: True)
    monkeypatch.setattr(validate, "_is_capturing", lambda: True)  # RegionWorkspace.ensure_vllm_topk's
    a = make_decode_batch([70, 2], num_heads=16, seed=1).args
    ws = RegionWorkspace.for_args(a)
    P.partitioned_region(a, ws, None)
    assert len(launches["topk"]) == 1 and not launches["prep"] and not vllm_ops.calls
    assert ws.vllm_topk_workspace is None
    with pytest.raises(RuntimeError, match="ensure_vllm_topk"):
        P.partitioned_region(a, ws, HYBRID)
    monkeypatch.setattr(validate, "_is_capturing", lambda: False)
    ws.ensure_vllm_topk()
    monkeypatch.setattr(validate, "_is_capturing", lambda: True)
    P.partitioned_region(a, ws, None)
    assert len(launches["topk"]) == 1 and len(launches["prep"]) == 1 and len(vllm_ops.calls) == 1

# -- the workspace's buffers ----------------------------------------------------------------------
def test_workspace_buffers_checked_and_listed():
    a = make_decode_batch([70, 2], num_heads=16, seed=1).args
    ws = RegionWorkspace.for_args(a)
    assert "workspace.vllm_topk_workspace" not in ws.buffers()
    ws.ensure_vllm_topk()
    ws.check_fits(a)
    assert ws.buffers()["workspace.vllm_topk_workspace"] is ws.vllm_topk_workspace
    assert ws.buffers()["workspace.vllm_topk_lens"] is ws.vllm_topk_lens
    assert ws.vllm_topk_lens.shape == (ws.max_tokens,) and ws.vllm_topk_lens.dtype == torch.int32
    bad = dataclasses.replace(ws, vllm_topk_lens=ws.vllm_topk_lens[:1].clone())
    with pytest.raises(ValueError, match=r"workspace\.vllm_topk_lens"):
        bad.check_fits(a)
    bad = dataclasses.replace(ws, vllm_topk_workspace=torch.empty(1024, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"workspace\.vllm_topk_workspace"):
        bad.check_fits(a)
    bad = dataclasses.replace(ws, vllm_topk_workspace=ws.vllm_topk_workspace.view(torch.int32))
    with pytest.raises(TypeError, match=r"workspace\.vllm_topk_workspace"):
        bad.check_fits(a)


# -- (2b) the whole region under the interpreter against the reference -----------------------------
def _run(b, cfg, device, ws=None, check_values=None):
    ref = b.clone()
    run_region(ref.args, path="reference", use_ue8m0=b.use_ue8m0)
    out = b.clone()
    out.args.topk_indices.fill_(12345)  # every slot must be written: selected or -1
    ws = ws or RegionWorkspace.for_args(out.args)
    run_region(out.args, path="partitioned", workspace=ws, config=cfg, use_ue8m0=b.use_ue8m0,
               check_values=check_values)
    if device == "cuda":
        torch.cuda.synchronize()
    checks.check_region(out.args, ref.args, b)
    for name, x in (("counters", ws.counters), ("radix.counters", ws.radix.counters), ("radix.hist", ws.radix.hist)):
        assert int(x.abs().sum()) == 0, f"workspace.{name} not zero"
    return out, ws


CASES = [
    # (context_lens, next_n, padding requests, tie_free, config)
    ([1, 63, 2049, 70], 1, 1, True, HYBRID),
    ([2, 2049, 700], 2, 1, False, PartitionConfig(topk_impl="vllm", first_prequant=True, dense_first=True,
                                                   gemm_programs=2)),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=["n1-cooperative", "n2-persistent-dense-first"])
def test_hybrid_matches_reference(case, vllm_ops, monkeypatch):
    lens, next_n, pad, tie_free, cfg = case
    if next_n == 2:  # without cooperative_topk the dispatch falls to persistent_topk (as for > 64 rows)
        monkeypatch.setattr(vllm_ops, "cooperative_topk", None)
    b = make_decode_batch(lens, num_heads=16, next_n=next_n, num_padding=pad, tie_free=tie_free, seed=5 + next_n)
    _run(b, cfg, "cpu")
    want = "cooperative_topk" if next_n == 1 else "persistent_topk"
    assert [c["name"] for c in vllm_ops.calls] == [want]


@interpreted
def test_hybrid_clamps_lengths_past_the_table(vllm_ops):
    """Value checks off and a length past the block table (what a CUDA graph sees with a stale
    length): vLLM's op is handed the clamped length, so it selects only the table's positions."""
    b = make_decode_batch([70, 100], num_heads=16, seed=21)
    a = b.clone().args
    a.context_lens[0] = 5000
    a.slot_mapping[0] = -1
    ws = RegionWorkspace.for_shape(a.num_tokens, 8192, a.q_c.device)
    run_region(a, path="partitioned", workspace=ws, config=HYBRID, check_values=False)
    assert vllm_ops.calls[0]["lengths"].reshape(-1).tolist() == [128, 100]
    for t, L in enumerate((128, 100)):
        row = a.topk_indices[t]
        assert sorted(row[row >= 0].tolist()) == list(range(L)) and int((row == -1).sum()) == 2048 - L


# -- (3) the tuning file ----------------------------------------------------------------------------
H200 = {"gpu": "NVIDIA H200", "num_sms": 132, "torch": "2.11", "triton": "3.6"}


def test_tuning_round_trip_keeps_topk_impl(tmp_path):
    cache = tuning.TuningCache(meta=dict(H200, date="x"))
    b = tuning.Bucket.of(8, 128, 1, 4096)
    cfg = PartitionConfig(topk_impl="vllm", first_prequant=True, dense_first=True, gemm_programs=264, maxnreg=168)
    cache.put(b, "partitioned", cfg, {"partitioned:x": 30.0})
    assert tuning.config_to_dict(cfg)["topk_impl"] == "vllm"
    path = tmp_path / "c.json"
    tuning.save_cache(cache, str(path))
    got = tuning.load_cache(str(path), H200).lookup(b)
    assert got.config == cfg and got.config.topk_impl == "vllm"


def test_old_tuning_entries_load_as_smpart():
    old = tuning.config_to_dict(PartitionConfig(indexer_programs=100, gemm_programs=164))
    del old["topk_impl"]  # a file written before the field existed
    assert tuning.config_from_dict(old).topk_impl == "smpart"
    with pytest.raises(ValueError, match=r"config\.topk_impl"):
        tuning.config_from_dict(dict(old, topk_impl="fast"))


def test_autotune_hybrid_candidates_are_standalone_splits():
    from smpart.bench import autotune

    plain = autotune.candidates(32, 128, 1, 4096, 132)
    assert all(c.topk_impl == "smpart" for c in plain)
    both = autotune.candidates(32, 128, 1, 4096, 132, vllm_topk=True)
    hybrid = [c for c in both if c.topk_impl == "vllm"]
    assert hybrid and [c for c in both if c.topk_impl == "smpart"] == plain
    assert all(not c.fuse_topk and c.gemm_in_tail == 0 for c in hybrid)
    names = [autotune._name(c, "partitioned") for c in both]
    assert len(set(names)) == len(names) and all("vllmtopk" in autotune._name(c, "p") for c in hybrid)
    if not torch.cuda.is_available():
        assert autotune.vllm_topk_available() == (False, "needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_vllm_topk_available_needs_only_vllms_topk_ops_on_sm90(monkeypatch):
    """The hybrid's availability: SM90+ and vLLM's top-k ops; DeepGEMM is never asked (CPU: faked CUDA)."""
    from smpart.bench import autotune

    def no_deep_gemm():
        raise AssertionError("vllm_topk_available must not load DeepGEMM")

    def ops(**have):
        names = ("cooperative_topk", "persistent_topk", "top_k_per_row_decode")
        return types.SimpleNamespace(source="fake", **{n: have.get(n) for n in names})

    monkeypatch.setattr(vendor, "load_deep_gemm", no_deep_gemm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cap = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap[0])
    loaded = [ops(persistent_topk=object())]

    def load_vllm_ops():
        if isinstance(loaded[0], Exception):
            raise loaded[0]
        return loaded[0]

    monkeypatch.setattr(vendor, "load_vllm_ops", load_vllm_ops)
    ok, why = autotune.vllm_topk_available()
    assert not ok and "SM90" in why and "sm_80" in why
    cap[0] = (9, 0)
    ok, why = autotune.vllm_topk_available()
    assert ok and "persistent_topk" in why and "fake" in why
    loaded[0] = RuntimeError("vLLM's compiled ops are not available (nothing)")
    assert autotune.vllm_topk_available() == (False, "vLLM's compiled ops are not available (nothing)")
    loaded[0] = ops()
    ok, why = autotune.vllm_topk_available()
    assert not ok and "cooperative_topk" in why
    # the injection point is still asked as given (after the CUDA check)
    assert autotune.vllm_topk_available(available=lambda: (False, "injected")) == (False, "injected")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autotune.vllm_topk_available(available=lambda: (True, "injected"))[0] is False


# -- on a GPU: vLLM's real ops -----------------------------------------------------------------------
def _real_ops_or_skip():
    try:
        vendor.load_vllm_ops()
    except RuntimeError as e:
        pytest.skip(f"vLLM's compiled ops do not load here: {str(e)[:200]}")


@pytest.mark.gpu
@pytest.mark.parametrize("next_n,lens,pad", [(1, [1, 63, 2048, 2049, 5000, 70000], 1), (2, [2, 2049, 9000, 700], 1)])
def test_hybrid_real_vllm_topk_matches_reference(next_n, lens, pad):
    _real_ops_or_skip()
    b = make_decode_batch(lens, num_heads=128, next_n=next_n, num_padding=pad, seed=9, device="cuda")
    _run(b, PartitionConfig(topk_impl="vllm"), "cuda")
    b = make_decode_batch([4096] * 70, num_heads=32, next_n=next_n, seed=10, device="cuda")  # > 64 rows: persistent
    _run(b, PartitionConfig(topk_impl="vllm", first_prequant=True, dense_first=True, maxnreg=168), "cuda")


@pytest.mark.gpu
def test_hybrid_real_vllm_topk_in_a_cuda_graph():
    """Captured after one eager call (which makes the buffers), replayed with new batches copied into
    the captured inputs (lengths, tables, cache): each replay matches the reference. A fresh
    workspace under capture is refused before anything runs."""
    _real_ops_or_skip()
    B, H, max_len = 8, 32, 8192
    cfg = PartitionConfig(topk_impl="vllm")
    live = make_decode_batch(max_len, batch_size=B, num_heads=H, seed=1, device="cuda")
    ws = RegionWorkspace.for_args(live.args)
    run_region(live.args, path="partitioned", workspace=ws, config=cfg)  # compiles, makes the buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_region(live.args, path="partitioned", workspace=ws, config=cfg)
    for step in range(4):
        lens = torch.randint(1, max_len + 1, (B,)).tolist()
        nb = make_decode_batch(lens, num_heads=H, seed=100 + step, device="cuda")
        load_into(live, nb)  # same shapes as the captured batch: every input into the captured buffers
        ref = nb.clone()
        run_region(ref.args, path="reference")
        live.args.topk_indices.fill_(12345)
        graph.replay()
        torch.cuda.synchronize()
        lv = reference.visible_lens(ref.args.context_lens, 1)
        l64 = reference.paged_mqa_logits(ref.args.index_q_fp8, ref.args.index_weights, ref.args.kv_cache,
                                         ref.args.block_table, ref.args.context_lens, 1, max(int(lv.max()), 1),
                                         dtype=torch.float64)
        checks.check_topk(live.args.topk_indices, l64, lv, checks.logits_tolerance(ref.args, lv))
    fresh = RegionWorkspace.for_args(live.args)
    with pytest.raises(RuntimeError, match="ensure_vllm_topk"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            run_region(live.args, path="partitioned", workspace=fresh, config=cfg)


# -- the default where vLLM's top-k is registered (a vLLM server), the top-k config in tuning files --
def test_cost_model_picks_the_hybrid_where_vllm_topk_is_registered(monkeypatch):
    from smpart import vendor

    monkeypatch.setattr(tuning, "_shipped_cache", lambda meta: None)  # no tuning file: the cost model
    monkeypatch.setattr(vendor, "vllm_topk_registered", lambda: True)
    c = tuning.choose(8, 128, 1, 4096)
    assert c.source == "model" and c.config.topk_impl == "vllm" and c.config.gemm_in_tail == 0
    assert not c.config.fuse_topk
    monkeypatch.setattr(vendor, "vllm_topk_registered", lambda: False)
    c = tuning.choose(8, 128, 1, 4096)
    assert c.config.topk_impl == "smpart"


def test_vllm_topk_registered_is_false_without_cuda():
    from smpart import vendor

    if not torch.cuda.is_available():
        assert vendor.vllm_topk_registered() is False


def test_topk_config_round_trips_through_the_tuning_file():
    from smpart.triton_kernels.radix_topk import RadixTopkConfig

    for tk in (None, RadixTopkConfig(algo="radix"), RadixTopkConfig(chunk=8192, short_max=16384, bits=3)):
        cfg = PartitionConfig(indexer_programs=100, gemm_programs=164, topk_config=tk)
        assert tuning.config_from_dict(tuning.config_to_dict(cfg)) == cfg
    d = tuning.config_to_dict(PartitionConfig(topk_config=RadixTopkConfig(algo="radix")))
    old = dict(d, topk_config={k: v for k, v in d["topk_config"].items() if k not in ("algo", "bits", "count",
                                                                                        "sample")})
    assert tuning.config_from_dict(old).topk_config.algo == "sample"  # written before the sampled top-k
    with pytest.raises(ValueError, match=r"config\.topk_config"):
        tuning.config_from_dict(dict(d, topk_config=dict(d["topk_config"], speed=1)))
    with pytest.raises(ValueError, match=r"config\.algo"):
        tuning.config_from_dict(dict(d, topk_config=dict(d["topk_config"], algo="fast")))


def test_autotune_tries_both_topk_algorithms():
    from smpart.bench import autotune

    algos = {(c.topk_config.algo if c.topk_config else "sample") for c in autotune.candidates(32, 128, 1, 65536, 132)}
    assert algos == {"sample", "radix"}


@interpreted
def test_hybrid_on_the_production_models_args(vllm_ops):
    """The hybrid with the production model's region (index-q prep prologue, keys and fill already
    done by vLLM, ``fused_q``-rounded q_pe): cache untouched, q equal to the plain partitioned run's,
    top-k by the rule against float64 logits from the prep's outputs."""
    from test_v32_region import H, _clone, _production

    b = make_decode_batch([2100, 70, 3], num_heads=H, seed=11)
    p = _production(b, seed=5)
    plain, hyb = _clone(p), _clone(p)
    run_region(plain, path="partitioned", workspace=RegionWorkspace.for_args(plain), use_ue8m0=b.use_ue8m0)
    ws = RegionWorkspace.for_args(hyb)
    run_region(hyb, path="partitioned", workspace=ws, config=HYBRID, use_ue8m0=b.use_ue8m0)
    assert [c["name"] for c in vllm_ops.calls] == ["cooperative_topk"]
    assert torch.equal(hyb.kv_cache, p.kv_cache), "write_keys=False: the cache must be untouched"
    assert torch.equal(hyb.q.view(torch.int16), plain.q.view(torch.int16))
    assert torch.equal(hyb.index_q_fp8.view(torch.uint8), plain.index_q_fp8.view(torch.uint8))
    lens = reference.visible_lens(p.context_lens, p.next_n)
    logits64 = reference.paged_mqa_logits(hyb.index_q_fp8, hyb.index_weights, p.kv_cache, p.block_table,
                                          p.context_lens, p.next_n, int(lens.max()), dtype=torch.float64)
    want = dataclasses.replace(p, index_q_fp8=hyb.index_q_fp8, index_weights=hyb.index_weights)
    checks.check_topk(hyb.topk_indices, logits64, lens, checks.logits_tolerance(want, lens))
    ws.check_clean()
