"""Attaching to a pool file that is not a healthy pool of this release, and other lifecycle misuse.

Every rejection must raise the specific ``pykvshm.errors`` class with a message that names the
problem, and must leave the backing file byte for byte as it was: a pool is validated from a
private copy of its superblock before anything is mapped writable or any member slot is taken.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pykvshm
from pykvshm import _core
from pykvshm import errors as E

LAYOUT = _core.layout_info()
OFF = LAYOUT["offsets"]
SB_BYTES = LAYOUT["sizeof_superblock"]
VERSION_AT = OFF["superblock.layout_version"]
CHECKSUM_AT = OFF["superblock.checksum"]
REGIONS_AT = OFF["superblock.regions"]
CAPACITY = "3MiB"


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fix_checksum(buf: bytearray) -> None:
    """Recompute the superblock checksum: crc32c of bytes [0, 8) and [12, 504), stored as u64 LE at 504."""
    c = _core.crc32c(bytes(buf[0:VERSION_AT]))
    c = _core.crc32c(bytes(buf[VERSION_AT + 4 : CHECKSUM_AT]), c)
    struct.pack_into("<Q", buf, CHECKSUM_AT, c)


def make_pool_file(path: str, spec: pykvshm.KVSpec) -> None:
    """A closed pool with a few sealed blocks, so the file has more than zeros in it."""
    with pykvshm.Pool.create(path, spec=spec, capacity=CAPACITY) as pool:
        keys = pykvshm.block_keys(np.arange(4 * spec.block_tokens), spec.block_tokens, salt=b"attach")
        pool.publish(keys, np.ones((len(keys), *spec.block_shape), dtype=spec.np_dtype))


def patch(path: str, edit) -> None:
    buf = bytearray(Path(path).read_bytes())
    edit(buf)
    Path(path).write_bytes(bytes(buf))


def assert_rejected(path: str, cls: type[BaseException], *words: str, spec: pykvshm.KVSpec | None = None) -> None:
    """open(path) raises exactly ``cls`` (or a subclass), its message names ``words``, the file is unchanged."""
    before = file_hash(path)
    unraisable: list[str] = []
    old_hook = sys.unraisablehook
    # A half-built Pool must not fail later in __del__ either; catch that here, not at some later test.
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
    try:
        try:
            pykvshm.Pool.open(path, spec=spec)
        except BaseException as e:
            got, msg = e, str(e)
        else:
            got, msg = None, ""
        name = type(got).__name__
        del got
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert name != "NoneType", f"open() accepted the pool; expected {cls.__name__}"
    assert issubclass(getattr(E, name, Exception), cls), f"open() raised {name}: {msg!r}; expected {cls.__name__}"
    for w in words:
        assert w.lower() in msg.lower(), f"{cls.__name__} message {msg!r} does not mention {w!r}"
    assert file_hash(path) == before, f"opening the rejected pool ({name}: {msg!r}) modified {path}"
    assert not unraisable, f"the rejected open left an object that failed when collected: {unraisable}"


@pytest.fixture
def pool_file(pool_path: str, spec: pykvshm.KVSpec) -> str:
    make_pool_file(pool_path, spec)
    return pool_path


def test_checksum_helper_matches_the_core(pool_file: str) -> None:
    # Guards every "fix the checksum" case below: recomputing it on a healthy pool is a no-op.
    raw = Path(pool_file).read_bytes()
    buf = bytearray(raw)
    fix_checksum(buf)
    assert bytes(buf) == raw
    assert VERSION_AT == 8 and CHECKSUM_AT == 504


def test_healthy_pool_opens_and_leaves_superblock_alone(pool_file: str, spec: pykvshm.KVSpec) -> None:
    head = Path(pool_file).read_bytes()[:SB_BYTES]
    with pykvshm.Pool.open(pool_file, spec=spec) as pool:
        assert pool.match(pykvshm.block_keys(np.arange(4 * spec.block_tokens), spec.block_tokens, salt=b"attach")) == 4
    assert Path(pool_file).read_bytes()[:SB_BYTES] == head


# ---- (a) truncated ----

@pytest.mark.parametrize("length", ["0", "100", "half-superblock", "superblock-minus-1", "one-page", "metadata-only",
                                    "end-minus-1"])
def test_truncated_pool_is_corrupt(pool_file: str, length: str) -> None:
    size = os.path.getsize(pool_file)
    data_off = struct.unpack_from("<Q", Path(pool_file).read_bytes(), REGIONS_AT + 16 * LAYOUT["regions"]["data"])[0]
    n = {"0": 0, "100": 100, "half-superblock": SB_BYTES // 2, "superblock-minus-1": SB_BYTES - 1, "one-page": 4096,
         "metadata-only": data_off, "end-minus-1": size - 1}[length]
    os.truncate(pool_file, n)
    assert_rejected(pool_file, E.CorruptPoolError, "truncated")


def test_extended_pool_is_corrupt(pool_file: str) -> None:
    with open(pool_file, "ab") as f:
        f.write(b"\0" * 4096)
    assert_rejected(pool_file, E.CorruptPoolError, "resized")


# ---- (b), (c) not a pool ----

def test_random_bytes_are_not_a_pool(pool_path: str) -> None:
    Path(pool_path).write_bytes(np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    assert_rejected(pool_path, E.CorruptPoolError, "not a pykvshm pool")


def test_random_bytes_behind_a_valid_magic_are_corrupt(pool_path: str) -> None:
    buf = bytearray(np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    buf[0:8] = b"PYKVSHM\0"
    struct.pack_into("<I", buf, VERSION_AT, LAYOUT["layout_version"])
    Path(pool_path).write_bytes(bytes(buf))
    assert_rejected(pool_path, E.CorruptPoolError, "superblock")


def test_text_file_is_not_a_pool(pool_path: str) -> None:
    Path(pool_path).write_text("This is a README, not a KV pool.\n" * 400)
    assert_rejected(pool_path, E.CorruptPoolError, "not a pykvshm pool")


def test_short_text_file_is_truncated(pool_path: str) -> None:
    Path(pool_path).write_text("hello\n")
    assert_rejected(pool_path, E.CorruptPoolError, "truncated")


def test_fifo_is_not_a_pool(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(E.CorruptPoolError, match="not a regular file"):
        pykvshm.Pool.open(str(fifo))


def test_directory_is_not_a_pool(tmp_path: Path) -> None:
    with pytest.raises(E.PoolError, match="cannot open pool"):
        pykvshm.Pool.open(str(tmp_path))


# ---- (d) newer layout, (g) still initialising ----

def test_newer_layout_version_is_refused(pool_file: str) -> None:
    def edit(buf: bytearray) -> None:
        struct.pack_into("<I", buf, VERSION_AT, LAYOUT["layout_version"] + 1)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.LayoutMismatchError, f"layout version {LAYOUT['layout_version'] + 1}",
                    f"layout version {LAYOUT['layout_version']}", "recreate")


@pytest.mark.parametrize("old", [2, 3])
def test_pool_of_an_earlier_layout_version_is_refused(pool_file: str, old: int) -> None:
    # Pools made by earlier releases must not be attached: version 2 has 128-bit pin masks and a
    # fixed 128-slot member table, version 3 no lock shard table (every region sits 36 KiB lower).
    assert LAYOUT["layout_version"] == 4

    def edit(buf: bytearray) -> None:
        struct.pack_into("<I", buf, VERSION_AT, old)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.LayoutMismatchError, f"layout version {old}", "layout version 4", "recreate")


class _CreatorAtWork:
    """Holds the exclusive flock a creating process holds on a pool file until it has published the
    layout version (Mapping::create)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> "_CreatorAtWork":
        import fcntl

        self.fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def test_version_zero_means_initialising(pool_file: str) -> None:
    patch(pool_file, lambda buf: struct.pack_into("<I", buf, VERSION_AT, 0))
    with _CreatorAtWork(pool_file):
        assert_rejected(pool_file, E.PoolInitializingError, "still being created", "retry")
    # Nobody at work on it any more: its creator died before publishing the version.
    assert_rejected(pool_file, E.CorruptPoolError, "no layout version", "no process is creating it", "--force")


