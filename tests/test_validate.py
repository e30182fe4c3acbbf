"""Bad input: a named ValueError/TypeError before any kernel runs, nothing written (docs/CORRECTNESS.md, "Inputs")."""

import dataclasses

import pytest
import torch

from smpart.triton_kernels import dims
from smpart.batch import make_decode_batch
from smpart.region import run_region
from smpart.validate import validate_region_args


@pytest.fixture(scope="module")
def batch():
    return make_decode_batch([70, 130], num_heads=16, next_n=1, seed=11)


def _with(batch, **kw):
    return dataclasses.replace(batch.clone().args, **kw)


BAD_META = [
    ("q_c", lambda a: a.q_c.float(), TypeError, "q_c"),
    ("q_c", lambda a: a.q_c[:, :1024], ValueError, "q_c"),
    ("q_b_proj_weight", lambda a: a.q_b_proj_weight.view(torch.uint8), TypeError, "q_b_proj_weight"),
    ("q_b_proj_weight", lambda a: a.q_b_proj_weight[:100], ValueError, "q_b_proj_weight"),
    ("q_b_proj_weight_scale", lambda a: a.q_b_proj_weight_scale.double(), TypeError, "q_b_proj_weight_scale"),
    ("positions", lambda a: a.positions.int(), TypeError, "positions"),
    ("cos_sin_cache", lambda a: a.cos_sin_cache.half(), TypeError, "cos_sin_cache"),
    ("k_pe", lambda a: a.k_pe[..., :32], ValueError, "k_pe"),
    ("k_pe", lambda a: torch.empty(2, 1, 128, dtype=torch.bfloat16)[..., ::2], ValueError, "k_pe"),
    ("q", lambda a: a.q.transpose(0, 1).contiguous().transpose(0, 1), ValueError, "q"),
    ("index_q_fp8", lambda a: a.index_q_fp8.view(torch.uint8), TypeError, "index_q_fp8"),
    ("index_weights", lambda a: a.index_weights[:, :32], ValueError, "index_weights"),
    ("index_k", lambda a: a.index_k.float(), TypeError, "index_k"),
    ("kv_cache", lambda a: a.kv_cache.view(-1, 32, 264), ValueError, "kv_cache"),
    ("slot_mapping", lambda a: a.slot_mapping.int(), TypeError, "slot_mapping"),
    ("block_table", lambda a: a.block_table.long(), TypeError, "block_table"),
    ("context_lens", lambda a: a.context_lens[:1], ValueError, "context_lens"),
    ("topk_indices", lambda a: a.topk_indices[:, :1024], ValueError, "topk_indices"),
    ("topk_indices", lambda a: torch.empty(dims.INDEX_TOPK, 2, dtype=torch.int32).T, ValueError, "topk_indices"),
]


@pytest.mark.parametrize("field,make,exc,name", BAD_META, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_META)])
def test_metadata_errors_name_the_argument(batch, field, make, exc, name):
    a = batch.clone().args
    a = dataclasses.replace(a, **{field: make(a)})
    with pytest.raises(exc, match=name):
        validate_region_args(a)


def test_too_many_rows():
    b = make_decode_batch(10, batch_size=dims.T_MAX, num_heads=16)
    a = b.args
    big = dataclasses.replace(a, q_c=torch.cat([a.q_c, a.q_c[:1]]))
    with pytest.raises(ValueError, match="q_c"):
        validate_region_args(big)


def test_next_n_mismatch(batch):
    with pytest.raises(ValueError, match="next_n"):
        validate_region_args(_with(batch, next_n=3))
    with pytest.raises(ValueError, match="block_table"):
        validate_region_args(_with(batch, next_n=2))  # T=2 -> B=1 but block_table has 2 rows


BAD_VALUES = [
    ("context_lens", lambda a: a.context_lens + 1000, "context_lens"),
    ("context_lens", lambda a: a.context_lens - 1000, "context_lens"),
    ("block_table", lambda a: a.block_table + 10_000, "block_table"),
    ("slot_mapping", lambda a: a.slot_mapping - 10_000, "slot_mapping"),
    ("slot_mapping", lambda a: a.slot_mapping + 10**9, "slot_mapping"),
    ("slot_mapping", lambda a: a.slot_mapping.roll(1), "slot_mapping"),
    ("positions", lambda a: a.positions + 10**7, "positions"),
]


