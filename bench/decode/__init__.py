"""``smpart-bench decode``: a continuous-batching decode loop of the DSV3.2 region, every path side by side.

What an inference engineer runs first: does every path give the reference's answer step after step
while requests come and go, and how many microseconds does each path save per layer?

The loop (one simulated decoder layer, decode steps only)
---------------------------------------------------------
* **Paged indexer cache and block pool, as vLLM v1 keeps them.** Each path owns one copy of the
  indexer cache, uint8 ``[num_blocks, 64, 132]`` (vLLM's layout, docs/KERNELS.md "Layouts"), zero-filled at start
  as vLLM's model runner allocates KV caches (``torch.zeros`` in
  ``vllm/v1/worker/gpu_model_runner.py::_allocate_kv_cache_tensors``). :class:`BlockAllocator`
  mirrors ``vllm/v1/core/block_pool.py``: block 0 is the reserved null block, free blocks sit in a
  FIFO queue, allocation pops from the front, a finished request's blocks go back to the tail in
  reverse order (its tail block first, ``single_type_kv_cache_manager.py::free``). Blocks are
  never cleared: a reused block keeps its previous owner's bytes past the new owner's length
  (:attr:`LoopStats.stale_positions` counts those bytes seen inside live block tables), and no
  path may let them reach a logit.
* **Requests.** Arrivals are Poisson with a rate that rises and falls in waves
  (``peak * sin^2(pi * step / period)``), so the batch size sweeps from 1 to ``--max-batch`` and
  back. Prompt and output lengths come from :class:`RequestMix` (seeded; see its docstring for the
  assumed distribution). Admission is first-come first-served while blocks and batch slots last;
  when a running request cannot grow, the most recently admitted request is preempted (its blocks
  freed, re-queued at the front, re-prefilled on readmission with recomputed keys), as vLLM v1's
  scheduler does. Requests finish after their drawn number of output tokens (or at
  ``--max-context``) and free their blocks.
* **Prefill** writes each admitted prompt's indexer keys (random bf16, quantized exactly as
  ``reference.indexer_k_quant_and_cache``) into every path's cache copy.
* **Decode step.** Every running request decodes ``next_n`` rows (1, or 2 with one MTP draft
  token); :class:`~smpart.region.RegionArgs` is built from the allocator's
  ``block_table`` (a persistent table whose rows keep stale ids past each request's blocks, as
  vLLM's ``BlockTable`` does), ``slot_mapping``, ``context_lens`` (vLLM ``seq_lens``, new tokens
  included), ``positions``, a fixed ``cos_sin_cache`` and ``q_b_proj`` weight, and fresh random
  ``q_c``, ``k_pe``, ``index_q_fp8``, ``index_weights``, ``index_k``. The region itself writes the
  new keys into each path's cache. With MTP the draft is accepted with probability
  ``--mtp-accept`` (the context grows by 1 or 2; a rejected draft's slot is rewritten next step).
* **Checks.** ``reference`` runs every step; every other path is compared with it
  (``checks.check_region`` through ``smpart.bench.common.check_path``: cache bytes exact, ``k_pe``
  exact, ``q`` by normalized difference, ``topk_indices`` by the rule of docs/CORRECTNESS.md; ``--check
  fast`` is a vectorized equivalent for long GPU runs, :func:`fast_check_region`), and after each
  step every path's cache copy must equal the reference's byte for byte. The first mismatch stops
  the run with a :class:`MismatchError` naming the step, path, row, request and first differing
  element.
* **CUDA graphs** (``--graphs``, GPU only, the default there): one graph per path per batch-size
  bucket (powers of two up to ``--max-batch``, plus ``--max-batch``: like vLLM, a fixed list of
  captured sizes with each batch padded up to the next one; vLLM's default list is denser, 1, 2, 4,
  then steps of 8), captured once after eager warm-ups, replayed with the live step copied into
  the captured buffers; padding rows have ``slot_mapping`` -1 and context length 0, as vLLM pads.
  Each replay is timed with CUDA events, by default after a read-only L2 flush (``--cold-l2``).
  The vendor paths' per-step DeepGEMM metadata (``context_lens_2d``, ``schedule_meta``) is rebuilt
  eagerly before each replay, as vLLM's metadata builder does outside the forward; their host-side
  ``max_seq_len`` is frozen in the graph at ``--max-context`` (captured with every row at that
  length).
* **Production model** (``LoopConfig.production``; the default on a GPU where ``vllm_v32`` loads, and
  whenever ``--paths`` names a ``vllm_v32*`` path): every path runs the region as vLLM 0.33's
  production DSV3.2 model hands it over (``smpart.prep``: bf16 ``index_q`` and raw weights, the
  index-q prep inside the region), the loop writing the new keys into every cache copy and
  -1-filling ``topk_indices`` outside the timing (vLLM's ``fused_norm_rope``); the baseline is
  ``vllm_v32``. Where it cannot run (CPU, no DeepGEMM / vLLM ops / fused_q) the CLI says so in one
  line and runs the generic region as before.
* **CPU economy** (``--stride PATH=N``): a path may run only every N-th step; in between, its
  cache copy receives the reference's new bytes, so it keeps reading its own earlier writes.

Outputs (``--out``): ``steps.csv`` (one row per step: batch, tokens, contexts, allocator counters,
per-path us), ``summary.json``, ``summary.md`` (per-path median / p90 us per step and the per-layer
saving against ``vllm_v32``, else ``vllm_dual_stream``, else ``dual_stream``, extrapolated to DSV3.2's 61 layers: per
model step and per generated token) and ``step_time_vs_batch.png``. Without CUDA the loop runs a
short, small-dims correctness loop under ``TRITON_INTERPRET=1`` (re-running itself with it set if
needed) and says that timings need a GPU.

Usage: ``smpart-bench decode [options]`` or ``python -m smpart.bench.decode [options]``.

Modules, by concern: :mod:`~smpart.bench.decode.scheduler` (block pool, request mix, arrivals,
admission, prefill, preemption), :mod:`~smpart.bench.decode.config` (``LoopConfig``),
:mod:`~smpart.bench.decode.steps` (step inputs, CUDA-graph capture, launches, timing),
:mod:`~smpart.bench.decode.checking` (against the reference; the mismatch report),
:mod:`~smpart.bench.decode.loop` (``DecodeLoop``), :mod:`~smpart.bench.decode.report` (CSV, JSON,
Markdown, plot), :mod:`~smpart.bench.decode.cli` (the command line).
"""

from .checking import MismatchError, fast_check_region, format_report, reference_logits64
from .common import BASELINES, BLOCK_SIZE, NUM_LAYERS, SUPPORTED_H, VENDOR_PATHS
from .config import LoopConfig
from .loop import DecodeLoop
from .report import write_outputs, write_steps_csv
from .scheduler import (BlockAllocator, LoopStats, OutOfBlocksError, Request, RequestMix, batch_buckets, bucket_for,
                        copy_slots, quantize_keys, tie_free_keys, tie_free_query, write_keys)
from .cli import build_parser, config_from_args, main, parse_partition_config

__all__ = ["BASELINES", "BLOCK_SIZE", "NUM_LAYERS", "SUPPORTED_H", "VENDOR_PATHS", "BlockAllocator", "DecodeLoop",
           "LoopConfig", "LoopStats", "MismatchError", "OutOfBlocksError", "Request", "RequestMix", "batch_buckets",
           "bucket_for", "build_parser", "config_from_args", "copy_slots", "fast_check_region", "format_report", "main",
           "parse_partition_config", "quantize_keys", "reference_logits64", "tie_free_keys", "tie_free_query",
           "write_keys", "write_outputs", "write_steps_csv"]
