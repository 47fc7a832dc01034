"""Placement: NUMA binding (and clear errors for missing or memory-less nodes), huge pages (clear
errors when tmpfs or hugetlbfs cannot provide them), prefault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pykvshm
from pykvshm import errors

MiB = 1 << 20
NODES = Path("/sys/devices/system/node")


def _node_list(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _real_nodes(attr: str) -> list[int]:
    try:
        return _node_list((NODES / attr).read_text())
    except OSError:
        return []


def _fake_nodes(root: Path, online: str, has_memory: str, dirs: list[int]) -> Path:
    d = root / "devices" / "system" / "node"
    d.mkdir(parents=True)
    (d / "online").write_text(online + "\n")
    (d / "has_memory").write_text(has_memory + "\n")
    for n in dirs:
        (d / f"node{n}").mkdir()
    return root


def test_missing_numa_node_is_a_clear_error(pool_name: str, spec: pykvshm.KVSpec) -> None:
    online = _real_nodes("online")
    if not online:
        pytest.skip(f"{NODES}/online is unreadable: no NUMA support in this kernel")
    missing = max(online) + 1
    listed = ", ".join(map(str, online))
    with pytest.raises(errors.PlacementError, match=rf"NUMA node {missing} does not exist on this machine; its node\(s\): "
                                                    rf"{listed} \({NODES}/online\)"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", numa_node=missing)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))  # refused before anything was created
    pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB").close()
    with pytest.raises(errors.PlacementError, match=rf"NUMA node {missing} does not exist"):
        pykvshm.Pool.open(pool_name, numa_node=missing)
    for bad in (-1, -5, True, 1.0):
        with pytest.raises(ValueError, match="numa_node must be a non-negative int"):
            pykvshm.Pool.create(pool_name + "x", spec=spec, capacity="4MiB", numa_node=bad)  # type: ignore[arg-type]


def test_memoryless_and_offline_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool_name: str,
                                      spec: pykvshm.KVSpec) -> None:
    # A fake sysfs: node 1 is online but has no memory (a CPU-only node, or CXL memory not onlined
    # as system RAM), node 2 exists but is offline.  This machine has neither, so sysfs is faked.
    monkeypatch.setenv("PYKVSHM_SYSFS", str(_fake_nodes(tmp_path, online="0-1", has_memory="0", dirs=[0, 1, 2])))
    with pytest.raises(errors.PlacementError, match=r"NUMA node 1 has no memory; node\(s\) with memory: 0 .*has_memory"
                                                    r".*daxctl reconfigure-device --mode=system-ram"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", numa_node=1)
    with pytest.raises(errors.PlacementError, match=r"NUMA node 2 is offline; online node\(s\): 0, 1"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", numa_node=2)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


def test_garbage_in_sysfs_is_an_error_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool_name: str,
                                                  spec: pykvshm.KVSpec) -> None:
    monkeypatch.setenv("PYKVSHM_SYSFS", str(_fake_nodes(tmp_path, online="0-x", has_memory="0", dirs=[0])))
    with pytest.raises(errors.PlacementError, match=r"online holds '0-x'|holds 'x', not a number"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", numa_node=0)


def _node0_usable() -> bool:
    return 0 in _real_nodes("online") and 0 in _real_nodes("has_memory")


@pytest.mark.skipif(not _node0_usable(), reason="NUMA node 0 with memory is not listed in /sys/devices/system/node")
def test_bind_to_node_0_with_prefault(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", numa_node=0, prefault=True) as pool:
        p = pool.placement
        assert p["backend"] == "shm" and p["numa_node"] == 0 and p["prefault"]
        assert p["policy"] == "bind:0"  # /proc/self/numa_maps of this mapping
        assert p["pages_per_node"] == {0: pool.total_bytes // 4096}  # every page present, all on node 0
        # The policy belongs to the shm object: a process that opens without numa_node sees it too.
        code = ("import json, sys, pykvshm\n"
                "with pykvshm.Pool.open(sys.argv[1]) as p: print(json.dumps(p.placement))")
        r = subprocess.run([sys.executable, "-c", code, pool_name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        other = json.loads(r.stdout)
        assert other["numa_node"] is None and other["policy"] == "bind:0"


def test_prefault_faults_every_page_in(pool_name: str, spec: pykvshm.KVSpec, tmp_path: Path) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="16MiB") as lazy:
        pages = lazy.total_bytes // 4096
        assert not lazy.placement["prefault"]
        lazy_resident = sum(lazy.placement["pages_per_node"].values())
        assert lazy_resident < pages // 2  # only the metadata the creator wrote
        with pykvshm.Pool.open(pool_name, prefault=True) as eager:
            assert eager.placement["prefault"]
            assert sum(eager.placement["pages_per_node"].values()) == pages


def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fs type, super options) of the longest mount containing ``path``."""
    best = ("", "", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            fstype, _, opts = right.split()[:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, fstype, opts)
    return best


def test_huge_pages_on_tmpfs_without_thp_is_a_clear_error(pool_name: str, spec: pykvshm.KVSpec) -> None:
    point, fstype, opts = _mount_of("/dev/shm")
    huge = dict(o.split("=", 1) for o in opts.split(",") if "=" in o).get("huge", "never")
    try:
        shmem = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        shmem = ""
    if fstype != "tmpfs" or huge != "never" or "[force]" in shmem:
        pytest.skip(f"/dev/shm ({fstype}, huge={huge}, shmem_enabled {shmem.strip()!r}) can give huge pages here")
    with pytest.raises(errors.PlacementError, match=rf"huge pages are not available for /dev/shm/{pool_name}: its tmpfs "
                                                    rf"mount {point} has huge=never .*hugetlbfs.*HugePages_Free"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", huge_pages=True)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


def test_huge_pages_auto_falls_back_with_the_reason(pool_name: str, spec: pykvshm.KVSpec) -> None:
    point, fstype, opts = _mount_of("/dev/shm")
    huge = dict(o.split("=", 1) for o in opts.split(",") if "=" in o).get("huge", "never")
    if fstype != "tmpfs" or huge != "never":
        pytest.skip(f"/dev/shm ({fstype}, huge={huge}) may give huge pages here")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", huge_pages="auto") as p:
        pl = p.placement
        assert pl["page_size"] == 4096 and not pl["huge_pages"]
        assert "huge=never" in pl["huge_pages_refusal"] and pool_name in pl["huge_pages_refusal"]
        with pykvshm.Pool.open(pool_name, huge_pages="auto") as q:
            assert "huge=never" in q.placement["huge_pages_refusal"]
        with pykvshm.Pool.open(pool_name) as q:  # not asked: the system's answer is still reported
            assert "huge=never" in q.placement["huge_pages_refusal"]
    with pytest.raises(ValueError, match="huge_pages must be True, False or 'auto'"):
        pykvshm.Pool.open(pool_name, huge_pages="yes")


def test_huge_pages_on_a_regular_filesystem_is_a_clear_error(tmp_path: Path, spec: pykvshm.KVSpec) -> None:
    point, fstype, opts = _mount_of(str(tmp_path))
    if fstype in ("tmpfs", "hugetlbfs") or "dax" in opts.split(","):
        pytest.skip(f"{tmp_path} is on {fstype}")
    path = tmp_path / "pool.kv"
    with pytest.raises(errors.PlacementError, match=rf"it is on {fstype} \({point}\); huge pages need a hugetlbfs mount"):
        pykvshm.Pool.create(str(path), spec=spec, capacity="4MiB", huge_pages=True)
    assert not path.exists()


# hugetlbfs: mounted in a private mount namespace (so nothing is left mounted), pages reserved
# through /proc/sys/vm/nr_hugepages only for the test and restored afterwards.
_HUGETLB_CHILD = r"""
import json, subprocess, sys, pykvshm
mnt = sys.argv[1]
r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], capture_output=True, text=True)
if r.returncode != 0:
    print(json.dumps({"skip": "mount -t hugetlbfs: " + (r.stderr.strip() or "exit %d" % r.returncode)}))
    sys.exit(0)
spec = pykvshm.KVSpec(2, 2, 8, 4)
out = {}
try:
    with pykvshm.Pool.create(mnt + "/pool", spec=spec, capacity="8MiB", prefault=True, huge_pages="auto") as p:
        out = {"ok": True, "placement": p.placement, "total": p.total_bytes}
except pykvshm.errors.PlacementError as e:
    out = {"ok": False, "error": str(e)}
print(json.dumps(out))
"""

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def _hugetlbfs_child(tmp_path: Path) -> dict:
    unshare = shutil.which("unshare")
    if unshare is None or "hugetlbfs" not in Path("/proc/filesystems").read_text():
        pytest.skip("needs unshare and hugetlbfs support in the kernel")
    mnt = tmp_path / "huge"
    mnt.mkdir(exist_ok=True)
    r = subprocess.run([unshare, "--mount", "--propagation", "private", sys.executable, "-c", _HUGETLB_CHILD, str(mnt)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and r.stderr.startswith("unshare:"):
        pytest.skip(f"cannot create a private mount namespace: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    out = dict(json.loads(r.stdout))
    if "skip" in out:
        pytest.skip(f"cannot mount hugetlbfs in a private mount namespace: {out['skip']}")
    return out


def _free_huge_pages() -> int:
    d = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    return int((d / "free_hugepages").read_text()) - int((d / "resv_hugepages").read_text())


def test_hugetlbfs_without_free_pages_is_a_clear_error(tmp_path: Path) -> None:
    if not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists():
        pytest.skip("no 2 MiB huge page size on this machine")
    if _free_huge_pages() >= 4:
        pytest.skip(f"{_free_huge_pages()} huge pages are free here; the shortage cannot be shown")
    out = _hugetlbfs_child(tmp_path)
    assert not out["ok"]
    assert "on the hugetlbfs mount" in out["error"] and "needs 4 pages of 2048 kB" in out["error"]
    assert "HugePages_Free" in out["error"] and "/proc/sys/vm/nr_hugepages" in out["error"]


def test_hugetlbfs_with_reserved_pages(tmp_path: Path) -> None:
    if not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists():
        pytest.skip("no 2 MiB huge page size on this machine")
    try:
        before = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(before + 4))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages ({NR_HUGEPAGES}: {e})")
    try:
        if _free_huge_pages() < 4:
            pytest.skip("the kernel could not allocate 4 huge pages (memory fragmented)")
        out = _hugetlbfs_child(tmp_path)
    finally:
        NR_HUGEPAGES.write_text(str(before))
    assert int(NR_HUGEPAGES.read_text()) == before
    assert out["ok"], out
    p = out["placement"]
    assert out["total"] == 8 * MiB and p["backend"] == "file" and p["huge_pages"] and p["page_size"] == 2 * MiB
    assert p["prefault"] and p["pages_per_node"] and sum(p["pages_per_node"].values()) == 4  # numa_maps counts huge pages
    assert p["huge_pages_refusal"] is None  # huge_pages="auto" on hugetlbfs: 2 MiB pages, nothing refused
