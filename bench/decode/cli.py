"""``smpart-bench decode``: the command line of the decode loop."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

import torch

from .checking import MismatchError, format_report
from .common import MAX_MODEL_LEN, SUPPORTED_H, V32_PATHS, VENDOR_PATHS
from .config import LoopConfig
from .loop import DecodeLoop
from .report import _env_info, _format_table, summary_table, write_outputs
from .scheduler import RequestMix



def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _kv_int(s: str) -> tuple[str, int]:
    try:
        k, v = s.split("=", 1)
        return k.strip(), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATH=N (an int), got {s!r}") from None


def parse_partition_config(s: str):
    """``KEY=VAL[,KEY=VAL]`` -> ``PartitionConfig`` (ints, ``true``/``false``, ``none``; ``topk_impl``
    takes its name, e.g. ``topk_impl=vllm``).

    Raises
    ------
    ValueError : an unknown key or a malformed pair.
    """
    from smpart.triton_kernels.partitioned import PartitionConfig

    names = {f.name for f in dataclasses.fields(PartitionConfig)}
    kw = {}
    for item in _str_list(s):
        if "=" not in item:
            raise ValueError(f"--partitioned-config: expected KEY=VAL, got {item!r}")
        k, v = (x.strip() for x in item.split("=", 1))
        if k not in names or k == "topk_config":
            raise ValueError(f"--partitioned-config: unknown key {k!r}; choose from {sorted(names - {'topk_config'})}")
        low = v.lower()
        if k == "topk_impl":  # the one str field: PartitionConfig checks the name
            kw[k] = v
        elif low == "none":
            kw[k] = None
        elif low in ("true", "false"):
            kw[k] = low == "true"
        else:
            try:
                kw[k] = int(v) if v.lstrip("+-").isdigit() else float(v)  # gemm_in_tail is a fraction
            except ValueError:
                raise ValueError(f"--partitioned-config: {k}={v!r} is not a number, none, true or false") from None
    return PartitionConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``smpart-bench decode`` argument parser (every option's meaning in its ``help``)."""
    p = argparse.ArgumentParser(
        prog="smpart-bench decode",
        description="Continuous-batching decode loop of the DSV3.2 region: every path against the reference at "
                    "every step, timed per step on a GPU (CUDA graphs per batch bucket).",
        epilog="H200 targets: smpart-bench decode --steps 2000 --max-context 65536 (H=128), then add --heads 32; "
               "MTP: --next-n 2. CPU: a short interpreter loop at H=16 (correctness only).")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default: 200 on a GPU, 20 on the CPU)")
    p.add_argument("--heads", type=int, default=None, choices=SUPPORTED_H,
                   help="MLA heads per rank H (default: 128 on a GPU, 16 on the CPU)")
    p.add_argument("--next-n", type=int, default=1, choices=(1, 2),
                   help="rows per request (2 = one MTP draft token; default 1)")
    p.add_argument("--max-batch", type=int, default=None, help="requests per step (default: 128 GPU, 4 CPU)")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"longest context in tokens, next_n+1..{MAX_MODEL_LEN} (default: 131072 GPU, 3072 CPU)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="cache blocks per path copy (default: max(2*max_context, 16384*max_batch) tokens on a GPU, "
                        "2*max_context on the CPU)")
    p.add_argument("--paths", type=_str_list, default=None,
                   help="paths besides reference (default: sequential,dual_stream,partitioned,vllm_v32,"
                        "vllm_v32_dual_stream on the production model's region, baseline vllm_v32, where DeepGEMM, "
                        "vLLM's ops and its fused_q load; else the generic region with vllm_sequential,"
                        "vllm_dual_stream where they load; CPU: sequential,partitioned)")
    p.add_argument("--stride", type=_kv_int, action="append", default=[], metavar="PATH=N",
                   help="run PATH only every N-th step (its cache copy gets the reference's new bytes otherwise); "
                        "repeatable")
    p.add_argument("--partitioned-config", default=None, metavar="KEY=VAL,...",
                   help="PartitionConfig fields for the partitioned path (default: the tuned/default choice)")
    p.add_argument("--prompt-median", type=float, default=None, help="prompt length median (tokens)")
    p.add_argument("--prompt-sigma", type=float, default=None, help="prompt length log-space sigma")
    p.add_argument("--output-median", type=float, default=None, help="output length median (tokens)")
    p.add_argument("--output-sigma", type=float, default=None, help="output length log-space sigma")
    p.add_argument("--output-max", type=int, default=None, help="output length clip (tokens)")
    p.add_argument("--arrival-peak", type=float, default=None, help="peak arrivals per step (default: auto)")
    p.add_argument("--arrival-period", type=int, default=None, help="steps per arrival wave (default: auto)")
    p.add_argument("--mtp-accept", type=float, default=None,
                   help="MTP draft acceptance probability in [0, 1] (--next-n 2 only; default 0.85)")
    p.add_argument("--tie-free", action="store_true", help="tie-free indexer inputs (exact top-k index sets)")
    p.add_argument("--pad-batches", action="store_true", help="pad eager batches to their bucket too")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs per batch bucket (default: on with CUDA)")
    p.add_argument("--cold-l2", action=argparse.BooleanOptionalAction, default=None,
                   help="read-only L2 flush before each timed run (default: on with CUDA)")
    p.add_argument("--check", choices=("full", "fast"), default=None,
                   help="full = checks.check_region; fast = its vectorized twin (default: fast on GPU, full on CPU)")
    p.add_argument("--check-every", type=int, default=1, help="compare with the reference every N-th step (default 1)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop after the step that passes this many seconds (>= 0) of loop time (outputs still "
                        "written)")
    p.add_argument("--fp32-scales", action="store_true", help="plain fp32 scales instead of UE8M0")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--out", default="decode_out", help="output folder for steps.csv, summary.json, summary.md, "
                   "step_time_vs_batch.png (default decode_out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def v32_baseline(cuda: bool) -> tuple[bool, str]:
    """Can the default baseline ``vllm_v32`` run (``smpart.vendor_v32.v32_available``)? ``(ok, reason)``."""
    if not cuda:
        return False, "no CUDA device"
    from smpart.vendor_v32 import v32_available

    return v32_available()


