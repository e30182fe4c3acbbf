"""The continuous-batching decode loop (``smpart-bench decode``, ``bench/decode/``).

* Two interpreter loops at small dims (H=16, contexts up to ~2-2.5K), 25 + 25 = 50 steps, MTP off
  and on, requests joining and leaving, blocks reused with stale bytes inside live blocks, padded
  batches in one, tie-free inputs (exact top-k index sets) in the other: zero mismatches of
  ``sequential`` and ``partitioned`` against ``reference``. They run as two CLI subprocesses side
  by side (one through ``smpart-bench decode``, one through ``python -m smpart.bench.decode``),
  started together by the first loop test, at the end of the file. To fit the CPU budget (on a
  2-core machine the interpreter costs ~2 s per ``partitioned`` step with 256-row GEMM tiles and
  ~5 s per ``sequential`` step), ``partitioned`` runs every step and ``sequential`` every 10th (its
  cache copy receives the reference's new bytes in between, so it still reads its own earlier
  writes).
* The loop machinery over many steps with stand-in paths (the reference under the paths' names):
  allocator invariants, preemption, strides, and the mismatch report (step, request, element).
* The unit tests (block allocator, request mix, option checks, prefill quantization, vectorized
  check) are in ``test_decode_units.py``.
* GPU (``-m gpu``): a CUDA-graph loop at H=32 with timings, and an eager MTP loop at H=128.
"""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

from smpart.bench import decode as dl
from smpart.bench.decode import DecodeLoop, LoopConfig, MismatchError, RequestMix

# --------------------------------------------------------------------------------------
# loop machinery with stand-in paths (the reference under the paths' names: no Triton, fast)
# --------------------------------------------------------------------------------------
@pytest.fixture
def stand_in_paths(monkeypatch):
    """Put the reference in place of ``sequential`` and ``partitioned``; returns a dict where a test
    can put a ``corrupt(step, args)`` hook per path."""
    import importlib

    from smpart import reference, region

    hooks = {}
    # small tensors: one intra-op thread (OpenMP spin-waits crawl when the cores are shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(name):
        calls = collections.Counter()

        def impl(args, ws, config, use_ue8m0):
            reference.run_region(args, use_ue8m0=use_ue8m0)
            if name in hooks:
                hooks[name](calls[name], args)
            calls[name] += 1

        return impl

    for name in ("sequential", "partitioned"):  # the PATHS table resolves module:function at each call
        module, _, attr = region.PATHS[name].partition(":")
        monkeypatch.setattr(importlib.import_module(module), attr, make(name))
    yield hooks
    torch.set_num_threads(threads)


def _allocator_invariants(loop: DecodeLoop):
    owned = [b for r in loop.running for b in r.blocks]
    assert len(owned) == len(set(owned)), "a block is in two requests"
    assert loop.allocator.num_used == len(owned)
    for r in loop.running:
        assert all(loop.allocator.owner(b) == r.rid for b in r.blocks)
        assert len(r.blocks) * 64 >= r.context_len


SCENARIOS = {
    # churn: many short requests through a small cache (reuse, stale bytes, padded buckets)
    "churn": dict(steps=45, max_batch=6, max_context=2048, num_blocks=60, arrival_period=40,
                  mix=RequestMix(prompt_median=500, prompt_sigma=1.0, prompt_max=2000, output_median=12,
                                 output_sigma=0.8, output_max=80)),
    # preemption: requests outgrow a 12-block cache, the newest are preempted and re-prefilled
    "preemption": dict(steps=50, max_batch=6, max_context=512, num_blocks=12, arrival_period=40,
                       mix=RequestMix(prompt_median=60, prompt_sigma=0.6, prompt_max=500, output_median=25,
                                      output_sigma=0.5, output_max=200)),
}


