"""``smpart-bench``: time every path of the region on a grid of decode shapes (method: docs/RESULTS.md).

For each shape (H, B, context, next_n): one ``make_decode_batch`` on the GPU, one
``RegionWorkspace``; the ``reference`` path's outputs; then for each requested path: one eager run
on a clone checked against the reference (``checks.check_region``; a failure marks the path
FAILED for that shape and it is not timed), then the CUDA-graph timing of
:func:`smpart.bench.harness.time_graph` with a read-only L2 flush before each replay. Paths that
raise ``RuntimeError`` (unavailable here: no DeepGEMM, no green contexts, not built yet) are
listed as skipped with the reason.

Outputs under ``--out``: ``results.csv`` (rows appended: GPU, versions, date, shape, path, status,
median/p10/p90 us, floor us, ratio to the dual-stream baseline, ratio to the floor, GB/s),
``results.md`` (this run's table) and ``latency.png`` (latency vs batch per context length, one
line per path, the floor dashed).

Without CUDA: runs the interpreter comparison of ``sequential`` (and ``partitioned`` when
registered) against ``reference`` at one small shape (H=16, B=2, context 300) under
``TRITON_INTERPRET=1`` (re-running itself in a subprocess with it set if needed), says that
timings need a GPU, and exits 0 (1 if a path gives wrong results).
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import datetime
import itertools
import os
import subprocess
import sys
import time

from smpart.bench.common import VENDOR_PATHS, _unavailable, check_path  # noqa: F401 - check_path is used by tests

DEFAULT_PATHS = "sequential,dual_stream,partitioned,vllm_sequential,vllm_dual_stream"
CPU_PATHS = ("sequential", "partitioned")
V32_PATHS = ("vllm_v32", "vllm_v32_dual_stream")  # vLLM's production DSV3.2 model (smpart.vendor_v32)
AUTO = "auto"  # the runtime's dispatch (tuning.choose) for each shape
# ``partitioned+<variant>``: the bucket's partitioned config (tuned, else the cost model's) with one change
PATH_VARIANTS = {
    "radix": "the radix (histogram) top-k instead of the sampled one (topk_config.algo='radix')",
    "vllmtopk": "vLLM's own top-k after the fused launch (topk_impl='vllm', standalone split)",
}


def variant_config(variant: str, config):
    """The ``PartitionConfig`` of path ``partitioned+<variant>`` (:data:`PATH_VARIANTS`) from the
    bucket's ``config`` (None: the defaults). Raises ValueError for an unknown variant."""
    from smpart.triton_kernels.partitioned import PartitionConfig
    from smpart.triton_kernels.radix_topk import RadixTopkConfig

    cfg = config if isinstance(config, PartitionConfig) else PartitionConfig()
    if variant == "radix":
        return dataclasses.replace(cfg, topk_config=dataclasses.replace(cfg.topk_config or RadixTopkConfig(),
                                                                        algo="radix"))
    if variant == "vllmtopk":
        return dataclasses.replace(cfg, topk_impl="vllm", fuse_topk=False, gemm_in_tail=0.0)
    raise ValueError(f"--paths: unknown variant partitioned+{variant}; choose from {sorted(PATH_VARIANTS)}")
CPU_SHAPE = dict(num_heads=16, batch_size=2, context=300, next_n=1)

CSV_FIELDS = [
    "gpu", "torch", "triton", "deep_gemm", "date", "num_heads", "batch_size", "context", "next_n", "num_tokens",
    "path", "status", "median_us", "p10_us", "p90_us", "floor_us", "baseline_path", "ratio_to_baseline",
    "ratio_to_floor", "gbps", "floor_bytes", "copy_bw_gbps", "replays", "note",
]