@pytest.mark.parametrize("field,make,name", BAD_VALUES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_VALUES)])
@pytest.mark.parametrize("path", ["reference", "sequential"])
def test_value_errors_write_nothing(batch, field, make, name, path):
    from smpart.workspace import RegionWorkspace

    a = batch.clone().args
    a = dataclasses.replace(a, **{field: make(a)})
    before = a.kv_cache.clone(), a.topk_indices.clone(), a.k_pe.clone()
    ws = None if path == "reference" else RegionWorkspace.for_args(batch.args)
    with pytest.raises(ValueError, match=name):
        run_region(a, path=path, workspace=ws)
    assert torch.equal(a.kv_cache, before[0]) and torch.equal(a.topk_indices, before[1])
    assert torch.equal(a.k_pe, before[2]) and a.q.isnan().all()


def test_workspace_too_small(batch):
    from smpart.workspace import RegionWorkspace

    ws = RegionWorkspace.for_shape(2, 64, "cpu")
    with pytest.raises(ValueError, match="context_lens"):
        run_region(batch.clone().args, path="sequential", workspace=ws)
    with pytest.raises(ValueError, match="path"):
        run_region(batch.clone().args, path="fastest")
    with pytest.raises(ValueError, match="workspace"):
        run_region(batch.clone().args, path="sequential")


@pytest.mark.parametrize("max_tokens, max_len, exc, name", [
    (2.0, 64, TypeError, "max_tokens"), (True, 64, TypeError, "max_tokens"), ("2", 64, TypeError, "max_tokens"),
    (0, 64, ValueError, "max_tokens"), (257, 64, ValueError, "max_tokens"),
    (2, 64.0, TypeError, "max_len"), (2, None, TypeError, "max_len"), (2, 0, ValueError, "max_len"), (2, 163841, ValueError, "max_len"),
])
def test_workspace_for_shape_bad_sizes(max_tokens, max_len, exc, name):
    from smpart.workspace import RegionWorkspace

    with pytest.raises(exc, match=name):
        RegionWorkspace.for_shape(max_tokens, max_len, "cpu")


@pytest.mark.parametrize("path", ["partitioned", "sequential"])
def test_workspace_prequant_buffers_checked(batch, path):
    """A workspace whose q_c quant buffers do not fit the batch is refused before any launch
    (the partitioned kernel's first launch would write them past their rows); both None is allowed."""
    from smpart.checks import check_region
    from smpart.triton_kernels.partitioned import PartitionConfig
    from smpart.workspace import RegionWorkspace

    a = batch.clone().args
    T = a.num_tokens
    ws = RegionWorkspace.for_args(a)
    cfg = PartitionConfig(gemm_in_tail=1.0) if path == "partitioned" else None
    bad = [
        (dict(q_c_fp8=ws.q_c_fp8[: T - 1].clone()), ValueError, "workspace.q_c_fp8: expected shape"),
        (dict(q_c_scale=None), ValueError, "pass both"),
        (dict(q_c_fp8=torch.zeros(T, 1536, dtype=torch.bfloat16)), TypeError, "workspace.q_c_fp8: expected"),
        (dict(q_c_scale=torch.zeros(12, T).t()), ValueError, "workspace.q_c_scale: expected a contiguous"),
    ]
    for change, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            run_region(a, path=path, workspace=dataclasses.replace(ws, **change), config=cfg)
    out = batch.clone()
    run_region(out.args, path=path, workspace=dataclasses.replace(ws, q_c_fp8=None, q_c_scale=None), config=cfg)
    ref = batch.clone()
    run_region(ref.args, path="reference")
    check_region(out.args, ref.args, out)


def test_workspace_counters_fit_the_batch():
    """``counters`` holds 64 queue slots and one logits-arrival counter per row: one short of
    ``64 + T`` is refused before any launch (the fused top-k's row counters would run past it)."""
    from smpart.triton_kernels.partitioned import PartitionConfig
    from smpart.workspace import RegionWorkspace

    b = make_decode_batch([4999, 5000], num_heads=16, next_n=2, seed=3)
    a = b.args
    ws = RegionWorkspace.for_shape(a.num_tokens, 5056, "cpu")
    assert RegionWorkspace.num_counters(a.num_tokens) == 64 + a.num_tokens == ws.counters.numel()
    short = ws.counters[: 64 + a.num_tokens - 1].clone()
    before = a.kv_cache.clone()
    with pytest.raises(ValueError, match="workspace.counters"):
        run_region(a, path="partitioned", workspace=dataclasses.replace(ws, counters=short),
                   config=PartitionConfig(first_prequant=True, dense_first=True, fuse_topk=True))
    assert torch.equal(a.kv_cache, before)


