"""What the grid benchmark (``smpart.bench.__main__``), the decode loop (``smpart.bench.decode``) and
the autotuner share: the vendor path names and availability, the per-path correctness check and the
"cannot run here" test."""

from __future__ import annotations

VENDOR_PATHS = ("vllm_sequential", "vllm_dual_stream")  # vLLM's generic-model baselines
V32_PATHS = ("vllm_v32", "vllm_v32_dual_stream")  # vLLM's production DSV3.2 model (smpart.vendor_v32)


def v32_available() -> tuple[bool, str]:
    """Whether ``vllm_v32`` / ``vllm_v32_dual_stream`` can run here (``smpart.vendor_v32.v32_available``).

    Returns
    -------
    (ok, reason).
    """
    from smpart.vendor_v32 import v32_available as available

    return available()


def check_path(path: str, out, want, batch, logits64=None) -> None:
    """``checks.check_region`` of a path's outputs against the reference's.

    Vendor paths run vLLM's ``_C.rotary_embedding``, which computes in fp32 and rounds once,
    while the reference mirrors vLLM's DeepSeek rope ``forward_native`` (bf16 at each step): their
    ``k_pe`` may differ by an ulp, so for them ``k_pe`` is compared by normalized difference
    (< 1e-5) and every other output by the common rule.

    Raises
    ------
    AssertionError : naming the first bad output.
    """
    import dataclasses

    from smpart import checks

    if path in VENDOR_PATHS:
        d = checks.calc_diff(out.k_pe.float(), want.k_pe.float())
        if not d < 1e-5:
            raise AssertionError(f"k_pe: normalized difference {d:.3e} >= 1e-05")
        want = dataclasses.replace(want, k_pe=out.k_pe)
    checks.check_region(out, want, batch, logits64=logits64)


def _unavailable(e: BaseException) -> bool:
    """A path's "cannot run here" (``RuntimeError`` raised by the path, per ``run_region``'s contract),
    as opposed to a crash: CUDA errors (also ``RuntimeError`` subclasses) and every other exception."""
    if not isinstance(e, RuntimeError) or type(e).__name__ == "AcceleratorError":
        return False
    return "CUDA error" not in str(e) and "CUDA-capable" not in str(e)
