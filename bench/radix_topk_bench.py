"""Top-k timing: the sampled top-k (``sample_topk.py``, the default, in several configurations) and
the radix top-k (``radix_topk.py``) vs vLLM 0.33's ``cooperative_topk`` (<= 64 rows) /
``persistent_topk``, one process, same logits.

``python -m smpart.bench.radix_topk_bench [--vllm-so PATH] [--out DIR] [--variants a,b]`` (GPU). Per
shape (B x L; the top-k does not depend on H) and logits source (``real``: our logits kernel over a
random cache; ``gauss``: N(0, 1)): CUDA-graph median of cold-L2 replays, us
(``smpart.bench.harness.time_graph`` with ``l2_flush_buffer``: a read sweep of 2x L2 before each).
Columns: logits without / with the radix producer histogram; each variant (``radix``: its own
histogram pass where a row spans several chunks; ``sample*``: the sampled top-k's configurations);
the radix top-k fed by the producer (``logits+hist+select`` minus ``logits``); vLLM; each variant
over vLLM. Also checks every top-k's output (value multiset vs ``torch.topk``) and both ours and
vLLM's on narrow-range rows (vLLM issue #51782). ``--sweep [--impl sample|radix]``: the GPU
correctness sweep instead.
"""
from __future__ import annotations

import argparse
import os

import torch

from smpart.bench.harness import l2_flush_buffer, time_graph

SHAPES = [(1, 4096), (32, 8192), (128, 16384), (1, 65536), (128, 65536), (1, 163840)]


def check_values(out, logits, lens, what):
    """Value multiset of each row's selection == torch.topk's; indices unique; -1 count exact."""
    for t in range(out.shape[0]):
        L = int(lens[t])
        n = min(L, 2048)
        row = out[t]
        sel = row[:n].long()
        ok = bool((row[n:] == -1).all()) and bool(((sel >= 0) & (sel < L)).all())
        ok = ok and torch.unique(sel).numel() == n
        if ok and n:
            got = logits[t, :L][sel].sort().values
            ref = torch.topk(logits[t, :L], n).values.sort().values
            ok = bool((got == ref).all())
        if not ok:
            return f"{what}: row {t} WRONG"
    return "ok"


