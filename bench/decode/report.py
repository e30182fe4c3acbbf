"""Output files of a run: ``steps.csv``, ``summary.json``, ``summary.md``, ``step_time_vs_batch.png``."""

from __future__ import annotations

import collections
import csv
import datetime
import json
import os
import statistics

import torch

from .common import NUM_LAYERS
from .loop import DecodeLoop
from .scheduler import batch_buckets



def write_steps_csv(path: str, rows: list[dict]) -> None:
    """One row per step (fields: step, batch, padded_batch, num_tokens, total_context_tokens,
    max_context, allocator counters, ``<path>_us`` and ``<path>_wall_s``)."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)) for k, v in r.items()})


def plot_step_times(path: str, loop: DecodeLoop) -> bool:
    """PNG of step time (us) vs batch size, one colour per path (points: steps; line: median per
    batch size). Returns False when there is nothing timed or matplotlib is missing."""
    if not any(loop.states[p].times_us for p in loop.path_names):
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, p in enumerate(loop.path_names):
        pts = loop.states[p].times_us
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.scatter([b for _, b, _ in pts], [u for _, _, u in pts], s=6, alpha=0.25, color=color)
        by_b = collections.defaultdict(list)
        for _, b, u in pts:
            by_b[b].append(u)
        bs = sorted(by_b)
        ax.plot(bs, [statistics.median(by_b[b]) for b in bs], color=color, label=p)
    ax.set_xscale("log", base=2)
    batches = sorted({b for p in loop.path_names for _, b, _ in loop.states[p].times_us})
    ticks = [t for t in batch_buckets(max(batches)) if t >= batches[0]] or batches
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("batch size (requests)")
    ax.set_ylabel("us per step, one layer" + (" (cold L2)" if loop.cfg.cold_l2 else ""))
    ax.set_title(f"DSV3.2 region, H={loop.cfg.num_heads}, next_n={loop.cfg.next_n}"
                 f"{', CUDA graphs' if loop.cfg.graphs else ', eager'}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _env_info(device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        from smpart.vendor import deep_gemm_version

        info["gpu"] = torch.cuda.get_device_name(device)
        info["deep_gemm"] = deep_gemm_version() or "n/a"
    else:
        info["gpu"] = "none (CPU, Triton interpreter)"
    return info


def summary_table(summary: dict) -> list[list]:
    """Rows of the per-path table: path, runs, median us, p90 us, x baseline, saving per layer us,
    saving per model step (61 layers) us, saving per generated token us."""

    def f(x, nd=1):
        return "" if x is None else f"{x:.{nd}f}"

    rows = []
    for p, d in summary["paths"].items():
        ratio = "baseline" if p == summary.get("baseline") else f(d.get("ratio_to_baseline"), 2)
        rows.append([p, d["runs"], f(d.get("median_us")), f(d.get("p90_us")), ratio,
                     f(d.get("saving_per_layer_us"), 2), f(d.get("saving_per_step_us"), 1),
                     f(d.get("saving_per_token_us"), 1)])
    return rows


TABLE_HEADERS = ["path", "steps run", "median us/step", "p90 us/step", "x baseline", "saving us/layer",
                 f"saving us/step ({NUM_LAYERS} layers)", "saving us/token"]


def _format_table(rows: list[list]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=TABLE_HEADERS, tablefmt="github")
    except ImportError:
        lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
        lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
        return "\n".join(lines)


def write_outputs(out_dir: str, loop: DecodeLoop, summary: dict, env: dict, mismatch: dict | None) -> list[str]:
    """Write ``steps.csv``, ``summary.json``, ``summary.md`` and (when timed) ``step_time_vs_batch.png``."""
    os.makedirs(out_dir, exist_ok=True)
    files = []
    p = os.path.join(out_dir, "steps.csv")
    write_steps_csv(p, loop.step_rows)
    files.append(p)
    p = os.path.join(out_dir, "summary.json")
    with open(p, "w") as f:
        json.dump({**summary, "env": env, "mismatch": mismatch}, f, indent=1, default=str)
    files.append(p)
    p = os.path.join(out_dir, "summary.md")
    cfg, st = loop.cfg, summary["stats"]
    with open(p, "w") as f:
        f.write(f"# smpart-bench decode, {env.get('gpu')}, {env['date']}\n\n")
        f.write(f"torch {env['torch']}, triton {env['triton']}"
                f"{', DeepGEMM ' + env['deep_gemm'] if 'deep_gemm' in env else ''}; H={cfg.num_heads}, "
                f"next_n={cfg.next_n}, {st['steps']} steps, batch {st['min_batch_seen']}..{st['max_batch_seen']}, "
                f"contexts up to {st['max_context_seen']}; {'CUDA graphs per batch bucket' if cfg.graphs else 'eager'}"
                f"{', L2 flushed before each timed run' if cfg.cold_l2 else ''}; baseline "
                f"{summary['baseline'] or 'n/a'}; {st['checks']} steps checked against the reference, "
                f"{'a MISMATCH' if mismatch else 'zero mismatches'}.\n\n")
        f.write(_format_table(summary_table(summary)) + "\n")
        if not summary.get("timed"):
            f.write("\nThe timing columns are empty: this run had no CUDA device and ran the kernels in Triton's "
                    "interpreter, which checks correctness only (its speed says nothing about a GPU's). Run "
                    "`smpart-bench decode` on a CUDA GPU for microseconds per step and the savings.\n")
        f.write(f"\nStale positions in live blocks: {st['stale_positions']} over {st['steps_with_stale']} steps. "
                "Freed cache blocks are reused without being cleared (as in vLLM), so a reused block can hold key "
                "bytes of its earlier owner past the new owner's length; every step that saw some tested that no "
                "path lets them reach a logit.\n")
    files.append(p)
    p = os.path.join(out_dir, "step_time_vs_batch.png")
    if plot_step_times(p, loop):
        files.append(p)
    return files
