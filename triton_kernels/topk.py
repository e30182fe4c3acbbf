"""The top-2048 of every path, one entry point: the sampled top-k (``sample_topk.py``, the default)
or the radix top-k (``radix_topk.py``), chosen by ``RadixTopkConfig.algo``; and the top-k item of the
persistent kernels (``partitioned.py``), which runs either algorithm's per-(row, chunk) work.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .radix_topk import _radix_launch, _radix_topk_item
from .topk_config import RadixTopkConfig, _check_radix_args
from .sample_topk import _sample_launch, _sample_topk_item, sample_size


def topk(logits, context_lens, topk_indices, *, next_n: int, workspace, row_lens=None, max_len=None,
         hist_ready: bool = False, config: RadixTopkConfig | None = None, check_values: bool | None = None) -> None:
    """Top-2048 positions of every decode row's visible logits, -1 padded: ``config.algo``
    ``"sample"`` (default) runs ``sample_topk.sample_topk``, ``"radix"`` ``radix_topk.radix_topk``.

    Parameters
    ----------
    logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, config, check_values : as
        ``radix_topk.radix_topk`` (shapes, dtypes, the length rule, NaN ordering and the dirty-state
        check are documented there).
    hist_ready : the logits producer filled ``workspace.hist`` for these rows (``algo="radix"`` only).

    Raises
    ------
    TypeError, ValueError, RuntimeError : as ``radix_topk.radix_topk`` (checks before any launch),
        and ``hist_ready`` with ``algo="sample"`` (the sampled top-k reads no histogram, so nothing
        would zero it).

    Example
    -------
    >>> ws = RadixTopkWorkspace(T, "cuda")              # topk_config.RadixTopkWorkspace, once
    >>> out = torch.empty(T, 2048, dtype=torch.int32, device="cuda")
    >>> topk(logits, None, out, next_n=1, workspace=ws, row_lens=lens)  # lens: int32 [T]
    """
    _check_radix_args(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, config,
                      check_values, hist_ready, (config or RadixTopkConfig()).algo)
    cfg = config or RadixTopkConfig()
    if cfg.algo == "radix":
        _radix_launch(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, hist_ready, cfg)
        return
    if hist_ready:
        raise ValueError("hist_ready: the sampled top-k (config.algo='sample') reads no histogram; build "
                         "none, or pass config.algo='radix'")
    _sample_launch(logits, context_lens, topk_indices, next_n, workspace, row_lens, max_len, cfg)


@triton.jit
def _topk_item(t, c, L, ppr, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr, ctr_ptr, cand_key_ptr,
               cand_pos_ptr, scratch_ptr, HAS_HIST: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
               CAND: tl.constexpr, CP: tl.constexpr, RT: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr,
               COUNT: tl.constexpr):
    """The top-k item of the persistent kernels: ``S == 0`` the radix item for chunk ``c``
    (``radix_topk._radix_topk_item``, histogram-fed with ``HAS_HIST``), else :func:`_sample_topk_item`
    for program ``c`` of the row's ``ppr`` (``topk_config.programs_per_row``) with ``S`` sampled values
    per long row (``RadixTopkConfig.algo``)."""
    if S == 0:
        _radix_topk_item(t, c, L, logits_ptr, stride_logits, topk_ptr, stride_topk, hist_ptr, ctr_ptr, cand_key_ptr,
                         cand_pos_ptr, scratch_ptr, HAS_HIST, CHUNK, K, CAND, CP, RT)
    else:
        _sample_topk_item(t, c, L, ppr, logits_ptr, stride_logits, topk_ptr, stride_topk, ctr_ptr, cand_key_ptr,
                          cand_pos_ptr, scratch_ptr, CHUNK, K, CAND, CP, RT, S, BITS, COUNT)


def topk_sample_constexprs(config, lmax: int) -> dict:
    """``TOPK_S``/``TOPK_BITS``/``TOPK_COUNT`` of the persistent kernels for a ``RadixTopkConfig``
    (None: its defaults) and rows of at most ``lmax`` positions: ``TOPK_S`` 0 selects the radix item."""
    cfg = config or RadixTopkConfig()
    s = 0 if cfg.algo == "radix" else (cfg.sample or sample_size(lmax))
    return dict(TOPK_S=s, TOPK_BITS=cfg.bits, TOPK_COUNT=cfg.count)



__all__ = ["topk", "topk_sample_constexprs", "_topk_item"]
