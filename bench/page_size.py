"""publish / copy_to of 256 MiB of Llama-3-8B KV into a pool on /dev/shm (4 KiB pages) and on
hugetlbfs (2 MiB pages), beside memcpy, in one run.

    echo 600 > /proc/sys/vm/nr_hugepages && mkdir -p /mnt/hugetlb && mount -t hugetlbfs -o pagesize=2M none /mnt/hugetlb
    python bench/page_size.py [/mnt/hugetlb]
"""

import statistics
import sys
import time

import numpy as np

import pykvshm
spec = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB blocks
n = 128  # 256 MiB
data = np.random.default_rng(0).integers(0, 1<<16, size=(n, *spec.block_shape), dtype=np.uint16).view(np.float16)
dst = [np.zeros_like(data) for _ in range(3)]
def bench(path, **kw):
    try: pykvshm.Pool.destroy(path)
    except Exception: pass
    p = pykvshm.Pool.create(path, spec=spec, capacity=(4 * n + 2) * spec.block_bytes, prefault=True, **kw)
    ts = []
    for r in range(5):
        keys = pykvshm.block_keys(np.arange(n*16)+r*10**7, 16)
        t = time.perf_counter(); p.publish(keys, data); ts.append(time.perf_counter()-t)
    tc = []
    with p.acquire(keys) as lease:
        out = dst[0]
        for r in range(5):
            t = time.perf_counter(); lease.copy_to(out); tc.append(time.perf_counter()-t)
    p.close(); pykvshm.Pool.destroy(path)
    return statistics.median(ts), statistics.median(tc)
mc = []
for r in range(5):
    t = time.perf_counter(); np.copyto(dst[r % 3], data); mc.append(time.perf_counter()-t)
m = statistics.median(mc)
for label, path, kw in [("/dev/shm (4 KiB pages)", "hugebench", {}), ("hugetlbfs (2 MiB pages)", (sys.argv[1] if len(sys.argv) > 1 else "/mnt/hugetlb") + "/hugebench", {})]:
    pub, cp = bench(path, **kw)
    print(f"{label:26s} publish {data.nbytes/pub/1e9:5.2f} GB/s ({m/pub:.2f}x memcpy)  copy_to {data.nbytes/cp/1e9:5.2f} GB/s ({m/cp:.2f}x memcpy)")
print(f"memcpy {data.nbytes/m/1e9:.2f} GB/s")
