#!/usr/bin/env bash
# Set up (or reuse) the virtual environment of `make demo` / `make test`.
#
#   scripts/setup_env.sh VENV demo   torch + Triton 3.6 + numpy<2.4, smpart editable with the bench extra
#   scripts/setup_env.sh VENV test   the same + the test extra + vLLM 0.33.0's Python package (scripts/install_vllm_cpu.sh)
#
# torch: with a working `nvidia-smi` the venv sees the machine's packages (--system-site-packages) and
# keeps its CUDA torch (installs torch==2.13.0 from PyPI only if none is importable); without one it
# installs the CPU wheel torch==2.13.0 (PyTorch's CPU index, else the default index / local wheels).
# Triton is pinned to 3.6.0 and numpy to < 2.4 (Triton 3.6's interpreter breaks on numpy >= 2.4);
# a constraints file keeps every later install from moving torch, Triton or numpy.
# Re-running is cheap: a stamp file skips the installs while pyproject.toml and this script are unchanged.
set -euo pipefail
VENV=${1:-.venv}
WHAT=${2:-demo}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "$WHAT" in demo|test) ;; *) echo "setup_env.sh: second argument: expected demo or test, got '$WHAT'" >&2; exit 2;; esac

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$GPU" = 1 ]; then
        echo "setup_env: GPU found (nvidia-smi): $VENV sees the system's packages (its CUDA torch)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "setup_env: no GPU: $VENV gets the CPU torch 2.13.0"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
STAMP="$VENV/.smpart-setup-$WHAT"
KEY=$(cat "$ROOT/pyproject.toml" "$0" "$ROOT/scripts/install_vllm_cpu.sh" | cksum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    echo "setup_env: $VENV is set up for '$WHAT' (delete $STAMP to redo)"
    exit 0
fi
PIP=("$PY" -m pip install -q)
# numpy first: importing torch without it prints "Failed to initialize NumPy" (the torch probes below)
"${PIP[@]}" 'numpy<2.4'

have_torch() { "$PY" -c "import torch" >/dev/null 2>&1; }
if [ "$GPU" = 1 ]; then
    have_torch || "${PIP[@]}" torch==2.13.0
else
    if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" >/dev/null 2>&1; then
        "${PIP[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1 \
            || { echo "setup_env: PyTorch's CPU index is unreachable: plain pip install torch==2.13.0"; \
                 "${PIP[@]}" torch==2.13.0; }
    fi
fi
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
printf 'torch==%s\ntriton==3.6.0\nnumpy<2.4\n' "$TORCH" > "$VENV/constraints.txt"
"${PIP[@]}" -c "$VENV/constraints.txt" triton==3.6.0 'numpy<2.4'
EXTRAS=bench
[ "$WHAT" = test ] && EXTRAS=bench,test
"${PIP[@]}" -c "$VENV/constraints.txt" -e "$ROOT[$EXTRAS]"
if [ "$WHAT" = test ]; then
    "$ROOT/scripts/install_vllm_cpu.sh" "$PY" "$VENV/constraints.txt"
fi
"$PY" -c "import torch, triton, numpy; print('setup_env: torch', torch.__version__, '| triton', triton.__version__, \
'| numpy', numpy.__version__, '| CUDA', torch.cuda.is_available())"
echo "$KEY" > "$STAMP"