@pytest.mark.parametrize("scenario, next_n", [("churn", 1), ("churn", 2), ("preemption", 2)])
def test_loop_machinery_many_steps(stand_in_paths, scenario, next_n):
    kw = SCENARIOS[scenario]
    cfg = LoopConfig(num_heads=16, next_n=next_n, strides={"sequential": 3}, pad_batches=True, seed=11, **kw)
    loop = DecodeLoop(cfg)
    for step in range(cfg.steps):
        loop.step(step)
        _allocator_invariants(loop)
    s, steps = loop.stats, kw["steps"]
    assert s.steps == s.checks == steps
    assert s.path_runs == {"sequential": -(-steps // 3), "partitioned": steps}
    assert s.finished >= 2 and s.admitted >= 9 and s.blocks_reused > 0 and s.stale_positions > 0
    assert s.min_batch_seen < s.max_batch_seen == 6
    assert any(r["padded_batch"] > r["batch"] for r in loop.step_rows)
    if scenario == "preemption":
        assert s.preempted > 0
    else:
        assert s.finished > 5


@pytest.mark.parametrize("kind", ["cache", "topk"])
def test_mismatch_report_names_step_request_and_element(stand_in_paths, kind):
    def corrupt(call, args):
        if call != 3:
            return
        if kind == "cache":  # a value byte of row 0's new key
            slot = int(args.slot_mapping[0])
            args.kv_cache[slot // 64].view(-1)[(slot % 64) * 128 + 5] ^= 0x10
        else:
            args.topk_indices[1, 0] = 10**6

    stand_in_paths["sequential"] = corrupt
    loop = DecodeLoop(LoopConfig(num_heads=16, next_n=2, steps=10, max_batch=4, max_context=1024, seed=3,
                                 arrival_peak=3.0, paths=("sequential",)))
    rows_before = []
    with pytest.raises(MismatchError) as ei:
        for step in range(10):
            loop.step(step)
            rows_before.append(step)
    rep = ei.value.report
    assert rep["step"] == 3 and rep["path"] == "sequential" and len(rows_before) == 3
    assert "MISMATCH at step 3" in str(ei.value)
    batch_rids = [r.rid for r in loop.running]
    if kind == "cache":
        assert rep["message"].startswith("kv_cache")
        assert rep["request"] == batch_rids[0] and "token" in rep["element"] and "value byte 5" in rep["element"]
        assert rep["block_owner"] == f"request {batch_rids[0]}"
    else:
        assert rep["row"] == 1 and rep["request"] == batch_rids[0] and rep["draft_index"] == 1
        assert "outside" in rep["message"] and rep["element"] == "topk_indices[1, 0]"


def test_crashing_path_is_reported(stand_in_paths):
    def crash(call, args):
        raise RuntimeError("boom")

    stand_in_paths["partitioned"] = crash
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=3, max_context=512, seed=1, paths=("partitioned",)))
    with pytest.raises(MismatchError, match="raised RuntimeError: boom") as ei:
        loop.run()
    assert ei.value.report["step"] == 0 and ei.value.report["check"] == "run"


def test_time_budget_stops_after_the_step(stand_in_paths):
    """``run(time_budget_s=0)`` runs exactly one step and still returns a summary."""
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=50, max_context=512, seed=1, paths=("partitioned",)))
    summary = loop.run(time_budget_s=0.0)
    assert loop.stats.steps == 1 and isinstance(summary, dict)


def test_graph_mode_bookkeeping_emulated_on_cpu(stand_in_paths, monkeypatch):
    """Graph mode's bookkeeping without CUDA: captured buffers per bucket, the live step copied in,
    padding rows, outputs sliced to the live rows, buffers reused across steps. A stand-in "graph"
    re-runs the path on its captured buffers, which is what a replay does."""
    from smpart.region import run_region

    cfg = LoopConfig(num_heads=16, next_n=2, steps=30, max_batch=6, max_context=1024, seed=7, arrival_period=20,
                     mix=RequestMix(prompt_median=200, prompt_max=1000, output_median=8, output_max=40))
    loop = DecodeLoop(cfg)
    loop.cfg.graphs = True  # resolved() refuses graphs without CUDA; the stand-in below replaces the capture

    class ReplayGraph:
        def __init__(self, fn):
            self.replay = fn

    def capture(st, bucket):
        static = loop.static_args(st, bucket)
        run_region(static, st.name, workspace=st.workspace, config=st.config, check_values=False)  # the warm-up
        st.graphs[bucket] = (ReplayGraph(lambda: run_region(static, st.name, workspace=st.workspace,
                                                            config=st.config, check_values=False)), static)

    monkeypatch.setattr(loop, "_capture", capture)
    before = loop.states["sequential"].kv_cache.clone()
    loop.capture_all()
    assert torch.equal(before, loop.states["sequential"].kv_cache), "a warm-up wrote into the cache"
    assert sorted(loop.states["partitioned"].graphs) == [1, 2, 4, 6]
    statics = {b: id(g[1]) for b, g in loop.states["partitioned"].graphs.items()}
    loop.run()
    assert loop.stats.checks == 30 and not loop.failed
    assert {b: id(g[1]) for b, g in loop.states["partitioned"].graphs.items()} == statics
    assert any(r["padded_batch"] > r["batch"] for r in loop.step_rows)
    assert {r["padded_batch"] for r in loop.step_rows} <= {1, 2, 4, 6}


