#!/usr/bin/env bash
# Create the Python environments that run SGLang and LMCache with pykvshm (the engine tests,
# tests/integrations/test_engines.py).  One environment per framework: SGLang 0.5.23 pins
# torch==2.14.1 and CUDA 13 kernels, LMCache 0.5.6 pins numpy<=2.2.6 and protobuf<7.
#
#   scripts/setup_engines_env.sh [sglang|lmcache|all] [ROOT]
#       (default all; ROOT ~/.cache/pykvshm, where pykvshm.integrations.engines_env looks:
#        ROOT/sglang-venv and ROOT/lmcache-venv)
#
# torch goes in first (2.13.0, the CPU wheel) and is pinned by a constraint so no framework
# pulls a CUDA build.
# SGLang: its declared dependencies cannot resolve against torch 2.13 (torch==2.14.1,
#   flashinfer, sgl-kernel, deep-ep, ... CUDA-only), so sglang is installed with --no-deps and
#   the pure-Python modules its cache controller and memory pools import are installed by
#   hand (the list below, found by importing until nothing was missing).  torchvision's PyPI
#   wheel is a CUDA build that cannot import with a CPU torch; scripts/sglang_torchvision_cpu.py
#   is installed beside it (see its docstring).
# LMCache: installs with its own dependencies (cupy-cuda13x and cuda-python come along,
#   unused on the CPU).
# Cost here: 10.6 min for both (2.7 GB + 1.9 GB) on the shared 2-vCPU machine with a reachable
# package index; reinstalling pykvshm alone takes seconds.
set -euo pipefail

WHICH="${1:-all}"
ROOT="${2:-$HOME/.cache/pykvshm}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$(mktemp)"
WHEELS="$(mktemp -d)"
trap 'rm -rf "$CONSTRAINTS" "$WHEELS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

SGLANG_DEPS=(
    aiohttp fastapi orjson msgspec xxhash zstandard psutil pyzmq requests pydantic packaging setproctitle
    uvicorn uvloop "transformers==5.19.0" sentencepiece tiktoken einops pybase64 python-multipart
    prometheus-client partial_json_parser interegular pillow tqdm huggingface_hub scipy distro regex
    watchfiles safetensors blobfile "python-dateutil<3" easydict triton ipython "apache-tvm-ffi==0.1.11"
    dill compressed-tensors gguf pytest
)

# This checkout as a wheel, built once with the current interpreter (same Python as the venvs).
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$REPO"
WHEEL="$(ls "$WHEELS"/pykvshm-*.whl)"

pip_in() { "$1/bin/python" -m pip --disable-pip-version-check -q "${@:2}"; }

setup_sglang() {
    local venv="$ROOT/sglang-venv"
    if ! (cd / && "$venv/bin/python" -c "import sglang.srt.managers.cache_controller") >/dev/null 2>&1; then
        mkdir -p "$ROOT"
        "$PYTHON" -m venv "$venv"
        pip_in "$venv" install -c "$CONSTRAINTS" "torch==2.13.0"
        pip_in "$venv" install --no-deps "sglang==0.5.23" "torchvision==0.28.0"
        pip_in "$venv" install -c "$CONSTRAINTS" "${SGLANG_DEPS[@]}"
        local sp
        sp="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        cp "$HERE/sglang_torchvision_cpu.py" "$sp/_pykvshm_torchvision_cpu.py"
        echo "import _pykvshm_torchvision_cpu" > "$sp/_pykvshm_torchvision_cpu.pth"
    fi
    pip_in "$venv" install --no-deps --force-reinstall "$WHEEL"
    (cd / && "$venv/bin/python" -c "
import sglang, torch, pykvshm.integrations.sglang
from sglang.srt.managers.cache_controller import HiCacheController  # noqa: F401
print(f'SGLang environment ready: sglang {sglang.__version__}, torch {torch.__version__}')" 2>&1 | tail -1)
}

setup_lmcache() {
    local venv="$ROOT/lmcache-venv"
    if ! (cd / && "$venv/bin/python" -c "import lmcache.v1.cache_engine") >/dev/null 2>&1; then
        mkdir -p "$ROOT"
        "$PYTHON" -m venv "$venv"
        pip_in "$venv" install -c "$CONSTRAINTS" "torch==2.13.0"
        pip_in "$venv" install -c "$CONSTRAINTS" "lmcache==0.5.6"
    fi
    pip_in "$venv" install --no-deps --force-reinstall "$WHEEL"
    (cd / && "$venv/bin/python" -c "
import torch, pykvshm.integrations.lmcache
from importlib.metadata import version
print(f'LMCache environment ready: lmcache {version(\"lmcache\")}, torch {torch.__version__}')" 2>&1 | tail -1)
}

case "$WHICH" in
    sglang) setup_sglang ;;
    lmcache) setup_lmcache ;;
    all) setup_sglang; setup_lmcache ;;
    *) echo "usage: $0 [sglang|lmcache|all] [ROOT]" >&2; exit 2 ;;
esac
