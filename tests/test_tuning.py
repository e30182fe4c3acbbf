"""Cost model and tuning cache (CPU): monotone model, atomic round trip, stale files rejected."""

import dataclasses
import json
import warnings

import pytest

from smpart import cost_model, tuning
from smpart.triton_kernels.partitioned import PartitionConfig

H200 = {"gpu": "NVIDIA H200", "num_sms": 132, "torch": "2.11", "triton": "3.6"}


@pytest.mark.parametrize("H", [128, 32])
@pytest.mark.parametrize("T", [1, 8, 32, 128])
def test_more_context_never_means_fewer_indexer_programs(T, H):
    splits = [cost_model.first_split(264, cost_model.role_bytes(T, H, 1, [L] * T))[0]
              for L in (1, 1024, 4096, 16384, 65536, 163840)]
    assert splits == sorted(splits), splits
    assert 1 <= splits[0] and splits[-1] <= 263


def test_role_bytes_known_values():
    rb = cost_model.role_bytes(1, 128, 1, [4096])
    # 24576 x 1536 FP8 weights + 192 x 12 fp32 scales + q_c/q/k_pe traffic
    assert rb.gemm == 24576 * 1536 + 192 * 12 * 4 + 1536 * 2 + 24576 * 2 + 64 * 4
    assert rb.indexer > 4096 * 132  # the keys plus queries, logits and top-k
    rb2 = cost_model.role_bytes(2, 128, 2, [4096])  # MTP rows share their request's keys
    assert rb2.indexer - rb.indexer < 4096 * 132


def test_predicted_time_falls_then_rises_with_the_split():
    rb = cost_model.role_bytes(32, 128, 1, [8192] * 32)
    times = [cost_model.predict_us(rb, x / 100)[2] for x in range(1, 100)]
    best = min(range(99), key=times.__getitem__)
    assert times[0] > times[best] < times[-1]
    with pytest.raises(ValueError, match="indexer_fraction"):
        cost_model.predict_us(rb, 1.0)
    with pytest.raises(ValueError, match="total_programs"):
        cost_model.first_split(1, rb)


def test_bucket_rounding_and_errors():
    b = tuning.Bucket.of(5, 128, 1, 5000)
    assert (b.num_tokens, b.max_len, b.key) == (8, 8192, "H128-n1-T8-L8192")
    assert tuning.Bucket.of(1, 32, 2, 163840).max_len == 163840
    with pytest.raises(ValueError, match="num_tokens"):
        tuning.Bucket.of(257, 128, 1, 10)
    with pytest.raises(ValueError, match="num_heads"):
        tuning.Bucket.of(1, 12, 1, 10)


def test_cache_round_trip(tmp_path):
    cache = tuning.TuningCache(meta=dict(H200, date="x"))
    b = tuning.Bucket.of(32, 128, 1, 8192)
    cfg = PartitionConfig(indexer_programs=100, gemm_programs=164, dynamic=False, blocks_per_item=8)
    cache.put(b, "partitioned", cfg, {"partitioned": 40.0, "dual_stream": 45.0})
    path = tmp_path / "c.json"
    tuning.save_cache(cache, str(path))
    back = tuning.load_cache(str(path), H200)
    assert back is not None
    got = back.lookup(b)
    assert got.path == "partitioned" and got.source == "tuned"
    assert dataclasses.replace(got.config, topk_config=None) == cfg
    assert back.lookup(tuning.Bucket.of(1, 128, 1, 8192)) is None
    assert not list(tmp_path.glob(".tuning-*"))  # no temporary file left behind


