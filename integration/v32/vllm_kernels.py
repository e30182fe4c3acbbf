"""vLLM 0.33's DSV3.2 Triton kernels (``vllm/models/deepseek_v32/common/kernels.py``) as real Triton kernels.

Why a loader: that file decorates its kernels with ``vllm.triton_utils.triton``, which vLLM replaces
by a placeholder (plain Python functions) on a machine with no active GPU driver
(``vllm/triton_utils/importing.py``), so on a CPU vLLM's own ``fused_q`` / ``fused_norm_rope``
cannot run, not even under ``TRITON_INTERPRET=1``; and the lent GPU machines have no vLLM package at
all (torch 2.11; vLLM 0.33 needs 2.14). :func:`load` executes the file's own source, unchanged, in a
fresh module whose ``from vllm... import`` statements resolve as follows:

* ``vllm.triton_utils``: the real ``triton`` / ``triton.language`` (so ``@triton.jit`` is Triton's,
  interpreted under ``TRITON_INTERPRET=1`` or compiled on a GPU);
* ``vllm.v1.attention.ops.common.pack_ue8m0_x4``: a ``@triton.jit`` copy of vLLM's 3-line helper
  (``vllm/v1/attention/ops/common.py``; only used for sm_100 MX scales);
* anything else from ``vllm``: the installed vLLM's own object when vLLM imports; otherwise (the GPU
  machine) a stand-in with vLLM's sm_90 answers: ``current_platform.fp8_dtype()`` =
  ``float8_e4m3fn``, ``is_cuda()`` = CUDA available, ``is_arch_support_pdl()`` = compute capability
  >= 9 (``vllm/platforms/cuda.py``), ``mqa_logits_use_mx_scales()`` = sm_100 family
  (``vllm/utils/deep_gemm.py``), ``is_quantized_kv_cache(d)`` = ``d`` starts with ``fp8`` or
  ``nvfp4`` (``vllm/v1/kv_cache_interface.py``), and the sm_100 CuTeDSL ``fused_q`` reported
  unsupported (``nvidia/ops/fused_q_cutedsl.py::is_fused_q_cutedsl_supported`` needs sm_100).

The file comes from ``path``, else ``$SMPART_VLLM_V32_KERNELS``, else the installed vLLM package
(located with ``importlib.util.find_spec``, not imported). On the GPU machine carry a copy made on a
machine with vLLM 0.33.0: ``python -m smpart.integration.v32.vllm_kernels .vllm_v32`` copies it to
``.vllm_v32/kernels.py`` (git-ignored); then ``export SMPART_VLLM_V32_KERNELS=$PWD/.vllm_v32/kernels.py``.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import importlib.util
import os
import sys
import types

ENV = "SMPART_VLLM_V32_KERNELS"
REL_PATH = os.path.join("models", "deepseek_v32", "common", "kernels.py")
_LOADED: dict[str, types.ModuleType] = {}


def default_path() -> str | None:
    """Where vLLM's ``kernels.py`` is: ``$SMPART_VLLM_V32_KERNELS``, else the installed package's file."""
    env = os.environ.get(ENV)
    if env:
        return env
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], REL_PATH)
    return p if os.path.exists(p) else None


def _standins() -> dict[str, types.SimpleNamespace]:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def pack_ue8m0_x4(scale):  # vllm/v1/attention/ops/common.py (vLLM 0.33.0), verbatim
        return ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF) * 0x01010101

    def _cap():
        return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)

    platform = types.SimpleNamespace(
        fp8_dtype=lambda: torch.float8_e4m3fn, is_cuda=torch.cuda.is_available, is_rocm=lambda: False,
        is_arch_support_pdl=lambda: _cap()[0] >= 9,
    )
    return {
        "vllm.triton_utils": types.SimpleNamespace(triton=triton, tl=tl),
        "vllm.v1.attention.ops.common": types.SimpleNamespace(pack_ue8m0_x4=pack_ue8m0_x4),
        "vllm.platforms": types.SimpleNamespace(current_platform=platform),
        "vllm.utils.deep_gemm": types.SimpleNamespace(mqa_logits_use_mx_scales=lambda: _cap()[0] == 10),
        "vllm.v1.kv_cache_interface": types.SimpleNamespace(
            is_quantized_kv_cache=lambda d: str(d).startswith(("fp8", "nvfp4"))),
        "vllm.models.deepseek_v32.nvidia.ops.fused_q_cutedsl": types.SimpleNamespace(
            is_fused_q_cutedsl_supported=lambda *a, **k: False, fused_q_cutedsl=None),
    }


def load(path: str | None = None) -> types.ModuleType:
    """vLLM's DSV3.2 ``kernels.py`` with real Triton kernels (cached per file content).

    Returns
    -------
    module with vLLM's ``fused_q``, ``fused_norm_rope``, ``_fused_q_kernel``,
    ``_fused_norm_rope_kernel``, ... (its own source, unchanged).

    Raises
    ------
    FileNotFoundError : no file at ``path`` / ``$SMPART_VLLM_V32_KERNELS`` and no vLLM installed.
    """
    path = path or default_path()
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"vLLM's deepseek_v32 kernels.py not found (path={path!r}); install vllm==0.33.0 "
                                f"or set {ENV} to a copy (python -m smpart.integration.v32.vllm_kernels DIR)")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    key = hashlib.sha256(src.encode()).hexdigest()
    if key in _LOADED:
        return _LOADED[key]
    stand = _standins()
    real_import = builtins.__import__

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "vllm" or name.startswith("vllm.")):
            if name == "vllm.triton_utils" or name == "vllm.v1.attention.ops.common" or \
                    name.endswith("fused_q_cutedsl"):
                return stand[name]
            try:
                return real_import(name, globals, locals, fromlist, level)
            except ImportError:
                if name in stand:
                    return stand[name]
                raise
        return real_import(name, globals, locals, fromlist, level)

    mod = types.ModuleType(f"smpart_vllm_v32_kernels_{key[:8]}")
    mod.__file__ = path
    mod.__dict__["__builtins__"] = dict(vars(builtins), __import__=_import)
    sys.modules[mod.__name__] = mod  # Triton's jit reads the defining module's globals through it
    exec(compile(src, path, "exec"), mod.__dict__)
    _LOADED[key] = mod
    return mod


def _main(argv: list[str]) -> int:
    import shutil

    dest = argv[1] if len(argv) > 1 else ".vllm_v32"
    src = default_path()
    if src is None:
        print("vLLM is not installed here; run this where vllm==0.33.0 is installed", file=sys.stderr)
        return 1
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(src, os.path.join(dest, "kernels.py"))
    print(f"copied {src} -> {os.path.join(dest, 'kernels.py')}; on the GPU machine: export {ENV}=$PWD/{dest}/kernels.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
