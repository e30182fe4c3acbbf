"""Unit tests of the decode loop's pieces (``bench/decode/``): the block allocator, the request mix,
the batch buckets, option checks (``LoopConfig``, the CLI), the prefill key quantization and the
vectorized output check (``fast_check_region`` against ``smpart.bench.__main__.check_path``).

The loop itself (stand-in paths, the production region, the interpreter loops, GPU) is in
``test_decode_loop.py``.
"""

import numpy as np
import pytest
import torch

from smpart.bench import decode as dl
from smpart.bench.decode import BlockAllocator, LoopConfig, OutOfBlocksError, RequestMix

# --------------------------------------------------------------------------------------
# block allocator
# --------------------------------------------------------------------------------------
def test_allocator_fifo_order_null_block_and_reuse():
    a = BlockAllocator(6)  # block 0 is the null block: 5 usable
    assert a.num_free == 5 and a.num_used == 0
    x = a.allocate(2, owner="x")
    y = a.allocate(2, owner="y")
    assert x == [1, 2] and y == [3, 4] and 0 not in x + y
    assert a.owner(1) == "x" and a.owner(4) == "y" and a.owner(5) is None and a.owner(0) is None
    a.free(x, owner="x")  # back to the tail, last block first (vLLM frees in reverse order)
    assert a.num_free == 3 and a.num_reused == 0
    z = a.allocate(3, owner="z")
    assert z == [5, 2, 1]  # the never-used block first (FIFO), then x's blocks, tail first
    assert a.num_reused == 2 and a.num_allocations == 7
    assert a.owner(2) == "z"


def test_allocator_out_of_blocks_takes_nothing():
    a = BlockAllocator(4)
    a.allocate(2, owner=0)
    with pytest.raises(OutOfBlocksError, match="needs 2, 1 free"):
        a.allocate(2, owner=1)
    assert a.num_free == 1  # nothing was taken
    assert isinstance(OutOfBlocksError("x"), RuntimeError)


def test_allocator_rejects_bad_frees_and_sizes():
    a = BlockAllocator(4)
    b = a.allocate(1, owner="r")
    with pytest.raises(ValueError, match="not owned by request 's'"):
        a.free(b, owner="s")
    a.free(b, owner="r")
    with pytest.raises(ValueError, match="not owned"):
        a.free(b, owner="r")  # double free
    with pytest.raises(ValueError, match="not owned"):
        a.free([0], owner="r")  # the null block
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(1)
    with pytest.raises(ValueError, match="n: expected >= 0"):
        a.allocate(-1, owner="r")


# --------------------------------------------------------------------------------------
# request mix
# --------------------------------------------------------------------------------------
def test_request_mix_seeded_and_within_bounds():
    mix = RequestMix()
    p1, o1 = mix.sample(np.random.default_rng(7), 20000)
    p2, o2 = mix.sample(np.random.default_rng(7), 20000)
    assert np.array_equal(p1, p2) and np.array_equal(o1, o2)
    assert p1.dtype == np.int64 and p1.min() >= 1 and p1.max() <= 131072
    assert o1.min() >= 1 and o1.max() <= 4096
    # heavy at a few thousand, spanning short prompts to the 128K clip
    assert 2500 <= np.median(p1) <= 3500
    assert (p1 < 100).any() and (p1 == 131072).any() and (p1 > 20000).mean() > 0.05
    p3, _ = mix.sample(np.random.default_rng(8), 100)
    assert not np.array_equal(p1[:100], p3)


def test_request_mix_small_and_validation():
    mix = RequestMix.small(2560)
    p, o = mix.sample(np.random.default_rng(0), 5000)
    assert p.min() >= 1 and p.max() <= 2560 - 64 and o.max() <= 48
    with pytest.raises(ValueError, match="prompt_median"):
        RequestMix(prompt_median=0).validate()
    with pytest.raises(ValueError, match="output_min/output_max"):
        RequestMix(output_min=5, output_max=4).validate()
    with pytest.raises(ValueError, match="prompt_min/prompt_max"):
        RequestMix(prompt_max=200000).validate()


