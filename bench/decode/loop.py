"""``DecodeLoop``: one simulated decoder layer, decode steps only (see the package docstring)."""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Callable

import numpy as np
import torch

from .checking import CheckMixin
from .common import BASELINES, BLOCK_SIZE, NUM_LAYERS, V32_PATHS, VENDOR_PATHS, _PathState
from .config import LoopConfig
from .scheduler import BlockAllocator, LoopStats, Request, SchedulerMixin, batch_buckets
from .steps import StepsMixin



class DecodeLoop(SchedulerMixin, StepsMixin, CheckMixin):
    """The continuous-batching decode loop (see the module docstring).

    Parameters
    ----------
    config : LoopConfig (validated and completed with :meth:`LoopConfig.resolved`).
    progress : optional callable ``(step, info: dict) -> None`` called after every step.

    Attributes
    ----------
    cfg : the resolved LoopConfig. allocator : BlockAllocator. stats : LoopStats.
    step_rows : list of per-step dicts (the CSV rows). states : ``{path: _PathState}`` (reference first).
    skipped : ``{path: reason}`` for paths that cannot run here. failed : ``{path: reason}`` for paths
    whose CUDA-graph capture crashed (dropped from the run; the CLI exits 1).
    """

    def __init__(self, config: LoopConfig, progress: Callable[[int, dict], None] | None = None):
        from smpart.triton_kernels import dims
        from smpart import reference
        from smpart.batch import make_decode_batch

        self.cfg = cfg = config.resolved()
        self.progress = progress
        self.dev = torch.device(cfg.device)
        self.is_cuda = self.dev.type == "cuda"
        self.rng = np.random.default_rng(cfg.seed)
        self.tgen = torch.Generator(device=self.dev).manual_seed(cfg.seed + 1)
        self.allocator = BlockAllocator(cfg.num_blocks)
        self.stats = LoopStats()
        self.step_rows: list[dict] = []
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.waiting: collections.deque = collections.deque()
        self.running: list[Request] = []
        self.next_rid = 0
        self.max_blocks = -(-cfg.max_context // BLOCK_SIZE)
        self.max_len = self.max_blocks * BLOCK_SIZE
        self.buckets = batch_buckets(cfg.max_batch)
        self.host_block_table = np.zeros((cfg.max_batch, self.max_blocks), dtype=np.int32)

        # fixed per run: q_b_proj weights (DeepSeek checkpoint block quant, UE8M0 re-quant) and cos/sin
        w = make_decode_batch(cfg.next_n, batch_size=1, num_heads=cfg.num_heads, next_n=cfg.next_n,
                              use_ue8m0=cfg.use_ue8m0, seed=cfg.seed, device="cpu", spare_blocks=0).args
        self.weight = w.q_b_proj_weight.to(self.dev)
        self.weight_scale = w.q_b_proj_weight_scale.to(self.dev)
        self.cos_sin_cache = reference.make_cos_sin_cache(self.max_len, torch.bfloat16, device=self.dev)
        # the production model's indexer RoPE table (fp32, as smpart.prep.to_production builds it)
        self.index_cos_sin_cache = (reference.make_cos_sin_cache(self.max_len, torch.float32, device=self.dev)
                                    if cfg.production else None)
        self._dims = dims

        # one cache copy per path (reference first), zero-filled as vLLM allocates KV caches
        shape = (cfg.num_blocks, BLOCK_SIZE, dims.CACHE_BYTES_PER_TOKEN)
        self.states: dict[str, _PathState] = {
            "reference": _PathState("reference", torch.zeros(shape, dtype=torch.uint8, device=self.dev), None, None,
                                    1, 0)}
        self._setup_paths()
        self._flush = None
        if cfg.cold_l2:
            from smpart.bench.harness import l2_flush_buffer

            self._flush = l2_flush_buffer(self.dev)
        self._pool = None
        self._validated_step = None

    # ---------------------------------------------------------------------------------
    # setup
    # ---------------------------------------------------------------------------------
    def _setup_paths(self) -> None:
        from smpart import region
        from smpart.workspace import RegionWorkspace

        cfg = self.cfg
        max_tokens = self.buckets[-1] * cfg.next_n
        strided = 0
        for p in cfg.paths:
            try:
                region.load_path(p)
            except Exception as e:  # noqa: BLE001 - report per path
                self.skipped[p] = f"not loadable ({type(e).__name__}: {e})"
                continue
            if p in VENDOR_PATHS:
                from smpart.vendor import vendor_available

                ok, why = vendor_available()
                if not ok:
                    self.skipped[p] = why
                    continue
            if p in V32_PATHS:
                from smpart.vendor_v32 import v32_available

                ok, why = (v32_available() if cfg.production
                           else (False, "runs the production model's region only (LoopConfig.production)"))
                if not ok:
                    self.skipped[p] = why
                    continue
            if p == "green_ctx" and not self.is_cuda:
                self.skipped[p] = "green_ctx: needs a CUDA device"
                continue
            stride = cfg.strides.get(p, 1)
            offset = 0
            if stride > 1:
                offset, strided = strided, strided + 1
            ws = RegionWorkspace.for_shape(max_tokens, self.max_len, self.dev)
            self.states[p] = _PathState(p, self.states["reference"].kv_cache.clone(), ws, cfg.configs.get(p), stride,
                                        offset)
            self.stats.path_runs[p] = 0

    @property
    def path_names(self) -> list[str]:
        """The non-reference paths that run (skipped ones excluded)."""
        return [p for p in self.states if p != "reference"]

    # ---------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Run one decode step (arrivals, admission, growth, all paths, checks, retirement).

        Returns
        -------
        dict : the step's CSV row.

        Raises
        ------
        MismatchError : a path disagreed with the reference.
        """
        from smpart.region import run_region

        cfg = self.cfg
        self._arrivals(step)
        preempted0 = self.stats.preempted
        self._grow()  # running requests first, then the waiting queue (vLLM v1's scheduler order)
        # no admission in a step that preempted (as vLLM), unless nothing runs (never an empty step)
        admitted = self._admit() if self.stats.preempted == preempted0 or not self.running else 0
        if not self.running:
            raise RuntimeError(f"step {step}: no request could be scheduled (num_blocks {cfg.num_blocks} too small?)")
        sb = self._build_step(step)
        stale = self._stale_positions(sb)
        if cfg.production:  # vLLM's fused_norm_rope: the new keys into every cache copy, before the region
            self._write_keys(sb)
        ref_args = self._args(sb, self.states["reference"].kv_cache, padded=False)
        run_region(ref_args, "reference", use_ue8m0=cfg.use_ue8m0)
        outs = self._run_paths(sb, ref_args)
        checked = step % cfg.check_every == 0
        if checked:
            self._check(sb, ref_args, outs)
        ctxs = [r.context_len + cfg.next_n for r in sb.requests]
        s = self.stats
        s.steps += 1
        s.stale_positions += stale
        s.steps_with_stale += int(stale > 0)
        s.max_batch_seen = max(s.max_batch_seen, sb.B)
        s.min_batch_seen = sb.B if s.steps == 1 else min(s.min_batch_seen, sb.B)
        s.max_context_seen = max(s.max_context_seen, max(ctxs))
        finished = self._finish_step(sb)
        s.block_allocations = self.allocator.num_allocations
        s.blocks_reused = self.allocator.num_reused
        row = {"step": step, "batch": sb.B, "padded_batch": sb.Bp, "num_tokens": sb.T,
               "total_context_tokens": int(sum(ctxs)), "max_context": max(ctxs), "admitted": admitted,
               "finished": finished, "preempted": s.preempted - preempted0, "waiting": len(self.waiting),
               "blocks_used": self.allocator.num_used, "blocks_reused_total": s.blocks_reused,
               "stale_positions": stale, "checked": int(checked)}
        for p in self.path_names:
            st = self.states[p]
            ran = p in outs
            row[f"{p}_us"] = st.times_us[-1][2] if ran and st.times_us and st.times_us[-1][0] == step else None
            row[f"{p}_wall_s"] = st.wall_s[-1] if ran and st.wall_s else None
        self.step_rows.append(row)
        return row

    def run(self, time_budget_s: float | None = None) -> dict:
        """Run ``cfg.steps`` steps (capturing graphs first in graph mode); returns :meth:`summary`.

        ``time_budget_s``: stop early, after the step during which this many wall-clock seconds
        (from the call) have passed; ``self.stats.steps`` says how many ran.

        Raises
        ------
        MismatchError : the first disagreement with the reference (``self.step_rows`` holds the steps
            before it).
        """
        if self.cfg.graphs and not any(st.graphs for st in self.states.values()):
            self.capture_all()
        t0 = time.perf_counter()
        for step in range(self.cfg.steps):
            row = self.step(step)
            if self.progress:
                self.progress(step, row)
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
        return self.summary()

    # ---------------------------------------------------------------------------------
    # results
    # ---------------------------------------------------------------------------------
    def baseline(self) -> str | None:
        """The first of ``vllm_v32``, ``vllm_dual_stream``, ``dual_stream`` that was timed, else None."""
        for b in BASELINES:
            if b in self.states and self.states[b].times_us:
                return b
        return None

    def path_summary(self) -> dict:
        """Per path: runs, median / p90 / mean us per step; against the baseline: the median over the
        steps both ran of ``baseline_us - path_us`` per layer (``saving_per_layer_us``), times 61 layers
        (``saving_per_step_us``: one decode step of the model), and per generated token
        (``saving_per_token_us``: the step's saving over the tokens a request gains per step, 1 or
        1 + the MTP acceptance), and the median ratio ``path_us / baseline_us``."""
        from smpart.bench.harness import _percentile

        base = self.baseline()
        base_t = {s: us for s, _, us in self.states[base].times_us} if base else {}
        tokens_per_step = self.stats.tokens_generated / max(self.stats.request_steps, 1) or 1.0
        out = {}
        for p in self.path_names:
            st = self.states[p]
            d = {"runs": st.runs}
            if st.times_us:
                us = sorted(x[2] for x in st.times_us)
                d.update(median_us=statistics.median(us), p90_us=_percentile(us, 90), mean_us=statistics.fmean(us))
                if base and p != base:
                    sav = [base_t[s] - u for s, _, u in st.times_us if s in base_t]
                    if sav:
                        d["saving_per_layer_us"] = statistics.median(sav)
                        d["saving_per_step_us"] = NUM_LAYERS * d["saving_per_layer_us"]
                        d["saving_per_token_us"] = d["saving_per_step_us"] / tokens_per_step
                        d["ratio_to_baseline"] = statistics.median(
                            [u / base_t[s] for s, _, u in st.times_us if s in base_t])
            if st.wall_s:
                d["interpreter_s_per_step"] = statistics.fmean(st.wall_s)
            out[p] = d
        return out

    def summary(self) -> dict:
        """Everything ``summary.json`` holds: config, stats, per-path results, skipped paths."""
        cfg = dataclasses.asdict(self.cfg)
        cfg["configs"] = {k: repr(v) for k, v in self.cfg.configs.items()}
        cfg["mix"] = dataclasses.asdict(self.cfg.mix)
        return {"config": cfg, "stats": dataclasses.asdict(self.stats), "paths": self.path_summary(),
                "baseline": self.baseline(), "skipped": dict(self.skipped), "failed": dict(self.failed),
                "region": "production" if self.cfg.production else "generic",
                "buckets": self.buckets,
                "timed": bool(self.is_cuda), "graphs": bool(self.cfg.graphs)}
