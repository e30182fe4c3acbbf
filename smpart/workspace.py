"""``RegionWorkspace``: every scratch buffer of the region, made once per shape bucket.

The forward of every Triton path allocates nothing (CUDA-graph capturable): the logits, the radix top-k's
histograms and candidate buffers and the partitioned kernel's counters live here. Counters are zero at creation
and every kernel that uses them leaves them zero again (reset in-kernel by the last user), so one
workspace serves every CUDA-graph replay.
"""

from __future__ import annotations

import dataclasses

import torch

from .triton_kernels import dims
from .triton_kernels.topk_config import check_buffer as _check_buffer


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
    counters : int32 [64 + max_tokens], zero between launches (partitioned kernel: 64 queue slots,
        then one logits-arrival counter per row).
    radix : the radix top-k's workspace (:class:`smpart.triton_kernels.radix_topk.RadixTopkWorkspace`:
        per-row histograms the logits kernel fills, counters, candidates; zero between launches),
        used by every path's top-k.
    q_c_fp8, q_c_scale : float8_e4m3fn [max_tokens, 1536] and fp32 [max_tokens, 12]: ``q_c``
        quantized once per token for the prequantized GEMM (``q_b_proj._q_c_quant_row``; written by
        the partitioned kernel's first launch, read by the GEMM tiles of its second).
    vllm_topk_workspace, vllm_topk_lens : ``None``, or (made once by :meth:`ensure_vllm_topk`) uint8
        [1 MiB] (vLLM ``RADIX_TOPK_WORKSPACE_SIZE``, the scratch of its ``cooperative_topk`` /
        ``persistent_topk``) and int32 [max_tokens] (each row's clamped visible length, the
        ``context_lens_2d`` those ops read): the buffers of ``PartitionConfig(topk_impl="vllm")``.
    """

    max_tokens: int
    max_len: int
    logits: torch.Tensor
    counters: torch.Tensor
    radix: object
    q_c_fp8: torch.Tensor = None
    q_c_scale: torch.Tensor = None
    extra: dict = dataclasses.field(default_factory=dict)
    vllm_topk_workspace: torch.Tensor = None
    vllm_topk_lens: torch.Tensor = None

    @classmethod
    def for_shape(cls, max_tokens: int, max_len: int, device) -> "RegionWorkspace":
        """Allocate for ``max_tokens`` rows (1..256) and ``max_len`` positions (1..163840).

        Raises
        ------
        TypeError : ``max_tokens`` or ``max_len`` not an int.
        ValueError : out-of-range sizes.
        """
        if type(max_tokens) is not int:
            raise TypeError(f"max_tokens: expected an int, got {max_tokens!r}")
        if not 1 <= max_tokens <= dims.T_MAX:
            raise ValueError(f"max_tokens: expected 1..{dims.T_MAX}, got {max_tokens}")
        from .validate import check_max_len

        if max_len is None:
            raise TypeError("max_len: expected an int, got None")
        check_max_len(max_len)
        if not 1 <= max_len <= dims.MAX_MODEL_LEN:
            raise ValueError(f"max_len: expected 1..{dims.MAX_MODEL_LEN}, got {max_len}")
        from .triton_kernels.radix_topk import RadixTopkWorkspace

        max_len = _round_up(max_len, dims.CACHE_BLOCK_SIZE)
        return cls(
            max_tokens=max_tokens,
            max_len=max_len,
            logits=torch.empty(max_tokens, max_len, dtype=torch.float32, device=device),
            counters=torch.zeros(cls.num_counters(max_tokens), dtype=torch.int32, device=device),
            q_c_fp8=torch.empty(max_tokens, dims.Q_LORA_RANK, dtype=torch.float8_e4m3fn, device=device),
            q_c_scale=torch.empty(max_tokens, dims.Q_LORA_RANK // dims.QUANT_GROUP, dtype=torch.float32,
                                  device=device),
            radix=RadixTopkWorkspace(max_tokens, device),
        )

    @staticmethod
    def num_counters(max_tokens: int) -> int:
        """Length of ``counters``: 64 queue slots (``partitioned._QUEUE_SLOTS``), then one
        logits-arrival counter per row (the fused top-k's last-arriver election)."""
        return 64 + max_tokens

    @classmethod
    def for_args(cls, args, max_len: int | None = None) -> "RegionWorkspace":
        """A workspace for ``args`` (RegionArgs); ``max_len`` defaults to the block table's capacity
        (``block_table.shape[1] * 64``, capped at 163840), which needs no device read.

        Raises
        ------
        TypeError : ``args`` not a RegionArgs (a ``DecodeBatch``: pass ``batch.args``); ``max_len``
            not an int.
        ValueError : ``max_len`` <= 0 or > 163840.
        """
        from .validate import check_args_type, check_max_len

        check_args_type(args)
        check_max_len(max_len)
        if max_len is None:
            max_len = min(args.block_table.shape[1] * dims.CACHE_BLOCK_SIZE, dims.MAX_MODEL_LEN)
        return cls.for_shape(args.num_tokens, max_len, args.q_c.device)

    def visible_cols(self, args) -> int:
        """Logits columns any row of ``args`` can see: ``min(max_len, block_table.shape[1] * 64)``.

        Every kernel clamps a row's visible length to this bound (value checks are off under CUDA
        graphs, so ``context_lens`` is not trusted); metadata only, no device read.
        """
        return min(self.max_len, args.block_table.shape[1] * dims.CACHE_BLOCK_SIZE)

    def ensure_vllm_topk(self) -> None:
        """Allocate, once, the buffers vLLM's decode top-k needs (``PartitionConfig(topk_impl="vllm")``):
        ``vllm_topk_workspace`` uint8 [1 MiB] and ``vllm_topk_lens`` int32 [max_tokens], on the
        logits' device; a no-op when they exist. The partitioned path calls it in eager mode; call it
        yourself before capturing a CUDA graph with a fresh workspace (nothing is allocated under
        capture).

        Raises
        ------
        RuntimeError : the buffers are missing and a CUDA graph is being captured on this stream.
        """
        if self.vllm_topk_workspace is not None and self.vllm_topk_lens is not None:
            return
        from .validate import _is_capturing
        from .vendor import RADIX_TOPK_WORKSPACE_SIZE

        if _is_capturing():
            raise RuntimeError("workspace.vllm_topk_workspace: config.topk_impl='vllm' needs vLLM's top-k buffers, "
                               "which are not allocated under CUDA-graph capture; call workspace.ensure_vllm_topk() "
                               "(or run the path once eagerly) before capturing")
        dev = self.logits.device
        self.vllm_topk_workspace = torch.empty(RADIX_TOPK_WORKSPACE_SIZE, dtype=torch.uint8, device=dev)
        self.vllm_topk_lens = torch.zeros(self.max_tokens, dtype=torch.int32, device=dev)

    def reset(self) -> None:
        """Zero every arrival counter (``counters``, ``radix.counters``) and the radix top-k's
        histograms (``radix.hist``), on the current stream.

        Kernels leave the counters zero (the last arriver resets its counter), so a workspace needs
        this only after a launch that did not complete (an error mid-launch, an interrupted
        benchmark, a kernel bug). In eager mode ``run_region`` refuses a workspace whose counters
        are not zero (:meth:`check_clean`) and names this method; a CUDA graph cannot check, so
        call it before capturing with a workspace of unknown history.
        """
        for _, c in self._zero_between_launches():
            c.zero_()

    def _zero_between_launches(self) -> list:
        """(name, tensor) of every buffer the kernels leave zero: the arrival counters, and the radix
        top-k's histograms and counters."""
        out = [("workspace.counters", self.counters)]
        for n in ("counters", "hist"):
            x = getattr(self.radix, n, None)
            if isinstance(x, torch.Tensor):
                out.append((f"workspace.radix.{n}", x))
        return out

    def check_clean(self) -> None:
        """Raise ``ValueError`` if an arrival counter is not zero (stale state from a launch that
        did not complete: the next launch would elect the wrong last arriver and write garbage
        rows). Reads the counters on the host (one sync): eager mode only."""
        for name, c in self._zero_between_launches():
            nz = torch.count_nonzero(c).item()
            if nz:
                raise ValueError(f"{name}: {nz} arrival counters are not zero (a launch did not complete); "
                                 f"call workspace.reset() before reusing this workspace")

    def check_fits(self, args) -> None:
        """Check every buffer of the workspace against the batch ``args`` (RegionArgs), from tensor
        metadata only (no device read: runs in eager mode and under CUDA-graph capture alike).

        Checked: ``max_tokens``/``max_len`` are ints (``max_len`` a multiple of 64 in
        ``[64, 163840]``); ``logits`` fp32 ``[>= T, >= max_len]`` contiguous; ``counters`` int32
        ``[>= 64 + T]``; ``radix`` (:meth:`_check_radix`); ``q_c_fp8``/``q_c_scale``
        (``q_b_proj.check_prequant_buffers``; both ``None`` is allowed: the fused-quant GEMM);
        ``vllm_topk_workspace`` uint8 ``[>= 1 MiB]`` and ``vllm_topk_lens`` int32 ``[>= T]`` where
        present. Every buffer contiguous and on the batch's device.

        Raises
        ------
        TypeError : a buffer that is not a tensor, or has the wrong dtype; ``radix`` of another type.
        ValueError : wrong shape, device, contiguity or geometry (the message names the buffer).
        """
        T, dev = args.num_tokens, args.q_c.device
        for name in ("max_tokens", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"workspace.{name}: expected an int, got {v!r}")
        if args.num_tokens > self.max_tokens:
            raise ValueError(f"workspace: holds {self.max_tokens} rows, the batch has {args.num_tokens}")
        if not (dims.CACHE_BLOCK_SIZE <= self.max_len <= dims.MAX_MODEL_LEN and self.max_len % dims.CACHE_BLOCK_SIZE == 0):
            raise ValueError(f"workspace.max_len: expected a multiple of 64 in [64, {dims.MAX_MODEL_LEN}], "
                             f"got {self.max_len}")
        _check_buffer("workspace.logits", self.logits, torch.float32, dev, (T, self.max_len))
        _check_buffer("workspace.counters", self.counters, torch.int32, dev, (self.num_counters(T),))
        self._check_radix(T, dev)
        if self.q_c_fp8 is not None or self.q_c_scale is not None:  # both None: the fused-quant GEMM
            from .triton_kernels.q_b_proj import check_prequant_buffers

            check_prequant_buffers(self.q_c_fp8, self.q_c_scale, args.num_tokens, prefix="workspace.")
            if self.q_c_fp8.device != args.q_c.device:
                raise ValueError(f"workspace.q_c_fp8: on {self.q_c_fp8.device}, the batch is on {args.q_c.device}")
        if self.vllm_topk_workspace is not None:  # None: made by ensure_vllm_topk when the hybrid first runs
            from .vendor import RADIX_TOPK_WORKSPACE_SIZE

            _check_buffer("workspace.vllm_topk_workspace", self.vllm_topk_workspace, torch.uint8, dev,
                          (RADIX_TOPK_WORKSPACE_SIZE,))
        if self.vllm_topk_lens is not None:
            _check_buffer("workspace.vllm_topk_lens", self.vllm_topk_lens, torch.int32, dev, (T,))

    def _check_radix(self, T: int, dev) -> None:
        """The top-k's workspace: a ``RadixTopkWorkspace`` whose geometry and buffers fit ``T`` rows on
        ``dev`` (``RadixTopkWorkspace.check``: ``hist`` int32 ``[>= T, 2048]``, ``counters`` int32
        ``[>= T, 2]``, ``cand_key``/``cand_pos`` int32 ``[>= T, cand]``, ``scratch`` int32
        ``[>= T, 2 * cp]``, ``cand``/``cp`` powers of two in ``topk_config.CAND_RANGE`` / ``CP_RANGE``)."""
        from .triton_kernels.topk_config import RadixTopkWorkspace

        if not isinstance(self.radix, RadixTopkWorkspace):
            raise TypeError(f"workspace.radix: expected a RadixTopkWorkspace, got {type(self.radix).__name__}")
        self.radix.check(T, dev, name="workspace.radix")

    def buffers(self) -> dict:
        """Every tensor the kernels write, by name (``workspace.logits``, ...; ``None`` skipped)."""
        out = {"workspace.logits": self.logits, "workspace.counters": self.counters,
               "workspace.q_c_fp8": self.q_c_fp8, "workspace.q_c_scale": self.q_c_scale,
               "workspace.vllm_topk_workspace": self.vllm_topk_workspace,
               "workspace.vllm_topk_lens": self.vllm_topk_lens}
        if self.radix is not None:  # check_fits refuses a missing one; this lists what there is
            out.update({f"workspace.radix.{n}": x for n, x in vars(self.radix).items() if isinstance(x, torch.Tensor)})
        return {k: v for k, v in out.items() if v is not None}
