"""Issue 17 on the GPU: the production region in ONE FULL CUDA graph, replayed with changing lengths,
equal to vLLM 0.33's own kernels captured the same way, at every replay.

Per case (H 128 / 16, next_n 1 / 2, B = 8, contexts to 20000) two graphs on two copies of one production
batch (``make_decode_batch`` + ``to_production``), each with its own workspace:

* smpart as the production model runs it in a FULL graph (path ``partitioned``, ``use_ue8m0=True``,
  ``check_values=False``). Test 1: ``run_region`` with the RegionArgs ``integration/v32/attention.py::
  run_v32_region`` builds (that module imports vLLM, absent on the GPU machine). Test 2: ``run_v32_region``
  itself in vLLM's ``set_forward_context``, on the plan ``SmpartDeepseekV32Attention._smpart_step_plan``
  takes from vLLM's ``DeepseekV32IndexerMetadataBuilder`` metadata (skipped where vLLM does not import).
* vLLM: ``run_region(path="vllm_v32")`` (quant + DeepGEMM GEMM, vLLM's ``fused_q``, DeepGEMM logits,
  vLLM's top-k); its DeepGEMM schedule is rebuilt eagerly before each replay, as vLLM's builder does.

Before each replay every step input is rewritten in place: lengths (one request > 2048 visible rows,
one <= 2048, every other step two padding requests: seq_len 0, slot -1), a fresh block table, matching
positions and slots, the new keys in the cache and the -1 fill (``fused_norm_rope``'s work), new ``q_c``,
``index_q`` and raw weights. Compared after each replay:

* index q: smpart's prep outputs vs the FP8 q and weights vLLM's ``fused_q`` returned in its graph: bytes.
* q: rows whose ``q_c`` has one non-zero make every FP8 GEMM exact in any order, so both rope the same
  q_pe: those rows must be equal bytes (q_pe rounded as ``fused_q``). All rows: q_nope and q_pe by
  normalized difference < 1e-5 (GEMM accumulation orders differ; vLLM's ``W_UK_T`` bmm turning q_nope
  into ql_nope is the same op after either path).
* top-k: rows with <= 2048 visible positions: the index set equals vLLM's; all rows of both pass
  ``check_topk`` against float64 logits of the (equal) index-q bytes (``logits_tolerance``). Padding
  requests' rows: smpart's all -1 (the contract); vLLM's are not compared (nothing reads them).
* the cache untouched by both; smpart's arrival counters and radix histograms zero (``check_clean``).
"""

import dataclasses
import types

import pytest
import torch

from smpart import checks, reference
from smpart.batch import make_decode_batch
from smpart.prep import to_production
from smpart.region import run_region
from smpart.triton_kernels import dims
from smpart.workspace import RegionWorkspace

pytestmark = pytest.mark.gpu
B, MAXLEN, REPLAYS, BS, TOPK = 8, 20000, 20, dims.CACHE_BLOCK_SIZE, dims.INDEX_TOPK
CASES = [(128, 1), (128, 2), (16, 1), (16, 2)]
PREFIX = "model.layers.3.self_attn.indexer.k_cache"
STEP_INPUTS = ("context_lens", "block_table", "positions", "slot_mapping", "q_c", "index_q", "index_weights_raw")


def _need_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from smpart.vendor_v32 import v32_available

    ok, why = v32_available()  # sm_90+, DeepGEMM, vLLM's compiled ops, vLLM's fused_q kernels file
    if not ok:
        pytest.skip(f"vLLM's kernels unavailable: {why}")


def _batch(H, next_n):
    """Production RegionArgs: every request at MAXLEN, so each owns a full-width table row of keys."""
    b = make_decode_batch(MAXLEN, batch_size=B, num_heads=H, next_n=next_n, seed=H + next_n, device="cuda")
    return to_production(b.args, use_ue8m0=True, seed=H * next_n)


def _clone(a):
    return dataclasses.replace(a, **{f.name: getattr(a, f.name).clone() for f in dataclasses.fields(a)
                                     if isinstance(getattr(a, f.name), torch.Tensor)})


