"""A fresh user's report (README walk-through): bad inputs refused by name before any work, a
command that compared nothing says so and fails, and the reference clamps out-of-range values as
the kernels do when value checks are off."""

import os

import pytest
import torch

from smpart import PartitionConfig, RegionWorkspace, checks, make_decode_batch, run_region
from smpart.bench import __main__ as grid
from smpart.bench.decode import cli
from smpart.validate import validate_region_args


@pytest.fixture(scope="module")
def batch():
    return make_decode_batch([300, 70], num_heads=16, seed=3)


# -- RegionWorkspace.for_args / validate_region_args: what they are given -------------------------
@pytest.mark.parametrize("fn", [RegionWorkspace.for_args, validate_region_args], ids=["for_args", "validate"])
def test_a_decode_batch_is_refused_with_a_hint(batch, fn):
    with pytest.raises(TypeError, match=r"args: .*DecodeBatch.*pass batch\.args"):
        fn(batch)
    with pytest.raises(TypeError, match=r"args: expected a RegionArgs, got NoneType"):
        fn(None)


@pytest.mark.parametrize("fn", [RegionWorkspace.for_args, validate_region_args], ids=["for_args", "validate"])
@pytest.mark.parametrize("max_len, exc", [("4096", TypeError), (4096.0, TypeError), (True, TypeError),
                                          (0, ValueError), (-64, ValueError)])
def test_max_len_is_checked(batch, fn, max_len, exc):
    with pytest.raises(exc, match="max_len"):
        fn(batch.args, max_len=max_len)


def test_partition_config_needs_a_role():
    with pytest.raises(ValueError, match="config.roles"):
        PartitionConfig(roles=0)
    PartitionConfig(roles=2)  # a subset of the roles stays a benchmark knob


# -- make_decode_batch -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, name", [
    (dict(spare_blocks=-1), ValueError, "spare_blocks"),
    (dict(spare_blocks=1.5), TypeError, "spare_blocks"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=1.0), TypeError, "batch_size"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(seed=0.5), TypeError, "seed"),
    (dict(num_heads=16.0), TypeError, "num_heads"),
    (dict(num_heads=12), ValueError, "num_heads"),
    (dict(next_n=True), TypeError, "next_n"),
    (dict(next_n=3), ValueError, "next_n"),
    (dict(num_padding=True), TypeError, "num_padding"),
    (dict(num_padding=-1), ValueError, "num_padding"),
    (dict(context_lens=[True]), TypeError, r"context_lens\[0\]"),
    (dict(context_lens=[70.0]), TypeError, r"context_lens\[0\]"),
    (dict(context_lens=70.0), TypeError, "context_lens"),
    (dict(device="bogus"), ValueError, "device"),
    (dict(device="meta"), ValueError, "device"),
    (dict(device=0.5), TypeError, "device"),
])
def test_make_decode_batch_refuses_by_name(kw, exc, name):
    kw = dict(dict(context_lens=[70], num_heads=16), **kw)
    with pytest.raises(exc, match=name):
        make_decode_batch(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_make_decode_batch_cuda_without_cuda():
    with pytest.raises(ValueError, match="device: .*no CUDA device"):
        make_decode_batch([70], num_heads=16, device="cuda")


def test_meta_batch_is_refused_naming_the_device(batch):
    a = batch.args.to("meta")
    for path, ws in (("reference", None), ("sequential", RegionWorkspace.for_shape(2, 320, "meta"))):
        with pytest.raises(ValueError, match="device 'meta'"):
            run_region(a, path, workspace=ws)


# -- the reference with value checks off: clamps/masks like the kernels -------------------------------
def _out_of_range(b):
    a = b.clone().args
    a.slot_mapping[0] = 10**6                      # past the cache: skipped
    a.block_table[0, 1] = a.kv_cache.shape[0] + 5  # past the cache: keys read as zero
    a.block_table[1, 0] = -3
    a.positions[1] = 10**6                         # past cos_sin_cache: clamped
    a.positions[0] = -4
    return a


def test_reference_clamps_out_of_range_values_like_the_kernels(batch):
    ref = _out_of_range(batch)
    run_region(ref, "reference", check_values=False)  # no raw IndexError
    out = _out_of_range(batch)
    run_region(out, "sequential", workspace=RegionWorkspace.for_args(out), check_values=False)
    checks.check_region(out, ref, batch)


# -- smpart-bench decode: bad flags, an unwritable --out, nothing compared ------------------------------
@pytest.mark.parametrize("argv, text", [
    (["--time-budget-s", "-1"], "--time-budget-s"),
    (["--time-budget-s", "nan"], "--time-budget-s"),
    (["--mtp-accept", "0.5"], "--mtp-accept"),
    (["--next-n", "2", "--mtp-accept", "1.5"], "--mtp-accept"),
])
def test_decode_bad_flags(argv, text, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_decode_out_is_checked_up_front(capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for out, text in ((str(f), "is not a folder"), (str(f / "sub"), "cannot create")):
        assert cli.main(["--steps", "1", "--no-progress", "--out", out]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and text in err


@pytest.mark.parametrize("paths", ["green_ctx"] + (["vllm_v32"] if not torch.cuda.is_available() else []))
def test_decode_with_no_path_run_fails(paths, capsys, tmp_path):
    if torch.cuda.is_available() and paths == "green_ctx":
        pytest.skip("green_ctx may run with CUDA")
    rc = cli.main(["--paths", paths, "--steps", "1", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 2
    assert "no path to compare" in out.err and "zero mismatches" not in out.out


# -- smpart-bench (grid) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--batch", "1,,2"), ("--heads", "16,"), ("--context", ",4096"),
                                         ("--next-n", "")])
def test_grid_empty_list_items_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        grid.main([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_grid_cpu_says_out_is_not_written(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = grid.build_parser().parse_args(["--paths", "dual_stream", "--out", str(tmp_path / "o")])
    assert grid.sys_argv_for(args)[-2:] == ["--out", str(tmp_path / "o")]  # the interpreter re-run keeps it
    assert grid.cpu_main(args) == 2  # dual_stream is not checked on a CPU: nothing runs
    assert f"nothing is written to --out {tmp_path / 'o'}" in capsys.readouterr().out
