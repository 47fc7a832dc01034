"""Device DAX through a file-backed stand-in: sysfs size and alignment, no ftruncate, pools found by
uuid among several devices, foreign devices read but never written, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pykvshm
from pykvshm import errors
from pykvshm.testing import blocks_for_keys

MiB = 1 << 20


class FakeDax:
    """A sysfs tree (``<root>/sys/bus/dax/devices/daxX.Y/size``) and a device directory in which
    regular files stand in for the character devices; PYKVSHM_SYSFS and PYKVSHM_DAX_DEV_DIR
    point the library at them."""

    def __init__(self, root: Path, tag: str = "") -> None:
        self.sys = root / f"sys{tag}"
        self.dev = root / f"dev{tag}"
        (self.sys / "bus" / "dax" / "devices").mkdir(parents=True)
        self.dev.mkdir()

    @property
    def env(self) -> dict[str, str]:
        return {"PYKVSHM_SYSFS": str(self.sys), "PYKVSHM_DAX_DEV_DIR": str(self.dev)}

    def add(self, name: str, size: int, *, file_size: int | None = None, content: bytes | None = None,
            align: int | None = None, target_node: int | None = None, link_to: Path | None = None) -> Path:
        d = self.sys / "bus" / "dax" / "devices" / name
        d.mkdir()
        (d / "size").write_text(f"{size}\n")
        if align is not None:
            (d / "align").write_text(f"{align}\n")
        if target_node is not None:
            (d / "target_node").write_text(f"{target_node}\n")
        path = self.dev / name
        if link_to is not None:
            os.link(link_to, path)  # the same device under another name
            return path
        with open(path, "wb") as f:
            f.truncate(size if file_size is None else file_size)
            if content is not None:
                f.write(content)
        return path


@pytest.fixture
def dax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDax:
    fake = FakeDax(tmp_path)
    for k, v in fake.env.items():
        monkeypatch.setenv(k, v)
    return fake


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pool_on_a_device_takes_its_sysfs_size_and_is_never_resized(dax: FakeDax, spec: pykvshm.KVSpec) -> None:
    # The stand-in file is larger than the device's sysfs size: the size comes from sysfs.
    dev = dax.add("dax0.0", 16 * MiB, file_size=18 * MiB)
    with pykvshm.Pool.create(str(dev), spec=spec, capacity="4MiB") as pool:  # capacity is ignored on a device
        assert pool.total_bytes == 16 * MiB and dev.stat().st_size == 18 * MiB
        p = pool.placement
        assert p["backend"] == "devdax" and p["page_size"] == 2 * MiB and p["huge_pages"] and p["device_node"] is None
        keys = pykvshm.block_keys(np.arange(3 * spec.block_tokens), spec.block_tokens)
        pool.publish(keys, blocks_for_keys(keys, spec))
        uid = pool.uuid
    with pykvshm.Pool.open(str(dev), spec=spec) as pool:
        assert pool.uuid == uid and pool.match(keys) == 3
    with pytest.raises(errors.PoolExistsError, match="already holds a pykvshm pool"):
        pykvshm.Pool.create(str(dev), spec=spec)
    before = dev.read_bytes()
    pykvshm.Pool.destroy(str(dev))
    after = dev.read_bytes()
    # Destroy wipes the superblock page only: the device is no pool any more, but it stays.
    assert after[:4096] == bytes(4096) and after[4096:] == before[4096:] and dev.stat().st_size == 18 * MiB
    assert [d["uuid"] for d in pykvshm.dax_devices()] == [None]
    with pytest.raises(errors.PoolNotFoundError, match="holds no pykvshm pool; it was left untouched"):
        pykvshm.Pool.destroy(str(dev))
    assert dev.read_bytes() == after


def test_open_by_uuid_scans_devices_and_skips_foreign_ones(dax: FakeDax, spec: pykvshm.KVSpec) -> None:
    foreign = dax.add("dax0.0", 8 * MiB, content=b"XFSB" + os.urandom(8188))  # somebody else's data
    zero_size = dax.add("dax0.1", 0)
    a = dax.add("dax1.0", 8 * MiB)
    b = dax.add("dax10.0", 8 * MiB)
    not_listed = dax.dev / "dax2.0"  # a device node without sysfs entry is not a candidate
    not_listed.write_bytes(b"")
    for dev in (a, b):
        pykvshm.Pool.create(str(dev), spec=spec).close()
    foreign_digest, foreign_mtime = _digest(foreign), foreign.stat().st_mtime_ns
    with pykvshm.Pool.open(str(a)) as pa:
        ua = pa.uuid
    with pykvshm.Pool.open(str(b)) as pb:
        ub = pb.uuid
    devs = pykvshm.dax_devices()
    assert [d["name"] for d in devs] == ["dax0.0", "dax0.1", "dax1.0", "dax10.0"]  # numeric order
    assert [d["uuid"] for d in devs] == [None, None, ua, ub]
    assert devs[0]["note"] == "not a pykvshm pool" and "size 0" in devs[1]["note"]
    assert devs[2]["size"] == 8 * MiB and devs[2]["path"] == str(a)
    with pykvshm.Pool.open(uuid=ub, spec=spec) as pool:
        assert pool.path == str(b) and pool.uuid == ub
    import uuid as uuidlib

    with pykvshm.Pool.open(uuid=uuidlib.UUID(ua)) as pool:
        assert pool.path == str(a)
    # Scanning read the foreign device and the zero-size one without writing them.
    assert _digest(foreign) == foreign_digest and foreign.stat().st_mtime_ns == foreign_mtime
    assert zero_size.stat().st_size == 0
    missing = "0f8fad5b-d9cb-469f-a165-70867728950e"
    with pytest.raises(errors.PoolNotFoundError) as ei:
        pykvshm.Pool.open(uuid=missing)
    msg = str(ei.value)
    assert missing in msg and str(dax.sys / "bus" / "dax" / "devices") in msg
    for dev, what in ((foreign, "not a pykvshm pool"), (a, ua), (b, ub), (zero_size, "size 0")):
        assert f"{dev}: " in msg and what in msg
    assert _digest(foreign) == foreign_digest


def test_no_devices_at_all(dax: FakeDax) -> None:
    with pytest.raises(errors.PoolNotFoundError, match="found no devices"):
        pykvshm.Pool.open(uuid="0f8fad5b-d9cb-469f-a165-70867728950e")
    assert pykvshm.dax_devices() == []


def test_the_same_uuid_on_two_devices_is_an_error(dax: FakeDax, spec: pykvshm.KVSpec) -> None:
    a = dax.add("dax0.0", 8 * MiB)
    with pykvshm.Pool.create(str(a), spec=spec) as pool:
        uid = pool.uuid
    dax.add("dax0.1", 8 * MiB, content=a.read_bytes()[: 4 * MiB])  # a copied device
    with pytest.raises(errors.PoolError, match=f"pool {uid} appears on 2 devices .*dax0.0.*dax0.1"):
        pykvshm.Pool.open(uuid=uid)
    with pykvshm.Pool.open(str(dax.dev / "dax0.1"), uuid=uid) as pool:  # by path, the uuid is only checked
        assert pool.uuid == uid


def test_open_by_name_checks_the_uuid(dax: FakeDax, pool_name: str, spec: pykvshm.KVSpec) -> None:
    pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB").close()
    with pytest.raises(errors.PoolNotFoundError, match="has uuid .*, not 0f8fad5b"):
        pykvshm.Pool.open(pool_name, uuid="0f8fad5b-d9cb-469f-a165-70867728950e")
    with pytest.raises(TypeError, match="needs a pool name"):
        pykvshm.Pool.open()
    for bad in ("not-a-uuid", 12, b"short"):
        with pytest.raises(ValueError, match="uuid must be a pool uuid"):
            pykvshm.Pool.open(uuid=bad)  # type: ignore[arg-type]
    with pykvshm.Pool.open(pool_name) as pool:
        assert len(pool.members()) == 1  # the refused opens left no member behind


@pytest.mark.parametrize(
    "size, align, match",
    [
        (16 * MiB + 4096, None, r"size 16781312 bytes .*not a multiple of its 2 MiB alignment"),
        (16 * MiB, 1 << 30, r"not a multiple of its 1024 MiB alignment"),
        (16 * MiB, 3 * MiB, r"align holds 3145728, not a power of two"),
        (0, None, r"has size 0"),
    ],
    ids=["unaligned", "1g-align", "bad-align", "zero"],
)
def test_bad_device_sizes_are_refused_untouched(dax: FakeDax, spec: pykvshm.KVSpec, size: int, align: int | None,
                                                match: str) -> None:
    dev = dax.add("dax0.0", size, file_size=32 * MiB, align=align)
    digest = _digest(dev)
    with pytest.raises(errors.PoolError, match=match):
        pykvshm.Pool.create(str(dev), spec=spec)
    assert _digest(dev) == digest and dev.stat().st_size == 32 * MiB


def test_device_too_small_for_the_pool(dax: FakeDax) -> None:
    dev = dax.add("dax0.0", 2 * MiB)
    big = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16)  # 2 MiB blocks
    with pytest.raises(errors.PoolError, match=rf"device DAX {dev} \(2097152 bytes\) is too small for this pool"):
        pykvshm.Pool.create(str(dev), spec=big)
    assert dev.read_bytes() == bytes(2 * MiB)


def test_stand_in_shorter_than_its_sysfs_size(dax: FakeDax, spec: pykvshm.KVSpec) -> None:
    dev = dax.add("dax0.0", 16 * MiB, file_size=4 * MiB)
    with pytest.raises(errors.PoolError, match="shorter than its sysfs size"):
        pykvshm.Pool.create(str(dev), spec=spec)


def test_device_numa_node_comes_from_sysfs(dax: FakeDax, spec: pykvshm.KVSpec) -> None:
    on0 = dax.add("dax0.0", 8 * MiB, target_node=0)
    on1 = dax.add("dax1.0", 8 * MiB, target_node=1)
    unknown = dax.add("dax2.0", 8 * MiB)
    real = (dax.sys / "devices" / "system" / "node")
    real.mkdir(parents=True)
    (real / "online").write_text("0-1\n")
    (real / "has_memory").write_text("0-1\n")
    for n in (0, 1):
        (real / f"node{n}").mkdir()
    with pykvshm.Pool.create(str(on0), spec=spec, numa_node=0) as pool:
        assert pool.placement["numa_node"] == 0 and pool.placement["device_node"] == 0
    with pytest.raises(errors.PlacementError, match=r"dax1.0 is memory of NUMA node 1, not node 0"):
        pykvshm.Pool.create(str(on1), spec=spec, numa_node=0)
    with pytest.raises(errors.PlacementError, match=r"NUMA node unknown \(sysfs has no target_node\)"):
        pykvshm.Pool.create(str(unknown), spec=spec, numa_node=0)
    assert on1.read_bytes()[:8] == bytes(8) and unknown.read_bytes()[:8] == bytes(8)


_OPEN_BY_UUID = """
import json, sys, pykvshm
with pykvshm.Pool.open(uuid=sys.argv[1]) as pool:
    print(json.dumps({"path": pool.path, "match": pool.match(pykvshm.block_keys(list(range(int(sys.argv[2]))), 4))}))
