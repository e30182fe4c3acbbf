#!/usr/bin/env bash
# The GPU runs behind the results in bench/results/<gpu>/<date>/, in two stages because vLLM's
# compiled ops (.vx, scripts/get_vllm_ops.sh) and DeepGEMM (.dgx/dg.tar.xz, scripts/get_deep_gemm.sh)
# do not travel together to the lent GPU machine (64 MiB per call); the machine keeps /tmp between
# two calls made back to back.
#   stage ops  (carry .vx):            unpack vLLM's ops to /tmp/vso, install, top-k timing vs vLLM,
#                                      the sampled top-k's GPU correctness sweep
#   stage grid (carry .dgx .vllm_v32): DeepGEMM, the GPU tests, smpart-bench against vLLM's kernels
#   stage accept (carry .dgx, after ops): per-op table vs vLLM (smpart.bench.kernels, issue 16's
#                                      shapes) and compute-sanitizer memcheck
#   stage tune (carry .dgx .vllm_v32, after ops): smpart-autotune on the reported buckets into
#                                      OUT/tuned.json, then smpart-bench with that file
# Usage: scripts/gpu_run.sh ops|grid|accept|tune OUT_DIR [smpart-bench args...]
set -uo pipefail
STAGE=$1; OUT=$2; shift 2
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
if [ "$STAGE" = ops ]; then
  mkdir -p /tmp/vso && xz -T16 -dc .vx/_C_stable_libtorch.abi3.so.xz > /tmp/vso/_C_stable_libtorch.abi3.so
  timeout "${TOPK_TIMEOUT:-380}" python -m smpart.bench.radix_topk_bench --out "$OUT/topk" ${TOPK_ARGS:-} 2>&1 \
    | grep -v Warning | tee "$OUT/topk.log"
  timeout "${SWEEP_TIMEOUT:-170}" python -m smpart.bench.radix_topk_bench --sweep --impl sample 2>&1 \
    | grep -v Warning | tee "$OUT/sweep.log"
elif [ "$STAGE" = accept ]; then
  test -f /tmp/vso/_C_stable_libtorch.abi3.so || echo "no /tmp/vso: run stage ops first (vLLM columns read n/a)"
  mkdir -p .dg && tar -C .dg -xJf .dgx/dg.tar.xz
  export PYTHONPATH=$PWD/.dg
  timeout "${KERNELS_TIMEOUT:-240}" python -m smpart.bench.kernels --out "$OUT/kernels.md" \
    --shapes "${KERNELS_SHAPES:-128x1x4096,128x32x8192,128x128x16384,128x1x65536,128x128x65536,128x1x163840}" 2>&1 \
    | grep -v Warning | tee "$OUT/kernels.log"
  timeout "${MEMCHECK_TIMEOUT:-300}" python -m pytest -o addopts= --import-mode=importlib -q -rs -m gpu \
    -p no:cacheprovider tests/test_partitioned_stress.py::test_memcheck_gpu 2>&1 | tail -15 | tee "$OUT/memcheck.log"
elif [ "$STAGE" = tune ]; then
  mkdir -p .dg && tar -C .dg -xJf .dgx/dg.tar.xz
  export PYTHONPATH=$PWD/.dg SMPART_VLLM_V32_KERNELS=$PWD/.vllm_v32/kernels.py
  timeout "${TUNE_TIMEOUT:-330}" python -m smpart.bench.autotune --heads 128 --batch 1,8,32,128 \
    --context 4096,16384,65536 --budget-s "${TUNE_BUDGET_S:-300}" --out "$OUT/tuned.json" 2>&1 | grep -v Warning | tail -30
  SMPART_TUNING_CACHE=$OUT/tuned.json timeout "${GRID_TIMEOUT:-240}" python -m smpart.bench --out "$OUT/grid" "$@" 2>&1 \
    | grep -v Warning | tail -60
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