def test_buckets():
    assert dl.batch_buckets(1) == [1]
    assert dl.batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert dl.batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert dl.bucket_for(3, dl.batch_buckets(4)) == 4 and dl.bucket_for(33, dl.batch_buckets(48)) == 48
    for bad in (0, -4):
        with pytest.raises(ValueError, match="max_batch"):
            dl.batch_buckets(bad)
    for bad in (True, 4.0, "4", None):
        with pytest.raises(TypeError, match="max_batch"):
            dl.batch_buckets(bad)


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=24), "num_heads"),
    (dict(next_n=3), "next_n"),
    (dict(max_batch=129, next_n=2), "max_batch"),
    (dict(max_context=200000), "max_context"),
    (dict(max_context=4096, num_blocks=64), "num_blocks"),
    (dict(paths=("sequential", "fastest")), "paths: unknown"),
    (dict(strides={"dual_stream": 2}), "strides"),
    (dict(strides={"sequential": 0}), "strides"),
    (dict(check="approx"), "check"),
    (dict(graphs=True), "graphs"),
    (dict(mtp_accept=1.5), "mtp_accept"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_loop_config_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        LoopConfig(**kw).resolved()


def test_cli_bad_option_exits_2(capsys):
    assert dl.main(["--max-batch", "300", "--no-progress"]) == 2
    assert dl.main(["--partitioned-config", "block_m=3", "--no-progress"]) == 2
    assert dl.main(["--partitioned-config", "gemm_in_tail=half", "--no-progress"]) == 2
    assert dl.main(["--partitioned-config", "dynamic=1", "--no-progress"]) == 2  # a TypeError from the config
    assert dl.parse_partition_config("gemm_in_tail=0.5,tail_block_n=256").gemm_in_tail == 0.5
    assert dl.main(["--paths", "reference", "--no-progress"]) == 2  # the reference always runs
    with pytest.raises(SystemExit):
        dl.main(["--heads", "7"])


# --------------------------------------------------------------------------------------
# prefill quantization, vectorized check
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "fp32"])
def test_prefill_bytes_equal_reference_cache_write(ue8m0):
    from smpart import reference

    g = torch.Generator().manual_seed(3)
    keys = (torch.randn(200, 128, generator=g) * torch.rand(200, 1, generator=g) * 5).to(torch.bfloat16)
    keys[7] = 0  # amax below the 1e-4 floor
    slots = torch.randperm(10 * 64, generator=g)[:200].long()
    want = torch.zeros(10, 64, 132, dtype=torch.uint8)
    reference.indexer_k_quant_and_cache(keys, want, slots, use_ue8m0=ue8m0)
    got = torch.zeros_like(want)
    dl.write_keys(got, slots, *dl.quantize_keys(keys, ue8m0))
    assert torch.equal(got, want)


def _check_pair(path, out, want, tie_free):
    """(full message or None, fast message or None)."""
    import types

    from smpart.bench.__main__ import check_path
    from smpart import checks, reference

    l64 = dl.reference_logits64(want)
    msgs = []
    try:
        check_path(path, out, want, types.SimpleNamespace(tie_free=tie_free), l64)
        msgs.append(None)
    except AssertionError as e:
        msgs.append(str(e))
    tol = None if tie_free else checks.logits_tolerance(want, reference.visible_lens(want.context_lens, want.next_n))
    try:
        dl.fast_check_region(path, out, want, l64, tol, tie_free)
        msgs.append(None)
    except AssertionError as e:
        msgs.append(str(e))
    return msgs


def _corrupt(kind, a, lens, logits64):
    """Corrupt RegionArgs ``a`` (outputs of a correct run) in place."""
    if kind == "pad":
        a.topk_indices[0, 2047] = 3  # row 0 sees < 2048 positions: its last column must be -1
    elif kind == "range":
        a.topk_indices[1, 0] = int(lens[1])
    elif kind == "dup":
        a.topk_indices[1, 1] = a.topk_indices[1, 0]
    elif kind == "value":
        t = int(torch.argmax(lens))  # a row longer than 2048: swap in its lowest-logit position
        a.topk_indices[t, 5] = int(torch.argmin(logits64[t, : int(lens[t])]))
    elif kind == "cache":
        a.kv_cache.view(-1)[12345] ^= 1
    elif kind == "k_pe":
        a.k_pe.view(torch.int16)[1, 0, 3] += 1
    elif kind == "q_nan":
        a.q[1, 2, 3] = float("nan")
    elif kind == "q":
        a.q[0] *= 1.5


@pytest.mark.parametrize("tie_free", [False, True], ids=["random", "tiefree"])
@pytest.mark.parametrize("kind", [None, "pad", "range", "dup", "value", "cache", "k_pe", "q_nan", "q"])
def test_fast_check_agrees_with_check_region(kind, tie_free):
    from smpart import reference
    from smpart.batch import make_decode_batch
    from smpart.region import run_region

    b = make_decode_batch([70, 300, 2300], num_heads=16, next_n=2, num_padding=0, tie_free=tie_free, seed=5)
    run_region(b.args, "reference")
    want = b.args
    out = b.clone().args
    lens = reference.visible_lens(want.context_lens, want.next_n)
    if kind is not None:
        _corrupt(kind, out, lens, dl.reference_logits64(want))
    full, fast = _check_pair("sequential", out, want, tie_free)
    if kind is None:
        assert full is None and fast is None
    else:
        assert full is not None and fast is not None, (full, fast)
        assert full.split(":")[0] == fast.split(":")[0], (full, fast)  # same output, same row
        if kind == "value" and tie_free:
            assert "index set differs" in fast or "has logit" in fast
