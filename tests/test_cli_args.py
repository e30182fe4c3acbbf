"""Command-line checks: every bad flag is refused by name (exit status 2) before any work."""

import os
import subprocess
import sys

import pytest

from smpart.bench import autotune, kernels
from smpart.bench import decode as dl


# (argv, text the refusal names) per command
AUTOTUNE_BAD = [
    (["--heads", "7", "--dry-run"], "--heads"),
    (["--batch", "0"], "--batch"),
    (["--context", "-5"], "--context"),
    (["--context", "200000"], "--context"),
    (["--batch", "300"], "--batch"),
    (["--batch", "8,300"], "--batch"),
    (["--batch", "200", "--next-n", "1,2"], "--batch"),
    (["--next-n", "3"], "--next-n"),
    (["--replays", "0"], "--replays"),
    (["--budget-s", "0"], "--budget-s"),
    (["--batch", "x"], "--batch"),
]
KERNELS_BAD = [
    (["--shapes", "7x1x4096"], "H=7"),
    (["--shapes", "128x0x4096"], "B=0"),
    (["--shapes", "128x1x0"], "L=0"),
    (["--shapes", "128x1"], "HxBxL"),
    (["--shapes", ","], "at least one"),
    (["--replays", "0"], "--replays"),
]


@pytest.mark.parametrize("main, argv, text", [(autotune.main, *c) for c in AUTOTUNE_BAD]
                         + [(kernels.main, *c) for c in KERNELS_BAD],
                         ids=[f"autotune-{i}" for i in range(len(AUTOTUNE_BAD))]
                         + [f"kernels-{i}" for i in range(len(KERNELS_BAD))])
def test_bad_flags_are_refused_by_name(main, argv, text, capsys):
    """smpart-autotune and ``python -m smpart.bench.kernels``: exit status 2, the flag (or the bad
    part of a shape) named on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert text in capsys.readouterr().err


def test_autotune_help_names_the_out_default_once(capsys):
    with pytest.raises(SystemExit):
        autotune.main(["--help"])
    out = capsys.readouterr().out
    assert out.count("default") >= 6 and "(default: None)" not in out
    assert "smpart/tuned/<gpu>.json" in out


def test_autotune_dry_run_lists_every_bucket(capsys):
    assert autotune.main(["--dry-run", "--batch", "8,128", "--heads", "16", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "2 buckets" in out and "H16-n1-T8-L4096" in out and "H16-n1-T128-L4096" in out


def test_kernels_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128x1x4096,128x32x8192,128x128x16384,32x1x65536)" in out
    assert "replays per kernel" in out and "(default: 40)" in out


@pytest.mark.parametrize("argv", [["--max-context", "1"], ["--max-context", "2", "--next-n", "2"],
                                  ["--max-context", "200000"]])
def test_decode_max_context_bounds_are_one_rule(argv, capsys):
    assert dl.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--max-context: expected" in err
    nn = 2 if "--next-n" in argv else 1
    assert f"{nn + 1}..163840" in err


def test_decode_refuses_a_bad_flag_before_rerunning_itself():
    """Without TRITON_INTERPRET in the environment, a bad option is refused in the first process (no
    "re-running" under the interpreter first)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "smpart.bench", "decode", "--max-batch", "300", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "max_batch: expected 1..256" in out.stderr
    assert "re-running" not in out.stdout