"""


def test_the_same_device_under_different_names_on_two_hosts(tmp_path: Path, spec: pykvshm.KVSpec) -> None:
    """Host A calls the device dax0.0, host B dax3.1 (here: hard links in two device directories,
    each with its own sysfs tree); both find the pool by its uuid."""
    a, b = FakeDax(tmp_path, "-a"), FakeDax(tmp_path, "-b")
    dev_a = a.add("dax0.0", 8 * MiB)
    b.add("dax0.0", 8 * MiB)  # host B's dax0.0 is another, empty device
    dev_b = b.add("dax3.1", 8 * MiB, link_to=dev_a)
    env = dict(os.environ, **a.env)
    code = (
        "import sys, pykvshm\n"
        "spec = pykvshm.KVSpec(2, 2, 8, 4)\n"
        "with pykvshm.Pool.create(sys.argv[1], spec=spec) as p:\n"
        "    keys = pykvshm.block_keys(list(range(8)), 4)\n"
        "    import numpy as np\n"
        "    p.publish(keys, np.zeros((2, *spec.block_shape), spec.np_dtype))\n"
        "    print(p.uuid)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(dev_a)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    uid = r.stdout.strip()
    seen = []
    for host in (a, b):
        r = subprocess.run([sys.executable, "-c", _OPEN_BY_UUID, uid, "8"], env=dict(os.environ, **host.env),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        seen.append(json.loads(r.stdout))
    assert seen == [{"path": str(dev_a), "match": 2}, {"path": str(dev_b), "match": 2}]