def test_initialising_pool_opens_once_published(pool_file: str, spec: pykvshm.KVSpec) -> None:
    patch(pool_file, lambda buf: struct.pack_into("<I", buf, VERSION_AT, 0))
    with _CreatorAtWork(pool_file):
        with pytest.raises(E.PoolInitializingError):
            pykvshm.Pool.open(pool_file)
        patch(pool_file, lambda buf: struct.pack_into("<I", buf, VERSION_AT, LAYOUT["layout_version"]))
    pykvshm.Pool.open(pool_file, spec=spec).close()


@pytest.mark.parametrize("content", ["empty", "zeros"])
def test_a_file_being_created_is_initialising_not_corrupt(pool_path: str, content: str) -> None:
    """A creator's file is empty, then zero, until its superblock is written: open() used to call it
    "truncated" or "bad magic"; an unfinished file nobody is creating any more is CorruptPoolError
    saying what to do, at once (open_or_create used to wait 10 s for it)."""
    with open(pool_path, "wb") as f:
        f.truncate(0 if content == "empty" else 3 << 20)
    with _CreatorAtWork(pool_path):
        assert_rejected(pool_path, E.PoolInitializingError, "still being created")
    what = "is empty" if content == "empty" else "only zeros"
    assert_rejected(pool_path, E.CorruptPoolError, what, "no process is creating it", "destroy --force")
    import time

    spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
    t0 = time.monotonic()
    with pytest.raises(E.CorruptPoolError):
        pykvshm.Pool.open_or_create(pool_path, spec, CAPACITY)
    assert time.monotonic() - t0 < 5