def _draw(g, next_n, width, pool, step):
    """One decode step's inputs (CPU tensors) and the mask of rows whose ``q_c`` has one non-zero."""
    T = B * next_n
    lens = torch.randint(next_n, MAXLEN + 1, (B,), generator=g)
    lens[0] = int(torch.randint(TOPK + next_n, MAXLEN + 1, (1,), generator=g))  # every row sees > 2048
    lens[1] = int(torch.randint(next_n, TOPK + 1, (1,), generator=g))  # every row sees <= 2048
    if step % 2:
        lens[-2:] = 0  # padding requests of a FULL graph batch
    table = torch.randperm(pool, generator=g)[: B * width].view(B, width).to(torch.int32)
    rb, j = torch.arange(T) // next_n, torch.arange(T) % next_n
    pos = (lens[rb] - next_n + j).clamp(min=0)
    slots = torch.where(lens[rb] > 0, table[rb, pos // BS].long() * BS + pos % BS, -1)
    q_c = torch.randn(T, dims.Q_LORA_RANK, generator=g)
    exact = torch.arange(T) % 3 == 0
    keep = torch.zeros_like(q_c, dtype=torch.bool)
    keep[torch.arange(T), torch.randint(0, dims.Q_LORA_RANK, (T,), generator=g)] = True
    q_c = torch.where(exact[:, None] & ~keep, 0.0, q_c)
    rnd = [torch.randn(T, *shape, generator=g).bfloat16() for shape in ((64, 128), (64,), (128,))]
    return dict(context_lens=lens.to(torch.int32), block_table=table, positions=pos, slot_mapping=slots,
                q_c=q_c.bfloat16(), index_q=rnd[0], index_weights_raw=rnd[1], index_k=rnd[2]), exact


def _capture(fn):
    """Two eager warm-ups on a side stream (compiles, workspaces, vendor metadata), then one graph;
    returns the graph and what ``fn`` returned during the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def _compare_replays(a, smpart_fn, monkeypatch, before_replay=None):
    """Capture ``smpart_fn`` (runs the region on ``a``; returns its workspace and where it leaves the
    index-q prep outputs) and ``vllm_v32`` on a clone of ``a``; replay both REPLAYS times (module
    docstring). ``before_replay(new)``: the caller's per-step hook (test 2: vLLM's builder)."""
    from smpart import vendor_v32

    next_n, dev = a.next_n, a.q_c.device
    v = _clone(a)
    vws, held, real, pe_diff = RegionWorkspace.for_args(v), {}, vendor_v32._fused_q, [0, 0]

    def spy(*args, **kw):  # vLLM's fused_q returns fresh index-q tensors: keep the captured ones
        held["out"] = real(*args, **kw)
        return held["out"]

    monkeypatch.setattr(vendor_v32, "_fused_q", spy)
    g_s, (ws, q8_s, w_s) = _capture(smpart_fn)
    g_v, _ = _capture(lambda: run_region(v, path="vllm_v32", workspace=vws, use_ue8m0=True, check_values=False))
    q8_v, w_v = held["out"]
    assert q8_v.dtype == q8_s.dtype and w_v.dtype == w_s.dtype and q8_v.numel() == q8_s.numel()
    kv = a.kv_cache.clone()
    gen = torch.Generator().manual_seed(1000 * a.num_heads + next_n)
    for step in range(REPLAYS):
        new, exact = _draw(gen, next_n, a.block_table.shape[1], a.kv_cache.shape[0], step)
        new = {k: t.to(dev) for k, t in new.items()}
        reference.indexer_k_quant_and_cache(new["index_k"], kv, new["slot_mapping"], True)  # fused_norm_rope
        for x in (a, v):
            for name in STEP_INPUTS:
                getattr(x, name).copy_(new[name])
            x.kv_cache.copy_(kv)
            x.topk_indices.fill_(-1)
            x.q.fill_(float("nan"))
        q8_s.view(torch.uint8).fill_(0x7F)  # NaN bytes: the prep must rewrite its outputs every replay
        w_s.fill_(float("nan"))
        try:
            if before_replay is not None:
                before_replay(new)
            vws.vendor.prepare(v, True)  # vLLM's metadata builder: visible lengths + DeepGEMM schedule
            g_s.replay()
            g_v.replay()
            torch.cuda.synchronize()
            _check(a, v, ws, kv, (q8_s, w_s), (q8_v.view(q8_s.shape), w_v.view(w_s.shape)), exact.to(dev), pe_diff)
        except AssertionError as e:
            raise AssertionError(f"replay {step} (H={a.num_heads}, next_n={next_n}, "
                                 f"lens {new['context_lens'].tolist()}): {e}") from None
    print(f"H={a.num_heads} next_n={next_n}: q_pe elements differing from vLLM's on rows with random q_c "
          f"(GEMM order; informational): {pe_diff[0]} of {pe_diff[1]}")


def _check(a, v, ws, kv, prep_s, prep_v, exact, pe_diff):
    T, next_n = a.num_tokens, a.next_n
    checks.assert_equal_bytes("index_q_fp8 (smpart prep vs vLLM fused_q)", prep_s[0], prep_v[0])
    checks.assert_equal_bytes("index_weights (smpart prep vs vLLM fused_q)", prep_s[1], prep_v[1])
    for name, x in (("smpart", a), ("vLLM", v)):
        checks.assert_equal_bytes(f"{name} kv_cache (write_keys=False)", x.kv_cache, kv)
        assert not x.q.isnan().any(), f"{name} q: unwritten element"
    checks.assert_equal_bytes("q rows with one-hot q_c (exact GEMM; q_pe roped as fused_q)", a.q[exact], v.q[exact])
    for part, cols in (("q_nope", slice(0, dims.QK_NOPE_HEAD_DIM)), ("q_pe", slice(dims.QK_NOPE_HEAD_DIM, None))):
        d = checks.calc_diff(a.q[..., cols].float(), v.q[..., cols].float())
        assert d < 1e-5, f"{part}: normalized difference {d:.3e} >= 1e-5"
    pe_s, pe_v = (x.q[~exact, :, dims.QK_NOPE_HEAD_DIM:].view(torch.int16) for x in (a, v))
    pe_diff[0], pe_diff[1] = pe_diff[0] + int((pe_s != pe_v).sum()), pe_diff[1] + pe_s.numel()
    lens = reference.visible_lens(a.context_lens, next_n)
    live = (a.context_lens > 0).repeat_interleave(next_n)
    want = dataclasses.replace(a, index_q_fp8=prep_s[0], index_weights=prep_s[1])
    logits64 = reference.paged_mqa_logits(prep_s[0], prep_s[1], a.kv_cache, a.block_table, a.context_lens, next_n,
                                          max(int(lens.max()), 1), dtype=torch.float64)
    tol = checks.logits_tolerance(want, lens)
    checks.check_topk(a.topk_indices, logits64, lens, tol)
    checks.check_topk(v.topk_indices[live], logits64[live], lens[live], tol[live])
    at, vt, lc, lv = a.topk_indices.cpu(), v.topk_indices.cpu(), lens.cpu(), live.cpu()
    for t in range(T):
        if lv[t] and lc[t] <= TOPK:
            assert set(at[t].tolist()) == set(vt[t].tolist()), f"topk row {t} (len {int(lc[t])}): sets differ"
    try:
        ws.check_clean()
    except ValueError as e:
        raise AssertionError(f"smpart workspace after the replay: {e}") from None


@pytest.mark.parametrize("H,next_n", CASES)
def test_region_full_graph_replays_match_vllm_kernels(H, next_n, monkeypatch):
    """The region as ``run_v32_region`` launches it (same RegionArgs, options and path), captured once,
    vs vLLM's own kernels captured once, over REPLAYS replays with changing lengths (module docstring)."""
    _need_kernels()
    a = _batch(H, next_n)
    ws = RegionWorkspace.for_args(a)

    def smpart_fn():
        run_region(a, path="partitioned", workspace=ws, use_ue8m0=True, check_values=False)
        return ws, a.index_q_fp8, a.index_weights

    _compare_replays(a, smpart_fn, monkeypatch)


@pytest.mark.parametrize("H,next_n", CASES)
def test_region_in_vllm_forward_context_with_builder_metadata(H, next_n, monkeypatch, tmp_path_factory):
    """Test 1 through the plugin's code: ``run_v32_region`` on ``SmpartDeepseekV32Attention._smpart_step_plan``'s
    plan from vLLM's builder metadata, captured in ``set_forward_context`` (FULL, uniform). Before each
    replay the builder rebuilds the metadata (padding requests get no tokens, as vLLM's runner pads);
    its plan must read the tensors the graph captured (a padded batch gets none: vLLM sets
    ``requires_padding``, and replays the captured graph regardless)."""
    _need_kernels()
    try:
        import vllm  # noqa: F401
        from vllm.config import CUDAGraphMode, set_current_vllm_config
        from vllm.forward_context import BatchDescriptor, set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata
        from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadataBuilder
        from vllm.v1.kv_cache_interface import MLAAttentionSpec

        from smpart.integration import ops
        from smpart.integration.v32.attention import SmpartDeepseekV32Attention, run_v32_region
        from vllm_cpu_env import dsv32_vllm_config
    except Exception as e:  # noqa: BLE001 - any import failure: no usable vLLM here
        pytest.skip(f"vLLM 0.33.0 is not importable here ({type(e).__name__}: {e})")
    monkeypatch.setenv(ops.PATH_ENV, "partitioned")
    a = _batch(H, next_n)
    T, dev, width = a.num_tokens, a.q_c.device, a.block_table.shape[1]
    buf = torch.full((T + 4, TOPK), -9, dtype=torch.int32, device=dev)  # vLLM's buffer has spare rows
    a = dataclasses.replace(a, topk_indices=buf[:T])
    ns = types.SimpleNamespace
    layer = ns(_smpart_off=None, skip_topk=False, _index_rope_interleave=a.index_rope_interleave,
               indexer=ns(k_cache=ns(prefix=PREFIX, kv_cache=a.kv_cache), max_model_len=width * BS),
               q_b_proj=ns(weight=a.q_b_proj_weight, weight_scale_inv=a.q_b_proj_weight_scale),
               rotary_emb=ns(cos_sin_cache=a.cos_sin_cache), indexer_rope_emb=ns(cos_sin_cache=a.index_cos_sin_cache))
    qsl = torch.arange(B + 1, dtype=torch.int32) * next_n
    qsl_dev = qsl.to(dev)
    with dsv32_vllm_config(tmp_path_factory, f"g{H}n{next_n}") as cfg, set_current_vllm_config(cfg):
        spec = MLAAttentionSpec(block_size=BS, num_kv_heads=1, head_size=dims.CACHE_BYTES_PER_TOKEN, dtype=torch.uint8)
        bld = DeepseekV32IndexerMetadataBuilder(spec, [PREFIX], cfg, dev, block_table_width=width)
        if next_n > 1:  # as __init__ sets them with speculative_config.num_speculative_tokens = next_n - 1
            bld.num_speculative_tokens, bld.decode_threshold = next_n - 1, next_n
            bld.offsets_buffer = torch.arange(next_n, dtype=torch.int32, device=dev)

        def build():
            lens = a.context_lens.cpu()
            qsl[1:] = torch.cumsum((lens > 0).int() * next_n, 0)  # vLLM: a padding request has no tokens
            qsl_dev.copy_(qsl)
            cm = CommonAttentionMetadata(
                query_start_loc=qsl_dev, query_start_loc_cpu=qsl.clone(), seq_lens=a.context_lens, num_reqs=B,
                num_actual_tokens=T, max_query_len=next_n, max_seq_len=int(lens.max()),
                block_table_tensor=a.block_table, slot_mapping=a.slot_mapping, seq_lens_cpu_upper_bound=lens)
            return {PREFIX: bld.build(0, cm)}

        def context(md):
            return set_forward_context(md, cfg, cudagraph_runtime_mode=CUDAGraphMode.FULL,
                                       batch_descriptor=BatchDescriptor(num_tokens=T, uniform=True))

        state = {"md": build()}

        def smpart_fn():  # SmpartDeepseekV32Attention.forward's region part, as vLLM captures it
            with context(state["md"]):
                plan = SmpartDeepseekV32Attention._smpart_step_plan(layer, T)
                assert not isinstance(plan, str), f"the layer would fall back: {plan}"
                ws = ops.workspace_for(plan.num_tokens, layer.indexer.max_model_len, dev)
                assert ops.choose_path(T, H, plan.next_n, ws.max_len, dev, production=True) == "partitioned"
                run_v32_region(layer, a.positions, a.q_c, a.index_q, a.index_weights_raw, a.q, buf, plan, ws)
            state["plan"] = plan
            bufs = ws.extra[("v32", str(dev))]
            return ws, bufs["index_q_fp8"][:T], bufs["index_weights"][:T]

        def before_replay(new):
            state["md"] = build()
            with context(state["md"]):
                plan = SmpartDeepseekV32Attention._smpart_step_plan(layer, T)
            if isinstance(plan, str):
                assert "non-uniform" in plan and bool((new["context_lens"] == 0).any()), f"no plan: {plan}"
                return
            for name in ("context_lens", "block_table", "slot_mapping"):
                got, cap = getattr(plan, name), getattr(state["plan"], name)
                assert (got.data_ptr(), got.shape) == (cap.data_ptr(), cap.shape), f"builder moved {name}"

        _compare_replays(a, smpart_fn, monkeypatch, before_replay)
    assert bool((buf[T:] == -9).all()), "topk_indices_buffer rows past the batch were written"
