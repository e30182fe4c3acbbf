"""vLLM's own computation as a tuned choice (CPU): the tuning file stores and validates the vendor
path names, the autotuner's candidate list takes them when they load, the grid's ``auto`` path and
the vLLM shim's ``choose_path`` map them to the calling region, and ``radix_topk_bench`` times with
the shared harness."""

import dataclasses
import json
import warnings

import pytest

from smpart import tuning
from smpart.triton_kernels.partitioned import PartitionConfig

H200 = {"gpu": "NVIDIA H200", "num_sms": 132, "torch": "2.11", "triton": "3.6"}
CFG = PartitionConfig(indexer_programs=100, gemm_programs=164, blocks_per_item=8)


# --------------------------------------------------------------------------------------
# the tuning file
# --------------------------------------------------------------------------------------
def test_vendor_picks_round_trip_with_the_partitioned_config(tmp_path):
    cache = tuning.TuningCache(meta=dict(H200, date="x"))
    picks = {tuning.Bucket.of(1, 128, 1, 4096): "vllm_v32", tuning.Bucket.of(8, 128, 1, 4096): "vllm_dual_stream",
             tuning.Bucket.of(32, 16, 2, 65536): "vllm_v32_dual_stream",
             tuning.Bucket.of(64, 32, 1, 8192): "vllm_sequential", tuning.Bucket.of(128, 128, 1, 4096): "partitioned"}
    for b, p in picks.items():
        cache.put(b, p, CFG, {p: 10.0, "partitioned": 12.0})
    path = tmp_path / "c.json"
    tuning.save_cache(cache, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid file loads without a warning
        back = tuning.load_cache(str(path), H200)
    assert back is not None
    for b, p in picks.items():
        got = back.resolve(b)
        assert got.path == p and got.source == "tuned"
        assert dataclasses.replace(got.config, topk_config=None) == CFG  # kept whatever won
        assert got.run_config is (got.config if p == "partitioned" else None)


@pytest.mark.parametrize("bad", ["green_ctx", "reference", "vllm_v33", "", None, 3])
def test_stored_path_names_are_validated(tmp_path, bad):
    cache = tuning.TuningCache(meta=dict(H200))
    with pytest.raises(ValueError if isinstance(bad, str) else TypeError, match="path"):
        cache.put(tuning.Bucket.of(1, 128, 1, 4096), bad, CFG, {})
    assert cache.entries == {}
    f = tmp_path / "bad.json"
    entries = {"H128-n1-T1-L4096": {"path": "vllm_v32", "config": {}},
               "H128-n1-T2-L4096": {"path": bad, "config": {}}}
    f.write_text(json.dumps({"schema": 1, "meta": H200, "entries": entries}))
    with pytest.warns(UserWarning, match="unreadable"):
        assert tuning.load_cache(str(f), H200) is None


def test_stale_or_corrupt_files_with_vendor_picks_are_still_refused(tmp_path):
    good = {"H128-n1-T1-L4096": {"path": "vllm_v32", "config": {}}}
    cases = [(dict(H200, gpu="NVIDIA H100 80GB HBM3"), good, "gpu"), (dict(H200, torch="2.9"), good, "torch"),
             (H200, {"H128-n1-T1-L4096": {"path": "vllm_v32", "config": {"bogus": 1}}}, "unreadable"),
             (H200, {"H128-n1-T1-L4096": "vllm_v32"}, "unreadable")]
    for meta, entries, why in cases:
        f = tmp_path / f"{why}.json"
        f.write_text(json.dumps({"schema": 1, "meta": meta, "entries": entries}))
        with pytest.warns(UserWarning, match=why):
            assert tuning.load_cache(str(f), H200) is None


def test_path_for_region_maps_vendor_picks_both_ways():
    for generic, production in (("vllm_sequential", "vllm_v32"), ("vllm_dual_stream", "vllm_v32_dual_stream")):
        for p in (generic, production):
            assert tuning.path_for_region(p, True) == production
            assert tuning.path_for_region(p, False) == generic
    for p in tuning.SMPART_PATHS:
        assert tuning.path_for_region(p, True) == tuning.path_for_region(p, False) == p
    with pytest.raises(ValueError, match="path"):
        tuning.path_for_region("green_ctx", False)
    from smpart.region import PATHS

    assert set(tuning.TUNABLE_PATHS) <= set(PATHS)


# --------------------------------------------------------------------------------------
# the autotuner's candidates
# --------------------------------------------------------------------------------------
def test_autotune_vendor_candidates_only_when_loadable():
    from smpart.bench import autotune

    yes, no = (lambda: (True, "here")), (lambda: (False, "no DeepGEMM"))
    assert autotune.vendor_candidates(True, yes) == (["vllm_v32", "vllm_v32_dual_stream"], "here")
    assert autotune.vendor_candidates(False, yes) == (["vllm_sequential", "vllm_dual_stream"], "here")
    assert autotune.vendor_candidates(True, no) == ([], "no DeepGEMM")
    paths, why = autotune.vendor_candidates(True)  # the real check: no CUDA here
    assert paths == [] and "CUDA" in why


def test_autotune_trials_time_vllm_before_the_budget_can_stop():
    from smpart.bench import autotune

    model = tuning.model_config(32, 128, 1, 8192, 132)
    half = dataclasses.replace(model, indexer_programs=200)
    cands = autotune.candidates(32, 128, 1, 8192, 132)
    order, n_first = autotune.trials(model, half, cands, ["vllm_v32", "vllm_v32_dual_stream"])
    assert order[:n_first] == [("sequential", None), ("dual_stream", None), ("vllm_v32", None),
                               ("vllm_v32_dual_stream", None), ("partitioned", model), ("partitioned", half)]
    assert all(p == "partitioned" and c is not None for p, c in order[n_first:])
    assert len(order) == n_first + len([c for c in cands if c not in (model, half)])
    assert all(p in tuning.TUNABLE_PATHS for p, _ in order)
    order, n_first = autotune.trials(model, half, cands, [])
    assert n_first == 4 and not any(p.startswith("vllm") for p, _ in order)
    with pytest.raises(ValueError, match="vendor"):
        autotune.trials(model, half, cands, ["green_ctx"])


def test_autotune_dry_run_names_vllms_candidates(capsys):
    from smpart.bench import autotune

    assert autotune.main(["--dry-run", "--batch", "1", "--context", "4096", "--heads", "16",
                          "--region", "production"]) == 0
    assert "vllm_v32, vllm_v32_dual_stream" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# dispatch: the grid's auto path and the vLLM shim
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, production, want_path, want_cfg", [
    ("partitioned", False, "partitioned", True), ("dual_stream", True, "dual_stream", False),
    ("sequential", False, "sequential", False), ("vllm_v32", False, "vllm_sequential", False),
    ("vllm_v32", True, "vllm_v32", False), ("vllm_dual_stream", True, "vllm_v32_dual_stream", False),
])
def test_grid_auto_passes_the_config_to_partitioned_only(path, production, want_path, want_cfg):
    """The tuned config is a PartitionConfig whatever path won; ``run_region`` refuses it on every
    other path (green_ctx takes an SM-count tuple), so ``auto`` passes it only to ``partitioned``."""
    from smpart.bench.__main__ import auto_dispatch
    from smpart.region import _check_config

    run_path, cfg = auto_dispatch(tuning.Choice(path, CFG, "tuned"), production)
    assert run_path == want_path and cfg is (CFG if want_cfg else None)
    _check_config(run_path, cfg)  # run_region's own config check accepts it
    if path != "partitioned":  # what the old code passed: refused
        with pytest.raises((TypeError, ValueError), match="config"):
            _check_config(run_path, CFG)
    _check_config("green_ctx", tuning.Choice("green_ctx", CFG, "tuned").run_config)


