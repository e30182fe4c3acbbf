"""Step inputs and running the paths: prefill key writes, ``RegionArgs`` of a step, CUDA-graph
capture per batch bucket and replay, eager launches, per-step timing."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .checking import MismatchError
from .common import _CODE_MOD, BLOCK_SIZE, V32_PATHS, VENDOR_PATHS, StepBatch, _PathState
from .scheduler import bucket_for, copy_slots, tie_free_keys, tie_free_query



class StepsMixin:
    """Step building, graph capture and the path launches of :class:`~smpart.bench.decode.loop.DecodeLoop`."""

    def _build_step(self, step: int) -> StepBatch:
        cfg, dev, nn = self.cfg, self.dev, self.cfg.next_n
        reqs = list(self.running)
        B = len(reqs)
        Bp = bucket_for(B, self.buckets) if (cfg.graphs or cfg.pad_batches) else B
        T, Tp = B * nn, Bp * nn
        for b, r in enumerate(reqs):  # rows keep stale ids past each request's blocks (vLLM BlockTable)
            self.host_block_table[b, : len(r.blocks)] = r.blocks
        bt = np.zeros((Bp, self.max_blocks), dtype=np.int32)  # padding rows -> the null block
        bt[:B] = self.host_block_table[:B]
        ctx = np.zeros(Bp, dtype=np.int32)
        pos = np.zeros(Tp, dtype=np.int64)
        slots = np.full(Tp, -1, dtype=np.int64)
        for b, r in enumerate(reqs):
            ctx[b] = r.context_len + nn
            for j in range(nn):
                p = r.context_len + j
                pos[b * nn + j] = p
                slots[b * nn + j] = r.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
        g = self.tgen
        t = {
            "q_c": torch.zeros(Tp, 1536, dtype=torch.bfloat16, device=dev),
            "k_pe": torch.zeros(Tp, 1, 64, dtype=torch.bfloat16, device=dev),
            "index_k": torch.zeros(Tp, 128, dtype=torch.bfloat16, device=dev),
            "positions": torch.from_numpy(pos).to(dev),
            "slot_mapping": torch.from_numpy(slots).to(dev),
            "block_table": torch.from_numpy(bt).to(dev),
            "context_lens": torch.from_numpy(ctx).to(dev),
        }
        t["q_c"][:T] = torch.randn(T, 1536, generator=g, device=dev).to(torch.bfloat16)
        t["k_pe"][:T] = torch.randn(T, 1, 64, generator=g, device=dev).to(torch.bfloat16)
        if cfg.tie_free:
            q, w = tie_free_query(Tp, dev)
            codes = torch.tensor([(r.code_a * (r.context_len + j) + r.code_b) % _CODE_MOD for r in reqs
                                  for j in range(nn)], dtype=torch.int64, device=dev)
            t["index_k"][:T] = tie_free_keys(codes)
        else:
            qf = torch.zeros(Tp, 64, 128, device=dev)
            qf[:T] = torch.randn(T, 64, 128, generator=g, device=dev)
            q = qf.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            w = torch.zeros(Tp, 64, device=dev)
            w[:T] = torch.randn(T, 64, generator=g, device=dev) * (64**-0.5 * 128**-0.5)
            t["index_k"][:T] = torch.randn(T, 128, generator=g, device=dev).to(torch.bfloat16)
        t["index_q_fp8"], t["index_weights"] = q, w.float()
        if cfg.production:  # what the production model hands the region: bf16 index_q, raw weights
            t["index_q"] = torch.zeros(Tp, 64, 128, dtype=torch.bfloat16, device=dev)
            t["index_q"][:T] = torch.randn(T, 64, 128, generator=g, device=dev).to(torch.bfloat16)
            t["index_weights_raw"] = torch.zeros(Tp, 64, dtype=torch.bfloat16, device=dev)
            t["index_weights_raw"][:T] = torch.randn(T, 64, generator=g, device=dev).to(torch.bfloat16)
        return StepBatch(step=step, requests=reqs, B=B, Bp=Bp, T=T, Tp=Tp, tensors=t,
                         live_slots=torch.from_numpy(slots[:T]).to(dev))

    def _args(self, sb: StepBatch, kv_cache: torch.Tensor, padded: bool):
        """RegionArgs over the step's inputs (``padded``: all Tp rows, else the T live rows) with
        fresh outputs (``q`` NaN, ``topk_indices`` -7, ``k_pe`` a copy: it is roped in place)."""
        from smpart.region import RegionArgs

        t = sb.tensors
        T, B = (sb.Tp, sb.Bp) if padded else (sb.T, sb.B)
        args = RegionArgs(
            q_c=t["q_c"][:T], q_b_proj_weight=self.weight, q_b_proj_weight_scale=self.weight_scale,
            positions=t["positions"][:T], cos_sin_cache=self.cos_sin_cache, k_pe=t["k_pe"][:T].clone(),
            q=torch.full((T, self.cfg.num_heads, 192), float("nan"), dtype=torch.bfloat16, device=self.dev),
            index_q_fp8=t["index_q_fp8"][:T], index_weights=t["index_weights"][:T], index_k=t["index_k"][:T],
            kv_cache=kv_cache, slot_mapping=t["slot_mapping"][:T], block_table=t["block_table"][:B],
            context_lens=t["context_lens"][:B],
            topk_indices=torch.full((T, 2048), -7, dtype=torch.int32, device=self.dev), next_n=self.cfg.next_n,
        )
        return self._production(args, t["index_q"][:T], t["index_weights_raw"][:T]) if self.cfg.production else args

    def _production(self, args, index_q, index_weights_raw):
        """``args`` as the production model hands the region over (``LoopConfig.production``): the
        index-q prep's inputs, fresh prep outputs, ``topk_indices`` -1-filled (``fused_norm_rope``'s
        fill) and ``smpart.prep.production_defaults()``. The keys are written by :meth:`_write_keys`."""
        import dataclasses

        from smpart.prep import production_defaults

        T = args.num_tokens
        return dataclasses.replace(
            args, index_q=index_q, index_weights_raw=index_weights_raw, index_cos_sin_cache=self.index_cos_sin_cache,
            index_q_fp8=torch.zeros(T, 64, 128, dtype=torch.float8_e4m3fn, device=self.dev),
            index_weights=torch.zeros(T, 64, dtype=torch.float32, device=self.dev), topk_indices=args.topk_indices.fill_(-1),
            **production_defaults())

    def _write_keys(self, sb: StepBatch) -> None:
        """The step's new indexer keys into every cache copy (production region: vLLM's ``fused_norm_rope``
        writes them before the region; eager, outside the timing)."""
        from smpart import reference

        if not sb.T:
            return
        t = sb.tensors
        ref_cache = self.states["reference"].kv_cache
        reference.indexer_k_quant_and_cache(t["index_k"][: sb.T], ref_cache, t["slot_mapping"][: sb.T],
                                            self.cfg.use_ue8m0)
        for p in self.path_names:
            copy_slots(ref_cache, self.states[p].kv_cache, sb.live_slots)

    def _stale_positions(self, sb: StepBatch) -> int:
        """Positions past each live request's context in its last block that hold key bytes left by an
        earlier owner of the block (nonzero fp32 scale in the reference cache) while the step runs."""
        if sb.B == 0:
            return 0
        from smpart import reference

        _, scales = reference.cache_values_and_scales(self.states["reference"].kv_cache)
        last = torch.tensor([r.blocks[(r.context_len + self.cfg.next_n - 1) // BLOCK_SIZE] for r in sb.requests],
                            dtype=torch.int64, device=self.dev)
        ctx = sb.tensors["context_lens"][: sb.B].long()
        start = ctx - (ctx - 1) // BLOCK_SIZE * BLOCK_SIZE  # first offset past the context in the last block
        offs = torch.arange(BLOCK_SIZE, device=self.dev)
        beyond = offs[None, :] >= start[:, None]
        return int(((scales[last] != 0) & beyond).sum())

    # ---------------------------------------------------------------------------------
    # running the paths
    # ---------------------------------------------------------------------------------
    def static_args(self, st: _PathState, bucket: int):
        """The captured buffers of ``st``'s graph for ``bucket`` requests (RegionArgs over ``bucket *
        next_n`` rows, the path's own cache): safe warm-up contents, every slot -1 (nothing is written
        to the cache) and every length ``max_context`` over the null block (so that vendor host values
        such as the top-k's ``max_seq_len`` are captured at their largest)."""
        from smpart.region import RegionArgs

        cfg, dev = self.cfg, self.dev
        Tp = bucket * cfg.next_n
        args = RegionArgs(
            q_c=torch.zeros(Tp, 1536, dtype=torch.bfloat16, device=dev), q_b_proj_weight=self.weight,
            q_b_proj_weight_scale=self.weight_scale, positions=torch.zeros(Tp, dtype=torch.int64, device=dev),
            cos_sin_cache=self.cos_sin_cache, k_pe=torch.zeros(Tp, 1, 64, dtype=torch.bfloat16, device=dev),
            q=torch.zeros(Tp, cfg.num_heads, 192, dtype=torch.bfloat16, device=dev),
            index_q_fp8=torch.zeros(Tp, 64, 128, device=dev).to(torch.float8_e4m3fn),
            index_weights=torch.zeros(Tp, 64, device=dev),
            index_k=torch.zeros(Tp, 128, dtype=torch.bfloat16, device=dev),
            kv_cache=st.kv_cache, slot_mapping=torch.full((Tp,), -1, dtype=torch.int64, device=dev),
            block_table=torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev),
            context_lens=torch.full((bucket,), cfg.max_context, dtype=torch.int32, device=dev),
            topk_indices=torch.full((Tp, 2048), -1, dtype=torch.int32, device=dev), next_n=cfg.next_n,
        )
        if not cfg.production:
            return args
        return self._production(args, torch.zeros(Tp, 64, 128, dtype=torch.bfloat16, device=dev),
                                torch.zeros(Tp, 64, dtype=torch.bfloat16, device=dev))

    def _capture(self, st: _PathState, bucket: int) -> None:
        """Capture ``st``'s path for ``bucket`` requests: :meth:`static_args`, two eager warm-ups on a
        side stream without value checks (compiles; the vendor paths build their workspace and
        per-step metadata), then the graph (vLLM's capture
        order; all graphs share one memory pool and are replayed one at a time)."""
        from smpart.region import run_region

        cfg, dev = self.cfg, self.dev
        static = self.static_args(st, bucket)
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(2):  # no value checks: every row over the null block is refused as a duplicate block
                run_region(static, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0,
                           check_values=False)
        cur.wait_stream(side)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            run_region(static, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0)
        torch.cuda.synchronize()
        st.graphs[bucket] = (graph, static)

    def capture_all(self, progress: Callable[[str], None] | None = None) -> None:
        """Capture every path's graph for every bucket (graph mode). A path whose warm-up or capture
        raises is dropped from the run: listed in ``skipped`` when the error says it cannot run here
        (``RuntimeError``, see ``smpart.bench.common._unavailable``), else in ``failed``."""
        from smpart.bench.common import _unavailable

        for p in list(self.path_names):
            st = self.states[p]
            for bucket in self.buckets:
                if progress:
                    progress(f"capturing {p} B={bucket}")
                try:
                    self._capture(st, bucket)
                except Exception as e:  # noqa: BLE001 - one path must not stop the others
                    why = f"capture (B={bucket}): {type(e).__name__}: {e}"
                    (self.skipped if _unavailable(e) else self.failed)[p] = why
                    del self.states[p]
                    self.stats.path_runs.pop(p, None)
                    torch.cuda.synchronize()
                    break

    def _load_static(self, st: _PathState, sb: StepBatch):
        """Copy the live step into ``st``'s captured buffers for the step's bucket; returns (graph, static)."""
        graph, s = st.graphs[sb.Bp]
        t = sb.tensors
        inputs = ("index_q", "index_weights_raw") if self.cfg.production else ("index_q_fp8", "index_weights")
        for name in ("q_c", "positions", "index_k", "slot_mapping") + inputs:
            getattr(s, name).copy_(t[name])
        s.k_pe.copy_(t["k_pe"])
        s.block_table.copy_(t["block_table"])
        s.context_lens.copy_(t["context_lens"])
        s.q.fill_(float("nan"))
        s.topk_indices.fill_(-1 if self.cfg.production else -7)  # production: fused_norm_rope's fill
        if st.name in VENDOR_PATHS + V32_PATHS:  # vLLM's metadata builder: per-step DeepGEMM schedule, eager
            st.workspace.vendor.prepare(s, self.cfg.use_ue8m0)
        return graph, s

    def _run_paths(self, sb: StepBatch, ref_args) -> dict:
        """Run every path due this step; returns ``{path: (out RegionArgs over live rows, padded topk)}``."""
        import dataclasses as dc

        due = [self.states[p] for p in self.path_names if self.states[p].runs_at(sb.step)]
        outs, events = {}, {}
        for st in due:
            try:
                args = self._launch(st, sb, events)
            except MismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - a crash is a disagreement too: stop with a report
                raise MismatchError({"step": sb.step, "path": st.name, "check": "run",
                                     "message": f"raised {type(e).__name__}: {e}"}) from e
            st.runs += 1
            self.stats.path_runs[st.name] = st.runs
            live = dc.replace(args, q=args.q[: sb.T], k_pe=args.k_pe[: sb.T], topk_indices=args.topk_indices[: sb.T],
                              q_c=args.q_c[: sb.T], positions=args.positions[: sb.T],
                              index_q_fp8=args.index_q_fp8[: sb.T], index_weights=args.index_weights[: sb.T],
                              index_k=args.index_k[: sb.T], slot_mapping=args.slot_mapping[: sb.T],
                              block_table=args.block_table[: sb.B], context_lens=args.context_lens[: sb.B],
                              **({} if args.index_q is None else dict(index_q=args.index_q[: sb.T],
                                                                      index_weights_raw=args.index_weights_raw[: sb.T])))
            outs[st.name] = (live, args.topk_indices[sb.T:])
        if events:
            try:
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - an asynchronous fault of one of this step's launches
                raise MismatchError({"step": sb.step, "path": ",".join(events), "check": "run",
                                     "message": f"CUDA error surfaced at the step's synchronize: "
                                                f"{type(e).__name__}: {e}"}) from e
            for name, (a, b) in events.items():
                self.states[name].times_us.append((sb.step, sb.B, a.elapsed_time(b) * 1e3))
        # paths not due this step: bring their cache copies up to date with the reference's new bytes
        for p in self.path_names:
            if not self.states[p].runs_at(sb.step) and sb.T:
                copy_slots(ref_args.kv_cache, self.states[p].kv_cache, sb.live_slots)
        return outs

    def _launch(self, st: _PathState, sb: StepBatch, events: dict):
        """Run one path on the step (graph replay or eager call, timed on a GPU); returns its args."""
        from smpart.region import run_region
        from smpart.validate import validate_region_args

        cfg = self.cfg
        if cfg.graphs:
            graph, args = self._load_static(st, sb)
            fn = graph.replay
        else:
            args = self._args(sb, st.kv_cache, padded=True)
            if self._validated_step != sb.step:  # value checks once per step, outside the timing
                validate_region_args(args, max_len=st.workspace.max_len)
                self._validated_step = sb.step

            def fn():
                run_region(args, st.name, workspace=st.workspace, config=st.config, use_ue8m0=cfg.use_ue8m0,
                           check_values=False)

        if self.is_cuda:  # CUDA events around the replay / call only (the L2 flush precedes them)
            if self._flush is not None:
                self._flush()
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            fn()
            ev[1].record()
            events[st.name] = ev
        else:
            t0 = time.perf_counter()
            fn()
            st.wall_s.append(time.perf_counter() - t0)
        return args
