"""Hosts that scale: alloc / publish / acquire throughput of 1, 2 and 4 emulated hosts, noncoherent
pools with one pool-wide lock and with lock shards, side by side with a coherent pool.

    python bench/host_scaling.py [--runs 3] [--seconds 0.5] [--hosts 1 2 4] [--json FILE]

Each "host" is one process that opens the pool with its own ``host_id`` (as bench/coherence.py
does: in a noncoherent pool its processes then meet the others in the bakery of each lock, and
judge them by lease, as another machine would; what one machine cannot emulate is separate
caches: the write-backs and invalidations are real instructions on local DRAM). All hosts start
behind a barrier and run the same operation for ``--seconds``:

* ``alloc``: alloc(16) + free of those 16 blocks (2 block operations per block);
* ``publish``: publish 16 new keys (1 KiB blocks; the pool fills and evicts);
* ``acquire``: acquire 16 keys published beforehand (by the host itself) + release.

Modes, run interleaved within each repetition: ``coherent``; ``noncoherent, 1 lock``
(``lock_shards=1``: the single pool-wide lock of layout version 2, same code as before the shards);
``noncoherent, 8 shards`` (the default). Figures are operations (blocks) per second summed over
the hosts, and each noncoherent figure as a ratio against the coherent one of the same repetition
and host count; the table gives the median and the spread (min-max) over ``--runs`` repetitions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np

import pykvshm

SPEC = pykvshm.KVSpec(num_layers=1, num_kv_heads=1, head_dim=16, block_tokens=16, dtype="float16")  # 1 KiB blocks
BATCH = 16
MODES: dict[str, dict[str, Any]] = {
    "coherent": {"coherence": "coherent"},
    "noncoherent, 1 lock": {"coherence": "noncoherent", "lock_shards": 1},
    "noncoherent, 8 shards": {"coherence": "noncoherent", "lock_shards": 8},
}
OPS = ("alloc", "publish", "acquire")
CTX = mp.get_context("fork")


def _keys(host: int, start: int, n: int) -> list[bytes]:
    return [((host << 48) | (start + j)).to_bytes(8, "little") + b"host-scl" for j in range(n)]


def _worker(name: str, op: str, host: int, host_id: int, seconds: float, barrier, out, i: int) -> None:
    try:
        pool = pykvshm.Pool.open(name, host_id=host_id or None)
        data = np.zeros((BATCH, *SPEC.block_shape), dtype=SPEC.np_dtype)
        warm = _keys(host, 0, BATCH)
        if op == "acquire":
            pool.publish(warm, data)
        barrier.wait()
        n, k = 0, 1
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                if op == "alloc":
                    pool.free(pool.alloc(BATCH, evict=False))
                    n += 2 * BATCH
                elif op == "publish":
                    pool.publish(_keys(host, k * BATCH, BATCH), data)
                    k += 1
                    n += BATCH
                else:
                    with pool.acquire(warm) as lease:
                        n += len(lease)
        out[i] = n / (time.perf_counter() - t0)
        pool.close()
    except BaseException as e:  # reported by the parent as a failed figure
        print(f"host {host}: {e!r}", file=sys.stderr)
        out[i] = -1.0
    os._exit(0)


def measure(mode: str, op: str, hosts: int, seconds: float) -> float:
    name = f"pykvshm-bench-hosts-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    kw = MODES[mode]
    with pykvshm.Pool.create(name, spec=SPEC, capacity="32MiB", prefault=True, **kw):
        out = CTX.RawArray("d", hosts)
        barrier = CTX.Barrier(hosts)
        nc = kw["coherence"] == "noncoherent"
        ps = [CTX.Process(target=_worker, args=(name, op, h, (0x5CA1E000 + h) if nc else 0, seconds, barrier, out, h))
              for h in range(hosts)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
    pykvshm.Pool.destroy(name)
    if min(out) < 0:
        raise RuntimeError(f"a host failed in {mode} / {op} / {hosts} hosts")
    return float(sum(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    raw: dict[str, dict[str, dict[int, list[float]]]] = {m: {o: {h: [] for h in a.hosts} for o in OPS} for m in MODES}
    load0 = os.getloadavg()
    for r in range(a.runs):
        for op in OPS:
            for h in a.hosts:
                for m in MODES:
                    raw[m][op][h].append(measure(m, op, h, a.seconds))
        print(f"run {r + 1}/{a.runs} done", file=sys.stderr)
    load1 = os.getloadavg()
    rows = []
    for op in OPS:
        for h in a.hosts:
            row: dict[str, Any] = {"op": op, "hosts": h}
            coh = raw["coherent"][op][h]
            row["coherent ops/s"] = statistics.median(coh)
            for m in MODES:
                if m == "coherent":
                    continue
                ratios = [x / c for x, c in zip(raw[m][op][h], coh)]
                row[m] = (statistics.median(raw[m][op][h]), statistics.median(ratios), min(ratios), max(ratios))
            rows.append(row)
    print(f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f}; {os.cpu_count()} CPUs; {a.runs} runs of {a.seconds} s\n")
    nc_modes = [m for m in MODES if m != "coherent"]
    print("| op | hosts | coherent ops/s | " + " | ".join(f"{m}: ops/s, x coherent (spread)" for m in nc_modes) + " |")
    print("|---|---|---|" + "---|" * len(nc_modes))
    for row in rows:
        cells = [f"{row[m][0]:,.0f}, {row[m][1]:.2f}x ({row[m][2]:.2f}-{row[m][3]:.2f})" for m in nc_modes]
        print(f"| {row['op']} | {row['hosts']} | {row['coherent ops/s']:,.0f} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"raw": {m: {o: {str(h): v for h, v in d.items()} for o, d in od.items()} for m, od in raw.items()},
                       "load_before": load0, "load_after": load1, "cpus": os.cpu_count(),
                       "runs": a.runs, "seconds": a.seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