def config_from_args(a: argparse.Namespace, cuda: bool, v32: tuple[bool, str] | None = None) -> LoopConfig:
    """LoopConfig from parsed CLI options (device-dependent defaults filled in).

    The default baseline is ``vllm_v32`` (vLLM 0.33's production DSV3.2 kernels): with it available
    (``v32``: :func:`v32_baseline`'s answer, computed when None) the default paths are ours plus
    ``vllm_v32*`` and the loop runs the production model's region (``LoopConfig.production``), as it
    does whenever ``--paths`` names a ``vllm_v32*`` path; otherwise the generic region, as before.

    Raises
    ------
    ValueError : a bad option.
    """
    if a.time_budget_s is not None and not (math.isfinite(a.time_budget_s) and a.time_budget_s >= 0):
        raise ValueError(f"--time-budget-s: expected a finite number of seconds >= 0, got {a.time_budget_s!r}")
    if a.mtp_accept is not None and a.next_n != 2:
        raise ValueError(f"--mtp-accept: the MTP draft acceptance applies to --next-n 2 only (got next_n "
                         f"{a.next_n}); drop it or add --next-n 2")
    if a.mtp_accept is not None and not (math.isfinite(a.mtp_accept) and 0.0 <= a.mtp_accept <= 1.0):
        raise ValueError(f"--mtp-accept: expected a probability in [0, 1], got {a.mtp_accept!r}")
    max_context = a.max_context if a.max_context is not None else (131072 if cuda else 3072)
    lo = a.next_n + 1  # one prompt token plus the step's new tokens (LoopConfig.resolved's bound)
    if not isinstance(max_context, int) or not lo <= max_context <= MAX_MODEL_LEN:
        raise ValueError(f"--max-context: expected {lo}..{MAX_MODEL_LEN} (next_n {a.next_n}), got {max_context!r}")
    base = RequestMix() if cuda else RequestMix.small(max_context)
    mix = dataclasses.replace(
        base,
        prompt_max=min(base.prompt_max, max(1, max_context - a.next_n)),
        **{k: v for k, v in (("prompt_median", a.prompt_median), ("prompt_sigma", a.prompt_sigma),
                             ("output_median", a.output_median), ("output_sigma", a.output_sigma),
                             ("output_max", a.output_max)) if v is not None})
    v32_ok = (v32 if v32 is not None else v32_baseline(cuda))[0]
    if cuda:
        paths = ["sequential", "dual_stream", "partitioned"]
        if v32_ok:
            paths += list(V32_PATHS)
        else:
            from smpart.vendor import vendor_available

            if vendor_available()[0]:
                paths += list(VENDOR_PATHS)
    else:
        paths = ["sequential", "partitioned"]  # dual_stream is sequential on one CPU stream
    if a.paths is not None:
        paths = a.paths
        if "reference" in paths:
            raise ValueError("--paths: 'reference' always runs (every path is checked against it); "
                             "name the paths to compare with it")
        if not paths:
            raise ValueError("--paths: name at least one path besides the reference")
    configs = {}
    if a.partitioned_config:
        configs["partitioned"] = parse_partition_config(a.partitioned_config)
        if "partitioned" not in paths:
            raise ValueError("--partitioned-config: the partitioned path is not among --paths")
    strides = {}
    for k, v in a.stride:
        if k in strides:
            raise ValueError(f"--stride: {k!r} given twice")
        strides[k] = v
    return LoopConfig(
        num_heads=a.heads if a.heads is not None else (128 if cuda else 16), next_n=a.next_n,
        steps=a.steps if a.steps is not None else (200 if cuda else 20),
        max_batch=a.max_batch if a.max_batch is not None else (128 if cuda else 4),
        max_context=max_context, num_blocks=a.num_blocks, paths=tuple(paths), strides=strides, configs=configs,
        mix=mix, arrival_peak=a.arrival_peak, arrival_period=a.arrival_period,
        mtp_accept=0.85 if a.mtp_accept is None else a.mtp_accept,
        tie_free=a.tie_free, pad_batches=a.pad_batches,
        graphs=cuda if a.graphs is None else a.graphs, cold_l2=cuda if a.cold_l2 is None else a.cold_l2,
        check=a.check or ("fast" if cuda else "full"), check_every=a.check_every,
        use_ue8m0=not a.fp32_scales, seed=a.seed, device="cuda" if cuda else "cpu",
        production=v32_ok and any(p in V32_PATHS for p in paths),
    )


