"""The top-k's configuration, workspace and argument checks, shared by both algorithms
(``sample_topk.py``, ``radix_topk.py``) and the persistent kernels (``partitioned.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from . import dims
from .aliasing import check_no_overlap

TOPK_K = dims.INDEX_TOPK  # 2048
HIST_BINS = 2048  # bins per row histogram (the bin function below is written for 2048)
RADIX_CAND = 8192  # candidate slots per row (threshold-bin members; the sampled top-k's values >= tau)
RADIX_CP = 256  # members ranked pairwise (<= this after narrowing)
RADIX_RT = 32  # rows of the pairwise rank tile
RADIX_CHUNK = 4096  # positions per (row, chunk) program of long rows
RADIX_SHORT = 8192  # rows up to this many positions: one program per row
# the workspace geometry the kernels accept: sample_topk packs counts of up to CAND lanes into 16-bit
# fields and its last arriver loads CAND // 2 or CAND lanes (a power of two, >= 2 * 2048); CP lanes
# of the pairwise rank
CAND_RANGE = (2 * TOPK_K, 32768)
CP_RANGE = (32, 1024)
PPR_MAX = 1 << 16  # programs per row of the sampled top-k, at most (rows have <= 80 chunks of 2048)
INTERPRETER_SMS = 132  # the SM count ``programs_per_row`` assumes without a GPU (an H100 SXM's)

@dataclasses.dataclass(frozen=True)
class RadixTopkConfig:
    """Launch parameters of :func:`radix_topk`.

    Attributes
    ----------
    chunk : positions per (row, chunk) program of long rows (power of two in [2048, 32768]).
    short_max : a launch whose length bound is <= this runs one program per row (its chunk is the
        bound rounded up to a power of two, >= 2048); no histogram pass (power of two).
    num_warps : warps of the select programs. hist_warps : warps of the histogram pass.
    bits : sub-ranges per bisection round of the sampled top-k (``sample_topk``), as a power of two:
        3 or 4 (2..6 with ``count=0``; 1 never narrows a bracket whose fp32 log2 rounds up: ``_span_shift``).
    count : how a round counts: 0 ``tl.histogram``, 1 packed one-hot int64 sums.
    sample : sampled values per long row (power of two in [256, 8192]); 0 = ``sample_topk.sample_size``.
    programs_per_row : the sampled top-k's programs per long row, at most (each takes every
        ``programs_per_row``-th chunk; one program owns its row with no atomics); 0 = auto
        (:func:`programs_per_row`: ``num_sms // T``, so that many rows get one program each and
        few rows get one per chunk). The radix algorithm always runs one program per chunk
        (``radix_topk.radix_topk`` ignores it, as ``sample_topk.sample_topk`` ignores ``algo``).
    algo : ``"sample"`` (default: ``sample_topk``, a sampled cutoff, no histogram) or ``"radix"``
        (this module: the 2048-bin histogram, built by the logits producer or a pass of its own);
        read by ``topk.topk`` and the persistent kernels.
    """

    chunk: int = RADIX_CHUNK
    short_max: int = RADIX_SHORT
    num_warps: int = 16
    hist_warps: int = 8
    bits: int = 4
    count: int = 1
    sample: int = 0
    programs_per_row: int = 0
    algo: str = "sample"

    def __post_init__(self):
        """Reject bad values: TypeError naming the field for a wrong type (a non-int, a bool, a
        non-str ``algo``), ValueError for a value out of range."""
        if not isinstance(self.algo, str):
            raise TypeError(f"config.algo: expected a str, got {type(self.algo).__name__}")
        for name in ("chunk", "short_max", "num_warps", "hist_warps", "bits", "count", "sample", "programs_per_row"):
            v = getattr(self, name)
            if type(v) is not int:
                raise TypeError(f"config.{name}: expected an int, got {type(v).__name__} {v!r}")
        if self.algo not in ("sample", "radix"):
            raise ValueError(f"config.algo: expected 'sample' or 'radix', got {self.algo!r}")
        for name, lo, hi in (("chunk", 2048, 32768), ("short_max", 2048, 32768), ("num_warps", 1, 32),
                             ("hist_warps", 1, 32)):
            v = getattr(self, name)
            if type(v) is not int or not lo <= v <= hi or v & (v - 1):
                raise ValueError(f"config.{name}: expected a power of two in [{lo}, {hi}], got {v!r}")
        if type(self.count) is not int or self.count not in (0, 1):
            raise ValueError(f"config.count: expected 0 (tl.histogram) or 1 (packed sums), got {self.count!r}")
        if type(self.bits) is not int or not (2 <= self.bits <= 6 if self.count == 0 else 3 <= self.bits <= 4):
            raise ValueError(f"config.bits: expected 3 or 4 (2..6 with count=0), got {self.bits!r}")
        s = self.sample
        if type(s) is not int or (s != 0 and (not 256 <= s <= 8192 or s & (s - 1))):
            raise ValueError(f"config.sample: expected 0 or a power of two in [256, 8192], got {s!r}")
        if not 0 <= self.programs_per_row <= PPR_MAX:
            raise ValueError(f"config.programs_per_row: expected 0 (auto) .. {PPR_MAX}, got {self.programs_per_row!r}")


class RadixTopkWorkspace:
    """Buffers of :func:`radix_topk` for up to ``max_tokens`` rows (allocated once).

    Parameters
    ----------
    max_tokens : rows T the buffers hold (int >= 1). device : torch device.
    cand : candidate slots per row (``CAND``): a power of two in [4096, 32768] (default
        ``RADIX_CAND``). The kernels load ``cand // 2`` or ``cand`` lanes with ``tl.arange``
        (``sample_topk._bin_counts``, ``radix_topk._resolve_regs``), which needs a power of two;
        ``sample_topk`` needs ``cand >= 2 * 2048`` and packs counts of up to ``cand`` lanes into
        16-bit fields.
    cp : members ranked pairwise (``CP``): a power of two in [32, 1024] (default ``RADIX_CP``).

    Attributes
    ----------
    hist : int32 [max_tokens, 2048], zero between launches (the row's last program zeroes it).
    counters : int32 [max_tokens, 2] (slot reservation, arrivals), zero between launches.
    cand_key, cand_pos : int32 [max_tokens, CAND] threshold-bin members.
    scratch : int32 [max_tokens, 2 * CP].

    Raises
    ------
    TypeError : ``max_tokens``, ``cand`` or ``cp`` not an int (a bool included).
    ValueError : ``max_tokens`` < 1; ``cand`` not a power of two in [4096, 32768]; ``cp`` not a
        power of two in [32, 1024].
    """

    def __init__(self, max_tokens: int, device, *, cand: int = RADIX_CAND, cp: int = RADIX_CP):
        for name, v in (("max_tokens", max_tokens), ("cand", cand), ("cp", cp)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
        for name, v, (lo, hi) in (("cand", cand, CAND_RANGE), ("cp", cp, CP_RANGE)):
            if not lo <= v <= hi or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two in [{lo}, {hi}], got {v!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: not a torch device ({e})") from None
        self.max_tokens, self.cand, self.cp = int(max_tokens), int(cand), int(cp)
        self.hist = torch.zeros(max_tokens, HIST_BINS, dtype=torch.int32, device=device)
        self.counters = torch.zeros(max_tokens, 2, dtype=torch.int32, device=device)
        self.cand_key = torch.empty(max_tokens, self.cand, dtype=torch.int32, device=device)
        self.cand_pos = torch.empty(max_tokens, self.cand, dtype=torch.int32, device=device)
        self.scratch = torch.empty(max_tokens, 2 * self.cp, dtype=torch.int32, device=device)

    def reset(self) -> None:
        """Zero ``hist`` and ``counters`` (both are zero between launches; a launch that did not
        complete, e.g. an interrupted graph replay, leaves them dirty and every later launch's
        selection wrong, rows possibly unwritten; never out of bounds: every store is masked to its
        row and slots). The launchers refuse dirty counters in eager mode (:meth:`check_clean`)."""
        self.hist.zero_()
        self.counters.zero_()

    def check(self, num_rows: int, device, name: str = "workspace") -> None:
        """Refuse a workspace the kernels cannot use for ``num_rows`` rows on ``device`` (metadata
        only; attributes may have been replaced since construction).

        ``cand``/``cp`` ints, powers of two in ``CAND_RANGE``/``CP_RANGE`` (the kernels take them as
        constexprs); ``max_tokens >= num_rows``; ``hist`` int32 ``[>= num_rows, 2048]``, ``counters``
        int32 ``[>= num_rows, 2]``, ``cand_key``/``cand_pos`` int32 ``[>= num_rows, cand]``, ``scratch``
        int32 ``[>= num_rows, 2 * cp]``, each contiguous on ``device``; any other tensor it holds:
        contiguous, on ``device``, ``>= num_rows`` rows.

        Raises
        ------
        TypeError : a geometry field that is not an int, a buffer that is not a tensor or has the
            wrong dtype (the message names ``{name}.<field>``).
        ValueError : a geometry field out of range, too few rows, a wrong shape, device or stride;
            ``num_rows`` < 0, ``device`` not a device (TypeError: ``num_rows`` not an int).
        """
        if isinstance(num_rows, bool) or not isinstance(num_rows, int):
            raise TypeError(f"num_rows: expected an int, got {num_rows!r}")
        if num_rows < 0:
            raise ValueError(f"num_rows: expected >= 0, got {num_rows}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: not a torch device ({e})") from None
        for field in ("max_tokens", "cand", "cp"):
            v = getattr(self, field, None)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}.{field}: expected an int, got {v!r}")
        for field, (lo, hi) in (("cand", CAND_RANGE), ("cp", CP_RANGE)):
            v = getattr(self, field)
            if not lo <= v <= hi or v & (v - 1):
                raise ValueError(f"{name}.{field}: expected a power of two in [{lo}, {hi}], got {v}")
        if self.max_tokens < num_rows:
            raise ValueError(f"{name}.max_tokens: holds {self.max_tokens} rows, the batch has {num_rows}")
        want = {"hist": HIST_BINS, "counters": 2, "cand_key": self.cand, "cand_pos": self.cand, "scratch": 2 * self.cp}
        for field, cols in want.items():
            check_buffer(f"{name}.{field}", getattr(self, field, None), torch.int32, device, (num_rows, cols),
                         exact_cols=True)
        for field, x in vars(self).items():
            if isinstance(x, torch.Tensor) and field not in want:
                check_buffer(f"{name}.{field}", x, x.dtype, device, (num_rows,) + tuple(x.shape[1:]))

    def check_clean(self, num_rows: int, hist: bool = False, name: str = "workspace") -> None:
        """Raise ``ValueError`` if ``counters[:num_rows]`` (and ``hist[:num_rows]`` with ``hist``) is
        not zero: state left by a launch that did not complete. With it every later launch is
        wrong (no program is elected last arriver, so rows may stay unwritten, and the counters drift
        further), never out of bounds; :meth:`reset` clears it. Reads the buffers on the host (one
        sync): not under CUDA-graph capture."""
        for field, on in (("counters", True), ("hist", hist)):
            if on:
                nz = int(torch.count_nonzero(getattr(self, field)[:num_rows]).item())
                if nz:
                    raise ValueError(f"{name}.{field}: {nz} entries are not zero (a launch did not complete); "
                                     f"call {name}.reset() before reusing this workspace")

    @property
    def nbytes(self) -> int:
        """Device bytes held by the five buffers (int32 each: ``4 * T * (2048 + 2 + 2 * cand + 2 * cp)``)."""
        return sum(x.numel() * x.element_size() for x in (self.hist, self.counters, self.cand_key, self.cand_pos,
                                                          self.scratch))


def radix_chunk(lmax: int, config: RadixTopkConfig | None = None) -> int:
    """Positions per program (``CHUNK``) for a launch whose rows see at most ``lmax`` positions:
    ``lmax <= config.short_max`` gives one program per row (``lmax`` rounded up to a power of two,
    at least 2048), else ``config.chunk``. ``config`` None: :class:`RadixTopkConfig` defaults."""
    cfg = config or RadixTopkConfig()
    if lmax <= cfg.short_max:
        return max(TOPK_K, triton.next_power_of_2(max(lmax, 1)))
    return cfg.chunk


def check_buffer(name: str, x, dtype: torch.dtype, device, min_shape: tuple, exact_cols: bool = False) -> None:
    """``x`` must be a contiguous ``dtype`` tensor on ``device`` with ``len(min_shape)`` dims, each at
    least ``min_shape`` (the last exactly, with ``exact_cols``: a row stride the kernels assume).

    Raises
    ------
    TypeError : not a tensor, or another dtype. ValueError : another device, shape or a
        non-contiguous layout (each message starts with ``name``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {x.dtype}")
    if x.device != torch.device(device):
        raise ValueError(f"{name}: on {x.device}, the batch is on {device}")
    shape = tuple(x.shape)
    if (len(shape) != len(min_shape) or any(a < b for a, b in zip(shape, min_shape))
            or (exact_cols and shape[-1] != min_shape[-1])):
        want = ", ".join(f">= {b}" for b in min_shape[:-1])
        last = f"{min_shape[-1]}" if exact_cols else f">= {min_shape[-1]}"
        raise ValueError(f"{name}: expected shape [{want + ', ' if want else ''}{last}] for this batch, got {list(shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {x.stride()}")


def _check_radix_args(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, config,
                      check_values=None, hist_ready=False, algo: str = "sample") -> None:
    """Checks of every top-k launcher, before any launch: TypeError / ValueError naming the argument
    (types, dtypes, shapes, devices, contiguous lengths, ``next_n`` 1 or 2, the workspace's geometry
    and buffers (:meth:`RadixTopkWorkspace.check`), outputs that overlap each other or an input
    (``aliasing.check_no_overlap``)), RuntimeError for CPU tensors without ``TRITON_INTERPRET=1``
    (all from metadata: capturable); then, with ``check_values`` (None: unless a CUDA graph is being
    captured), the workspace's clean state from its values (:meth:`RadixTopkWorkspace.check_clean`:
    one host sync; ``hist`` too when ``algo`` is the radix algorithm that runs and not ``hist_ready``)."""
    if not isinstance(hist_ready, bool):
        raise TypeError(f"hist_ready: expected a bool, got {type(hist_ready).__name__}")
    for name, x in (("logits", logits), ("topk_indices", topk_indices)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(workspace, RadixTopkWorkspace):
        raise TypeError(f"workspace: expected a RadixTopkWorkspace, got {type(workspace).__name__}")
    if config is not None and not isinstance(config, RadixTopkConfig):
        raise TypeError(f"config: expected a RadixTopkConfig or None, got {type(config).__name__}")
    for name, v, lo in (("next_n", next_n, 1), ("max_len", 0 if max_len is None else max_len, 0)):
        if type(v) is not int:
            raise TypeError(f"{name}: expected an int, got {v!r}")
        if v < lo:
            raise ValueError(f"{name}: expected >= {lo}, got {v}")
    if next_n not in dims.SUPPORTED_NEXT_N:
        raise ValueError(f"next_n: expected one of {dims.SUPPORTED_NEXT_N}, got {next_n}")
    if topk_indices.dim() != 2 or topk_indices.dtype != torch.int32 or topk_indices.shape[1] != TOPK_K:
        raise ValueError(f"topk_indices: expected int32 [T, {TOPK_K}] ({TOPK_K} columns), got "
                         f"{topk_indices.dtype} {tuple(topk_indices.shape)}")
    T = topk_indices.shape[0]
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits: expected fp32 [>= T, W], got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[0] < T:
        raise ValueError(f"logits: {logits.shape[0]} rows, fewer than topk_indices' {T}")
    dev = topk_indices.device
    for name, x in (("logits", logits), ("topk_indices", topk_indices)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name}: the last dim must have unit stride, got strides {tuple(x.stride())}")
    if logits.device != dev:
        raise ValueError(f"logits: on {logits.device}, topk_indices on {dev}")
    if row_lens is not None:
        lens_name, lens, need = "row_lens", row_lens, T
    elif context_lens is not None:
        lens_name, lens, need = "context_lens", context_lens, -(-T // next_n)
    else:
        raise ValueError("context_lens: give context_lens (with next_n) or row_lens, got neither")
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{lens_name}: expected a torch.Tensor, got {type(lens).__name__}")
    if lens.dim() != 1 or lens.dtype != torch.int32 or lens.shape[0] < need:
        raise ValueError(f"{lens_name}: expected int32 [>= {need}], got {lens.dtype} {tuple(lens.shape)}")
    if not lens.is_contiguous():
        raise ValueError(f"{lens_name}: expected a contiguous tensor (the kernels index its storage), got strides "
                         f"{tuple(lens.stride())}")
    if lens.device != dev:
        raise ValueError(f"{lens_name}: on {lens.device}, topk_indices on {dev}")
    workspace.check(T, dev)
    # outputs that alias an input or each other make the result depend on program order
    outs = {"topk_indices": topk_indices}
    outs.update({f"workspace.{n}": x for n, x in vars(workspace).items() if isinstance(x, torch.Tensor)})
    check_no_overlap(outs, {"logits": logits, lens_name: lens})
    if logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("logits: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing "
                           "triton), or pass CUDA tensors")
    if check_values is not None and not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool or None, got {check_values!r}")
    if check_values if check_values is not None else not is_capturing():
        workspace.check_clean(T, hist=algo == "radix" and not hist_ready)


def is_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (then no host read or
    allocation may happen); False without CUDA. The one definition the runtime
    (``smpart.validate``) and the plugin (``integration.ops``) use too."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_per_row(config: RadixTopkConfig | None, num_rows: int, n_chunks: int, device) -> int:
    """Programs per row of a sampled top-k launch over ``num_rows`` rows of ``n_chunks`` chunks (its
    grid is ``num_rows`` times this; every row's programs take its chunks in turn; the radix
    algorithm always runs one program per chunk and does not call this).

    Returns ``config.programs_per_row`` if set, else ``num_sms // num_rows`` (one wave of one 16-warp
    program per SM: each extra program of a row repeats the row's sampled cutoff and adds atomics; a
    row alone needs many programs to read it fast), both within ``[1, n_chunks]``. ``device``: the
    logits' (its SM count; ``INTERPRETER_SMS`` off CUDA).

    Raises
    ------
    TypeError : ``config`` not a RadixTopkConfig or None; ``num_rows`` / ``n_chunks`` not an int.
    ValueError : ``num_rows`` < 0, ``n_chunks`` < 1, ``device`` not a device.
    """
    if config is not None and not isinstance(config, RadixTopkConfig):
        raise TypeError(f"config: expected a RadixTopkConfig or None, got {type(config).__name__}")
    for name, v, lo in (("num_rows", num_rows, 0), ("n_chunks", n_chunks, 1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {v!r}")
        if v < lo:
            raise ValueError(f"{name}: expected >= {lo}, got {v}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device ({e})") from None
    cfg = config or RadixTopkConfig()
    want = cfg.programs_per_row or _num_sms(device) // max(num_rows, 1)
    return min(max(want, 1), n_chunks)


def launch_geometry(logits, max_len, config: RadixTopkConfig | None) -> tuple[int, int, int]:
    """``(lmax, chunk, n_chunks)`` of a top-k launch over ``logits`` [T, W]: the rows' length bound
    ``lmax = max(min(W, max_len), 0)`` (``max_len`` None: W), the positions per program
    (:func:`radix_chunk`) and the chunks per row (>= 1); the radix top-k launches ``T * n_chunks``
    programs, the sampled one ``T * programs_per_row(...)``."""
    lmax = logits.shape[1] if max_len is None else min(logits.shape[1], int(max_len))
    lmax = max(lmax, 0)
    chunk = radix_chunk(lmax, config)
    return lmax, chunk, max(triton.cdiv(lmax, chunk), 1)