def test_open_while_another_process_creates_sees_only_initialising(pool_name: str) -> None:
    """Poll open() while a child creates a 64 MiB pool: every failure is PoolNotFoundError or
    PoolInitializingError, never CorruptPoolError ("truncated", "bad magic")."""
    seen: dict[str, int] = {}
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import pykvshm
            spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
            pykvshm.Pool.create({pool_name!r}, spec=spec, capacity="64MiB").close()
            """)])
        try:
            while True:
                try:
                    pykvshm.Pool.open(pool_name).close()
                    break
                except (E.PoolNotFoundError, E.PoolInitializingError) as e:
                    seen[type(e).__name__] = seen.get(type(e).__name__, 0) + 1
                    assert child.poll() in (None, 0), "the creator failed"
        finally:
            assert child.wait(60) == 0
        pykvshm.Pool.destroy(pool_name)
    assert seen.get("PoolNotFoundError", 0) > 0


# ---- (e) checksum ----

def test_corrupt_checksum_field(pool_file: str) -> None:
    patch(pool_file, lambda buf: buf.__setitem__(CHECKSUM_AT, buf[CHECKSUM_AT] ^ 0x01))
    assert_rejected(pool_file, E.CorruptPoolError, "checksum")


def test_covered_byte_flipped_without_fixing_checksum(pool_file: str) -> None:
    at = OFF["superblock.created_ns"]
    patch(pool_file, lambda buf: buf.__setitem__(at, buf[at] ^ 0x80))
    assert_rejected(pool_file, E.CorruptPoolError, "checksum")


def test_non_zero_reserved_bytes_are_corrupt(pool_file: str) -> None:
    def edit(buf: bytearray) -> None:
        buf[OFF["superblock.reserved"] + 7] = 0x5A
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "reserved")


# ---- (f) regions ----

@pytest.mark.parametrize("region", ["states", "index", "data"])
@pytest.mark.parametrize("how", ["plus-64", "past-end"])
def test_moved_region_is_corrupt(pool_file: str, region: str, how: str) -> None:
    r = LAYOUT["regions"][region]
    size = os.path.getsize(pool_file)

    def edit(buf: bytearray) -> None:
        at = REGIONS_AT + 16 * r
        (off,) = struct.unpack_from("<Q", buf, at)
        struct.pack_into("<Q", buf, at, off + 64 if how == "plus-64" else size)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, f"region {r}", "expected")


def test_region_size_changed_is_corrupt(pool_file: str) -> None:
    def edit(buf: bytearray) -> None:
        at = REGIONS_AT + 16 * LAYOUT["regions"]["descriptors"] + 8
        (sz,) = struct.unpack_from("<Q", buf, at)
        struct.pack_into("<Q", buf, at, sz * 2)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "region")


def test_region_moved_without_fixing_checksum(pool_file: str) -> None:
    at = REGIONS_AT + 16 * LAYOUT["regions"]["index"]
    patch(pool_file, lambda buf: struct.pack_into("<Q", buf, at, struct.unpack_from("<Q", buf, at)[0] + 4096))
    assert_rejected(pool_file, E.CorruptPoolError, "checksum")


@pytest.mark.parametrize("value", [0, 2**28, 2**64 - 1])
def test_impossible_block_count_is_corrupt(pool_file: str, value: int) -> None:
    def edit(buf: bytearray) -> None:
        struct.pack_into("<Q", buf, OFF["superblock.num_blocks"], value)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "block count")


def test_inconsistent_block_bytes_are_corrupt(pool_file: str) -> None:
    def edit(buf: bytearray) -> None:
        at = OFF["superblock.geometry"] + OFF["geometry.block_bytes"]
        struct.pack_into("<Q", buf, at, struct.unpack_from("<Q", buf, at)[0] + 2)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "block sizes")


DTYPE_CODE_AT = OFF["superblock.geometry"] + 16  # Geometry.dtype_code


@pytest.mark.parametrize("code", [0, 9, 255])
def test_unknown_dtype_code_is_corrupt(pool_file: str, code: int) -> None:
    # Passes every core check once the checksum is recomputed; must still be refused before attaching.
    def edit(buf: bytearray) -> None:
        struct.pack_into("<I", buf, DTYPE_CODE_AT, code)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "dtype")


def test_refused_open_leaves_nothing_that_fails_when_collected(pool_file: str) -> None:
    # Whatever class the refusal has, a half-built pykvshm.Pool must not raise in __del__ (it is an error
    # under -W error, reported against whichever test happens to be running at collection time).
    def edit(buf: bytearray) -> None:
        struct.pack_into("<I", buf, DTYPE_CODE_AT, 0)
        fix_checksum(buf)

    patch(pool_file, edit)
    unraisable: list[str] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
    try:
        with pytest.raises(E.PoolError):
            pykvshm.Pool.open(pool_file)
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert not unraisable, unraisable


@pytest.mark.parametrize("code", [6, 3], ids=["int8-code-2-byte-size", "float32-code-2-byte-size"])
def test_dtype_code_disagreeing_with_dtype_size_is_corrupt(pool_file: str, code: int) -> None:
    # The spec built from the code would have another block size than the core uses: views and copies break.
    def edit(buf: bytearray) -> None:
        struct.pack_into("<I", buf, DTYPE_CODE_AT, code)
        fix_checksum(buf)

    patch(pool_file, edit)
    assert_rejected(pool_file, E.CorruptPoolError, "dtype")


# ---- (h) wrong spec ----

def test_wrong_spec_names_both_geometries(pool_file: str, spec: pykvshm.KVSpec) -> None:
    other = pykvshm.KVSpec(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                           block_tokens=spec.block_tokens * 2, dtype=spec.dtype)
    with pytest.raises(E.GeometryMismatchError) as info:
        pykvshm.Pool.open(pool_file, spec=other)
    msg = str(info.value)
    assert f"holds 2 layers, 2 kv heads, head_dim 8, {spec.block_tokens}-token blocks, float16" in msg
    assert f"expects 2 layers, 2 kv heads, head_dim 8, {other.block_tokens}-token blocks, float16" in msg


def test_wrong_spec_leaves_the_file_unchanged(pool_file: str, spec: pykvshm.KVSpec) -> None:
    # The geometry is in the superblock, so a mismatch can be refused before a member slot is taken.
    other = pykvshm.KVSpec(num_layers=spec.num_layers + 1, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                           block_tokens=spec.block_tokens, dtype=spec.dtype)
    assert_rejected(pool_file, E.GeometryMismatchError, "expects", spec=other)


def test_wrong_dtype_spec_is_refused(pool_file: str, spec: pykvshm.KVSpec) -> None:
    other = pykvshm.KVSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_tokens, dtype="bfloat16")
    with pytest.raises(E.GeometryMismatchError, match="bfloat16"):
        pykvshm.Pool.open(pool_file, spec=other)


# ---- (i) symlinks ----

def test_symlink_to_a_pool_is_refused(pool_file: str, tmp_path: Path) -> None:
    link = tmp_path / "link.kv"
    link.symlink_to(pool_file)
    before = file_hash(pool_file)
    with pytest.raises(E.InvalidNameError, match="symbolic link"):
        pykvshm.Pool.open(str(link))
    assert file_hash(pool_file) == before


def test_destroy_through_a_symlink_removes_nothing(pool_file: str, tmp_path: Path) -> None:
    link = tmp_path / "link.kv"
    link.symlink_to(pool_file)
    with pytest.raises(E.PoolError):
        pykvshm.Pool.destroy(str(link))
    assert os.path.exists(pool_file) and link.is_symlink()


def test_create_over_a_dangling_symlink_is_refused(tmp_path: Path, spec: pykvshm.KVSpec) -> None:
    target = tmp_path / "elsewhere.kv"
    link = tmp_path / "link.kv"
    link.symlink_to(target)
    with pytest.raises(E.PoolExistsError):
        pykvshm.Pool.create(str(link), spec=spec, capacity=CAPACITY)
    assert not target.exists()


# ---- names ----

BAD_NAMES = {
    "empty": "",
    "dotdot": "..",
    "dot": ".",
    "slash": "a/b",
    "300-chars": "p" * 300,
    "nul": "pool\0name",
    "space": "a pool",
    "path-dotdot-middle": "/tmp/../etc/pykvshm-pool",
    "path-dotdot-end": "/tmp/pykvshm/..",
    "path-directory": "/tmp/",
    "root": "/",
}


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
@pytest.mark.parametrize("op", ["create", "open", "destroy"])
def test_bad_names_are_refused(name: str, op: str, spec: pykvshm.KVSpec) -> None:
    with pytest.raises(E.InvalidNameError) as info:
        if op == "create":
            pykvshm.Pool.create(name, spec=spec, capacity=CAPACITY)
        elif op == "open":
            pykvshm.Pool.open(name)
        else:
            pykvshm.Pool.destroy(name)
    assert "name" in str(info.value) or "path" in str(info.value)


def test_long_path_component_is_not_limited_like_a_shm_name(tmp_path: Path, spec: pykvshm.KVSpec) -> None:
    # 200 characters is a limit on shm names; an absolute path may be longer (up to the OS limit).
    path = str(tmp_path / ("p" * 210))
    pykvshm.Pool.create(path, spec=spec, capacity=CAPACITY).close()
    pykvshm.Pool.destroy(path)


# ---- exists / missing ----

def test_create_on_existing_shm_name(pool_name: str, spec: pykvshm.KVSpec) -> None:
    pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY).close()
    path = pykvshm.Pool.path_for(pool_name)
    before = file_hash(path)
    with pytest.raises(E.PoolExistsError, match="already exists"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY)
    assert file_hash(path) == before


def test_create_on_existing_path(pool_file: str, spec: pykvshm.KVSpec) -> None:
    before = file_hash(pool_file)
    with pytest.raises(E.PoolExistsError, match="already exists"):
        pykvshm.Pool.create(pool_file, spec=spec, capacity=CAPACITY)
    assert file_hash(pool_file) == before


def test_create_on_existing_foreign_file_keeps_it(pool_path: str, spec: pykvshm.KVSpec) -> None:
    Path(pool_path).write_text("precious\n")
    with pytest.raises(E.PoolExistsError):
        pykvshm.Pool.create(pool_path, spec=spec, capacity=CAPACITY)
    assert Path(pool_path).read_text() == "precious\n"


def test_open_and_destroy_missing_shm_name(pool_name: str) -> None:
    with pytest.raises(E.PoolNotFoundError, match="does not exist"):
        pykvshm.Pool.open(pool_name)
    with pytest.raises(E.PoolNotFoundError, match="does not exist"):
        pykvshm.Pool.destroy(pool_name)


def test_open_and_destroy_missing_path(pool_path: str) -> None:
    with pytest.raises(E.PoolNotFoundError, match="does not exist"):
        pykvshm.Pool.open(pool_path)
    with pytest.raises(E.PoolNotFoundError, match="does not exist"):
        pykvshm.Pool.destroy(pool_path)


def test_create_in_missing_directory(tmp_path: Path, spec: pykvshm.KVSpec) -> None:
    with pytest.raises(E.PoolNotFoundError, match="directory does not exist"):
        pykvshm.Pool.create(str(tmp_path / "no" / "such" / "pool.kv"), spec=spec, capacity=CAPACITY)


# ---- capacity ----

@pytest.mark.parametrize("capacity", [1, 4096, "1MiB", "2MiB"])
def test_capacity_too_small_for_one_block(pool_path: str, spec: pykvshm.KVSpec, capacity) -> None:
    with pytest.raises(E.PoolFullError) as info:
        pykvshm.Pool.create(pool_path, spec=spec, capacity=capacity)
    msg = str(info.value)
    assert "too small" in msg and str(spec.block_bytes) in msg and "need at least" in msg
    assert not os.path.exists(pool_path)


def test_capacity_too_small_for_one_huge_block(pool_name: str) -> None:
    big = pykvshm.KVSpec(num_layers=64, num_kv_heads=8, head_dim=128, block_tokens=64)  # 16 MiB blocks
    with pytest.raises(E.PoolFullError, match="too small"):
        pykvshm.Pool.create(pool_name, spec=big, capacity="8MiB")
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


@pytest.mark.parametrize("capacity", [2**64, 2**64 - 1, 2**63, "20000000TiB"])
def test_capacity_beyond_any_pool_is_a_clear_value_error(pool_name: str, spec: pykvshm.KVSpec, capacity) -> None:
    """2**64 used to print pybind11's signature dump (a TypeError), and 2**64-1 wrapped around in the
    size rounding and said "too small"."""
    with pytest.raises(ValueError, match=r"larger than a pool can be") as info:
        pykvshm.Pool.create(pool_name, spec=spec, capacity=capacity)
    assert "incompatible function arguments" not in str(info.value) and "too small" not in str(info.value)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))
    with pytest.raises(E.PoolError, match="larger than a pool can be"):  # the core's own guard
        _core.Pool.create(pool_name, 2, 2, 8, 4, 1, 2, 2**64 - 1)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


@pytest.mark.parametrize("option, value, needle", [
    ("mode", -1, "permission bits between 0 and 0o777"),
    ("mode", 2**40, "permission bits between 0 and 0o777"),
    ("mode", "600", "permission bits"),
    ("host_id", -1, r"host_id must be an int between 0 and 2\*\*64-1"),
    ("host_id", 2**64, "host_id must be"),
    ("numa_node", 2**40, "numa_node must be a non-negative int"),
    ("lease", float("inf"), "lease must be a positive, finite number"),
    ("lease", float("nan"), "lease must be a positive, finite number"),
    ("lease", -1, "lease must be a positive, finite number"),
])
def test_out_of_range_options_are_clear_value_errors(pool_name: str, spec: pykvshm.KVSpec, option: str, value,
                                                      needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY, **{option: value})
    assert "incompatible function arguments" not in str(info.value)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))
    if option != "mode":
        pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY).close()
        with pytest.raises(ValueError, match=needle):
            pykvshm.Pool.open(pool_name, **{option: value})


# ---- file mode ----

def _mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def test_default_mode_is_0600(pool_path: str, pool_name: str, spec: pykvshm.KVSpec) -> None:
    pykvshm.Pool.create(pool_path, spec=spec, capacity=CAPACITY).close()
    pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY).close()
    assert _mode(pool_path) == 0o600
    assert _mode(pykvshm.Pool.path_for(pool_name)) == 0o600


@pytest.mark.parametrize("mode", [0o4600, 0o2660, 0o1600, 0o7777])
def test_setuid_setgid_and_sticky_bits_are_refused(pool_name: str, spec: pykvshm.KVSpec, mode: int) -> None:
    """They used to be accepted (and fchmod'ed onto the pool file)."""
    with pytest.raises(ValueError, match="beyond the permission bits"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY, mode=mode)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))
    with pytest.raises(ValueError, match="no setuid, setgid or sticky bit"):  # the core refuses them too
        _core.Pool.create(pool_name, 2, 2, 8, 4, 1, 2, 1 << 22, mode=mode)
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


