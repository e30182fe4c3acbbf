#!/usr/bin/env bash
# Put vLLM's compiled CUDA ops (its `_C_stable_libtorch` library: indexer_k_quant_and_cache,
# cooperative_topk, persistent_topk, top_k_per_row_decode, rotary_embedding, per_token_group_fp8_quant, ...)
# into DEST as an xz file small enough to carry to the GPU machine (about 61 MiB).
# Usage: scripts/get_vllm_ops.sh [DEST=.vx] [VLLM_VERSION=0.33.0]
# The library and DeepGEMM (get_deep_gemm.sh) do not fit in one carry together (64 MiB), so use two calls
# back to back, while the GPU machine is still warm:
#   call 1, carry [".vx"]: mkdir -p /tmp/vso && xz -dc .vx/_C_stable_libtorch.abi3.so.xz > /tmp/vso/_C_stable_libtorch.abi3.so
#   call 2, carry [".dg"]: test -f /tmp/vso/_C_stable_libtorch.abi3.so && ... python3 -c 'import torch; torch.ops.load_library("/tmp/vso/_C_stable_libtorch.abi3.so")'
# Seen working 2026-11-30: vLLM 0.33.0's library loads under the GPU image's torch 2.11 and its ops run
# (torch.ops._C.cooperative_topk, torch.ops._C.persistent_topk, torch.ops._C_cache_ops.indexer_k_quant_and_cache,
# torch.ops._C.rotary_embedding, torch.ops._C.per_token_group_fp8_quant). Signatures: vllm/_custom_ops.py and
# vllm/model_executor/layers/indexer_topk.py in the same wheel.
set -euo pipefail
DEST=${1:-.vx}
VER=${2:-0.33.0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps -d "$TMP" "vllm==$VER"
mkdir -p "$DEST"
(cd "$TMP" && unzip -q vllm-*.whl 'vllm/_C_stable_libtorch.abi3.so')
xz -T2 -6 -c "$TMP/vllm/_C_stable_libtorch.abi3.so" > "$DEST/_C_stable_libtorch.abi3.so.xz"
ls -la "$DEST"
