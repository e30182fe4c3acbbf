"""Per-op timing: each standalone smpart kernel next to vLLM's kernel for the same op.

``python -m smpart.bench.kernels [--shapes 128x1x4096,128x32x8192] [--replays 40]`` prints one
Markdown table (us, CUDA-graph median, cold L2 before every replay; docs/RESULTS.md, "Method") with, per shape:
key write, fill, paged logits, top-k (each on its own kernel's logits), q side (ours: one fused
launch; vLLM: activation quant + DeepGEMM GEMM + RoPE), and the whole partitioned launch.
Our top-k is the top-k as the stream paths run it (``schedules.logits_and_topk``: the sampled top-k
by default; with the radix algorithm the logits kernel also builds the per-row histograms up to
``radix_topk.hist_fed``'s bound), minus the plain logits, so a histogram's cost counts as top-k time.
Vendor columns need DeepGEMM and vLLM's ops (``smpart.vendor``); without them they
read "n/a".
"""

from __future__ import annotations

import argparse

import torch


DEFAULT_SHAPES = "128x1x4096,128x32x8192,128x128x16384,32x1x65536"


def _shape(s: str) -> tuple[int, int, int]:
    """``HxBxL`` -> (H, B, L), checked: H one of the DSV3.2 head counts, 1 <= B <= 256 requests
    (next_n = 1), 1 <= L <= 163840 tokens. Raises ``argparse.ArgumentTypeError`` naming the part."""
    from smpart.triton_kernels import dims

    parts = s.lower().strip().split("x")
    try:
        h, b, length = (int(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxBxL (three integers, e.g. 128x32x8192), got {s!r}") from None
    if h not in dims.SUPPORTED_H:
        raise argparse.ArgumentTypeError(f"{s!r}: H={h}, expected one of {dims.SUPPORTED_H}")
    if not 1 <= b <= dims.T_MAX:
        raise argparse.ArgumentTypeError(f"{s!r}: B={b}, expected 1..{dims.T_MAX}")
    if not 1 <= length <= dims.MAX_MODEL_LEN:
        raise argparse.ArgumentTypeError(f"{s!r}: L={length}, expected 1..{dims.MAX_MODEL_LEN}")
    return h, b, length


def _shapes(s: str) -> list[tuple[int, int, int]]:
    out = [_shape(x) for x in s.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected at least one HxBxL")
    return out


def _positive(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smpart.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=DEFAULT_SHAPES,
                   help=f"comma-separated HxBxL: MLA heads per rank, requests (next_n=1), context tokens "
                        f"(default: {DEFAULT_SHAPES})")
    p.add_argument("--replays", type=_positive, default=40,
                   help="timed CUDA-graph replays per kernel, the median is reported (default: 40)")
    p.add_argument("--out", default=None, help="write the table to this Markdown file too (default: print only)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("smpart.bench.kernels: per-kernel timings need a CUDA GPU")
        return 0
    from tabulate import tabulate

    from smpart.bench.harness import l2_flush_buffer, time_graph
    from smpart import schedules, vendor
    from smpart.batch import make_decode_batch
    from smpart.triton_kernels.fill import fill_topk_indices
    from smpart.triton_kernels.indexer_cache import indexer_k_quant_and_cache
    from smpart.triton_kernels.mqa_logits import paged_mqa_logits
    from smpart.partitioned import partitioned_region
    from smpart.workspace import RegionWorkspace

    flush = l2_flush_buffer("cuda")
    ok, why = vendor.vendor_available()
    rows = []
    for H, B, L in a.shapes:
        batch = make_decode_batch(L, batch_size=B, num_heads=H, seed=0, device="cuda")
        args = batch.args
        ws = RegionWorkspace.for_args(args)
        schedules.run_sequential(args, ws, None, True)  # logits in ws for the top-k timing
        T = args.num_tokens

        def t(fn):
            return time_graph(fn, flush, replays=a.replays)["median_us"]

        def logits_fn(hist=None):
            paged_mqa_logits(args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table,
                             args.context_lens, ws.logits, next_n=args.next_n, hist=hist)

        def logits_topk():  # what the stream paths run (the default top-k: sampled, no histogram)
            schedules.logits_and_topk(args, ws)

        logits_us = t(logits_fn)
        ours = {
            "key write": t(lambda: indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping)),
            "fill": t(lambda: fill_topk_indices(args.topk_indices, T)),
            "logits": logits_us,
            "top-k": t(logits_topk) - logits_us,
            "q side": t(lambda: schedules.q_side(args, True, ws)),
            "partitioned": t(lambda: partitioned_region(args, ws, None, True)),
        }
        theirs = dict.fromkeys(ours, float("nan"))
        if ok:
            vs = vendor._vendor_state(args, ws, True)
            ops, dg = vs.ops, vs.dg
            ctx2d = vs.context_lens_view(T, args.next_n)
            q4 = args.index_q_fp8.view(B, args.next_n, 64, 128)
            logits = dg.fp8_fp4_paged_mqa_logits((q4, None), args.kv_cache.unsqueeze(-2), args.index_weights, ctx2d,
                                                 args.block_table, vs.schedule_meta, vs.max_len)
            backend = vendor._resolve_topk(vs, logits, T, "auto")
            topk_fn = ops.cooperative_topk if backend == "cooperative" else ops.persistent_topk
            theirs.update({
                "key write": t(lambda: ops.indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping,
                                                                     128, "ue8m0")),
                "fill": t(lambda: args.topk_indices.fill_(-1)),
                "logits": t(lambda: dg.fp8_fp4_paged_mqa_logits((q4, None), args.kv_cache.unsqueeze(-2),
                                                                args.index_weights, ctx2d, args.block_table,
                                                                vs.schedule_meta, vs.max_len)),
                "top-k": t(lambda: topk_fn(logits, ctx2d, args.topk_indices, vs.topk_workspace, 2048, vs.max_seq_len)),
                "q side": t(lambda: vendor.vllm_q_side(args, vs, True)),
            })
        for op in ours:
            rows.append([f"H={H} B={B} L={L}", op, round(ours[op], 1), round(theirs[op], 1)])
        print(tabulate(rows[-len(ours):], headers=["shape", "op", "smpart us", "vLLM us"]), flush=True)
    table = tabulate(rows, headers=["shape", "op", "smpart us", "vLLM 0.33 us"], tablefmt="github")
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}; vendor kernels: {'yes' if ok else why}\n{table}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"{gpu}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