def test_summary_savings_and_output_files(stand_in_paths, tmp_path, monkeypatch):
    """Savings math and the writers, on injected GPU-style timings (us per step)."""
    pytest.importorskip("matplotlib")
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=4, max_context=512, seed=1, paths=("sequential", "partitioned")))
    loop.run()
    monkeypatch.setattr(dl.loop, "BASELINES", ("sequential",))  # stands in for the dual-stream baseline
    for step, row in enumerate(loop.step_rows):
        loop.states["sequential"].times_us.append((step, row["batch"], 30.0))
        loop.states["partitioned"].times_us.append((step, row["batch"], 25.0 + step % 2))
    summary = loop.summary()
    d = summary["paths"]["partitioned"]
    assert summary["baseline"] == "sequential"
    assert d["median_us"] == 25.5 and d["saving_per_layer_us"] == 4.5 and d["ratio_to_baseline"] == pytest.approx(0.85)
    assert d["saving_per_step_us"] == pytest.approx(61 * 4.5)
    assert d["saving_per_token_us"] == pytest.approx(61 * 4.5)  # next_n = 1: one token per request-step
    files = dl.write_outputs(str(tmp_path), loop, summary, {"torch": "t", "triton": "x", "date": "d", "gpu": "g"}, None)
    assert {os.path.basename(f) for f in files} == {"steps.csv", "summary.json", "summary.md", "step_time_vs_batch.png"}
    md = (tmp_path / "summary.md").read_text()
    assert "zero mismatches" in md and "partitioned" in md and "274.5" in md
    assert json.loads((tmp_path / "summary.json").read_text())["paths"]["partitioned"]["saving_per_layer_us"] == 4.5


# --------------------------------------------------------------------------------------
# the production model's region (vllm_v32 baseline)
# --------------------------------------------------------------------------------------
def test_production_loop_hands_every_path_the_production_region(stand_in_paths):
    """``production=True``: every path (and the reference) gets bf16 ``index_q`` with the production
    switches, a -1-filled ``topk_indices`` and a cache already holding the step's new keys (the
    loop's stand-in for ``fused_norm_rope``); the prep's outputs are compared byte for byte."""
    seen = []

    def spy(call, args):
        seen.append((args.index_q is not None, args.write_keys, args.fill, args.rope_k_pe, args.rope_fused_q))

    stand_in_paths["partitioned"] = spy
    cfg = LoopConfig(num_heads=16, next_n=2, steps=12, production=True, strides={"sequential": 3}, pad_batches=True,
                     seed=5, **{k: v for k, v in SCENARIOS["churn"].items() if k != "steps"})
    loop = DecodeLoop(cfg)
    for step in range(cfg.steps):
        loop.step(step)
        _allocator_invariants(loop)
    assert loop.stats.checks == 12 and seen and set(seen) == {(True, False, False, False, True)}
    assert loop.summary()["region"] == "production"
    # the keys come from the loop, not the paths: a path that skips the write still matches
    ref = loop.states["reference"].kv_cache
    assert all(torch.equal(loop.states[p].kv_cache, ref) for p in loop.path_names)


def test_production_loop_catches_a_wrong_index_q_prep(stand_in_paths):
    def corrupt(call, args):
        if call == 1:
            args.index_weights[0, 3] += 1.0

    stand_in_paths["partitioned"] = corrupt
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=4, max_context=512, seed=1, paths=("partitioned",),
                                 production=True))
    with pytest.raises(MismatchError, match="index_weights"):
        loop.run()