def prepare_out_dir(out) -> None:
    """Make the output folder ``--out`` now, before any step runs, so that a bad one fails at once.

    Raises
    ------
    ValueError : ``out`` is empty, an existing non-folder, cannot be created, or is not writable
        (the message names ``--out``).
    """
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out!r} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create the folder {out!r} ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out: the folder {out!r} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smpart-bench decode`` and ``python -m smpart.bench.decode``; returns the exit
    status (0 ok, 1 a mismatch, 2 bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.device not in (None, "cpu", "cuda"):
        parser.error(f"--device: expected cuda or cpu, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    want_cuda = a.device != "cpu" and torch.cuda.is_available()
    if want_cuda and os.environ.get("TRITON_INTERPRET") == "1":
        print("smpart-bench decode: TRITON_INTERPRET=1 with a GPU present: running the CPU interpreter loop")
        want_cuda = False
    if not want_cuda and os.environ.get("TRITON_INTERPRET") != "1" and "triton" not in sys.modules:
        # no kernel is decorated yet in this process: the interpreter can still be switched on here
        os.environ["TRITON_INTERPRET"] = "1"
    v32 = v32_baseline(want_cuda)
    try:  # bad options are refused here, before any kernel runs or the command re-runs itself
        cfg = config_from_args(a, want_cuda, v32).resolved()
        prepare_out_dir(a.out)
    except (ValueError, TypeError) as e:  # bad options, or a --partitioned-config value of the wrong type
        print(f"smpart-bench decode: {e}", file=sys.stderr)
        return 2
    if not want_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("smpart-bench decode: no CUDA device; re-running under TRITON_INTERPRET=1", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "smpart.bench.decode", *argv], env=env)
    if want_cuda:
        for pkg in ("tqdm", "matplotlib"):
            try:
                __import__(pkg)
            except ImportError:
                print(f"smpart-bench decode: the '{pkg}' package is missing; pip install -e '.[bench]'",
                      file=sys.stderr)
                return 2
    if not cfg.production and (a.paths is None or any(p in V32_PATHS for p in a.paths)):
        print(f"smpart-bench decode: baseline vllm_v32 unavailable ({v32[1]}); falling back to the generic "
              f"region (baseline vllm_dual_stream, else dual_stream)", flush=True)
    env = _env_info(cfg.device)
    mode = ("CUDA graphs" if cfg.graphs else "eager") if want_cuda else "CPU, Triton interpreter"
    print(f"smpart-bench decode ({mode}): H={cfg.num_heads} next_n={cfg.next_n} steps={cfg.steps} "
          f"max_batch={cfg.max_batch} max_context={cfg.max_context} num_blocks={cfg.num_blocks} "
          f"paths={','.join(('reference',) + tuple(cfg.paths))} region={'production' if cfg.production else 'generic'} "
          f"check={cfg.check}; {env['gpu']}, torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)

    bar = None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and not a.no_progress:
        bar = tqdm(total=cfg.steps, desc="decode", unit="step")

    def progress(step: int, row: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(f"B={row['batch']} max_ctx={row['max_context']} reused={row['blocks_reused_total']}")
            bar.update(1)
        elif not a.no_progress:
            print(f"step {step}: B={row['batch']} max_ctx={row['max_context']}", flush=True)

    loop = DecodeLoop(cfg, progress=progress)
    for p, why in loop.skipped.items():
        print(f"skipped: {p}: {why}")
    if not loop.path_names:
        print(f"smpart-bench decode: no path to compare with the reference: every path of --paths "
              f"{list(cfg.paths)} was skipped here (reasons above); nothing was run", file=sys.stderr)
        return 2
    mismatch = None
    t0 = time.perf_counter()
    try:
        if cfg.graphs:
            print(f"capturing {len(loop.path_names)} paths x {len(loop.buckets)} batch buckets {loop.buckets}",
                  flush=True)
            tc = time.perf_counter()
            loop.capture_all(progress=None if a.no_progress else (lambda msg: print(msg, flush=True)))
            print(f"captured in {time.perf_counter() - tc:.0f} s", flush=True)
        loop.run(time_budget_s=a.time_budget_s)
    except MismatchError as e:
        mismatch = e.report
    finally:
        if bar is not None:
            bar.close()
    for p, why in loop.skipped.items():
        if p not in loop.states and why.startswith("capture"):
            print(f"skipped: {p}: {why}")
    for p, why in loop.failed.items():
        print(f"FAILED: {p}: {why}", file=sys.stderr)
    summary = loop.summary()
    files = write_outputs(a.out, loop, summary, env, mismatch)
    st = loop.stats
    print(f"{st.steps} steps in {time.perf_counter() - t0:.0f} s: batch {st.min_batch_seen}..{st.max_batch_seen}, "
          f"contexts up to {st.max_context_seen}; requests arrived {st.arrived}, finished {st.finished}, "
          f"preempted {st.preempted}; blocks allocated {st.block_allocations}, reused {st.blocks_reused}; stale "
          f"positions in live blocks {st.stale_positions} over {st.steps_with_stale} steps (key bytes an earlier "
          f"owner of a reused block left past a live request's length: no path may let them reach a logit); "
          f"{st.checks} steps checked against the reference")
    if want_cuda:
        print(_format_table(summary_table(summary)))
        if summary["baseline"] is None:
            print("no baseline (vllm_v32 / vllm_dual_stream / dual_stream) was timed: savings not computed")
    else:
        for p, d in summary["paths"].items():
            if "interpreter_s_per_step" in d:
                print(f"{p}: {d['runs']} steps, {d['interpreter_s_per_step']:.1f} s per step under the interpreter")
        print("Timings need a CUDA GPU: run smpart-bench decode on the GPU machine (the timing columns of "
              "summary.md stay empty on a CPU).")
    print("wrote " + ", ".join(files))
    if mismatch:
        print(format_report(mismatch), file=sys.stderr)
        return 1
    compared = [p for p in loop.path_names if st.path_runs.get(p, 0) > 0]
    if not compared or not st.checks:
        print(f"smpart-bench decode: no path was compared with the reference (paths run: {compared or 'none'}, "
              f"steps checked: {st.checks}): no mismatch to report, nothing verified", file=sys.stderr)
        return 1
    print("zero mismatches" + (f"; but {sorted(loop.failed)} could not be captured" if loop.failed else ""))
    return 1 if loop.failed else 0
