"""``RegionWorkspace``: every scratch buffer of the region, made once per shape bucket.

The forward of every Triton path allocates nothing (DESIGN.md 7a): the logits, the top-k
candidate buffers and the partitioned kernel's counters live here. Counters are zero at creation
and every kernel that uses them leaves them zero again (reset in-kernel by the last user), so one
workspace serves every CUDA-graph replay.
"""

from __future__ import annotations

import dataclasses

import torch

from .triton_kernels import dims


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclasses.dataclass
class RegionWorkspace:
    """Scratch buffers for up to ``max_tokens`` decode rows of up to ``max_len`` visible positions.

    Attributes
    ----------
    max_tokens : rows T the buffers hold (<= 256).
    max_len : logits columns (a multiple of 64); every visible length must be <= max_len.
    logits : fp32 [max_tokens, max_len] (bytes: 4 * max_tokens * max_len).
    topk : the top-k kernel's workspace (:class:`smpart.triton_kernels.topk.TopkWorkspace`).
    counters : int32 [64 + max_tokens * max_chunks], zero between launches (partitioned kernel).
    q_c_fp8, q_c_scale : float8_e4m3fn [max_tokens, 1536] and fp32 [max_tokens, 12]: ``q_c``
        quantized once per token for the prequantized GEMM (``q_b_proj._q_c_quant_row``; written by
        the partitioned kernel's first launch, read by the GEMM tiles of its second).
    """

    max_tokens: int
    max_len: int
    logits: torch.Tensor
    topk: object
    counters: torch.Tensor
    q_c_fp8: torch.Tensor = None
    q_c_scale: torch.Tensor = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def for_shape(cls, max_tokens: int, max_len: int, device) -> "RegionWorkspace":
        """Allocate for ``max_tokens`` rows (1..256) and ``max_len`` positions (1..163840).

        Raises
        ------
        ValueError : out-of-range sizes.
        """
        if not 1 <= max_tokens <= dims.T_MAX:
            raise ValueError(f"max_tokens: expected 1..{dims.T_MAX}, got {max_tokens}")
        if not 1 <= max_len <= dims.MAX_MODEL_LEN:
            raise ValueError(f"max_len: expected 1..{dims.MAX_MODEL_LEN}, got {max_len}")
        from .triton_kernels.topk import TOPK_CHUNK, TopkWorkspace

        max_len = _round_up(max_len, dims.CACHE_BLOCK_SIZE)
        topk = TopkWorkspace(max_tokens, max_len, device, chunk=TOPK_CHUNK)
        return cls(
            max_tokens=max_tokens,
            max_len=max_len,
            logits=torch.empty(max_tokens, max_len, dtype=torch.float32, device=device),
            topk=topk,
            counters=torch.zeros(cls.num_counters(max_tokens, topk.max_chunks), dtype=torch.int32, device=device),
            q_c_fp8=torch.empty(max_tokens, dims.Q_LORA_RANK, dtype=torch.float8_e4m3fn, device=device),
            q_c_scale=torch.empty(max_tokens, dims.Q_LORA_RANK // dims.QUANT_GROUP, dtype=torch.float32,
                                  device=device),
        )

    @staticmethod
    def num_counters(max_tokens: int, max_chunks: int) -> int:
        """Length of ``counters``: 64 queue slots, then one per (row, top-k chunk)
        (``partitioned._QUEUE_SLOTS``; ``max_chunks`` = ``topk.max_chunks``)."""
        return 64 + max_tokens * max_chunks

    @classmethod
    def for_args(cls, args, max_len: int | None = None) -> "RegionWorkspace":
        """A workspace for ``args`` (RegionArgs); ``max_len`` defaults to the block table's capacity
        (``block_table.shape[1] * 64``, capped at 163840), which needs no device read."""
        if max_len is None:
            max_len = min(args.block_table.shape[1] * dims.CACHE_BLOCK_SIZE, dims.MAX_MODEL_LEN)
        return cls.for_shape(args.num_tokens, max_len, args.q_c.device)

    def check_fits(self, args) -> None:
        """Raise ``ValueError`` if ``args`` has more rows than the workspace or another device, if
        ``counters`` is shorter than the top-k workspace's chunking needs, or
        ``ValueError``/``TypeError`` if its ``q_c_fp8`` / ``q_c_scale`` do not fit the batch
        (``q_b_proj.check_prequant_buffers``; both ``None`` is allowed: the fused-quant GEMM)."""
        if args.num_tokens > self.max_tokens:
            raise ValueError(f"workspace: holds {self.max_tokens} rows, the batch has {args.num_tokens}")
        if self.logits.device != args.q_c.device:
            raise ValueError(f"workspace: on {self.logits.device}, the batch is on {args.q_c.device}")
        need = self.num_counters(args.num_tokens, self.topk.max_chunks)
        if self.counters.numel() < need:  # one per (row, chunk) of topk's chunking, past 64 queue slots
            raise ValueError(f"workspace.counters: {self.counters.numel()} int32, the batch needs {need} "
                             f"(64 + {args.num_tokens} rows x {self.topk.max_chunks} top-k chunks)")
        if self.q_c_fp8 is not None or self.q_c_scale is not None:  # both None: the fused-quant GEMM
            from .triton_kernels.q_b_proj import check_prequant_buffers

            check_prequant_buffers(self.q_c_fp8, self.q_c_scale, args.num_tokens, prefix="workspace.")
            if self.q_c_fp8.device != args.q_c.device:
                raise ValueError(f"workspace.q_c_fp8: on {self.q_c_fp8.device}, the batch is on {args.q_c.device}")
