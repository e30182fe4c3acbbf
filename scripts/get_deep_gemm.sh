#!/usr/bin/env bash
# Extract DeepGEMM (the copy vLLM ships, with its CUTLASS headers for JIT) into DEST
# so that it can be carried to the GPU machine and put on PYTHONPATH.
# Usage: scripts/get_deep_gemm.sh [DEST=.dg] [VLLM_VERSION=0.33.0]
# Then: make sure DEST is git-ignored (e.g. echo /.dg/ >> .git/info/exclude),
# carry it, and on the GPU machine: export PYTHONPATH=$PWD/.dg:$PYTHONPATH
# Seen working 2026-11-30: vLLM 0.33.0 ships DeepGEMM 2.8.1, which imports and runs with
# the GPU image's torch 2.11 / CUDA 13 (fp8_gemm_nt, fp8_fp4_paged_mqa_logits checked).
set -euo pipefail
DEST=${1:-.dg}
VER=${2:-0.33.0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps -d "$TMP" "vllm==$VER"
python3 - "$TMP" "$DEST" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(tmp.glob("vllm-*.whl"))
prefix = "vllm/third_party/deep_gemm/"
out = dest / "deep_gemm"
shutil.rmtree(out, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = out / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print(f"deep_gemm extracted to {out} ({size / 2**20:.0f} MiB)")
PY
