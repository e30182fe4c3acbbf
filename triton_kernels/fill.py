"""Fill of the top-k indices buffer: ``topk_indices[:num_rows] = -1``.

Mirrors vLLM ``vllm/model_executor/layers/sparse_attn_indexer.py`` (``topk_indices_buffer[:T] = -1``
before the decode logits and top-k). Torch ground truth: ``topk_indices[:T].fill_(-1)``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fill_topk_item(
    row,
    topk_ptr,
    stride_row,
    num_rows,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write -1 into columns ``[0, TOPK)`` of row ``row`` (nothing when ``row >= num_rows``).

    ``topk_ptr``: int32 ``[*, TOPK]`` with row stride ``stride_row``; ``BLOCK`` = next power of
    two >= ``TOPK`` (one vectorized store per row).
    """
    cols = tl.arange(0, BLOCK)
    mask = (cols < TOPK) & (row < num_rows)
    tl.store(topk_ptr + row.to(tl.int64) * stride_row + cols, tl.full([BLOCK], -1, tl.int32), mask=mask)


@triton.jit
def _fill_topk_kernel(topk_ptr, stride_row, num_rows, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program."""
    _fill_topk_item(tl.program_id(0), topk_ptr, stride_row, num_rows, TOPK, BLOCK)


def fill_topk_indices(topk_indices: torch.Tensor, num_rows: int, *, num_warps: int = 4) -> None:
    """Set ``topk_indices[:num_rows] = -1`` in place.

    Parameters
    ----------
    topk_indices : int32 ``[>= num_rows, K]`` (vLLM's ``topk_indices_buffer``, K = 2048), unit
        column stride.
    num_rows : rows to fill (host int: the batch's T, known from tensor shapes).
    num_warps : launch parameter.
    """
    if num_rows <= 0:
        return
    K = topk_indices.shape[1]
    _fill_topk_kernel[(num_rows,)](
        topk_indices, topk_indices.stride(0), num_rows,
        TOPK=K, BLOCK=triton.next_power_of_2(K), num_warps=num_warps,
    )