@pytest.mark.parametrize("content,why", [
    ("{not json", "unreadable"),
    (json.dumps({"schema": 99, "meta": H200, "entries": {}}), "unreadable"),
    (json.dumps({"schema": 1, "meta": H200, "entries": {"k": {"path": "warp_speed", "config": {}}}}), "unreadable"),
    (json.dumps({"schema": 1, "meta": H200, "entries": {"k": {"path": "partitioned", "config": {"bogus": 1}}}}),
     "unreadable"),
    (json.dumps({"schema": 1, "meta": dict(H200, gpu="NVIDIA H100 80GB HBM3"), "entries": {}}), "gpu"),
    (json.dumps({"schema": 1, "meta": dict(H200, triton="3.5"), "entries": {}}), "triton"),
    (json.dumps({"schema": 1, "meta": dict(H200, num_sms=114), "entries": {}}), "num_sms"),
])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content, why):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match=why):
        assert tuning.load_cache(str(path), H200) is None


def test_shipped_h200_file_is_valid_and_prefers_the_measured_fastest():
    import os

    path = os.path.join(tuning.TUNED_DIR, "nvidia_h200.json")
    cache = tuning.load_cache(path, H200)
    assert cache is not None and cache.entries
    for key, e in cache.entries.items():
        # candidate names: "sequential", "dual_stream", "partitioned" or "partitioned:<config>"
        own = {p: t for p, t in e["times_us"].items() if p.split(":")[0] in tuning.SMPART_PATHS}
        assert e["path"] == min(own, key=own.get).split(":")[0], key


def test_unseen_bucket_falls_back_to_the_cost_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shipped file matches a CPU process: quietly skipped
        c = tuning.choose(3, 16, 1, 300, device="cpu")
    assert c.source == "model" and c.path == "partitioned"
    assert c.config.indexer_programs >= 1 and c.config.gemm_programs >= 1


def test_unseen_bucket_takes_the_nearest_tuned_choice():
    """A bucket the tuner never measured (here MTP, next_n=2) runs what won at the nearest tuned
    bucket of the same H, not an unmeasured default; the answer is memoized per bucket."""
    cache = tuning.TuningCache(meta=dict(H200))
    fast = PartitionConfig(indexer_programs=7, gemm_programs=257)
    cache.put(tuning.Bucket.of(32, 128, 1, 4096), "dual_stream", fast, {"dual_stream": 40.0, "partitioned": 50.0})
    cache.put(tuning.Bucket.of(1, 128, 1, 65536), "partitioned", fast, {"dual_stream": 90.0, "partitioned": 80.0})
    cache.put(tuning.Bucket.of(32, 32, 2, 4096), "sequential", fast, {"sequential": 30.0})  # other H: not nearest
    got = cache.resolve(tuning.Bucket.of(64, 128, 2, 4096))
    assert got.path == "dual_stream" and got.source == "nearest:H128-n1-T32-L4096"
    assert dataclasses.replace(got.config, topk_config=None) == fast
    assert cache.resolve(tuning.Bucket.of(2, 128, 1, 40000)).source == "nearest:H128-n1-T1-L65536"
    assert cache.resolve(tuning.Bucket.of(32, 128, 1, 4096)).source == "tuned"
    assert cache.resolve(tuning.Bucket.of(32, 16, 1, 4096)).path == "dual_stream"  # no H16 entry: closest shape
    assert tuning.TuningCache(meta=dict(H200)).resolve(tuning.Bucket.of(1, 128, 1, 10)) is None


def test_autotune_candidates_and_dry_run(capsys):
    from smpart.bench import autotune

    cands = autotune.candidates(32, 128, 1, 8192, 132)
    model = tuning.model_config(32, 128, 1, 8192, 132)
    assert cands[0] == model and len(cands) == len(set(cands))
    for c in cands:
        if not c.dynamic:
            assert c.indexer_programs >= 1 and (c.gemm_programs or 1) >= 1
        if c.dense_first:  # one program per logits item; gemm_programs GEMM programs (None = per tile)
            assert c.first_prequant and c.gemm_in_tail == 0.0 and c.maxnreg in (128, 168)
        elif not c.dynamic:
            assert c.indexer_programs + c.gemm_programs == model.indexer_programs + model.gemm_programs
    assert any(c.dynamic for c in cands) and any(c.fuse_topk for c in cands)
    assert not cands[1].dense_first and any(c.dense_first for c in cands)  # T=32: the tail variants first
    big = autotune.candidates(128, 128, 1, 8192, 132)
    assert all(c.dense_first for c in big[1:6]) and len(big) == len(set(big))  # T >= 64: dense-first next
    assert not any(c.fuse_topk and c.gemm_in_tail for c in cands)  # the top-k launch is gone when fused
    assert {c.gemm_in_tail for c in cands} >= {0.0, 0.25, 0.5, 1.0}
    assert autotune.main(["--dry-run", "--batch", "1,8", "--context", "4096", "--heads", "16"]) == 0
    out = capsys.readouterr().out
    assert "H16-n1-T1-L4096" in out and "dual_stream" in out


