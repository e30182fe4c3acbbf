"""Memory-overlap checks for the region's outputs (run before any kernel; metadata only).

Every path writes ``kv_cache``, ``topk_indices``, ``q``, ``k_pe`` and the workspace's buffers while
it reads the other inputs. If an output shares memory with another tensor of the call, or an output
overlaps itself (a stride of 0, or rows closer together than they are long), the result depends on
the order in which programs run: the kernels race, and the PyTorch reference raises only after it
has written part of the outputs. :func:`check_no_overlap` refuses such a call up front.

The test is on addresses (``data_ptr`` plus strides), not on storages: two tensors overlap when some
byte lies in both. Byte ranges ``[first, last]`` that do not intersect prove disjointness; when they
do intersect (views of one allocation), the exact sets of addresses are compared for tensors of up to
``_EXACT_LIMIT`` bytes (so disjoint column slices of one buffer, e.g. ``k_pe`` as the last 64
columns of vLLM's ``[T, 576]`` ``kv_a`` output, are accepted next to other slices of it), and larger
ones are refused. No device value is read, so the check also runs while a CUDA graph is being
captured.
"""

from __future__ import annotations

import torch

# bytes per tensor compared address by address (host memory and time: 8 B and ~0.1 us per byte, so up
# to ~0.6 s for a pair of interleaved views near the limit; vLLM's q_c and kv_a (k_pe its last 64
# columns) can be views of one [T, 2112] bf16 GEMM output: q_c is 786 KB at T = 256)
_EXACT_LIMIT = 1 << 22


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last byte a tensor can touch (``numel() > 0``)."""
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))  # strides are >= 0 in torch
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Could two different indices of ``t`` address the same bytes? Conservative: True unless the
    dims (sorted by stride) each step past the whole extent of the smaller ones."""
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1)
    extent = 1  # elements spanned by the dims seen so far
    for st, s in dims:
        if st < extent:
            return True
        extent = st * (s - 1) + extent
    return False


def _addresses(t: torch.Tensor) -> torch.Tensor:
    """Every byte address of ``t`` (int64, CPU), relative to its first byte."""
    es = t.element_size()
    a = torch.zeros((), dtype=torch.int64)
    for s, st in zip(t.shape, t.stride()):
        a = a[..., None] + torch.arange(s, dtype=torch.int64) * (st * es)
    return (a.reshape(-1)[:, None] + torch.arange(es, dtype=torch.int64)).reshape(-1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do ``a`` and ``b`` share at least one byte? (Conservative for very large views of one
    allocation: True.)"""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if a.numel() * a.element_size() > _EXACT_LIMIT or b.numel() * b.element_size() > _EXACT_LIMIT:
        return True
    aa = _addresses(a) + a0
    bb = _addresses(b) + b0
    return bool(torch.isin(aa, bb).any())


def check_no_overlap(outputs: dict, inputs: dict) -> None:
    """Refuse outputs that overlap themselves, each other or any input.

    Parameters
    ----------
    outputs : name -> tensor written by the call (``None`` entries are skipped).
    inputs : name -> tensor only read (``None`` and non-tensors skipped). A tensor read and written
        in place (``k_pe``, ``kv_cache``) is listed in ``outputs`` only; names are unique across both.

    Raises
    ------
    ValueError : names the output and the tensor it overlaps (or says it overlaps itself).
    """
    outs = [(n, t) for n, t in outputs.items() if isinstance(t, torch.Tensor)]
    ins = [(n, t) for n, t in inputs.items() if isinstance(t, torch.Tensor)]
    for n, t in outs:
        if t.numel() and has_internal_overlap(t):
            raise ValueError(f"{n}: elements overlap in memory (shape {list(t.shape)}, strides {t.stride()}); "
                             f"an output needs one address per element")
    # byte ranges once per tensor; only pairs whose ranges intersect (views of one allocation) get the
    # exact test, so a call with disjoint allocations costs one range per tensor
    spans = [(i, n, t, *_byte_range(t)) for i, (n, t) in enumerate(outs + ins) if t.numel()]
    spans.sort(key=lambda s: (str(s[2].device), s[3]))
    for j, (i, n, t, a0, a1) in enumerate(spans):
        for k, m, u, b0, b1 in spans[j + 1:]:
            if b0 >= a1 or u.device != t.device:
                break
            # outputs come first in the list: the smaller index is an output unless both are inputs
            if min(i, k) < len(outs) and m != n and overlap(t, u):
                (_, first), (_, second) = sorted(((i, n), (k, m)))
                why = ""
                if max(t.numel() * t.element_size(), u.numel() * u.element_size()) > _EXACT_LIMIT:
                    why = (f" (or may: their byte ranges meet, and views of one allocation over "
                           f"{_EXACT_LIMIT >> 20} MiB are not compared address by address)")
                raise ValueError(f"{first}: shares memory with {second}{why}; outputs must not alias each other or "
                                 f"any input")
