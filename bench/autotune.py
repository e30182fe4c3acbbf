"""``smpart-autotune``: search the SM split and tile configuration per shape bucket, on the GPU.

For every bucket of the grid (H, T, next_n, context) it builds one ``make_decode_batch`` on the GPU,
computes the reference outputs once, then for each candidate: one eager run checked against the
reference (``checks.check_region``; a wrong candidate is dropped and reported), then the CUDA-graph
median with a cold L2 (``harness.time_graph``). Candidates: the cost model's split
(``cost_model.first_split``) scaled by 1/2 .. 2, a 50/50 split, the GEMM (all, half or a quarter of
it) moved to the top-k launch (``gemm_in_tail``, tile height 128 or 256; the GEMM-less first launch
with one program per logits item or 4 per SM), ``block_n`` 64/128,
``blocks_per_item`` 2/4/8, the top-k fused or as a second launch, the dynamic schedule, and where vLLM's
compiled ops load (:func:`vllm_topk_available`) the hybrid: the standalone splits with vLLM's own top-k
after the fused launch (``topk_impl="vllm"``); plus the
``sequential`` and ``dual_stream`` paths, and vLLM's own computation where it loads (``--region``:
the production model's ``vllm_v32`` / ``vllm_v32_dual_stream`` on its region, ``smpart.prep``, or the
generic model's ``vllm_sequential`` / ``vllm_dual_stream``). The fastest of all is recorded per bucket
with every candidate's time in the tuning cache (``smpart.tuning``; written atomically), so the
runtime dispatches to it (vLLM's own kernels included) and a tuned bucket never runs slower than the
streams or vLLM.

``--budget-s`` caps the device time: candidates are tried in the model's order of promise and the
search of a bucket stops when its share of the budget is spent. Without CUDA (or with ``--dry-run``)
it prints the candidate list of each bucket and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

import torch

from smpart import tuning
from smpart.triton_kernels import dims
from smpart.triton_kernels.partitioned import PartitionConfig
from smpart.triton_kernels.radix_topk import RadixTopkConfig
from smpart.triton_kernels.topk_config import PPR_MAX


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def candidates(T: int, H: int, next_n: int, max_len: int, num_sms: int,
               vllm_topk: bool = False) -> list[PartitionConfig]:
    """Partitioned configurations to try for one bucket, most promising first (model split first).

    ``vllm_topk``: also the hybrid (``topk_impl="vllm"``: vLLM 0.33's decode top-k after the fused
    launch) on the standalone splits (``gemm_in_tail=0``, ``fuse_topk=False``), the only ones it
    takes: the model's split, the dense-first splits and a 50/50 split, tried early (vLLM's top-k
    is 1.5-8x faster than the radix top-k, README). Pass it only where vLLM's ops load
    (:func:`vllm_topk_available`); the radix candidates are the same either way.

    Returns
    -------
    list of PartitionConfig, no duplicates; every static split has >= 1 program per role.
    """
    model = tuning.model_config(T, H, next_n, max_len, num_sms)
    total = model.indexer_programs + model.gemm_programs
    out: list[PartitionConfig] = []

    def add(cfg):
        if cfg not in out:
            out.append(cfg)

    # the GEMM beside the logits (q_c quantized by a launch of its own), GEMM programs numbered
    # first, one program per logits item, a register cap so that both share SMs; the top-k alone
    # after. H200, 2026-11-30, H=128, T=128: 72.4 / 153.3 / 528.0 us at 4K / 16K / 64K against
    # 84.4 / 170.6 / 554.7 for the tail split; tied or lost at T <= 32: tried first at T >= 64
    base = dataclasses.replace(model, gemm_in_tail=0.0, first_prequant=True, dense_first=True, blocks_per_item=8)
    dense = [dataclasses.replace(base, maxnreg=mr, gemm_programs=g, num_stages=st)
             for mr, g, st in ((168, 2 * num_sms, 3), (128, 2 * num_sms, 3), (168, num_sms, 4),
                               (128, 2 * num_sms, 4), (168, None, 3))]
    one = dataclasses.replace(model, gemm_in_tail=0.0)
    hybrid = [dataclasses.replace(c, topk_impl="vllm") for c in [one] + dense] if vllm_topk else []
    add(model)
    for cfg in hybrid[:1] + (dense + hybrid[1:] if T >= 64 else []):
        add(cfg)
    # the top-k launch with the GEMM beside it (the logits get the whole GPU first)
    for tail in (1.0, 0.0, 0.5, 0.25):
        add(dataclasses.replace(model, gemm_in_tail=tail))
    add(dataclasses.replace(model, gemm_in_tail=1.0, tail_block_n=256))
    for cfg in dense:
        add(cfg)
    add(dataclasses.replace(model, gemm_in_tail=1.0, first_programs=4 * num_sms))
    add(dataclasses.replace(model, gemm_in_tail=1.0, num_stages=4))
    for r in (2, 8):
        add(dataclasses.replace(model, blocks_per_item=r))
    for cfg in hybrid:
        add(cfg)
    # the top-k's own knobs: the radix (histogram) algorithm; longer or shorter chunks of the sampled
    # one (short chunks: more programs per row where rows are few)
    for tk in (RadixTopkConfig(algo="radix"), RadixTopkConfig(chunk=8192, short_max=16384),
               RadixTopkConfig(num_warps=8), RadixTopkConfig(short_max=4096),
               RadixTopkConfig(chunk=2048, short_max=2048), RadixTopkConfig(programs_per_row=PPR_MAX)):
        add(dataclasses.replace(model, topk_config=tk))
        add(dataclasses.replace(one, topk_config=tk))
    # one-launch splits (the GEMM in the fused launch: the split and its tile matter there)
    for f in (0.5, 0.75, 1.5, 2.0):
        n_idx = min(max(int(round(model.indexer_programs * f)), 1), total - 1)
        add(dataclasses.replace(one, indexer_programs=n_idx, gemm_programs=total - n_idx))
    add(dataclasses.replace(one, indexer_programs=total // 2, gemm_programs=total - total // 2))
    for bn in (128,):
        add(dataclasses.replace(one, block_n=bn))
    add(dataclasses.replace(one, fuse_topk=True))
    add(dataclasses.replace(one, dynamic=True, indexer_programs=total, gemm_programs=0))
    add(dataclasses.replace(one, dynamic=True, indexer_programs=total, gemm_programs=0, queue_chunk=16))
    if vllm_topk:
        add(dataclasses.replace(one, indexer_programs=total // 2, gemm_programs=total - total // 2,
                                topk_impl="vllm"))
    return out


def vllm_topk_available(available=None) -> tuple[bool, str]:
    """Whether the hybrid candidates (``PartitionConfig(topk_impl="vllm")``) can run here: never
    without CUDA, else what ``available`` says. The default asks exactly what the hybrid needs: an
    SM90+ GPU and vLLM's compiled decode top-k ops (``smpart.vendor.load_vllm_ops``, with at least one
    of ``cooperative_topk`` / ``persistent_topk`` / ``top_k_per_row_decode``, as
    ``smpart.partitioned._vllm_topk_ops`` requires). DeepGEMM is not needed (the hybrid's GEMM and
    logits are this package's; only the vendor paths, ``vendor_available``, need it).

    Parameters
    ----------
    available : callable ``() -> (ok, reason)`` or None (the default check above); tests inject one.

    Returns
    -------
    (ok, reason) : ``reason`` says what is missing, or which top-k ops loaded and from where.
    """
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if available is not None:
        return available()
    from smpart import vendor

    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"needs an SM90+ GPU for vLLM's decode top-k, got sm_{major}{minor}"
    try:
        ops = vendor.load_vllm_ops()
    except RuntimeError as e:
        return False, str(e)
    names = [n for n in ("cooperative_topk", "persistent_topk", "top_k_per_row_decode")
             if getattr(ops, n, None) is not None]
    if not names:
        return False, (f"vLLM's ops from {ops.source} have none of cooperative_topk / persistent_topk / "
                       "top_k_per_row_decode")
    return True, f"vLLM's top-k ops ({', '.join(names)}) from {ops.source}"


def vendor_candidates(production: bool, available=None) -> tuple[list[str], str]:
    """vLLM's own computation of the region to time beside ours, when it can run here.

    Parameters
    ----------
    production : bool, tuning the production model's region (``smpart.prep``): ``vllm_v32`` and
        ``vllm_v32_dual_stream``; else the generic region's ``vllm_sequential`` / ``vllm_dual_stream``.
    available : callable ``() -> (ok, reason)`` or None (default: ``smpart.bench.common.v32_available``
        for the production region, ``smpart.vendor.vendor_available`` for the generic one).

    Returns
    -------
    (paths, reason) : the vendor path names to try (empty when unavailable) and why not / where from.
    """
    from smpart.bench.common import V32_PATHS, VENDOR_PATHS

    if available is None:
        if production:
            from smpart.bench.common import v32_available as available
        else:
            from smpart.vendor import vendor_available as available
    ok, why = available()
    return (list(V32_PATHS if production else VENDOR_PATHS) if ok else []), why


def trials(model: PartitionConfig, half: PartitionConfig, cands: list, vendor: list[str]) -> tuple[list, int]:
    """The bucket's trials in order, as ``[(path, config or None)]``, and how many of them always run
    (the budget may stop the search only after these): the stream paths, vLLM's (``vendor``), the
    cost model's split and the 50/50 split, then the rest of ``cands``. Every path is one of
    ``tuning.TUNABLE_PATHS``."""
    first = [("sequential", None), ("dual_stream", None)] + [(p, None) for p in vendor]
    first += [("partitioned", model), ("partitioned", half)]
    rest = [("partitioned", c) for c in cands if c not in (model, half)]
    for path, _ in first:
        if path not in tuning.TUNABLE_PATHS:
            raise ValueError(f"vendor: {path!r} is not a tunable path {tuning.TUNABLE_PATHS}")
    return first + rest, len(first)


def _name(cfg: PartitionConfig | None, path: str) -> str:
    if cfg is None:
        return path
    if cfg.dynamic:
        return f"partitioned:dyn{cfg.indexer_programs}q{cfg.queue_chunk}"
    tail = f"-tail{cfg.gemm_in_tail:g}bn{cfg.tail_block_n}" if cfg.gemm_in_tail else ""
    if cfg.first_prequant:
        tail += "-prequant"
    if cfg.maxnreg is not None:
        tail += f"-maxnreg{cfg.maxnreg}"
    if cfg.gemm_in_tail and cfg.first_programs:
        tail += f"-first{cfg.first_programs}"
    if cfg.gemm_in_tail and not cfg.tail_prequant:
        tail += "-noprequant"
    if cfg.num_stages != 3:
        tail += f"-s{cfg.num_stages}"
    if cfg.topk_impl != "smpart":
        tail += f"-{cfg.topk_impl}topk"
    tk = cfg.topk_config
    if tk is not None and tk != RadixTopkConfig():
        tail += f"-topk:{tk.algo}-c{tk.chunk}-s{tk.short_max}-w{tk.num_warps}"
        tail += f"-p{tk.programs_per_row}" if tk.programs_per_row else ""
    split = (f"dense/{cfg.gemm_programs or 'tiles'}" if cfg.dense_first  # indexer_programs unused
             else f"{cfg.indexer_programs}/{cfg.gemm_programs}")
    return f"partitioned:{split}-bn{cfg.block_n}-r{cfg.blocks_per_item}{'-fusedtopk' if cfg.fuse_topk else ''}{tail}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smpart-autotune", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=_ints, default="1,8,32,64,128,256",
                   help="decode requests B, comma-separated; B * next_n <= 256 (default: 1,8,32,64,128,256)")
    p.add_argument("--context", type=_ints, default="4096,16384,65536",
                   help=f"context lengths in tokens, 1..{dims.MAX_MODEL_LEN} (default: 4096,16384,65536)")
    p.add_argument("--heads", type=_ints, default="128,32,16",
                   help=f"MLA heads per rank H, from {dims.SUPPORTED_H} (default: 128,32,16)")
    p.add_argument("--next-n", type=_ints, default="1", help="rows per request, 1 or 2 (default: 1)")
    p.add_argument("--replays", type=int, default=20, help="timed CUDA-graph replays per candidate (default: 20)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="device-time budget for the whole grid, seconds (default: 480)")
    p.add_argument("--out", default=None,
                   help="cache file (default: smpart/tuned/<gpu>.json in the installed package)")
    p.add_argument("--region", choices=("auto", "production", "generic"), default="auto",
                   help="the region tuned: production = vLLM 0.33's DSV3.2 model (smpart.prep; vLLM's candidates "
                        "vllm_v32, vllm_v32_dual_stream), generic = the generic model (vllm_sequential, "
                        "vllm_dual_stream); auto = production when vllm_v32 can run here (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="list the candidates of each bucket and exit")
    return p


def check_args(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse bad options with ``parser.error`` (exit 2, naming the flag) before any work."""
    def bad(flag, values, want):
        parser.error(f"{flag}: expected {want}, got {values}")

    for flag, vals in (("--batch", a.batch), ("--context", a.context), ("--heads", a.heads), ("--next-n", a.next_n)):
        if not vals:
            bad(flag, "nothing", "at least one value")
    if [h for h in a.heads if h not in dims.SUPPORTED_H]:
        bad("--heads", [h for h in a.heads if h not in dims.SUPPORTED_H], f"values from {dims.SUPPORTED_H}")
    if [n for n in a.next_n if n not in dims.SUPPORTED_NEXT_N]:
        bad("--next-n", [n for n in a.next_n if n not in dims.SUPPORTED_NEXT_N], "1 or 2")
    if [L for L in a.context if not 1 <= L <= dims.MAX_MODEL_LEN]:
        bad("--context", [L for L in a.context if not 1 <= L <= dims.MAX_MODEL_LEN], f"1..{dims.MAX_MODEL_LEN}")
    if [B for B in a.batch if B < 1]:
        bad("--batch", [B for B in a.batch if B < 1], "requests >= 1")
    too_big = [B for B in a.batch if B * max(a.next_n) > dims.T_MAX]
    if too_big:
        bad("--batch", too_big, f"B * next_n <= {dims.T_MAX} decode rows (next_n up to {max(a.next_n)})")
    if a.replays < 1:
        bad("--replays", a.replays, "an int >= 1")
    if not a.budget_s > 0:
        bad("--budget-s", a.budget_s, "seconds > 0")


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    shapes = [(H, n, L, B) for H in a.heads for n in a.next_n for L in a.context for B in a.batch
              if B * n <= 256]
    if a.dry_run or not torch.cuda.is_available():
        if not a.dry_run:
            print("smpart-autotune: tuning needs a CUDA GPU; listing the candidates instead (nothing written)")
        print(f"smpart-autotune --dry-run: {len(shapes)} buckets; splits assume 132 SMs (an H200) at "
              f"{PartitionConfig().num_warps} warps; a GPU run writes {a.out or 'smpart/tuned/<gpu>.json'}")
        for H, n, L, B in shapes:
            b = tuning.Bucket.of(B * n, H, n, L)
            cands = candidates(b.num_tokens, H, n, b.max_len, 132)
            print(f"{b.key}: {len(cands) + 2} candidates: " + ", ".join(_name(c, "") for c in cands)
                  + ", sequential, dual_stream")
        vend = {"production": "vllm_v32, vllm_v32_dual_stream", "generic": "vllm_sequential, vllm_dual_stream"}
        print("plus vLLM's own computation where it loads: " + (vend.get(a.region) or
              f"{vend['production']} (production region), else {vend['generic']}")
              + "; and there the hybrid splits (topk_impl=vllm: vLLM's top-k after the fused launch)")
        return 0

    from tabulate import tabulate
    from tqdm import tqdm

    from smpart.bench.harness import l2_flush_buffer, time_graph
    from smpart import region
    from smpart.bench.common import check_path
    from smpart.batch import make_decode_batch
    from smpart.workspace import RegionWorkspace

    dev = torch.device("cuda")
    meta = tuning.device_meta(dev)
    out = a.out or f"{tuning.TUNED_DIR}/{meta['gpu'].lower().replace(' ', '_')}.json"
    cache = tuning.load_cache(out, meta) if __import__("os").path.exists(out) else None
    if cache is None:
        cache = tuning.TuningCache(meta=dict(meta, date=datetime.date.today().isoformat(),
                                             source="smpart-autotune"))
    production = a.region == "production"
    vendor, why = vendor_candidates(production)
    if a.region == "auto":
        production = bool(vendor)
        if not production:
            vendor, why_generic = vendor_candidates(False)
            print(f"smpart-autotune: vllm_v32 unavailable ({why}); tuning the generic region"
                  + ("" if vendor else f" without vLLM's candidates ({why_generic})"))
    elif not vendor:
        print(f"smpart-autotune: vLLM's candidates unavailable ({why}); tuning without them")
    hybrid, why_hybrid = vllm_topk_available()
    print(f"smpart-autotune: {'production-model' if production else 'generic'} region; vLLM candidates: "
          f"{', '.join(vendor) or 'none'}; hybrid (topk_impl=vllm): "
          f"{'yes' if hybrid else 'no (' + why_hybrid[:200] + ')'}", flush=True)
    flush = l2_flush_buffer(dev)
    num_sms = meta["num_sms"]
    per_bucket = a.budget_s / max(len(shapes), 1)
    summary = []
    for H, n, L, B in tqdm(shapes, desc="smpart-autotune", unit="bucket"):
        t0 = time.monotonic()
        batch = make_decode_batch(L, B, num_heads=H, next_n=n, seed=0, device=dev)
        if production:  # the region as vLLM 0.33's production model hands it over
            from smpart.prep import to_production

            batch = dataclasses.replace(batch, args=to_production(batch.args, batch.use_ue8m0))
        bucket = tuning.Bucket.of(B * n, H, n, L)
        ws = RegionWorkspace.for_args(batch.args)
        ref = batch.clone()
        region.run_region(ref.args, "reference", use_ue8m0=batch.use_ue8m0)
        model = tuning.model_config(B * n, H, n, ws.max_len, num_sms)
        half = dataclasses.replace(model, indexer_programs=(model.indexer_programs + model.gemm_programs) // 2,
                                   gemm_programs=(model.indexer_programs + model.gemm_programs + 1) // 2)
        # streams, vLLM's own, the cost model's split and 50/50 first (always timed), then the rest
        order, n_first = trials(model, half, candidates(B * n, H, n, ws.max_len, num_sms, hybrid),
                                 vendor)
        times, configs = {}, {}
        for i, (path, cfg) in enumerate(order):
            if time.monotonic() - t0 > per_bucket and i >= n_first:
                break
            name = _name(cfg, path)
            trial = batch.clone()
            try:
                region.run_region(trial.args, path, workspace=ws, config=cfg, use_ue8m0=batch.use_ue8m0)
                torch.cuda.synchronize()
                check_path(path, trial.args, ref.args, batch)
            except Exception as e:  # a wrong answer, a config that does not compile / fit, vLLM unavailable
                tqdm.write(f"{bucket.key} {name}: dropped ({type(e).__name__}: {str(e)[:120]})")
                continue
            work = batch.clone()
            times[name] = time_graph(lambda: region.run_region(work.args, path, workspace=ws, config=cfg,
                                                               use_ue8m0=batch.use_ue8m0, check_values=False),
                                     flush, replays=a.replays)["median_us"]
            configs[name] = (path, cfg)
        best = min(times, key=times.get)
        path, cfg = configs[best]
        # the partitioned path keeps its own best config even when a stream path wins the bucket
        part = [k for k in times if configs[k][1] is not None]
        best_part = configs[min(part, key=times.get)][1] if part else model
        cache.put(bucket, path, cfg or best_part, times, model_config=model)
        tuning.save_cache(cache, out)  # after every bucket: an interrupted run keeps what it found
        summary.append([bucket.key, path if cfg is None else best, round(times[best], 1),
                        round(times.get(_name(model, "partitioned"), float("nan")), 1),
                        round(times.get(_name(half, "partitioned"), float("nan")), 1),
                        round(times.get("dual_stream", float("nan")), 1),
                        round(min([times[p] for p in vendor if p in times] or [float("nan")]), 1)])
        del batch, ref, ws
        torch.cuda.empty_cache()
    print(tabulate(summary, headers=["bucket", "chosen", "us", "model split us", "50/50 us", "dual_stream us",
                                    "best vLLM us"],
                   tablefmt="github"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
