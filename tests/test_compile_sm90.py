"""Register budget of the partitioned kernel's GEMM-less first launch, compiled for sm_90 on the CPU.

A launch with no GEMM tile (``gemm_in_tail = 1``) must compile no GEMM code: Triton counts the
registers of every compiled path, a loop of zero trips included, and the logits role is
latency-bound per program, so registers set its occupancy (docs/KERNELS.md, "Role functions"). Triton compiles for
sm_90 without a GPU (``triton.compile(ASTSource(...), target=GPUTarget('cuda', 90, 32))``, docs/KERNELS.md "Testing")
and its wheel ships ``cuobjdump``, which reads the register count from the cubin.

Measured 2026-11-30 (Triton 3.6, 4 warps): 218 registers with the GEMM loop compiled in (two
programs per SM), 96 with it compiled out; the standalone logits kernel: 79.

With the radix top-k (2026-12-07, Triton 3.6, registers / stack bytes): GEMM-less first launch
96 / 0 without the histogram, 93 / 0 with it; first launch with GEMM tiles and the histogram
214 / 0; the in-launch top-k (``fuse_topk``, 4 warps, 4096-position chunks) 255 / 624 GEMM-less and
255 / 608 with GEMM tiles (spills: an opt-in split); the tail launch (radix items beside
128-row GEMM tiles, 16 warps) 128 / 120 at 4096-position chunks, 128 / 488 at 8192.

With the sampled top-k and 8192 candidate slots (2026-12-08, final code): GEMM-less first launch
96 / 0 (no histogram); the tail launch 128 / 488 at 4096-position chunks; the in-launch top-k
(4 warps holding 8192 candidate lanes; never picked by the tuner) 255 / 4136 GEMM-less with the
radix algorithm; the radix tail 128 / 352 (4096) and 128 / 384 (8192); the standalone sampled top-k
kernel (16 warps) 128 / 56 at 4096-position chunks, 128 / 120 at 8192. Its parts alone do not
spill (exact select over 4096 / 8192 lanes 84 / 107 registers, the cutoff over 2048 samples 59):
the spills come from holding them together with the 8192-lane final select.

With programs per row (2026-12-08, later; a program takes every npr-th chunk, the next chunk's
load in flight): the standalone sampled top-k 128 / 32 at 4096-position chunks, 128 / 64 at 8192
(16 warps); the tail launch 128 / 760 (4096) and 128 / 824 (8192); the in-launch sampled top-k
(4 warps, the row's only program) 255 / 2512 GEMM-less.

Shared memory per block (``metadata.shared``, 2026-12-08): 16 KB (standalone sampled top-k, 8 warps)
to 32 KB (16 warps), 33 KB GEMM-less first launch, 64 KB with GEMM tiles, 73 KB tail launch; the
test keeps every variant under sm_90's 227 KB (a larger request fails at launch on the GPU).
"""

import os
import re
import shutil
import subprocess
import tempfile

import sys

import pytest

triton = pytest.importorskip("triton")

_PTR_TYPES = dict(
    q_c_ptr="*bf16", w_ptr="*fp8e4nv", ws_ptr="*fp32", positions_ptr="*i64", cos_sin_ptr="*bf16", k_pe_ptr="*bf16",
    q_ptr="*bf16", xq_ptr="*fp8e4nv", xs_ptr="*fp32", index_q_ptr="*fp8e4nv", index_w_ptr="*fp32",
    index_k_ptr="*bf16", kv_cache_ptr="*u8", block_table_ptr="*i32", context_lens_ptr="*i32",
    slot_mapping_ptr="*i64", logits_ptr="*fp32", topk_ptr="*i32", counters_ptr="*i32", hist_ptr="*i32",
    rctr_ptr="*i32", cand_key_ptr="*i32", cand_pos_ptr="*i32", scratch_ptr="*i32", lens_ptr="*i32", ctr_ptr="*i32",
)
_DIV16 = {"stride_q", "stride_w", "stride_k", "stride_logits", "stride_topk", "stride_qc", "stride_q_out", "N",
          "max_len"}  # what Triton's specialization sees at real shapes


