"""Allocator throughput: alloc+free of block batches, from Python and from C++, 1 and 2 processes.

    python bench/alloc.py [--seconds 2] [--skip-cpp]

Python: each process loops `handles = pool.alloc(64); pool.free(handles)` on its own pool
handle; figures are blocks allocated and freed per second (a block op = one alloc or one free).
C++: builds bench/cpp/alloc_bench.cpp (Release) with CMake into build/bench and runs it
(1 and 2 threads, one pool member each, batches of 1 and 64).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

# the Python measurement is shared with the packaged suite (pykvshm bench)
from pykvshm.benchmarks.alloc import python_figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpp_figures(seconds: float) -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cm

            cmake = os.path.join(cm.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            return "skipped: cmake not found (pip install cmake)"
    build = os.path.join(ROOT, "build", "bench")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", ROOT, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DPYKVSHM_BUILD_PYTHON=OFF",
                    "-DPYKVSHM_BUILD_BENCH=ON"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", build, "--target", "pykvshm_alloc_bench", "-j2"], check=True, capture_output=True)
    r = subprocess.run([os.path.join(build, "pykvshm_alloc_bench"), "--seconds", str(seconds)], check=True,
                       capture_output=True, text=True)
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--skip-cpp", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = python_figures(args.seconds)
    print("Python (pool.alloc(batch) + pool.free), block ops/s:")
    for r in rows:
        print(f"  {r['procs']} process(es), batch {r['batch']:2d}: {r['block_ops_per_s'] / 1e6:7.2f} M total, "
              f"{r['per_process'] / 1e6:6.2f} M per process")
    cpp = "skipped" if args.skip_cpp else cpp_figures(args.seconds)
    print("C++ (bench/cpp/alloc_bench.cpp):")
    print(cpp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": rows, "cpp": cpp}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