def test_gemm_in_tail_rule():
    """The model puts the whole GEMM beside the top-k at every shape (the H200 evidence in
    ``cost_model.gemm_in_tail``), and the model config then is a valid tail split."""
    from smpart import cost_model

    for sms in (8, 78, 132):
        for L in (1, 4096, 65536, 163840):
            for T in (1, 2, 8, 32, 64, 128, 256):
                assert cost_model.gemm_in_tail(T, L, sms) == 1.0
    for T in (8, 128):
        cfg = tuning.model_config(T, 128, 1, 4096, 132)
        assert cfg.gemm_in_tail == 1.0 and not cfg.fuse_topk and cfg.tail_prequant


@pytest.mark.parametrize("over,exc,match", [
    (dict(bucket="H128-n1-T32-L8192"), TypeError, "bucket"),
    (dict(bucket=None), TypeError, "bucket"),
    (dict(path=None), TypeError, "path"),
    (dict(path="green_ctx"), ValueError, "path"),
    (dict(config=None), TypeError, "config"),
    (dict(config={"indexer_programs": 100}), TypeError, "config"),
    (dict(model_config={"indexer_programs": 100}), TypeError, "model_config"),
    (dict(times_us=[("partitioned", 40.0)]), TypeError, "times_us"),
    (dict(times_us=None), TypeError, "times_us"),
    (dict(times_us={3: 40.0}), TypeError, "times_us"),
    (dict(times_us={"partitioned": "40"}), TypeError, "times_us"),
    (dict(times_us={"partitioned": True}), TypeError, "times_us"),
    (dict(times_us={"partitioned": float("nan")}), ValueError, "times_us"),
    (dict(times_us={"partitioned": float("inf")}), ValueError, "times_us"),
    (dict(times_us={"partitioned": 0.0}), ValueError, "times_us"),
    (dict(times_us={"partitioned": 40.0, "dual_stream": -1}), ValueError, "times_us"),
])
def test_put_refuses_bad_values_and_stores_nothing(over, exc, match):
    cache = tuning.TuningCache(meta=dict(H200))
    kw = dict(bucket=tuning.Bucket.of(32, 128, 1, 8192), path="partitioned", config=PartitionConfig(),
              times_us={"partitioned": 40.0}, model_config=None)
    kw.update(over)
    with pytest.raises(exc, match=match):
        cache.put(**kw)
    assert cache.entries == {}


def test_put_accepts_int_times_empty_times_and_a_model_config(tmp_path):
    cache = tuning.TuningCache(meta=dict(H200, date="x"))
    b = tuning.Bucket.of(32, 128, 1, 8192)
    cache.put(b, "partitioned", PartitionConfig(), {"partitioned": 40, "dual_stream": 45.5},
              model_config=PartitionConfig(indexer_programs=90, gemm_programs=174))
    cache.put(tuning.Bucket.of(1, 128, 1, 4096), "dual_stream", PartitionConfig(), {})
    path = tmp_path / "c.json"
    tuning.save_cache(cache, str(path))
    raw = json.loads(path.read_text())
    assert raw["entries"][b.key]["times_us"] == {"partitioned": 40, "dual_stream": 45.5}
    assert raw["entries"][b.key]["model_config"]["indexer_programs"] == 90
    assert tuning.load_cache(str(path), H200).lookup(b).path == "partitioned"