@pytest.mark.parametrize("case", ["slots", "block_ids", "lengths"])
@pytest.mark.parametrize("path", ["partitioned"])  # the standalone kernels: test_indexer_cache / test_mqa_logits
def test_bad_values_with_checks_off_stay_in_bounds(case, path, device):
    """What a CUDA graph sees (value checks skipped): out-of-range slots, block ids and lengths
    must not make any kernel touch memory outside its buffers (guard blocks around the cache stay
    as they were), and out-of-range slots write nothing at all."""
    import dataclasses as dc

    from smpart.workspace import RegionWorkspace

    a = make_decode_batch([70, 130], num_heads=16, seed=12, device=device).args
    guard = 2
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 0x7F, (a.kv_cache.shape[0] + 2 * guard, 64, 132), generator=g, dtype=torch.uint8)
    big = big.to(device)
    big[guard:-guard] = a.kv_cache
    ws = RegionWorkspace.for_args(a)
    if case == "slots":
        bad = dict(slot_mapping=torch.tensor([10**9, -5], dtype=torch.int64, device=device))
    elif case == "block_ids":
        bad = dict(block_table=a.block_table + 10_000)
    else:
        bad = dict(context_lens=a.context_lens + 10_000)  # far beyond the table and the workspace
    a = dc.replace(a, kv_cache=big[guard:-guard], **bad)
    before = big.clone()
    run_region(a, path=path, workspace=ws, check_values=False)
    assert torch.equal(big[:guard], before[:guard]) and torch.equal(big[-guard:], before[-guard:])
    if case == "slots":
        assert torch.equal(big, before)  # no valid slot: nothing written anywhere
    assert not a.q.isnan().any()
    cap = a.block_table.shape[1] * 64
    assert ((a.topk_indices >= -1) & (a.topk_indices < cap)).all()


def test_duplicate_slots_are_rejected():
    b = make_decode_batch([130, 130], num_heads=16, seed=4)
    a = b.clone().args
    a.block_table[1] = a.block_table[0]
    a.slot_mapping[1] = a.slot_mapping[0]
    with pytest.raises(ValueError, match="slot_mapping: slot .* more than one row"):
        validate_region_args(a)


@pytest.mark.parametrize("next_n", [1.0, True, torch.tensor(1)])
def test_next_n_must_be_an_int(batch, next_n):
    with pytest.raises(TypeError, match="next_n"):
        validate_region_args(_with(batch, next_n=next_n))


def test_workspace_type_and_interpreter_hint(batch, monkeypatch):
    with pytest.raises(TypeError, match="workspace"):
        run_region(batch.clone().args, path="sequential", workspace="big")
    if torch.cuda.is_available():
        return
    from smpart.workspace import RegionWorkspace

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = batch.clone().args
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run_region(a, path="sequential", workspace=RegionWorkspace.for_args(a))


def test_args_and_config_types(batch):
    from smpart.workspace import RegionWorkspace

    a = batch.clone().args
    with pytest.raises(TypeError, match="args: expected a RegionArgs"):
        run_region(dataclasses.asdict(a), path="sequential", workspace=RegionWorkspace.for_args(a))
    if torch.cuda.is_available():
        a = dataclasses.replace(a).to("cuda")
    elif __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    before = a.kv_cache.clone()
    with pytest.raises(TypeError, match="config: expected a PartitionConfig"):
        run_region(a, path="partitioned", workspace=RegionWorkspace.for_args(a), config="fast")
    from smpart.triton_kernels.partitioned import PartitionConfig

    for bad, err, name in BAD_CONFIGS:
        with pytest.raises(err, match=name):
            PartitionConfig(**bad)
    from smpart.triton_kernels.radix_topk import RadixTopkConfig

    for bad in (dict(chunk=3000), dict(chunk=1024), dict(short_max=65536), dict(num_warps=3), dict(hist_warps=0)):
        with pytest.raises(ValueError, match=f"config.{next(iter(bad))}"):
            RadixTopkConfig(**bad)
    for bad in (dict(chunk=4096.0), dict(num_warps=True), dict(sample=None), dict(bits="4")):
        with pytest.raises(TypeError, match=f"config.{next(iter(bad))}"):
            RadixTopkConfig(**bad)
    # the partitioned path's top-k config must be a radix_topk.RadixTopkConfig, refused when the
    # config is made, naming the field
    with pytest.raises(TypeError, match="topk_config"):
        PartitionConfig(topk_config=dict(chunk=4096))
    assert torch.equal(a.kv_cache, before)


