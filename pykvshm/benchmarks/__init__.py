"""The benchmark suite that ships with pykvshm (``pykvshm bench``).

Short versions of the scripts in the repository's bench/ folder, each measuring pykvshm beside a
baseline in the same run: the allocator against a private free list, publish and copy_to against
memcpy, match and acquire against a Python dict, a request handoff and a shared-prefix workload
against TCP (and NIXL and Mooncake where they are installed). The scripts in bench/ import the
measurements from here and add every size, plots and the C++ allocator figures.

    from pykvshm.benchmarks import BENCHMARKS, run, render
    print(render(run(["alloc", "match"], quick=True)))
"""

from .suite import BENCHMARKS, Benchmark, listing, render, run

__all__ = ["BENCHMARKS", "Benchmark", "listing", "render", "run"]
