#!/usr/bin/env bash
# vLLM 0.33.0's Python package for the shim's CPU tests (tests/test_integration_*.py), without its
# binary requirements.
#
#   scripts/install_vllm_cpu.sh [PYTHON] [CONSTRAINTS]
#
# `pip install vllm==0.33.0` cannot share an environment with smpart's pins: vLLM 0.33.0 requires
# torch 2.14 (CUDA) and a Triton newer than the 3.6 the kernels are tested with. The tests import
# only vLLM's Python modules, so vLLM goes in with --no-deps plus the pure-Python packages those
# modules import (the versions follow vLLM 0.33.0's own requirements). CONSTRAINTS (a pip constraints
# file) keeps torch / Triton / numpy where they are. On a GPU machine, the vendor baselines
# (vllm_sequential / vllm_dual_stream) also need vLLM's compiled ops and DeepGEMM: docs/VENDOR.md.
set -euo pipefail
PY=${1:-python}
CONS=${2:-}
C=()
[ -n "$CONS" ] && C=(-c "$CONS")
"$PY" -m pip install -q --no-deps vllm==0.33.0
"$PY" -m pip install -q "${C[@]}" packaging pydantic psutil cachetools msgspec pyyaml \
    regex requests tqdm 'transformers>=5.16.1,<5.21' cloudpickle pyzmq cbor2 aiohttp openai-harmony openai \
    pillow pybase64 uvloop py-cpuinfo prometheus-client 'xgrammar==0.2.8' 'fastapi>=0.133,<0.137' \
    partial-json-parser 'llguidance>=1.7,<1.8' einops
"$PY" -c "import vllm; print('install_vllm_cpu: vllm', vllm.__version__)"
