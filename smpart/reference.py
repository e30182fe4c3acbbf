"""Plain-PyTorch ground truth of the DeepSeek-V3.2 decode region (vLLM 0.33's semantics, files
named below; what "matches" means: docs/CORRECTNESS.md).

Written for clarity, not speed: every test and the benchmark's pre-timing check compare against
these functions. Each function names the vLLM / DeepGEMM file whose semantics it mirrors.

Region (one decode step of one layer), in vLLM's order:

1. ``indexer_k_quant_and_cache``: FP8-quantize each new indexer key into the paged cache.
2. ``topk_indices[:T] = -1``.
3. ``paged_mqa_logits`` over every visible position (the new keys included).
4. ``topk_indices``: top-2048 positions per row.
5. ``q_b_proj`` (W8A8 block FP8) then interleaved MLA RoPE on ``q[..., 128:]`` and ``k_pe``.
"""

from __future__ import annotations

import functools
import math

import torch

from .triton_kernels import dims
from .triton_kernels.fp8 import FP8_DTYPE, quant_fp8_torch, quant_scale_torch


# --------------------------------------------------------------------------------------
# lengths and cache layout
# --------------------------------------------------------------------------------------
def visible_lens(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """Visible length of every decode row.

    Parameters
    ----------
    context_lens : int32 [B], vLLM ``seq_lens`` (each request's length including its new tokens).
    next_n : 1 or 2 rows per request.

    Returns
    -------
    int32 [B * next_n]: row ``t = b*next_n + j`` sees ``max(0, context_lens[b] - next_n + 1 + j)``
    positions (docs/CORRECTNESS.md, "The top-k rule"; DeepGEMM's ``context_lens_2d``).
    """
    j = torch.arange(next_n, device=context_lens.device, dtype=torch.int64)
    lens = context_lens.to(torch.int64)[:, None] - next_n + 1 + j[None, :]
    return lens.clamp(min=0).reshape(-1).to(torch.int32)


def cache_values_and_scales(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the indexer cache's two regions.

    Parameters
    ----------
    kv_cache : uint8 [num_blocks, 64, 132] (vLLM's allocation; 8448 bytes per block).

    Returns
    -------
    (values uint8 [num_blocks, 64, 128], scales float32 [num_blocks, 64]), both views into
    ``kv_cache`` (vLLM ``csrc/cache_kernels.cu``: values token-major, then the 64 fp32 scales).
    """
    flat = kv_cache.view(kv_cache.shape[0], dims.CACHE_BYTES_PER_BLOCK)
    values = flat[:, : dims.CACHE_SCALE_OFFSET].view(-1, dims.CACHE_BLOCK_SIZE, dims.INDEX_HEAD_DIM)
    scales = flat[:, dims.CACHE_SCALE_OFFSET :].view(torch.float32)
    return values, scales


def indexer_k_quant_and_cache(
    k: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, use_ue8m0: bool = True
) -> None:
    """Quantize new indexer keys to FP8 and write them into the paged cache, in place.

    Mirrors vLLM ``csrc/cache_kernels.cu::indexer_k_quant_and_cache_kernel``:
    ``scale = max(amax, 1e-4) / 448`` (power of two, rounded up, when ``use_ue8m0``),
    ``bytes = e4m3(k / scale)``. Rows whose slot is negative (padding) write nothing.

    Parameters
    ----------
    k : bf16 [T, 128]. kv_cache : uint8 [num_blocks, 64, 132]. slot_mapping : int64 [T].
    """
    values, scales = cache_values_and_scales(kv_cache)
    kf = k.float()
    scale = quant_scale_torch(kf.abs().amax(dim=-1), dims.KEY_SCALE_EPS, use_ue8m0)  # [T]
    q = quant_fp8_torch(kf, scale[:, None]).view(torch.uint8)  # [T, 128]
    num_slots = kv_cache.shape[0] * dims.CACHE_BLOCK_SIZE
    for t in range(k.shape[0]):
        slot = int(slot_mapping[t])
        if not 0 <= slot < num_slots:  # padding (-1), or out of range with value checks off: skipped as the kernel does
            continue
        block, off = divmod(slot, dims.CACHE_BLOCK_SIZE)
        values[block, off] = q[t]
        scales[block, off] = scale[t]


def gather_keys(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` keys of one request: (float8 [length, 128], fp32 scales [length]).

    ``length`` is clamped to the row's capacity (``len(block_table_row) * 64``); a block id outside
    ``[0, num_blocks)`` (reachable only with value checks off) is not dereferenced: its keys and
    scales read as zero, so their logits are 0, as ``triton_kernels/mqa_logits.py`` masks them.
    """
    values, scales = cache_values_and_scales(kv_cache)
    length = max(0, min(int(length), block_table_row.shape[0] * dims.CACHE_BLOCK_SIZE))
    pos = torch.arange(length, device=kv_cache.device)
    blocks = block_table_row.long()[pos // dims.CACHE_BLOCK_SIZE]
    ok = (blocks >= 0) & (blocks < kv_cache.shape[0])
    blocks = torch.where(ok, blocks, torch.zeros_like(blocks))
    offs = pos % dims.CACHE_BLOCK_SIZE
    v = values[blocks, offs] * ok[:, None].to(values.dtype)
    sc = torch.where(ok, scales[blocks, offs], torch.zeros((), dtype=scales.dtype, device=scales.device))
    return v.view(FP8_DTYPE), sc


# --------------------------------------------------------------------------------------
# indexer: logits and top-k
# --------------------------------------------------------------------------------------
def paged_mqa_logits(
    q_fp8: torch.Tensor,
    weights: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    next_n: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    absolute: bool = False,
) -> torch.Tensor:
    """FP8 paged MQA logits of the DSV3.2 indexer (decode).

    ``logit[t, p] = sum_h weights[t, h] * relu(q[t, h] . k[p]) * k_scale[p]`` for ``p < L_t``,
    ``-inf`` for ``L_t <= p < max_len`` (mirrors DeepGEMM ``fp8_fp4_paged_mqa_logits`` and the
    reference in DeepGEMM ``tests/test_attention.py``; vLLM ``sparse_attn_indexer.py``). ``L_t`` is
    clamped to the block table's capacity ``max_blocks * 64``, as every kernel here clamps it
    (only reachable with value checks off).

    Parameters
    ----------
    q_fp8 : float8_e4m3fn [T, 64, 128]. weights : fp32 [T, 64]. kv_cache : uint8 [N, 64, 132].
    block_table : int32 [B, max_blocks]. context_lens : int32 [B]. next_n : rows per request.
    max_len : columns of the result. dtype : float32, or float64 for the high-precision check.
    absolute : compute ``sum_h |w| * (|q| . |k|) * k_scale`` instead: the magnitude ``A`` that bounds
        the rounding error of any summation order (error bounds in ``checks.logits_tolerance``).

    Returns
    -------
    ``dtype`` [T, max_len].
    """
    T = q_fp8.shape[0]
    lens = visible_lens(context_lens, next_n).clamp(max=block_table.shape[1] * dims.CACHE_BLOCK_SIZE)
    out = torch.full((T, max_len), float("-inf"), dtype=dtype, device=q_fp8.device)
    for t in range(T):
        L = int(lens[t])
        if L == 0:
            continue
        k, k_scale = gather_keys(kv_cache, block_table[t // next_n], L)
        q, w, kk = q_fp8[t].to(dtype), weights[t].to(dtype), k.to(dtype)
        if absolute:
            q, w, kk = q.abs(), w.abs(), kk.abs()
        s = q @ kk.T  # [64 heads, L]
        out[t, :L] = (s.relu() * w[:, None]).sum(0) * k_scale.to(dtype)
    return out


def topk_indices(logits: torch.Tensor, lens: torch.Tensor, k: int = dims.INDEX_TOPK) -> torch.Tensor:
    """Top-``k`` positions per row, padded with -1 (vLLM ``top_k_per_row_decode`` semantics).

    Parameters
    ----------
    logits : float [T, >= max(lens)]; only ``logits[t, :lens[t]]`` is read.
    lens : int [T] visible lengths.

    Returns
    -------
    int32 [T, k]: the positions of the ``min(k, L_t)`` largest logits of row ``t`` (largest first,
    ties to the lower position), then -1.
    """
    T = logits.shape[0]
    out = torch.full((T, k), -1, dtype=torch.int32, device=logits.device)
    for t in range(T):
        L = int(lens[t])
        if L == 0:
            continue
        n = min(k, L)
        # stable descending sort: ties resolve to the lower position
        order = torch.sort(logits[t, :L], descending=True, stable=True).indices[:n]
        out[t, :n] = order.to(torch.int32)
    return out


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 keys in the order of ``triton_kernels/radix_topk.py``'s ``_f32_to_key``.

    Parameters
    ----------
    x : float tensor, any shape (cast to fp32).

    Returns
    -------
    int64, the shape of ``x``: order-preserving (``-0.0`` and ``+0.0`` share key 0, +-inf at the ends).
    """
    b = x.float().contiguous().view(torch.int32).to(torch.int64)
    b = torch.where(b == -(2**31), torch.zeros_like(b), b)
    return torch.where(b < 0, -1 - (b & 0x7FFFFFFF), b)


def sample_positions(L: int, S: int) -> torch.Tensor:
    """Positions the sampled top-k samples in a row of ``L`` positions (``S`` sampled values; PyTorch
    twin of ``triton_kernels/sample_topk.py::_row_cutoff``): all of the row when ``L < S``, else
    ``S / 8`` groups of 8 consecutive positions, group ``g`` at ``8 * floor(floor(g * L / (S/8)) / 8)``
    plus the whole-sector offset ``8 * (((g * 2654435761 mod 2**32) >> 16) mod floor(L / S))``.

    Returns
    -------
    int64 [min(L, S)], each in [0, L).
    """
    n_s = min(L, S)
    i = torch.arange(n_s, dtype=torch.int64)
    if L < S:
        return i
    G = 8
    NG = S // G
    g = i // G
    start = (g * L) // NG // G * G
    off = (((g * 2654435761) & 0xFFFFFFFF) >> 16) % max(L // (NG * G), 1)
    return start + off * G + i % G


def sample_cutoff_torch(row: torch.Tensor, S: int, k: int = dims.INDEX_TOPK, e_lo: int = 3584,
                        e_hi: int = 5120) -> int:
    """PyTorch twin of ``triton_kernels/sample_topk.py::_row_cutoff``: the cutoff key of a row.

    Parameters
    ----------
    row : fp32 [L], the row's visible logits. S : sampled values (``sample_topk.sample_size``).
    k : the top-k's k. e_lo, e_hi : ``sample_topk.SAMPLE_E_LO`` / ``SAMPLE_E_HI`` (for k = 2048).

    Returns
    -------
    int : a key (:func:`order_keys`) whose count of sampled keys at or above it lies in
    ``[ceil(n_s * e_lo' / L), floor(n_s * e_hi' / L)]`` (``e_*' = e_* * k / 2048``) when ties allow,
    found by the kernel's 16-way bisection step for step (so the key is the kernel's).
    """
    L = row.shape[0]
    ks = order_keys(row[sample_positions(L, S)]).clamp(min=-(2**31) + 1)
    n_s = ks.shape[0]
    lo_e, hi_e = (e_lo * k) // 2048, (e_hi * k) // 2048
    c_lo = min(max((n_s * lo_e + L - 1) // L, 1), n_s)
    c_hi = min(max((n_s * hi_e) // L, c_lo), n_s)
    lo, hi = int(ks.min()), int(ks.max())
    above, cnt, need = 0, n_s, c_lo
    while above + cnt > c_hi and lo < hi:
        span = torch.tensor([hi - lo], dtype=torch.float32).view(torch.int32).item()
        s = max(((span >> 23) & 0xFF) - 127 - 3, 0)  # _span_shift(BITS=4): fp32 exponent - 4 + 1
        m = (ks >= lo) & (ks <= hi)
        h = torch.bincount((ks[m] - lo) >> s, minlength=16)[:16]
        ab = h.sum() - torch.cumsum(h, 0)
        b = int((ab >= need).sum())
        a, cnt = int(ab[b]), int(h[b])
        need -= a
        above += a
        lo, hi = lo + (b << s), min(hi, lo + (b << s) + (1 << s) - 1)
    return lo


def radix_topk_torch(logits: torch.Tensor, lens: torch.Tensor, k: int = dims.INDEX_TOPK) -> torch.Tensor:
    """PyTorch twin of ``triton_kernels/radix_topk.py::radix_topk`` with its tie rule: the
    ``min(L, k)`` best positions by (value desc, position asc), -0.0 == +0.0; -1 padded.

    Parameters
    ----------
    logits : float [T, W]. lens : int [T] visible lengths (clamped to W).

    Returns
    -------
    int32 [T, k], rank order.
    """
    T, W = logits.shape
    out = torch.full((T, k), -1, dtype=torch.int32, device=logits.device)
    for t in range(T):
        L = min(max(int(lens[t]), 0), W)
        if L == 0:
            continue
        keys = order_keys(logits[t, :L])
        order = torch.sort(keys, descending=True, stable=True).indices[:k]
        out[t, :order.numel()] = order.to(torch.int32)
    return out


# --------------------------------------------------------------------------------------
# MLA query side
# --------------------------------------------------------------------------------------
def per_token_group_quant(x: torch.Tensor, use_ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-column FP8 activation quantization.

    Mirrors vLLM ``fp8_utils.py::per_token_group_quant_fp8`` (``_per_token_group_quant_fp8``):
    ``s = max(amax, 1e-10) / 448`` (UE8M0: rounded up to a power of two), ``q = clamp(x / s)``.

    Returns (float8_e4m3fn [T, K], fp32 [T, K/128]).
    """
    T, K = x.shape
    g = x.float().view(T, K // dims.QUANT_GROUP, dims.QUANT_GROUP)
    s = quant_scale_torch(g.abs().amax(dim=-1), dims.ACT_SCALE_EPS, use_ue8m0)
    return quant_fp8_torch(g, s[..., None]).view(T, K), s


def q_b_proj(
    q_c: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, use_ue8m0: bool = True
) -> torch.Tensor:
    """W8A8 block-FP8 ``q_b_proj``: bf16 [T, N] = q_c [T, K] @ weight[N, K]^T.

    Mirrors vLLM's block-FP8 linear with DeepGEMM ``fp8_gemm_nt``: activations quantized per token
    per 128 columns, weights with one fp32 scale per 128x128 block, fp32 accumulation of
    ``sum_kb (x_q . w_q)_kb * x_s[t, kb] * w_s[n//128, kb]``, bf16 output.
    """
    x_q, x_s = per_token_group_quant(q_c, use_ue8m0)
    T, K = q_c.shape
    N = weight.shape[0]
    G = K // dims.QUANT_GROUP
    xq = x_q.float().view(T, G, dims.QUANT_GROUP)
    wq = weight.float().view(N, G, dims.QUANT_GROUP)
    partial = torch.einsum("tgk,ngk->tng", xq, wq)  # [T, N, G], exact in fp32 (FP8 x FP8 sums)
    w_s = weight_scale.repeat_interleave(dims.QUANT_GROUP, dim=0)[:N]  # [N, G]
    acc = (partial * x_s[:, None, :] * w_s[None, :, :]).sum(-1)
    return acc.to(torch.bfloat16)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE, the rounding of vLLM ``deepseek_scaling_rope.py::forward_static``.

    ``x`` bf16 [..., 64]; ``cos``/``sin`` [..., 32] broadcastable. With a bf16 cache every product
    and sum rounds to bf16 (as vLLM's bf16 math does); with an fp32 cache the math is fp32 and
    rounds once.
    """
    x_e, x_o = x[..., 0::2], x[..., 1::2]
    if cos.dtype == torch.bfloat16:
        out_e = x_e * cos - x_o * sin
        out_o = x_o * cos + x_e * sin
    else:
        xe, xo = x_e.float(), x_o.float()
        out_e = (xe * cos - xo * sin).to(x.dtype)
        out_o = (xo * cos + xe * sin).to(x.dtype)
    return torch.stack((out_e, out_o), dim=-1).flatten(-2)


def mla_rope_(q: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In-place MLA RoPE on ``q[..., 128:]`` ([T, H, 192] bf16) and ``k_pe`` ([T, 1, 64] bf16).

    ``cos_sin_cache`` [max_pos, 64] (cos in the first 32 columns, sin in the last 32), indexed by
    ``positions`` (int64 [T]); interleaved pairs (``is_neox_style=False``), as vLLM's
    ``MultiHeadLatentAttentionWrapper.forward`` calls ``rotary_emb(positions, q[..., 128:], k_pe)``.
    """
    cs = cos_sin_cache[_clamp_positions(positions, cos_sin_cache)]  # clamped to [0, max_pos) as the kernels
    half = dims.QK_ROPE_HEAD_DIM // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    q_pe = q[..., dims.QK_NOPE_HEAD_DIM :]
    q_pe.copy_(rope_interleaved(q_pe, cos, sin))
    k_pe.copy_(rope_interleaved(k_pe, cos, sin))


@functools.lru_cache(maxsize=8)
def _cos_sin_cache_cpu(max_pos: int) -> torch.Tensor:
    rot = dims.QK_ROPE_HEAD_DIM
    base, factor, orig = dims.ROPE_THETA, dims.ROPE_FACTOR, dims.ROPE_ORIGINAL_MAX_POS

    def corr_dim(n_rot: float) -> float:
        return (rot * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(dims.ROPE_BETA_FAST)), 0)
    high = min(math.ceil(corr_dim(dims.ROPE_BETA_SLOW)), rot - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(rot // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    inv_freq = inv_inter * (1 - mask) + inv_extra * mask

    def mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    ms = mscale(factor, dims.ROPE_MSCALE) / mscale(factor, dims.ROPE_MSCALE_ALL_DIM)
    t = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.einsum("i,j -> ij", t, inv_freq)
    return torch.cat((freqs.cos() * ms, freqs.sin() * ms), dim=-1)


def make_cos_sin_cache(
    max_pos: int = dims.MAX_MODEL_LEN, dtype: torch.dtype = torch.bfloat16, device="cpu"
) -> torch.Tensor:
    """DeepSeek YaRN ``cos_sin_cache`` [max_pos, 64] (cos | sin), as vLLM builds it.

    Mirrors vLLM ``rotary_embedding/deepseek_scaling_rope.py::_compute_cos_sin_cache`` with
    DSV3.2's rope_scaling (theta 1e4, factor 40, original 4096, beta 32/1, mscale 1/1), cast to
    the model dtype (bf16) as ``RotaryEmbeddingBase`` does.
    """
    return _cos_sin_cache_cpu(int(max_pos)).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# whole region
# --------------------------------------------------------------------------------------
def run_region(args, use_ue8m0: bool = True) -> None:
    """Run the whole region in vLLM's order, writing into ``args``' output buffers.

    ``args`` is a :class:`smpart.region.RegionArgs`. Writes ``kv_cache`` (new keys),
    ``topk_indices`` [T, 2048], ``q`` [T, H, 192] and ``k_pe`` (roped in place); honours the
    production-model options (``smpart.prep``: index-q prep, ``write_keys``, ``fill``,
    ``rope_k_pe``, ``rope_fused_q``).
    """
    T = args.q_c.shape[0]
    if getattr(args, "index_q", None) is not None:  # production model: index-q prep first (smpart.prep)
        from .triton_kernels.index_q import index_q_prep_torch

        q8, w, _ = index_q_prep_torch(_clamp_positions(args.positions, args.index_cos_sin_cache), args.index_q, args.index_cos_sin_cache, args.index_weights_raw,
                                      rope_interleave=args.index_rope_interleave)
        args.index_q_fp8.copy_(q8)
        args.index_weights.copy_(w)
    if getattr(args, "write_keys", True):
        indexer_k_quant_and_cache(args.index_k, args.kv_cache, args.slot_mapping, use_ue8m0)
    if getattr(args, "fill", True):
        args.topk_indices[:T] = -1
    # visible lengths clamped to the block table's capacity, as the kernels clamp them (a length
    # past the table is refused by the value checks; with them off every path sees the same rows)
    lens = visible_lens(args.context_lens, args.next_n).clamp(max=args.block_table.shape[1] * dims.CACHE_BLOCK_SIZE)
    max_len = max(int(lens.max()) if T else 0, 1)
    logits = paged_mqa_logits(
        args.index_q_fp8, args.index_weights, args.kv_cache, args.block_table, args.context_lens,
        args.next_n, max_len,
    )
    args.topk_indices[:T] = topk_indices(logits, lens)
    H = args.q.shape[1]
    args.q.view(T, H * dims.QK_HEAD_DIM).copy_(
        q_b_proj(args.q_c, args.q_b_proj_weight, args.q_b_proj_weight_scale, use_ue8m0)
    )
    if getattr(args, "rope_fused_q", False):
        # vLLM 0.33 fused_q pid 0: fp32 math whatever the table's dtype, one rounding to bf16
        cs = args.cos_sin_cache[_clamp_positions(args.positions, args.cos_sin_cache)].float()
        half = dims.QK_ROPE_HEAD_DIM // 2
        q_pe = args.q[..., dims.QK_NOPE_HEAD_DIM:]
        q_pe.copy_(rope_interleaved(q_pe, cs[:, None, :half], cs[:, None, half:]))
        if getattr(args, "rope_k_pe", True):
            args.k_pe.copy_(rope_interleaved(args.k_pe, *_cs_split(args.cos_sin_cache, args.positions)))
    elif getattr(args, "rope_k_pe", True):
        mla_rope_(args.q, args.k_pe, args.positions, args.cos_sin_cache)
    else:
        cos, sin = _cs_split(args.cos_sin_cache, args.positions)
        q_pe = args.q[..., dims.QK_NOPE_HEAD_DIM:]
        q_pe.copy_(rope_interleaved(q_pe, cos, sin))


def _cs_split(cos_sin_cache: torch.Tensor, positions: torch.Tensor):
    """(cos, sin) [T, 1, 32] rows of ``cos_sin_cache`` at ``positions`` (as :func:`mla_rope_` takes them)."""
    cs = cos_sin_cache[_clamp_positions(positions, cos_sin_cache)]
    half = dims.QK_ROPE_HEAD_DIM // 2
    return cs[:, None, :half], cs[:, None, half:]


def _clamp_positions(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """int64 ``positions`` clamped to ``[0, max_pos)``, as ``triton_kernels/q_b_proj.py``'s RoPE clamps
    them (out-of-range positions are refused by the value checks; with them off every path reads
    the same rows)."""
    return positions.long().clamp(0, max(cos_sin_cache.shape[0] - 1, 0))