@pytest.mark.parametrize("mode", [0o640, 0o660, 0o400])
def test_mode_is_exactly_what_was_asked(pool_path: str, pool_name: str, spec: pykvshm.KVSpec, mode: int) -> None:
    old = os.umask(0o077)  # the mode must not depend on the creator's umask
    try:
        pykvshm.Pool.create(pool_path, spec=spec, capacity=CAPACITY, mode=mode).close()
        pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY, mode=mode).close()
    finally:
        os.umask(old)
    assert _mode(pool_path) == mode
    assert _mode(pykvshm.Pool.path_for(pool_name)) == mode


# ---- out of space ----

@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test only (needs root and mount(8))."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


_CREATE_IN_CHILD = textwrap.dedent(
    """
    import sys, pykvshm
    spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4)
    try:
        pool = pykvshm.Pool.create(sys.argv[1], spec=spec, capacity=sys.argv[2], prefault=sys.argv[3] == "1")
    except pykvshm.PoolError as e:
        print(type(e).__name__ + ": " + str(e))
        sys.exit(3)
    pool.close()
    print("created")
    """
)


def _create_in_child(path: Path, capacity: str, prefault: bool = False) -> subprocess.CompletedProcess:
    # In a child: a SIGBUS on first touch of an unbacked page would kill it, not pytest.
    return subprocess.run([sys.executable, "-c", _CREATE_IN_CHILD, str(path), capacity, "1" if prefault else "0"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("prefault", [False, True], ids=["lazy", "prefault"])
def test_create_on_a_full_filesystem_fails_cleanly(tiny_tmpfs: Path, prefault: bool) -> None:
    path = tiny_tmpfs / "big.kv"
    r = _create_in_child(path, "8MiB", prefault)
    assert r.returncode == 3, f"expected a PoolError, got rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
    assert "space" in r.stdout, r.stdout
    assert not path.exists(), "a failed create left its file behind"
    assert list(tiny_tmpfs.iterdir()) == []
    # The space is really given back: a pool that fits can be created afterwards.
    ok = _create_in_child(tiny_tmpfs / "small.kv", "3MiB")
    assert ok.returncode == 0 and "created" in ok.stdout, (ok.stdout, ok.stderr)


def test_second_pool_on_a_full_filesystem_fails_cleanly(tiny_tmpfs: Path) -> None:
    first = _create_in_child(tiny_tmpfs / "first.kv", "3MiB")
    assert first.returncode == 0, (first.stdout, first.stderr)
    r = _create_in_child(tiny_tmpfs / "second.kv", "3MiB")
    assert r.returncode == 3, f"rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
    assert not (tiny_tmpfs / "second.kv").exists()
    assert (tiny_tmpfs / "first.kv").exists()


# ---- ownership: a pool another user made, or others may write ----

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (chown, setuid)")


@needs_root
def test_a_pool_owned_by_another_user_is_refused(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """Another local user can create the pool's name first; open / open_or_create used to attach to
    it without any check, so each side read (and could rewrite) the other's blocks."""
    squat = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, pykvshm
        os.setgid({NOBODY}); os.setuid({NOBODY})
        spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
        pykvshm.Pool.create({pool_name!r}, spec=spec, capacity="4MiB", mode=0o666).close()
        """)], capture_output=True, text=True, timeout=60)
    assert squat.returncode == 0, squat.stderr
    path = pykvshm.Pool.path_for(pool_name)
    assert os.stat(path).st_uid == NOBODY
    before = file_hash(path)
    for attach in (lambda: pykvshm.Pool.open(pool_name, spec=spec),
                   lambda: pykvshm.Pool.open_or_create(pool_name, spec, "4MiB")):
        with pytest.raises(E.UntrustedPoolError, match=rf"owned by uid {NOBODY}.*not by this process's user "
                                                       rf"\(uid 0.*allow_foreign=True") as info:
            attach()
        assert isinstance(info.value, PermissionError) and "destroy --force" in str(info.value)
    assert file_hash(path) == before  # refused before anything was mapped or any member slot taken
    with pykvshm.Pool.open(pool_name, spec=spec, allow_foreign=True) as pool:  # shared on purpose
        assert pool.num_blocks > 0


@needs_root
def test_an_empty_squat_file_is_refused_at_once_naming_its_owner(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """An empty file under the name used to block open_or_create for 10 s and end in CorruptPoolError."""
    import time

    path = pykvshm.Pool.path_for(pool_name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    os.fchown(fd, NOBODY, NOBODY)
    os.fchmod(fd, 0o666)
    os.close(fd)
    t0 = time.monotonic()
    with pytest.raises(E.UntrustedPoolError, match=rf"owned by uid {NOBODY}"):
        pykvshm.Pool.open_or_create(pool_name, spec, "4MiB")
    assert time.monotonic() - t0 < 2
    # `pykvshm info` attaches read-only (a monitor writes nothing, so ownership does not bar it): the
    # empty squat file is reported as no pool, with what to do, and nothing is changed.
    r = subprocess.run([sys.executable, "-m", "pykvshm", "info", pool_name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "CorruptPoolError" in r.stderr and "destroy --force" in r.stderr
    assert os.stat(path).st_size == 0 and os.stat(path).st_uid == NOBODY
    r = subprocess.run([sys.executable, "-m", "pykvshm", "recover", pool_name], capture_output=True, text=True,
                       timeout=60)  # a writable attach is refused naming the owner
    assert r.returncode == 1 and "UntrustedPoolError" in r.stderr and f"owned by uid {NOBODY}" in r.stderr


@pytest.mark.parametrize("mode, who", [(0o666, "every local user"), (0o620, "its group"), (0o602, "every local user")])
def test_a_pool_others_may_write_is_refused(pool_name: str, spec: pykvshm.KVSpec, mode: int, who: str) -> None:
    pykvshm.Pool.create(pool_name, spec=spec, capacity=CAPACITY, mode=mode).close()  # the creator may ask for it
    path = pykvshm.Pool.path_for(pool_name)
    with pytest.raises(E.UntrustedPoolError, match=rf"writable by {who} \(mode 0{mode:o}\).*allow_foreign=True.*chmod go-w"):
        pykvshm.Pool.open(pool_name)
    pykvshm.Pool.open(pool_name, allow_foreign=True).close()
    r = subprocess.run([sys.executable, "-m", "pykvshm", "check", pool_name, "--allow-foreign", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    os.chmod(path, 0o640)
    pykvshm.Pool.open(pool_name).close()