def _items(s: str) -> list[str]:
    """Comma-separated items, stripped; an empty item (``1,,2``, a trailing comma) is an error."""
    items = [x.strip() for x in s.split(",")]
    if not s.strip() or any(not x for x in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated values with none empty, got {s!r}")
    return items


def _int_list(s: str) -> list[int]:
    items = _items(s)
    try:
        return [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


MIXED = "mixed"


def _context_list(s: str) -> list:
    """Context lengths, or ``mixed``: per-request lengths drawn by :func:`mixed_lens`."""
    out = []
    for x in _items(s):
        if x == MIXED:
            out.append(MIXED)
            continue
        try:
            out.append(int(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers or '{MIXED}', got {s!r}") from None
    return out


def mixed_lens(batch_size: int, next_n: int, seed: int = 0) -> list[int]:
    """Mixed context lengths of one batch: log-uniform in [256, 65536] (seeded by B and ``seed``),
    with the first request at 65536 so the shape bucket is the 64K one. Returns ``B`` ints."""
    import random

    rng = random.Random(seed * 1000 + batch_size)
    lens = [65536] + [int(round(2 ** rng.uniform(8, 16))) for _ in range(batch_size - 1)]
    return [max(L, next_n) for L in lens]


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smpart-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="The decode loop: smpart-bench decode [options] (smpart-bench decode --help).")
    p.add_argument("--batch", type=_int_list, default="1,8,32", help="batch sizes B")
    p.add_argument("--context", type=_context_list, default="4096,16384",
                   help="context lengths (vLLM seq_lens); 'mixed' = per-request lengths log-uniform in 256..64K")
    p.add_argument("--heads", type=_int_list, default="128,32", help="MLA heads per rank H")
    p.add_argument("--next-n", type=_int_list, default="1", help="rows per request (1, 2)")
    p.add_argument("--paths", type=_str_list, default=DEFAULT_PATHS,
                   help="paths to run; 'auto' = the path and config the runtime dispatches to for the shape "
                        "(smpart.tuning.choose); 'partitioned+radix' / 'partitioned+vllmtopk' = the bucket's "
                        "partitioned config with the radix top-k / vLLM's top-k after the fused launch")
    p.add_argument("--replays", type=int, default=50, help="timed CUDA-graph replays per path (>= 30 advised)")
    p.add_argument("--out", default="bench_out", help="output folder (CSV appended, MD and PNG rewritten)")
    p.add_argument("--seed", type=int, default=0, help="make_decode_batch seed")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check before timing")
    p.add_argument("--fp32-scales", action="store_true", help="plain fp32 scales instead of UE8M0")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the harness's own tests
    return p


def _require(pkg: str):
    import importlib

    try:
        return importlib.import_module(pkg)
    except ImportError:
        raise SystemExit(f"smpart-bench: the '{pkg}' package is missing; install the bench extra: "
                         "pip install -e '.[bench]' (tqdm, tabulate, matplotlib)") from None


# --------------------------------------------------------------------------------------
# correctness check shared by the GPU and CPU modes
# --------------------------------------------------------------------------------------
def _reference_logits64(args):
    """float64 reference logits of the (post-write) cache, computed once per shape for every check."""
    import torch

    from smpart import reference

    lens = reference.visible_lens(args.context_lens, args.next_n)
    max_len = max(int(lens.max()), 1)
    return reference.paged_mqa_logits(args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table,
                                      args.context_lens, args.next_n, max_len, dtype=torch.float64)


def _load_paths() -> str | None:
    """Import every path's implementation (``region.load_path``); returns the errors' text, else ``None``."""
    from smpart import region

    errors = []
    for name in region.PATHS:
        try:
            region.load_path(name)
        except Exception as e:  # noqa: BLE001 - a module that cannot load must not stop the bench
            errors.append(f"{name}: {type(e).__name__}: {e}")
    return "; ".join(errors) or None


def _registered(path: str) -> bool:
    """Can ``path``'s implementation be imported here?"""
    from smpart import region

    try:
        region.load_path(path)
    except Exception:  # noqa: BLE001 - reported by _load_paths
        return False
    return True


# --------------------------------------------------------------------------------------
# CPU mode
# --------------------------------------------------------------------------------------
def cpu_main(args) -> int:
    """Interpreter correctness of the Triton paths at one small shape; no timings."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        print("smpart-bench: no CUDA device; re-running under TRITON_INTERPRET=1", flush=True)
        return subprocess.call([sys.executable, "-m", "smpart.bench", *sys_argv_for(args)], env=env)

    from smpart import region
    from smpart.batch import make_decode_batch

    err = _load_paths()
    if err:
        print(f"smpart-bench: path modules did not import ({err})")
    print(f"smpart-bench (CPU): nothing is written to --out {args.out} (results.csv/md, latency.png hold GPU "
          f"timings; a CPU checks correctness only)", flush=True)
    shape = CPU_SHAPE
    cpu_paths = [p for p in CPU_PATHS if p in args.paths]
    gpu_only = [p for p in args.paths if p not in CPU_PATHS]
    if gpu_only and cpu_paths:
        print(f"smpart-bench (CPU): not checked here (GPU only): {gpu_only}", flush=True)
    if not cpu_paths:
        print(f"smpart-bench (CPU): none of --paths {args.paths} runs without a GPU (CPU mode checks "
              f"{list(CPU_PATHS)}); nothing was checked")
        return 2
    print(f"smpart-bench (CPU, interpreter): H={shape['num_heads']} B={shape['batch_size']} "
          f"context={shape['context']} next_n={shape['next_n']} (the grid flags --batch/--context/--heads/"
          f"--next-n/--replays apply on a GPU)", flush=True)
    batch = make_decode_batch(shape["context"], shape["batch_size"], num_heads=shape["num_heads"],
                              next_n=shape["next_n"], use_ue8m0=not args.fp32_scales, seed=args.seed, device="cpu")
    ref = batch.clone()
    region.run_region(ref.args, "reference", use_ue8m0=batch.use_ue8m0)
    logits64 = _reference_logits64(ref.args)
    failed = 0
    for path in cpu_paths:
        if not _registered(path):
            print(f"skipped: {path} (not registered{'; ' + err if err else ''})", flush=True)
            continue
        out = batch.clone()
        t0 = time.perf_counter()
        try:
            from smpart.workspace import RegionWorkspace

            ws = RegionWorkspace.for_args(out.args)
            region.run_region(out.args, path, workspace=ws, use_ue8m0=batch.use_ue8m0)
        except Exception as e:  # noqa: BLE001 - report every path, whatever one of them raises
            if _unavailable(e):
                print(f"skipped: {path} ({e})", flush=True)
            else:
                failed += 1
                print(f"FAILED: {path}: raised {type(e).__name__}: {e}", flush=True)
            continue
        try:
            check_path(path, out.args, ref.args, batch, logits64)
        except AssertionError as e:
            failed += 1
            print(f"FAILED: {path}: {e}", flush=True)
            continue
        print(f"{path}: OK (matches reference; {time.perf_counter() - t0:.1f} s under the interpreter)", flush=True)
    print("Timings need a CUDA GPU: run smpart-bench on the GPU machine.")
    return 1 if failed else 0


def check_grid_args(parser: argparse.ArgumentParser, args) -> None:
    """Reject grid values no path can run (``parser.error``: usage line, exit status 2), in both
    the GPU and the CPU mode: unknown paths, H not in 128/64/32/16, B < 1, ``B * next_n > 256``,
    next_n not 1/2, contexts outside 1..163840, replays < 1."""
    from smpart.triton_kernels import dims
    from smpart.region import PATHS

    variants = [f"partitioned+{v}" for v in PATH_VARIANTS]
    bad = [p for p in args.paths if (p not in PATHS and p != AUTO and p not in variants) or p == "reference"]
    if bad or not args.paths:
        parser.error(f"--paths: unknown {bad}; choose from {[p for p in PATHS if p != 'reference'] + [AUTO]}"
                     f" + {variants}")
    if not args.heads or any(h not in dims.SUPPORTED_H for h in args.heads):
        parser.error(f"--heads: expected values in {dims.SUPPORTED_H}, got {args.heads}")
    if not args.next_n or any(n not in dims.SUPPORTED_NEXT_N for n in args.next_n):
        parser.error(f"--next-n: expected values in {dims.SUPPORTED_NEXT_N}, got {args.next_n}")
    if not args.batch or any(b < 1 or b * max(args.next_n) > dims.T_MAX for b in args.batch):
        parser.error(f"--batch: expected 1 <= B and B * next_n <= {dims.T_MAX}, got {args.batch}")
    if not args.context or any(c != MIXED and not 1 <= c <= dims.MAX_MODEL_LEN for c in args.context):
        parser.error(f"--context: expected lengths in 1..{dims.MAX_MODEL_LEN} or '{MIXED}', got {args.context}")
    if args.replays < 1:
        parser.error(f"--replays: expected >= 1, got {args.replays}")


def sys_argv_for(args) -> list[str]:
    """The CLI arguments reproducing ``args`` (for the interpreter re-run)."""
    out = ["--paths", ",".join(args.paths), "--seed", str(args.seed), "--out", args.out]
    if args.fp32_scales:
        out.append("--fp32-scales")
    return out


# --------------------------------------------------------------------------------------
# GPU mode
# --------------------------------------------------------------------------------------
def _env_info() -> dict:
    import torch
    import triton

    from smpart.vendor import deep_gemm_version

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "deep_gemm": deep_gemm_version() or "n/a",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def auto_dispatch(choice, production: bool) -> tuple[str, object]:
    """``(path, config)`` for ``run_region`` of the ``auto`` path's tuning choice (``smpart.tuning.Choice``).

    The file keeps each bucket's best partitioned config whatever path won, so the config is passed
    only to ``partitioned`` (:attr:`Choice.run_config`); ``green_ctx`` (whose config is an SM-count
    tuple) and every other path get ``None``, their default. A pick of vLLM's own computation runs
    the region's vendor path (``tuning.path_for_region``: ``vllm_v32*`` when ``production``, the
    generic ``vllm_sequential`` / ``vllm_dual_stream`` otherwise)."""
    from smpart import tuning

    path = tuning.path_for_region(choice.path, production) if choice.path in tuning.VENDOR_PATHS else choice.path
    return path, choice.run_config


def _fmt(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def gpu_main(args) -> int:
    import torch

    tqdm = _require("tqdm").tqdm
    tabulate = _require("tabulate").tabulate
    _require("matplotlib")

    from smpart.bench.harness import copy_bandwidth, floor_bytes, l2_flush_buffer, time_graph
    from smpart import region
    from smpart.batch import make_decode_batch
    from smpart.workspace import RegionWorkspace

    err = _load_paths()
    if err:
        print(f"smpart-bench: some path modules did not import ({err})")
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    env = _env_info()
    flush = l2_flush_buffer(dev)
    bw = copy_bandwidth(dev)
    print(f"{env['gpu']}: copy bandwidth {bw / 1e9:.0f} GB/s; L2 flush sweeps {flush.nbytes / 2**20:.0f} MiB; "
          f"torch {env['torch']}, triton {env['triton']}, DeepGEMM {env['deep_gemm']}", flush=True)

    shapes = list(itertools.product(args.heads, args.next_n, args.context, args.batch))
    rows = []
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(shapes) * len(args.paths), desc="smpart-bench", unit="run")
    for H, next_n, ctx, B in shapes:
        shape = dict(num_heads=H, batch_size=B, context=ctx, next_n=next_n, num_tokens=B * next_n)
        try:
            lens = mixed_lens(B, next_n, args.seed) if ctx == MIXED else ctx
            batch = make_decode_batch(lens, B, num_heads=H, next_n=next_n, use_ue8m0=not args.fp32_scales,
                                      seed=args.seed, device=dev)
        except (ValueError, TypeError) as e:
            tqdm.write(f"shape {shape}: not built ({e})")
            bar.update(len(args.paths))
            continue
        ws = RegionWorkspace.for_args(batch.args)
        # with a vllm_v32* path selected, every path but vLLM's generic baselines runs the production
        # model's region (smpart.prep: index-q prep from bf16 index_q, keys and fill already done)
        modes = {"generic": batch}
        if any(p in V32_PATHS for p in args.paths):
            from smpart.prep import to_production

            modes["v32"] = dataclasses.replace(batch, args=to_production(batch.args, batch.use_ue8m0, args.seed))
        refs = {}
        for mode, mb in modes.items():
            r = mb.clone()
            if not args.no_check:
                region.run_region(r.args, "reference", use_ue8m0=batch.use_ue8m0)
            refs[mode] = (r, None if args.no_check else _reference_logits64(r.args))
        fb = floor_bytes(batch.args)
        floor_us = fb / bw * 1e6
        results = {}
        for path in args.paths:
            bar.set_postfix_str(f"H={H} B={B} L={ctx} n={next_n} {path}")
            row = {**env, **shape, "path": path, "floor_us": floor_us, "floor_bytes": fb, "copy_bw_gbps": bw / 1e9,
                   "replays": args.replays, "status": "ok", "note": ""}
            run_path, cfg = path, None
            if "+" in path:
                from smpart import tuning

                run_path, variant = path.split("+", 1)
                cfg = variant_config(variant, tuning.choose(B * next_n, H, next_n, ws.max_len, dev).config)
                row["note"] = PATH_VARIANTS[variant]
            if path == AUTO:
                from smpart import tuning

                choice = tuning.choose(B * next_n, H, next_n, ws.max_len, dev)
                run_path, cfg = auto_dispatch(choice, production="v32" in modes)
                row["note"] = f"dispatched: {run_path} ({choice.source})"
            mode = "v32" if "v32" in modes and run_path not in VENDOR_PATHS else "generic"
            mb = modes[mode]
            ref, logits64 = refs[mode]
            if mode == "v32":
                row["note"] = (row["note"] + "; " if row["note"] else "") + "production-model region (smpart.prep)"
            if not _registered(run_path):
                row.update(status="skipped", note=f"not registered{'; ' + err if err else ''}")
            else:
                out = mb.clone()
                try:
                    region.run_region(out.args, run_path, workspace=ws, config=cfg, use_ue8m0=batch.use_ue8m0)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - one broken path must not stop the others
                    if _unavailable(e):
                        row.update(status="skipped", note=str(e))
                    else:
                        row.update(status="FAILED", note=f"raised {type(e).__name__}: {e}")
                        tqdm.write(f"FAILED {path} H={H} B={B} L={ctx} next_n={next_n}: {row['note']}")
                else:
                    if not args.no_check:
                        try:
                            check_path(run_path, out.args, ref.args, mb, logits64)
                        except AssertionError as e:
                            row.update(status="FAILED", note=str(e))
                            tqdm.write(f"FAILED {path} H={H} B={B} L={ctx} next_n={next_n}: {e}")
                    if row["status"] == "ok":
                        work = mb.clone()

                        def fn(a=work.args, p=run_path, c=cfg):
                            region.run_region(a, p, workspace=ws, config=c, use_ue8m0=batch.use_ue8m0,
                                              check_values=False)

                        try:
                            t = time_graph(fn, flush, replays=args.replays)
                        except Exception as e:  # noqa: BLE001 - e.g. not capturable
                            row.update(status="FAILED", note=f"timing (CUDA-graph capture/replay) raised "
                                                             f"{type(e).__name__}: {e}")
                            tqdm.write(f"FAILED {path} H={H} B={B} L={ctx} next_n={next_n}: {row['note']}")
                        else:
                            row.update(median_us=t["median_us"], p10_us=t["p10_us"], p90_us=t["p90_us"],
                                       gbps=fb / (t["median_us"] * 1e-6) / 1e9,
                                       ratio_to_floor=t["median_us"] / floor_us)
                            results[path] = t["median_us"]
                        del work
                    del out
            if row["status"] == "skipped":
                skipped.setdefault(path, row["note"])
            rows.append(row)
            bar.update(1)
        # the baseline: vLLM's production model's own kernels when timed, else the generic ones
        base = next((p for p in ("vllm_v32", "vllm_dual_stream", "dual_stream") if p in results), None)
        for row in rows[-len(args.paths):]:
            if base and row.get("median_us") is not None:
                row["baseline_path"] = base
                row["ratio_to_baseline"] = row["median_us"] / results[base]
        _write_csv(os.path.join(args.out, "results.csv"), rows[-len(args.paths):])  # per shape: a killed run keeps them
        del batch, ws, modes, refs
        torch.cuda.empty_cache()
    bar.close()

    for path, why in skipped.items():
        print(f"skipped: {path}: {why}")
    table = _table(rows, tabulate)
    md = os.path.join(args.out, "results.md")
    with open(md, "w") as f:
        f.write(f"# smpart-bench, {env['gpu']}, {env['date']}\n\n")
        f.write(f"torch {env['torch']}, triton {env['triton']}, DeepGEMM {env['deep_gemm']}; copy bandwidth "
                f"{bw / 1e9:.0f} GB/s; CUDA graphs, L2 flushed (read sweep of {flush.nbytes / 2**20:.0f} MiB) "
                f"before each of {args.replays} replays; median us (p10-p90).\n\n")
        f.write(table + "\n")
    print(table)
    png = os.path.join(args.out, "latency.png")
    _plot(rows, png)
    print(f"wrote {os.path.join(args.out, 'results.csv')}, {md}, {png}")
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


def _write_csv(path: str, rows: list[dict]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def _table(rows: list[dict], tabulate) -> str:
    out = []
    for r in rows:
        t = (f"{r['median_us']:.1f} ({r['p10_us']:.1f}-{r['p90_us']:.1f})" if r.get("median_us") is not None
             else r["status"])
        out.append([r["num_heads"], r["batch_size"], r["context"], r["next_n"], r["path"], t,
                    _fmt(r.get("ratio_to_baseline"), 2), _fmt(r["floor_us"]), _fmt(r.get("ratio_to_floor"), 2),
                    _fmt(r.get("gbps"), 0)])
    return tabulate(out, headers=["H", "B", "context", "next_n", "path", "us", "x baseline", "floor us", "x floor",
                                  "GB/s"], tablefmt="github")


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["num_heads"], r["next_n"], r["context"]) for r in rows},
                    key=lambda k: (k[0], k[1], k[2] if isinstance(k[2], int) else 1 << 30))  # "mixed" last
    if not panels:
        return
    ncols = len({p[2] for p in panels})
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    paths = list(dict.fromkeys(r["path"] for r in rows))
    for ax, (H, n, ctx) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["num_heads"], r["next_n"], r["context"]) == (H, n, ctx)]
        for p in paths:
            pts = sorted((r["batch_size"], r["median_us"]) for r in sel if r["path"] == p and r.get("median_us"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        fl = sorted({(r["batch_size"], r["floor_us"]) for r in sel})
        if fl:
            ax.plot(*zip(*fl), "k--", label="HBM floor")
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for r in sel})
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch B")
        ax.set_ylabel("us (median, cold L2)")
        ax.set_title(f"H={H} next_n={n} context={ctx}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smpart-bench`` (and ``python -m smpart.bench``). Returns the exit status.

    ``smpart-bench decode [options]`` runs the continuous-batching decode loop
    (:mod:`smpart.bench.decode`); anything else is the shape-grid benchmark below.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decode":
        from smpart.bench.decode.cli import main as decode_main

        return decode_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_grid_args(parser, args)
    import torch

    if not torch.cuda.is_available():
        return cpu_main(args)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("smpart-bench: TRITON_INTERPRET=1 with a GPU present: running the CPU correctness check only")
        return cpu_main(args)
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
