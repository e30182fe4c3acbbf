#!/usr/bin/env bash
# The GPU runs behind the results in bench/results/<gpu>/<date>/, in two stages because vLLM's
# compiled ops (.vx, scripts/get_vllm_ops.sh) and DeepGEMM (.dgx/dg.tar.xz, scripts/get_deep_gemm.sh)
# do not travel together to the lent GPU machine (64 MiB per call); the machine keeps /tmp between
# two calls made back to back.
#   stage ops  (carry .vx):            unpack vLLM's ops to /tmp/vso, install, top-k timing vs vLLM,
#                                      the sampled top-k's GPU correctness sweep
#   stage grid (carry .dgx .vllm_v32): DeepGEMM, the GPU tests, smpart-bench against vLLM's kernels
# Usage: scripts/gpu_run.sh ops|grid OUT_DIR [smpart-bench args...]
set -uo pipefail
STAGE=$1; OUT=$2; shift 2
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
if [ "$STAGE" = ops ]; then
  mkdir -p /tmp/vso && xz -T16 -dc .vx/_C_stable_libtorch.abi3.so.xz > /tmp/vso/_C_stable_libtorch.abi3.so
  timeout "${TOPK_TIMEOUT:-300}" python -m smpart.bench.radix_topk_bench --out "$OUT/topk" ${TOPK_ARGS:-} 2>&1 \
    | grep -v Warning | tee "$OUT/topk.log"
  timeout "${SWEEP_TIMEOUT:-150}" python -m smpart.bench.radix_topk_bench --sweep --impl sample 2>&1 \
    | grep -v Warning | tee "$OUT/sweep.log"
else
  test -f /tmp/vso/_C_stable_libtorch.abi3.so || echo "no /tmp/vso: run stage ops first (vLLM columns skip)"
  mkdir -p .dg && tar -C .dg -xJf .dgx/dg.tar.xz
  export PYTHONPATH=$PWD/.dg SMPART_VLLM_V32_KERNELS=$PWD/.vllm_v32/kernels.py
  # -o addopts=: pyproject.toml adds -n auto, which needs pytest-xdist (maybe absent on the GPU machine)
  timeout "${TEST_TIMEOUT:-200}" python -m pytest -o addopts= --import-mode=importlib -q -x -rs -m gpu -p no:cacheprovider \
    ${GPU_TESTS:-tests/test_sample_topk.py} 2>&1 \
    | tail -15 | tee "$OUT/pytest.log"
  timeout "${GRID_TIMEOUT:-300}" python -m smpart.bench --out "$OUT/grid" "$@" 2>&1 | grep -v Warning | tail -60
fi