@pytest.mark.parametrize("tuned, production, want", [
    ("vllm_v32", False, "vllm_sequential"), ("vllm_v32", True, "vllm_v32"),
    ("vllm_dual_stream", True, "vllm_v32_dual_stream"), ("vllm_v32_dual_stream", False, "vllm_dual_stream"),
    ("partitioned", True, "partitioned"), ("dual_stream", False, "dual_stream"),
])
def test_shim_choose_path_runs_the_regions_vendor_pick(monkeypatch, tuned, production, want):
    pytest.importorskip("vllm")
    from smpart.integration import ops

    monkeypatch.delenv(ops.PATH_ENV, raising=False)
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: tuning.Choice(tuned, CFG, "tuned"))
    got = ops.choose_path(8, 128, 1, 4096, "cpu", production=production)
    assert got == want and ops.runs_vllm(got) == want.startswith("vllm")
    monkeypatch.setenv(ops.PATH_ENV, tuned)  # an explicit path is mapped the same way
    assert ops.choose_path(8, 128, 1, 4096, "cpu", production=production) == want


def test_radix_topk_bench_uses_the_shared_harness():
    from smpart.bench import harness, radix_topk_bench

    assert radix_topk_bench.time_graph is harness.time_graph
    assert radix_topk_bench.l2_flush_buffer is harness.l2_flush_buffer
    assert not hasattr(radix_topk_bench, "_flush_buf")