def test_production_graph_mode_emulated_on_cpu(stand_in_paths, monkeypatch):
    """Graph mode's captured buffers carry the production inputs (index_q, raw weights) and are
    refilled each step; outputs checked every step."""
    from smpart.region import run_region

    cfg = LoopConfig(num_heads=16, next_n=1, steps=10, max_batch=4, max_context=1024, seed=7, production=True,
                     mix=RequestMix(prompt_median=200, prompt_max=1000, output_median=8, output_max=40))
    loop = DecodeLoop(cfg)
    loop.cfg.graphs = True

    class ReplayGraph:
        def __init__(self, fn):
            self.replay = fn

    def capture(st, bucket):
        static = loop.static_args(st, bucket)
        assert static.index_q is not None and not static.write_keys and bool((static.topk_indices == -1).all())
        st.graphs[bucket] = (ReplayGraph(lambda: run_region(static, st.name, workspace=st.workspace,
                                                            config=st.config, check_values=False)), static)

    monkeypatch.setattr(loop, "_capture", capture)
    loop.capture_all()
    loop.run()
    assert loop.stats.checks == 10 and not loop.failed


def test_production_options_are_checked_and_vllm_v32_skipped_without_cuda():
    with pytest.raises(ValueError, match="generic model's region"):
        LoopConfig(production=True, paths=("partitioned", "vllm_dual_stream")).resolved()
    with pytest.raises(ValueError, match="tie_free"):
        LoopConfig(production=True, tie_free=True).resolved()
    with pytest.raises(TypeError, match="production"):
        LoopConfig(production=1).resolved()
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=1, max_context=512, paths=("partitioned", "vllm_v32"),
                                 production=True))
    assert "CUDA" in loop.skipped["vllm_v32"] and loop.path_names == ["partitioned"]
    loop = DecodeLoop(LoopConfig(num_heads=16, steps=1, max_context=512, paths=("partitioned", "vllm_v32")))
    assert "production" in loop.skipped["vllm_v32"]


