"""``DecodeBatch``: every input of the DSV3.2 decode region, in real shapes and vLLM's formats.

``make_decode_batch`` builds the region's inputs for one layer's decode step: the MLA query side
(``q_c``, FP8 ``q_b_proj`` weight with 128x128 block scales quantized the way DeepSeek checkpoints
are and re-quantized to UE8M0 as vLLM 0.33 does on Hopper, ``positions``, the YaRN
``cos_sin_cache``, ``k_pe``) and the indexer tail (FP8 indexer queries, head weights, new keys, a
paged indexer cache in vLLM's byte layout holding each request's earlier keys, a shuffled
``block_table``, ``slot_mapping``, ``context_lens``), plus preallocated outputs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import torch

from .triton_kernels import dims
from . import reference
from .triton_kernels.fp8 import FP8_DTYPE, ue8m0_ceil_torch
from .region import RegionArgs


@dataclasses.dataclass
class DecodeBatch:
    """One decode step's inputs and output buffers.

    Attributes
    ----------
    args : RegionArgs, the tensors the entry point takes (outputs preallocated, poisoned).
    q_b_proj_weight_bf16 : bf16 [H*192, 1536], the unquantized weight (for the loose GEMM check).
    batch_size, num_heads, next_n : B, H, rows per request; ``T = B * next_n``.
    use_ue8m0 : whether the scales are powers of two (vLLM 0.33 on Hopper).
    tie_free : the logits were built exactly representable and distinct (index sets must match).
    """

    args: RegionArgs
    q_b_proj_weight_bf16: torch.Tensor
    batch_size: int
    num_heads: int
    next_n: int
    use_ue8m0: bool
    tie_free: bool

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.next_n

    def clone(self) -> "DecodeBatch":
        """A copy whose mutable buffers (kv_cache, k_pe, q, topk_indices) are independent."""
        a = self.args
        args = dataclasses.replace(
            a, kv_cache=a.kv_cache.clone(), k_pe=a.k_pe.clone(), q=a.q.clone(),
            topk_indices=a.topk_indices.clone(),
        )
        return dataclasses.replace(self, args=args)


def _weight_block_quant(w: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a bf16 [N, K] weight like a DeepSeek FP8 checkpoint (fp32 scale = amax/448),
    then, if ``use_ue8m0``, re-quantize to power-of-two scales as vLLM's
    ``fp8_utils.py::requant_weight_ue8m0_inplace`` / ``utils/deep_gemm.py::per_block_cast_to_fp8``."""

    def per_block_cast(x: torch.Tensor, ue8m0: bool):
        n, k = x.shape
        xv = x.view(n // 128, 128, k // 128, 128)
        amax = xv.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
        sf = amax / dims.FP8_MAX
        if ue8m0:
            sf = ue8m0_ceil_torch(sf)
        q = (xv.float() * (1.0 / sf)).to(FP8_DTYPE)
        return q.view(n, k), sf.view(n // 128, k // 128)

    q, s = per_block_cast(w, False)  # the checkpoint
    if use_ue8m0:
        deq = (q.float().view(q.shape[0] // 128, 128, -1, 128) * s[:, None, :, None]).view(q.shape)
        q, s = per_block_cast(deq, True)
    return q.contiguous(), s.contiguous()


def _is_int(x) -> bool:
    """A Python/numpy integer (not bool) or a 0-d integer tensor."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` on which tensors can be made here.

    Raises
    ------
    TypeError : not a str / ``torch.device``. ValueError : unparsable, not cpu / cuda, or cuda with
    no CUDA device (or an index past the devices).
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device: not a torch device: {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {str(dev)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(dev)!r} asked for, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def make_decode_batch(
    context_lens: Sequence[int] | int,
    batch_size: int | None = None,
    *,
    num_heads: int = 128,
    next_n: int = 1,
    num_padding: int = 0,
    tie_free: bool = False,
    use_ue8m0: bool = True,
    rope_dtype: torch.dtype = torch.bfloat16,
    spare_blocks: int = 3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DecodeBatch:
    """Build a decode batch of the DSV3.2 region.

    Parameters
    ----------
    context_lens : per-request lengths (vLLM ``seq_lens``, including the ``next_n`` new tokens),
        or one int for every request. Each must be >= next_n and <= 163840.
    batch_size : B (defaults to ``len(context_lens)``); with an int ``context_lens`` it is required.
    num_heads : MLA heads H on this rank (128, 64, 32 or 16).
    next_n : 1, or 2 with one MTP draft token.
    num_padding : how many of the B requests (the last ones) are CUDA-graph padding: slot -1 and
        context length 0, as vLLM pads a graph batch.
    tie_free : build indexer queries/keys whose logits are exact in fp32 and distinct per row
        (base-16 digit codes), so index sets must match the reference exactly.
    use_ue8m0 : power-of-two scales for weights, activations and keys (vLLM 0.33 on Hopper).
    rope_dtype : dtype of ``cos_sin_cache`` (bf16 as vLLM's DeepSeek YaRN rope; fp32 allowed).
    spare_blocks : extra cache blocks, filled with random bytes, that no request owns.
    seed : int, RNG seed. device : str or torch.device, cpu or cuda (a CUDA device must exist).

    Raises
    ------
    TypeError : a non-int count (``batch_size``, ``num_heads``, ``next_n``, ``num_padding``,
        ``spare_blocks``, ``seed``, a ``context_lens`` entry; bools are refused), a non-bool flag.
    ValueError : out-of-range values (named), ``device`` not cpu / cuda or CUDA absent.
    """
    for name, flag in (("tie_free", tie_free), ("use_ue8m0", use_ue8m0)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    for name, v in (("batch_size", batch_size), ("num_heads", num_heads), ("next_n", next_n),
                    ("num_padding", num_padding), ("spare_blocks", spare_blocks), ("seed", seed)):
        if v is None and name == "batch_size":
            continue
        if not _is_int(v) or isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if spare_blocks < 0:
        raise ValueError(f"spare_blocks: expected >= 0, got {spare_blocks}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    dev = _check_device(device)
    if _is_int(context_lens) and not isinstance(context_lens, torch.Tensor):
        if batch_size is None:
            raise ValueError("batch_size: required when context_lens is an int")
        lens = [int(context_lens)] * batch_size
    elif isinstance(context_lens, (bool, float, str, bytes)) or context_lens is None:
        raise TypeError(f"context_lens: expected an int or a sequence of ints, got {type(context_lens).__name__} "
                        f"{context_lens!r}")
    else:
        try:
            lens = list(context_lens)
        except TypeError:
            raise TypeError(f"context_lens: expected an int or a sequence of ints, got "
                            f"{type(context_lens).__name__}") from None
        for i, x in enumerate(lens):
            if not _is_int(x):
                raise TypeError(f"context_lens[{i}]: expected an int, got {type(x).__name__} {x!r}")
        lens = [int(x) for x in lens]
        if batch_size is None:
            batch_size = len(lens)
        if len(lens) != batch_size:
            raise ValueError(f"context_lens: expected {batch_size} lengths, got {len(lens)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if next_n not in dims.SUPPORTED_NEXT_N:
        raise ValueError(f"next_n: expected one of {dims.SUPPORTED_NEXT_N}, got {next_n!r}")
    if num_heads not in dims.SUPPORTED_H:
        raise ValueError(f"num_heads: expected one of {dims.SUPPORTED_H}, got {num_heads!r}")
    if batch_size * next_n > dims.T_MAX:
        raise ValueError(f"batch_size: B*next_n must be <= {dims.T_MAX}, got {batch_size * next_n}")
    if not 0 <= num_padding <= batch_size:
        raise ValueError(f"num_padding: expected 0..{batch_size}, got {num_padding}")
    for b, L in enumerate(lens[: batch_size - num_padding]):
        if not next_n <= L <= dims.MAX_MODEL_LEN:
            raise ValueError(f"context_lens[{b}]: expected {next_n}..{dims.MAX_MODEL_LEN}, got {L}")
    if rope_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"rope_dtype: expected torch.bfloat16 or torch.float32, got {rope_dtype}")
    lens = [L if b < batch_size - num_padding else 0 for b, L in enumerate(lens)]

    g = torch.Generator(device="cpu").manual_seed(seed)
    B, H, T = batch_size, num_heads, batch_size * next_n
    N, K = H * dims.QK_HEAD_DIM, dims.Q_LORA_RANK

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    # ---- MLA query side ------------------------------------------------------------
    q_c = randn(T, K).to(torch.bfloat16)
    w_bf16 = randn(N, K, std=0.02).to(torch.bfloat16)
    w_q, w_s = _weight_block_quant(w_bf16, use_ue8m0)
    max_pos = max(max(lens), 1)
    cos_sin_cache = reference.make_cos_sin_cache(max_pos, rope_dtype)
    k_pe = randn(T, 1, dims.QK_ROPE_HEAD_DIM).to(torch.bfloat16)
    positions = torch.tensor(
        [max(0, lens[t // next_n] - next_n + t % next_n) for t in range(T)], dtype=torch.int64
    )

    # ---- paged cache and tables ------------------------------------------------------
    blocks_per_req = [-(-L // dims.CACHE_BLOCK_SIZE) for L in lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    max_blocks = max(max(blocks_per_req), 1)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_table = torch.zeros(B, max_blocks, dtype=torch.int32)
    cursor = 0
    for b, nb in enumerate(blocks_per_req):
        block_table[b, :nb] = perm[cursor : cursor + nb]
        cursor += nb
    # stale bytes everywhere (fp8 NaN patterns 0x7f/0xff avoided so garbage stays finite)
    kv_cache = torch.randint(0, 0x7F, (num_blocks, dims.CACHE_BLOCK_SIZE, dims.CACHE_BYTES_PER_TOKEN),
                             generator=g, dtype=torch.uint8)
    _, cache_scales = reference.cache_values_and_scales(kv_cache)
    cache_scales.copy_(torch.rand(num_blocks, dims.CACHE_BLOCK_SIZE, generator=g))

    slot_mapping = torch.full((T,), -1, dtype=torch.int64)
    for t in range(T):
        b = t // next_n
        if lens[b] > 0:
            p = int(positions[t])
            slot_mapping[t] = int(block_table[b, p // 64]) * 64 + p % 64

    # ---- indexer queries, weights, keys ----------------------------------------------
    if tie_free:
        index_q, index_w, prefill_k, new_k = _tie_free_indexer(lens, next_n, g)
    else:
        index_q = randn(T, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM).clamp(-dims.FP8_MAX, dims.FP8_MAX)
        index_q = index_q.to(FP8_DTYPE)
        index_w = randn(T, dims.INDEX_N_HEADS, std=dims.INDEX_N_HEADS**-0.5 * dims.INDEX_HEAD_DIM**-0.5)
        prefill_k = [randn(max(0, L - next_n), dims.INDEX_HEAD_DIM).to(torch.bfloat16) for L in lens]
        new_k = randn(T, dims.INDEX_HEAD_DIM).to(torch.bfloat16)
    # earlier keys of every request, written with vLLM's quantization (vectorized)
    values, scales = reference.cache_values_and_scales(kv_cache)
    for b, L in enumerate(lens):
        n_prev = max(0, L - next_n)
        if n_prev == 0:
            continue
        kf = prefill_k[b].float()
        s = reference.quant_scale_torch(kf.abs().amax(-1), dims.KEY_SCALE_EPS, use_ue8m0)
        qb = reference.quant_fp8_torch(kf, s[:, None]).view(torch.uint8)
        pos = torch.arange(n_prev)
        blk = block_table[b].long()[pos // 64]
        values[blk, pos % 64] = qb
        scales[blk, pos % 64] = s

    args = RegionArgs(
        q_c=q_c,
        q_b_proj_weight=w_q,
        q_b_proj_weight_scale=w_s,
        positions=positions,
        cos_sin_cache=cos_sin_cache,
        k_pe=k_pe,
        q=torch.full((T, H, dims.QK_HEAD_DIM), float("nan"), dtype=torch.bfloat16),
        index_q_fp8=index_q,
        index_weights=index_w.float(),
        index_k=new_k,
        kv_cache=kv_cache,
        slot_mapping=slot_mapping,
        block_table=block_table,
        context_lens=torch.tensor(lens, dtype=torch.int32),
        topk_indices=torch.full((T, dims.INDEX_TOPK), -7, dtype=torch.int32),
        next_n=next_n,
    )
    args = args.to(dev)
    return DecodeBatch(args=args, q_b_proj_weight_bf16=w_bf16.to(dev), batch_size=B, num_heads=H,
                       next_n=next_n, use_ue8m0=use_ue8m0, tie_free=tie_free)


def redraw_decode_metadata(args: RegionArgs, num_blocks: int, max_len: int, generator: torch.Generator) -> None:
    """Draw a new decode step's metadata and write it **in place** into ``args`` (the tensors a
    captured CUDA graph reads): context lengths uniform in ``[next_n, max_len]``, block tables
    from a random permutation of the ``num_blocks`` cache blocks (no block shared), and the
    matching ``positions`` and ``slot_mapping`` (vLLM's rule: slot of position ``L - next_n + j``).

    Parameters
    ----------
    args : RegionArgs with ``B`` requests (``context_lens`` int32 [B], ``block_table`` int32
        [B, W], ``positions`` int64 [T], ``slot_mapping`` int64 [T]); ``W * 64 >= max_len``.
    num_blocks : cache blocks to draw from (<= ``kv_cache.shape[0]``, >= ``B * W``).
    max_len : longest context (<= ``W * 64`` and <= the ``cos_sin_cache`` rows).
    generator : CPU generator (the draw is reproducible).

    Raises
    ------
    ValueError : the table or the block pool is too small for ``max_len`` (named).
    """
    B, W = args.block_table.shape
    next_n = args.next_n
    if not next_n <= max_len <= W * dims.CACHE_BLOCK_SIZE:
        raise ValueError(f"max_len: expected {next_n}..{W * dims.CACHE_BLOCK_SIZE} (block table width {W}), got {max_len}")
    if not B * W <= num_blocks <= args.kv_cache.shape[0]:
        raise ValueError(f"num_blocks: expected {B * W}..{args.kv_cache.shape[0]}, got {num_blocks}")
    lens = torch.randint(next_n, max_len + 1, (B,), generator=generator)
    table = torch.randperm(num_blocks, generator=generator)[: B * W].view(B, W).to(torch.int32)
    pos = lens.repeat_interleave(next_n) - next_n + torch.arange(next_n).repeat(B)
    row_b = torch.arange(B).repeat_interleave(next_n)
    slots = table[row_b, pos // dims.CACHE_BLOCK_SIZE].long() * dims.CACHE_BLOCK_SIZE + pos % dims.CACHE_BLOCK_SIZE
    args.context_lens.copy_(lens.to(torch.int32))
    args.block_table.copy_(table)
    args.positions.copy_(pos.long())
    args.slot_mapping.copy_(slots)


_DIGITS = 5  # base-16 digits per code: 16**5 > 163840 positions
_HI_DIGITS = 3  # digits 0..2 go to head 0, digits 3..4 to head 1


def tie_free_keys(codes: torch.Tensor) -> torch.Tensor:
    """Indexer keys whose logit against :func:`tie_free_query` is exactly ``code / 256``.

    ``codes`` int64 [n] in ``[0, 16**5)``; returns bf16 [n, 128]: the base-16 digits of each code in
    dims 0..4 and 448 in dim 127, so the key's FP8 scale is exactly 1 (UE8M0 or fp32) and every
    digit is exact in e4m3.
    """
    k = torch.zeros(codes.numel(), dims.INDEX_HEAD_DIM, device=codes.device)
    for d in range(_DIGITS):
        k[:, d] = ((codes // 16 ** (_DIGITS - 1 - d)) % 16).float()
    k[:, -1] = dims.FP8_MAX
    return k.to(torch.bfloat16)


def tie_free_query(num_tokens: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(index_q_fp8 float8_e4m3fn [T, 64, 128], index_weights fp32 [T, 64]) for tie-free logits
    against :func:`tie_free_keys`: ``code / 256`` exactly, on any hardware.

    Head 0 is ``[256, 16, 1]`` on the key's digits 0..2 (weight 1), head 1 is ``[256, 16]`` on
    digits 3..4 (weight ``2**-12``), every other head has weight 0. Each head's dot product is an
    integer below 4096 (12 bits), exact even in Hopper's FP8 MMA, whose accumulator keeps only about
    14 bits relative to the largest term (DeepSeek-V3 report, 3.3.2: one head holding all five
    digits, 20 bits, lost the low digits on the H200, 2026-11-30); the fp32 weighted sum of the two
    heads needs 20 bits and is exact in any order.
    """
    q = torch.zeros(num_tokens, dims.INDEX_N_HEADS, dims.INDEX_HEAD_DIM, device=device)
    q[:, 0, :_HI_DIGITS] = torch.tensor([256.0, 16.0, 1.0], device=device)
    q[:, 1, _HI_DIGITS:_DIGITS] = torch.tensor([256.0, 16.0], device=device)
    w = torch.zeros(num_tokens, dims.INDEX_N_HEADS, device=device)
    w[:, 0] = 1.0
    w[:, 1] = 2.0**-12
    return q.to(FP8_DTYPE), w


def _tie_free_indexer(lens, next_n, g):
    """Queries/keys whose logits are exact fp32 code/256 values, distinct within every request
    (per-request random codes; :func:`tie_free_query`, :func:`tie_free_keys`)."""
    T = len(lens) * next_n
    q, w = tie_free_query(T)
    prefill, new = [], torch.zeros(T, dims.INDEX_HEAD_DIM, dtype=torch.bfloat16)
    for b, L in enumerate(lens):
        codes = torch.randperm(16**_DIGITS, generator=g)[: max(L, 1)]
        prefill.append(tie_free_keys(codes[: max(0, L - next_n)]))
        if L > 0:
            new[b * next_n : b * next_n + next_n] = tie_free_keys(codes[max(0, L - next_n) : L])
    return q, w, prefill, new
