"""Constants of the decode loop (DSV3.2 and vLLM values it mirrors), and the two records every part
shares: a path's state (``_PathState``) and one step's inputs (``StepBatch``)."""

from __future__ import annotations

import dataclasses

import torch

from smpart.bench.common import V32_PATHS, VENDOR_PATHS  # noqa: F401 - one definition, re-exported here

# Kernel modules (``smpart.triton_kernels.*``) are imported lazily: Triton reads TRITON_INTERPRET when
# a kernel is decorated, so the CPU mode must set it (re-exec) before any of them is imported.

NUM_LAYERS = 61  # DSV3.2 decoder layers; every one runs this region once per decode step
BLOCK_SIZE = 64  # indexer cache tokens per block (dims.CACHE_BLOCK_SIZE)
T_MAX = 256  # decode rows the region accepts (dims.T_MAX)
MAX_MODEL_LEN = 163840  # dims.MAX_MODEL_LEN
SUPPORTED_H = (128, 64, 32, 16)
BASELINES = ("vllm_v32", "vllm_dual_stream", "dual_stream")  # the first one timed is the baseline
_TIE_FREE_DIGITS = 5  # base-16 digits per key code (batch._DIGITS): 16**5 = 2**20 > 163840
_CODE_MOD = 16**_TIE_FREE_DIGITS


# ======================================================================================
# per-path state and one step's inputs
# ======================================================================================
class _PathState:
    """One path's persistent state: its own cache copy, workspace, captured graphs, timings."""

    def __init__(self, name: str, kv_cache: torch.Tensor, workspace, config, stride: int, offset: int):
        self.name = name
        self.kv_cache = kv_cache
        self.workspace = workspace
        self.config = config
        self.stride = stride
        self.offset = offset
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, static RegionArgs)
        self.times_us: list[tuple[int, int, float]] = []  # (step, batch, us)
        self.wall_s: list[float] = []
        self.runs = 0

    def runs_at(self, step: int) -> bool:
        return (step + self.offset) % self.stride == 0


@dataclasses.dataclass
class StepBatch:
    """The decode step being run.

    Attributes
    ----------
    step : step index. requests : the running requests in row order (row ``b*next_n + j``).
    B, Bp : live and padded batch sizes; T, Tp : live and padded rows (``* next_n``).
    tensors : dict of padded device tensors (``q_c`` [Tp, 1536] bf16, ``k_pe`` [Tp, 1, 64] bf16,
        ``index_q_fp8`` [Tp, 64, 128] fp8, ``index_weights`` [Tp, 64] fp32, ``index_k`` [Tp, 128] bf16,
        ``positions`` int64 [Tp], ``slot_mapping`` int64 [Tp] (-1 on padding rows), ``block_table``
        int32 [Bp, max_blocks], ``context_lens`` int32 [Bp] (0 on padding rows)).
    live_slots : int64 [T] device tensor of the slots written this step (all >= 0).
    """

    step: int
    requests: list
    B: int
    Bp: int
    T: int
    Tp: int
    tensors: dict
    live_slots: torch.Tensor