def _cuobjdump():
    import triton.backends.nvidia as nv

    p = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def _registers(constexprs: dict, tail: bool = False, num_warps: int = 4, fn=None) -> tuple[int, int, int]:
    """(registers, stack bytes, dynamic shared-memory bytes) of the first launch (``tail``: the top-k
    + GEMM tail launch; ``fn``: another kernel) for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from smpart.triton_kernels import partitioned as P

    fn = fn or (P._topk_gemm_tail_kernel if tail else P._partitioned_kernel)
    sig = {n: ("constexpr" if n in constexprs else _PTR_TYPES.get(n, "i32")) for n in fn.arg_names}
    missing = [n for n in fn.arg_names if n.endswith("_ptr") and n not in _PTR_TYPES]
    assert not missing, f"pointer arguments without a type in this test: {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (n.endswith("_ptr") or n in _DIV16)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2)), int(k.metadata.shared)


_BASE = dict(USE_UE8M0=True, NEXT_N=1, BLOCKS_PER_ITEM=4, NUM_STAGES=3, BLOCK_N=64, BLOCK_T=64,
             T_PAD=128, DYNAMIC=False, QUEUE_CHUNK=4, HW_CVT=True, HIST=True, TOPK_CHUNK=4096, TOPK_K=2048,
             CAND=8192, CP=256, GEMM_PREQUANT=False, GEMM_FIRST=False, PATCH=True, ROPE_FUSED_Q=False, ROPE_K_PE=True,
             TOPK_S=0, TOPK_BITS=4, TOPK_COUNT=1)


_TAIL = dict(NEXT_N=1, CHUNK=4096, TOPK_K=2048, CAND=8192, CP=256, USE_UE8M0=True, HW_CVT=True, BLOCK_N=128,
             BLOCK_T=64, NUM_STAGES=3, PREQUANT=True, ROPE_FUSED_Q=False, ROPE_K_PE=True, TOPK_S=0, TOPK_BITS=4,
             TOPK_COUNT=1)


def _variants() -> dict:
    """{variant: (registers, stack bytes)}: the partitioned launches with the radix top-k."""
    res = {}
    for h in (False, True):  # what gemm_in_tail=1 launches: key write + logits (+ histogram)
        res[f"first GEMM-less HIST={h}"] = _registers(dict(_BASE, HIST=h, ROLES=3, QUANT_Q_C=True, DENSE=True))
    res["first with GEMM HIST=True"] = _registers(dict(_BASE, ROLES=11, QUANT_Q_C=False, DENSE=False))
    res["first fused top-k GEMM-less"] = _registers(dict(_BASE, ROLES=7, QUANT_Q_C=False, DENSE=True))
    res["first fused top-k with GEMM"] = _registers(dict(_BASE, ROLES=15, QUANT_Q_C=False, DENSE=False))
    for chunk in (4096, 8192):
        res[f"tail CHUNK={chunk} 16w"] = _registers(dict(_TAIL, CHUNK=chunk), tail=True, num_warps=16)
    # the sampled top-k (the default): no histogram
    res["first GEMM-less sample"] = _registers(dict(_BASE, HIST=False, ROLES=3, QUANT_Q_C=True, DENSE=True,
                                                   TOPK_S=2048))
    res["tail sample CHUNK=4096 16w"] = _registers(dict(_TAIL, CHUNK=4096, TOPK_S=2048), tail=True, num_warps=16)
    from smpart.triton_kernels.sample_topk import _sample_topk_kernel

    res["standalone sample CHUNK=8192 16w"] = _registers(
        dict(PER_ROW_LENS=False, CHUNK=8192, K=2048, CAND=8192, CP=256, RT=32, S=4096, BITS=4, COUNT=1),
        num_warps=16, fn=_sample_topk_kernel)
    return res


def _child() -> None:
    """Run in a child process without TRITON_INTERPRET (the suite runs under the interpreter, where
    the kernels are not compiled): print the measures as JSON."""
    import json

    print("REGS " + json.dumps(_variants()))


def test_gemm_less_first_launch_compiles_no_gemm_code():
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend binaries) on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_compile_sm90 as t; t._child()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    m = re.search(r"REGS (\{.*\})", p.stdout)
    if m is None:
        if "ptxas" in p.stderr or "cuobjdump" in p.stderr:  # a toolchain that cannot target sm_90 here
            pytest.skip(f"cannot compile for sm_90 on this machine: {p.stderr[-300:]}")
        raise AssertionError(f"compile child failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    import json

    res = json.loads(m.group(1))
    print(res)
    (gemm_less, gemm_less_stack, _), (with_gemm, _, _) = res["first GEMM-less HIST=True"], res["first with GEMM HIST=True"]
    # a launch asking for more than sm_90's 227 KB of shared memory per block fails on the GPU
    # ("out of resources"); the variants here take 16-73 KB (2026-12-08)
    too_big = {k: v[2] for k, v in res.items() if v[2] > 232448}
    assert not too_big, f"shared memory over 227 KB per block: {too_big}"
    assert res["standalone sample CHUNK=8192 16w"][2] > 0, "the shared-memory measure reads nothing"
    assert gemm_less_stack == 0, f"GEMM-less first launch with the histogram spills ({gemm_less_stack} bytes)"
    # the GEMM tile alone needs > 200 registers; the logits role about 80-100
    assert with_gemm > 160, f"the measure does not see the GEMM code ({with_gemm} registers)"
    assert gemm_less <= 128, f"GEMM-less first launch: {gemm_less} registers (GEMM code compiled in?)"