BAD_CONFIGS = [
    (dict(gemm_in_tail=1.5), ValueError, "gemm_in_tail"),
    (dict(gemm_in_tail=float("nan")), ValueError, "gemm_in_tail"),
    (dict(gemm_in_tail="1"), TypeError, "gemm_in_tail"),
    (dict(gemm_in_tail=0.5, fuse_topk=True), ValueError, "fuse_topk"),
    (dict(tail_block_n=96), ValueError, "tail_block_n"),
    (dict(tail_block_n=128.0), ValueError, "tail_block_n"),
    (dict(tail_gemm_programs=0), ValueError, "tail_gemm_programs"),
    (dict(tail_gemm_programs=2.5), TypeError, "tail_gemm_programs"),
    (dict(tail_prequant=1), TypeError, "tail_prequant"),
    (dict(first_programs=0), ValueError, "first_programs"),
    (dict(first_programs=4.0), TypeError, "first_programs"),
    (dict(first_prequant=1), TypeError, "first_prequant"),
    (dict(dense_first="yes"), TypeError, "dense_first"),
    (dict(dense_first=True, dynamic=True), ValueError, "dense_first"),
    (dict(maxnreg=16), ValueError, "maxnreg"),
    (dict(maxnreg=64), ValueError, "maxnreg"),  # ptxas cannot compile the GEMM tile under ~90
    (dict(maxnreg=256), ValueError, "maxnreg"),
    (dict(maxnreg=128.0), TypeError, "maxnreg"),
    (dict(maxnreg=True), TypeError, "maxnreg"),
    (dict(dense_first=True, gemm_programs=0), ValueError, "gemm_programs"),
    (dict(topk_config="fast"), TypeError, "topk_config"),
    (dict(indexer_programs=0), ValueError, "indexer_programs"),
    (dict(gemm_programs=-1), ValueError, "gemm_programs"),
    (dict(block_n=32), ValueError, "block_n"),
    (dict(blocks_per_item=3), ValueError, "blocks_per_item"),
    (dict(num_warps=3), ValueError, "num_warps"),
    (dict(block_t=8), ValueError, "block_t"),
    (dict(roles=16), ValueError, "roles"),
    (dict(dynamic=1), TypeError, "dynamic"),
    (dict(queue_chunk=0), ValueError, "queue_chunk"),
]


def test_interpreter_set_after_import_is_named(batch, monkeypatch):
    """Kernels defined without the interpreter cannot run CPU tensors even if TRITON_INTERPRET=1 is
    set later: a RuntimeError says so (not an error from inside Triton)."""
    from smpart import region
    from smpart.workspace import RegionWorkspace

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(region, "_kernels_interpreted", lambda: False)
    a = batch.clone().args
    with pytest.raises(RuntimeError, match="set after triton's kernels were defined"):
        run_region(a, path="sequential", workspace=RegionWorkspace.for_args(a))


def test_zero_length_row_writing_a_slot_is_named():
    b = make_decode_batch([70, 130], num_heads=16, num_padding=1, seed=2)
    a = b.clone().args
    a.slot_mapping[1] = 5  # the padding row (length 0) writes a real slot
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 0 leaves no new token"):
        validate_region_args(a)


@pytest.mark.parametrize("lens,exc", [([300.5, 300], TypeError), ([True], TypeError)])
def test_make_decode_batch_rejects_non_int_lengths(lens, exc):
    with pytest.raises(exc, match=r"context_lens\[0\]"):
        make_decode_batch(lens, num_heads=16)