def main(argv=None):
    """Run the top-k timing (see the module docstring); ``argv`` as ``sys.argv[1:]`` (None: the real one).

    Options: ``--vllm-so`` path of vLLM's ``_C`` library (vLLM columns skipped when absent),
    ``--out`` directory for the CSV, ``--replays`` graph replays per timing, ``--shapes`` e.g.
    ``"1x4096,32x8192"`` (B x L), ``--sweep`` the config sweep instead. Needs a CUDA device.
    """
    p = argparse.ArgumentParser()
    p.add_argument("--vllm-so", default="/tmp/vso/_C_stable_libtorch.abi3.so")
    p.add_argument("--out", default=None)
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--shapes", default=None)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--impl", default="sample", choices=("radix", "sample"), help="top-k of --sweep")
    p.add_argument("--variants", default=None, help="comma list of the variants to time (default all)")
    a = p.parse_args(argv)
    if a.sweep:
        sweep(impl=a.impl)
        return
    from smpart.triton_kernels import radix_topk as rt
    from smpart.triton_kernels.mqa_logits import paged_mqa_logits
    from smpart.batch import make_decode_batch

    ops = None
    if os.path.exists(a.vllm_so):
        torch.ops.load_library(a.vllm_so)
        ops = torch.ops._C
    vws = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    flush = l2_flush_buffer(torch.device("cuda"))
    gpu = torch.cuda.get_device_name()
    shapes = SHAPES if a.shapes is None else [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    from smpart.triton_kernels.sample_topk import sample_topk
    from smpart.triton_kernels.topk_config import PPR_MAX

    C = rt.RadixTopkConfig
    variants = {"radix": (rt.radix_topk, C()),
                "sample": (sample_topk, C()),
                "sample_c8k": (sample_topk, C(chunk=8192, short_max=16384)),
                "sample_s16k": (sample_topk, C(short_max=16384)),
                "sample_s4k": (sample_topk, C(short_max=4096)),
                "sample_c2k": (sample_topk, C(chunk=2048, short_max=2048)),
                # one program per chunk (the grid before programs_per_row) and one per row
                "sample_pchunk": (sample_topk, C(programs_per_row=PPR_MAX)),
                "sample_p1": (sample_topk, C(programs_per_row=1)),
                "sample_hist6": (sample_topk, C(count=0, bits=6)),
                "sample_b3": (sample_topk, C(bits=3)),
                "sample_w8": (sample_topk, C(num_warps=8))}
    if a.variants:
        variants = {k: v for k, v in variants.items() if k in a.variants.split(",")}
    rows = []
    for B, L in shapes:
        batch = make_decode_batch(L, batch_size=B, num_heads=16, seed=0, device="cuda").args
        T = B
        lens = batch.context_lens
        ctx2d = lens.view(B, 1)
        out = torch.full((T, 2048), -1, dtype=torch.int32, device="cuda")
        rws = rt.RadixTopkWorkspace(T, "cuda")
        for src in ("real", "gauss"):
            logits = torch.empty(T, L, device="cuda")

            def logits_fn(hist=None):
                paged_mqa_logits(batch.index_q_fp8, batch.index_weights, batch.kv_cache, batch.block_table, lens,
                                 logits, next_n=1, max_len=L, hist=hist)

            if src == "real":
                logits_fn()
            else:
                logits.copy_(torch.randn(T, L, device="cuda"))
            r = {"gpu": gpu, "B": B, "L": L, "src": src}
            t = lambda fn: round(time_graph(fn, flush, replays=a.replays)["median_us"], 2)  # noqa: E731
            if src == "real":
                r["logits"] = t(lambda: logits_fn())
                r["logits_hist"] = t(lambda: logits_fn(rws.hist))
                rws.hist.zero_()
                torch.cuda.synchronize()
            for name, (topk_fn, cfg) in variants.items():
                out.fill_(-7)
                r[name] = t(lambda: topk_fn(logits, lens, out, next_n=1, workspace=rws, config=cfg))
                r[name + "_ok"] = check_values(out, logits, lens.tolist(), name)
            if src == "real" and "radix" in variants:
                out.fill_(-7)

                def fed():
                    logits_fn(rws.hist)
                    rt.radix_topk(logits, lens, out, next_n=1, workspace=rws, hist_ready=True)

                r["logits_hist_select"] = t(fed)
                r["radix_fed"] = round(r["logits_hist_select"] - r["logits"], 2)
                r["radix_fed_ok"] = check_values(out, logits, lens.tolist(), "fed")
                r["reset_ok"] = int(rws.hist.abs().sum()) == 0 and int(rws.counters.abs().sum()) == 0
            if ops is not None:
                fn = ops.cooperative_topk if T <= 64 else ops.persistent_topk
                out.fill_(-7)
                r["vllm"] = t(lambda: fn(logits, ctx2d, out, vws, 2048, L))
                r["vllm_ok"] = check_values(out, logits, lens.tolist(), "vllm")
            if "vllm" in r:
                for k in variants:
                    r[k + "_over_vllm"] = round(r[k] / r["vllm"], 2)
                if "radix_fed" in r:
                    r["fed_over_vllm"] = round(r["radix_fed"] / r["vllm"], 2)
            print(r, flush=True)
            rows.append(r)
        del batch
        torch.cuda.empty_cache()
    # narrow-range rows (vLLM issue #51782): thousands of logits in one coarse bin
    narrow = []
    for B, L in ((4, 65536), (128, 16384), (1, 163840)):
        x = 5.0 + torch.rand(B, L, device="cuda") * 1e-3
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        out = torch.full((B, 2048), -7, dtype=torch.int32, device="cuda")
        rws = rt.RadixTopkWorkspace(B, "cuda")
        res = {"B": B, "L": L}
        for name in ("radix", "sample"):
            out.fill_(-7)
            (rt.radix_topk if name == "radix" else sample_topk)(x, lens, out, next_n=1, workspace=rws)
            res[name] = check_values(out, x, lens.tolist(), name)
        if ops is not None:
            out.fill_(-7)
            (ops.cooperative_topk if B <= 64 else ops.persistent_topk)(x, lens.view(B, 1), out, vws, 2048, L)
            torch.cuda.synchronize()
            res["vllm"] = check_values(out, x, lens.tolist(), "vllm")
        print("narrow", res, flush=True)
        narrow.append(res)
    if a.out:
        import csv
        import json
        os.makedirs(a.out, exist_ok=True)
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(os.path.join(a.out, "topk.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(a.out, "narrow.json"), "w") as f:
            json.dump(narrow, f)


def sweep(n_batches=300, replays=1000, same=1000, impl="sample"):
    """GPU correctness of ``impl`` (``radix``: ``radix_topk``; ``sample``: ``sample_topk``): random
    batches; graph replays with changing lengths; one batch many times."""
    import functools

    from smpart.triton_kernels import radix_topk as rt
    from smpart.triton_kernels.sample_topk import sample_topk

    topk = functools.partial(rt.radix_topk if impl == "radix" else sample_topk)
    print(f"sweep of {impl}", flush=True)

    g = torch.Generator(device="cuda").manual_seed(1)
    ws = rt.RadixTopkWorkspace(64, "cuda")
    out = torch.full((64, 2048), -7, dtype=torch.int32, device="cuda")
    bad = 0
    for i in range(n_batches):
        B = int(torch.randint(1, 65, (1,)))
        W = int(torch.randint(1, 70000, (1,)))
        kind = i % 4
        x = torch.randn(B, W, device="cuda", generator=g)
        if kind == 1:
            x = torch.round(x * 2) / 2  # few distinct values: ties
        elif kind == 2:
            x = 5.0 + torch.rand(B, W, device="cuda", generator=g) * 1e-3  # narrow
        elif kind == 3:
            x = x * 2.0 ** 60
        lens = torch.randint(0, W + 1, (B,), device="cuda", generator=g, dtype=torch.int32)
        cfg = [None, rt.RadixTopkConfig(short_max=4096), rt.RadixTopkConfig(programs_per_row=1),
               rt.RadixTopkConfig(programs_per_row=3)][(i // 4) % 4]
        topk(x, None, out[:B], next_n=1, workspace=ws, row_lens=lens, config=cfg)
        if check_values(out[:B], x, lens.tolist(), "sweep") != "ok":
            bad += 1
    reset = int(ws.hist.abs().sum()) == 0 and int(ws.counters.abs().sum()) == 0
    print(f"sweep: {n_batches} batches, {bad} wrong, reset={reset}", flush=True)
    # graph replays with changing lengths
    B, W = 16, 40000
    x = torch.randn(B, W, device="cuda", generator=g)
    lens = torch.full((B,), W, dtype=torch.int32, device="cuda")
    fn = lambda: topk(x, None, out[:B], next_n=1, workspace=ws, row_lens=lens)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    bad = 0
    for i in range(replays):
        lens.copy_(torch.randint(0, W + 1, (B,), device="cuda", generator=g, dtype=torch.int32))
        gr.replay()
        if i % 10 == 0 or i == replays - 1:
            if check_values(out[:B], x, lens.tolist(), "graph") != "ok":
                bad += 1
    print(f"graph replays: {replays}, checked {replays // 10 + 1}, {bad} wrong", flush=True)
    # the same batch many times: identical index sets
    x = torch.round(torch.randn(B, W, device="cuda", generator=g) * 4) / 4  # ties everywhere
    lens.fill_(W)
    topk(x, None, out[:B], next_n=1, workspace=ws, row_lens=lens)
    ref = out[:B].sort(dim=1).values.clone()
    diff = 0
    for _ in range(same):
        topk(x, None, out[:B], next_n=1, workspace=ws, row_lens=lens)
        diff += int((out[:B].sort(dim=1).values != ref).any())
    print(f"same batch {same} times: {diff} differing index sets; exact={check_values(out[:B], x, lens.tolist(), 'same')}",
          flush=True)


if __name__ == "__main__":
    main()