def test_cli_default_baseline_is_vllm_v32_with_a_generic_fallback(stand_in_paths, tmp_path, capsys):
    from smpart.bench.decode import cli

    a = cli.build_parser().parse_args([])
    cfg = cli.config_from_args(a, cuda=True, v32=(True, "here"))
    assert cfg.production and cfg.paths[-2:] == ("vllm_v32", "vllm_v32_dual_stream")
    assert "vllm_sequential" not in cfg.paths and "vllm_dual_stream" not in cfg.paths
    cfg = cli.config_from_args(a, cuda=False, v32=(False, "no CUDA device"))
    assert not cfg.production and cfg.paths == ("sequential", "partitioned")
    a = cli.build_parser().parse_args(["--paths", "partitioned,vllm_v32"])
    assert cli.config_from_args(a, cuda=True, v32=(True, "here")).production
    assert not cli.config_from_args(a, cuda=True, v32=(False, "no DeepGEMM")).production
    # the CPU run says in one line that it falls back (the stand-ins keep it fast)
    rc = cli.main(["--steps", "2", "--max-context", "512", "--max-batch", "2", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("baseline vllm_v32 unavailable (no CUDA device)") == 1, out
    assert "region=generic" in out


def test_production_interpreter_loop_real_kernels():
    """The real sequential and partitioned paths on the production region under the interpreter: a few
    steps, index-q prep bytes, q, top-k and cache equal to the reference's."""
    import dataclasses as dc

    cfg = LoopConfig(num_heads=16, next_n=1, steps=3, max_batch=2, max_context=640, seed=9, production=True,
                     configs={"partitioned": dc.replace(__import__("smpart.triton_kernels.partitioned",
                                                                   fromlist=["PartitionConfig"]).PartitionConfig(),
                                                        block_n=256)},
                     mix=RequestMix(prompt_median=300, prompt_max=600, output_median=4, output_max=8))
    loop = DecodeLoop(cfg)
    loop.run()
    assert loop.stats.checks == 3 and loop.stats.path_runs == {"sequential": 3, "partitioned": 3}


# --------------------------------------------------------------------------------------
# the interpreter loops (subprocesses, run side by side)
# --------------------------------------------------------------------------------------
COMMON = ["--max-batch", "4", "--num-blocks", "48", "--paths", "sequential,partitioned", "--stride", "sequential=10",
          "--partitioned-config", "block_n=256", "--no-progress"]
LOOPS = {
    # name: (entry point, steps, extra options)
    "mtp_off": (["-m", "smpart.bench", "decode"], 25,
                ["--next-n", "1", "--max-context", "2560", "--pad-batches", "--seed", "1"]),
    "mtp_on": (["-m", "smpart.bench.decode"], 25,
               ["--next-n", "2", "--max-context", "2048", "--tie-free", "--seed", "2"]),
}


class _LoopRun:
    """A CLI loop started in a subprocess; :meth:`result` waits for it and reads its outputs."""

    def __init__(self, name, out_dir):
        entry, steps, extra = LOOPS[name]
        self.name, self.out_dir, self.steps = name, out_dir, steps
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        cmd = [sys.executable, *entry, "--steps", str(steps), "--out", str(out_dir), *COMMON, *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._result = None

    def result(self):
        if self._result is None:
            out, _ = self.proc.communicate(timeout=1200)
            summary_path = os.path.join(self.out_dir, "summary.json")
            summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
            self._result = (self.proc.returncode, out, summary)
        return self._result

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    runs = {name: _LoopRun(name, tmp_path_factory.mktemp(name)) for name in LOOPS}
    yield runs
    for r in runs.values():
        r.kill()


# --------------------------------------------------------------------------------------
# the interpreter loops' results
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOOPS))
def test_interpreter_loop_zero_mismatches(loop_runs, name):
    rc, out, summary = loop_runs[name].result()
    tail = "\n".join(line for line in out.splitlines() if "Warning" not in line)[-3000:]
    assert rc == 0 and "zero mismatches" in out, tail
    assert summary is not None and summary["mismatch"] is None, tail
    s, steps = summary["stats"], LOOPS[name][1]
    assert s["steps"] == s["checks"] == steps, tail
    assert s["path_runs"]["partitioned"] == steps and s["path_runs"]["sequential"] >= 3, s["path_runs"]
    # requests joining and leaving, varying batch, contexts of a few thousand tokens
    assert s["admitted"] >= 5 and s["finished"] >= 3, s
    assert s["min_batch_seen"] < s["max_batch_seen"], s
    assert s["max_context_seen"] >= 1500, s
    # reused blocks, with another request's bytes inside live blocks past the context
    assert s["blocks_reused"] > 0 and s["stale_positions"] > 0, s
    assert summary["config"]["next_n"] == (2 if name == "mtp_on" else 1)
    assert "Timings need a CUDA GPU" in out
    with open(os.path.join(loop_runs[name].out_dir, "steps.csv")) as f:
        lines = f.read().splitlines()
    assert len(lines) == steps + 1 and lines[0].startswith("step,batch,padded_batch,num_tokens")
    if name == "mtp_off":
        import csv

        rows = list(csv.DictReader(lines))
        assert any(int(r["padded_batch"]) > int(r["batch"]) for r in rows), "no padded batch was exercised"


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------
def _gpu_paths():
    from smpart.vendor import vendor_available

    return ("sequential", "dual_stream", "partitioned") + (dl.VENDOR_PATHS if vendor_available()[0] else ())


@pytest.mark.gpu
def test_decode_loop_graphs_gpu():
    cfg = LoopConfig(num_heads=32, next_n=1, steps=60, max_batch=16, max_context=16384, paths=_gpu_paths(),
                     graphs=True, cold_l2=True, check="fast", device="cuda", seed=4, arrival_period=30,
                     mix=RequestMix(prompt_max=16000, output_median=20))
    loop = DecodeLoop(cfg)
    summary = loop.run()
    assert not loop.failed, loop.failed
    assert loop.stats.checks == 60
    for p in loop.path_names:
        assert summary["paths"][p]["runs"] == 60 and summary["paths"][p]["median_us"] > 0
    assert summary["baseline"] in dl.BASELINES
    assert loop.stats.max_batch_seen > 1


@pytest.mark.gpu
def test_decode_loop_eager_mtp_full_check_gpu():
    cfg = LoopConfig(num_heads=128, next_n=2, steps=20, max_batch=8, max_context=8192, paths=_gpu_paths(),
                     graphs=False, check="full", device="cuda", seed=5, tie_free=True, pad_batches=True,
                     mix=RequestMix(prompt_max=8000, output_median=8))
    loop = DecodeLoop(cfg)
    loop.run()
    assert loop.stats.checks == 20
