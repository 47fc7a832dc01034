"""The pykvshm command, run as users run it (``python -m pykvshm`` in a child process, from a scratch folder):
every subcommand's --json output parses, and every error is one line ``pykvshm <cmd>: error: ...``
with exit status 1 (2 for usage errors) and no traceback: missing pools, invalid names, corrupt
pools, bad sizes. ``pykvshm bench`` runs two cheap benchmarks of the suite; its timings are not
checked, only the shape of its report and that it leaves no pool behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pykvshm

GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--block-tokens", "4"]
LONG_NAME = "p" * 300


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pykvshm", *argv], capture_output=True, text=True, timeout=timeout)


def assert_error(r: subprocess.CompletedProcess[str], command: str, needle: str) -> None:
    """Exit status 1, nothing on stdout, and exactly one line on stderr that names ``needle``."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"pykvshm {command}: error: "), lines[0]
    assert needle in lines[0], lines[0]


def leftover_bench_pools(pid: int) -> list[str]:
    """Pools the benchmark suite in process ``pid`` named (common.unique_pool_name) that still exist."""
    return [n for n in os.listdir("/dev/shm") if n.startswith("pykvshm-bench-") and f"-{pid}-" in n]


@pytest.fixture
def random_file(tmp_path: Path) -> Path:
    """A file of random bytes: not a pool at all."""
    f = tmp_path / "random.kv"
    f.write_bytes(os.urandom(1 << 16))
    return f


@pytest.fixture
def truncated_pool(tmp_path: Path, spec: pykvshm.KVSpec) -> Path:
    """A real pool whose file lost everything after its first two pages."""
    f = tmp_path / "truncated.kv"
    pykvshm.Pool.create(str(f), spec=spec, capacity="8MiB").close()
    os.truncate(f, 8192)
    return f


# -- happy paths -----------------------------------------------------------------------------------
def test_every_pool_subcommand_with_json(pool_name: str) -> None:
    r = cli("create", pool_name, *GEOMETRY, "--capacity", "8MiB", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == pool_name and info["coherence"] == "coherent" and info["members"] == []
    assert info["spec"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_tokens": 4, "dtype": "float16",
                            "block_bytes": 512}
    assert info["num_blocks"] > 0 and info["layout_version"] == pykvshm._core.layout_info()["layout_version"]

    r = cli("info", pool_name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["uuid"] == info["uuid"]
    r = cli("info", pool_name)
    assert r.returncode == 0 and "geometry    2 layers" in r.stdout and info["uuid"] in r.stdout
    assert info["max_members"] == 4096 and "member table of 4096 slots" in r.stdout

    r = cli("stat", pool_name, "--json")
    s = json.loads(r.stdout)
    assert r.returncode == 0 and s["free"] == s["total"] == info["num_blocks"] and s["sealed"] == s["pinned"] == 0
    for key in ("hits", "misses", "evictions", "bytes_in", "bytes_out"):
        assert key in s
    r = cli("stat", pool_name)
    assert r.returncode == 0 and "hit rate n/a" in r.stdout

    r = cli("check", pool_name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "strict": True, "checksums": False}
    r = cli("check", pool_name, "--live")
    assert r.returncode == 0 and "consistent" in r.stdout
    r = cli("recover", pool_name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["members_recovered"] == 0

    r = cli("destroy", pool_name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"destroyed": pool_name}
    assert not os.path.exists(f"/dev/shm/{pool_name}")


def test_stat_counts_what_processes_did(pool: pykvshm.Pool) -> None:
    import numpy as np

    keys = pykvshm.block_keys(np.arange(8), pool.spec.block_tokens)
    pool.publish(keys, np.zeros((len(keys), *pool.spec.block_shape), np.float16))
    lease = pool.acquire(keys)
    s = json.loads(cli("stat", pool.name, "--json").stdout)
    # members: this process only; the command attaches read-only and takes no member slot
    assert s["sealed"] == 2 and s["pinned"] == 2 and s["hits"] == 2 and s["members"] == 1
    lease.release()


def test_stat_watch_prints_until_interrupted(pool: pykvshm.Pool) -> None:
    p = subprocess.Popen([sys.executable, "-m", "pykvshm", "stat", pool.name, "--watch", "--interval", "0.05",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        first, second = json.loads(p.stdout.readline()), json.loads(p.stdout.readline())
        assert first["total"] == second["total"] == pool.num_blocks
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err


def test_create_with_a_member_table_size(pool_name: str) -> None:
    r = cli("create", pool_name, *GEOMETRY, "--capacity", "8MiB", "--max-members", "300", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_members"] == 300
    r = cli("info", pool_name)
    assert r.returncode == 0 and "member table of 300 slots" in r.stdout
    r = cli("create", pool_name + "-x", *GEOMETRY, "--capacity", "8MiB", "--max-members", "1")
    assert r.returncode != 0 and "max_members must be an int between 2 and 65535" in r.stderr


def test_recover_reports_dead_members(pool: pykvshm.Pool) -> None:
    pid = os.fork()
    if pid == 0:
        p = pykvshm.Pool.open(pool.name)
        p.alloc(3)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert sorted(m["alive"] for m in pool.members()) == [False, True]
    r = cli("recover", pool.name, "--json")
    assert r.returncode == 0, r.stderr
    # The command's own attach already recovered the dead member.
    assert json.loads(r.stdout)["recovered_members_total"] == 1
    assert pool.stats()["writing"] == 0


def test_console_script() -> None:
    script = Path(sys.executable).with_name("pykvshm")
    if not script.exists():
        pytest.skip("the pykvshm console script is not installed beside this interpreter")
    r = subprocess.run([str(script), "info", "no-such-pool-xyz"], capture_output=True, text=True, timeout=60)
    assert_error(r, "info", "PoolNotFoundError")


# -- error paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["info", "stat", "recover", "check", "destroy"])
def test_missing_pool(command: str) -> None:
    assert_error(cli(command, "pykvshm-test-no-such-pool"), command, "PoolNotFoundError")


@pytest.mark.parametrize("command, name", [
    ("info", "bad/name"), ("stat", LONG_NAME), ("recover", "../etc"), ("check", "bad/name"), ("destroy", LONG_NAME),
    ("destroy", "bad/name"),
])
def test_invalid_name(command: str, name: str) -> None:
    assert_error(cli(command, name), command, "InvalidNameError")


def test_invalid_name_on_create() -> None:
    assert_error(cli("create", "bad/name", *GEOMETRY, "--capacity", "8MiB"), "create", "InvalidNameError")


@pytest.mark.parametrize("command", ["info", "stat", "recover", "check"])
def test_corrupt_pool(command: str, random_file: Path, truncated_pool: Path) -> None:
    assert_error(cli(command, str(random_file)), command, "CorruptPoolError: pool")
    assert_error(cli(command, str(truncated_pool)), command, "is truncated")


def test_destroy_refuses_a_file_that_is_no_pool(random_file: Path) -> None:
    before = random_file.read_bytes()
    assert_error(cli("destroy", str(random_file)), "destroy", "is not a pykvshm pool")
    assert random_file.read_bytes() == before
    r = cli("destroy", str(random_file), "--force")
    assert r.returncode == 0 and not random_file.exists()


@pytest.mark.parametrize("kind", ["empty", "sparse", "ext4-like"])
def test_destroy_refuses_a_file_without_the_magic(tmp_path: Path, kind: str) -> None:
    """Only a file carrying the pool's magic is removed without --force: an empty file, a sparse one
    and a filesystem image (zero boot sector, data after it) used to pass the "first 8 bytes are
    zero" check and be deleted."""
    f = tmp_path / f"{kind}.img"
    if kind == "empty":
        f.touch()
    elif kind == "sparse":
        with open(f, "wb") as fh:
            fh.truncate(1 << 20)
    else:
        f.write_bytes(b"\0" * 1024 + b"\x53\xef" + os.urandom(4096))  # ext4's superblock sits at 1024
    before = f.read_bytes()
    what = "it is empty" if kind == "empty" else "its first bytes are zero"
    assert_error(cli("destroy", str(f)), "destroy", what)
    assert f.read_bytes() == before
    r = cli("destroy", str(f), "--force")
    assert r.returncode == 0 and not f.exists()


def test_destroy_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    """Checking a FIFO for the magic used to open it for reading, which blocks until a writer comes:
    the command hung forever.  Now it is refused from lstat alone."""
    f = tmp_path / "fifo"
    os.mkfifo(f)
    assert_error(cli("destroy", str(f), timeout=30), "destroy", "it is a FIFO")
    assert f.exists()
    r = cli("destroy", str(f), "--force", timeout=30)
    assert r.returncode == 0 and not f.exists(), r.stderr


def test_destroy_refuses_sockets_and_devices(tmp_path: Path) -> None:
    import socket

    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert_error(cli("destroy", str(sock_path), timeout=30), "destroy", "it is a socket")
    assert sock_path.exists()
    assert_error(cli("destroy", "/dev/null", timeout=30), "destroy", "it is a character device")
    assert os.path.exists("/dev/null")
    d = tmp_path / "dir"
    d.mkdir()
    assert_error(cli("destroy", str(d), timeout=30), "destroy", "it is a directory")


def test_destroy_removes_a_truncated_pool(truncated_pool: Path) -> None:
    r = cli("destroy", str(truncated_pool), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"destroyed": str(truncated_pool)} and not truncated_pool.exists()


@pytest.mark.parametrize("option, needle", [
    (["--capacity", "12QB"], "invalid size '12QB'"),
    (["--capacity", "0"], "size must be positive"),
    (["--capacity", "1KiB"], "too small"),
    (["--mode", "999"], "--mode must be octal"),
])
def test_create_bad_arguments(pool_name: str, option: list[str], needle: str) -> None:
    assert_error(cli("create", pool_name, *GEOMETRY, *option), "create", needle)
    assert not os.path.exists(f"/dev/shm/{pool_name}")


def test_create_existing_pool(pool: pykvshm.Pool) -> None:
    assert_error(cli("create", pool.name, *GEOMETRY, "--capacity", "8MiB"), "create", "PoolExistsError")


def test_usage_errors_exit_2() -> None:
    r = cli("create", "x")  # the geometry is required
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("pykvshm create: error: the following arguments are required")
    r = cli("bench", "--only", "alloc,nonsense")
    assert r.returncode == 2 and "unknown benchmark 'nonsense'" in r.stderr.splitlines()[-1]


# -- bench -----------------------------------------------------------------------------------------
def test_bench_list() -> None:
    r = cli("bench", "--list", "--json")
    assert r.returncode == 0, r.stderr
    names = [b["name"] for b in json.loads(r.stdout)]
    assert names == ["alloc", "publish_acquire", "match", "handoff", "prefix_reuse", "connector_load", "tier"]
    r = cli("bench", "--list")
    assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == names


def test_bench_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.Popen([sys.executable, "-m", "pykvshm", "bench", "--quick", "--only", "alloc,match", "--json",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    report = json.loads(stdout)
    assert json.loads(out.read_text()) == report
    assert report["quick"] is True and report["errors"] == {} and list(report["benchmarks"]) == ["alloc", "match"]
    for name, b in report["benchmarks"].items():
        assert b["error"] is None and b["baseline"] and b["seconds"] > 0
        assert len(b["table"]["rows"]) == len(b["rows"]) > 0
        assert all(len(row) == len(b["table"]["header"]) for row in b["table"]["rows"])
    for row in report["benchmarks"]["alloc"]["rows"]:
        assert row["pool_block_ops_per_s"] > 0 and row["baseline_block_ops_per_s"] > 0
        assert row["pool_vs_baseline"] == pytest.approx(row["pool_block_ops_per_s"] / row["baseline_block_ops_per_s"])
    match = {row["operation"]: row for row in report["benchmarks"]["match"]["rows"]}
    assert match["match (128 keys)"]["pool_us"] > 0 and match["match (128 keys)"]["pool_vs_baseline"] > 0
    # one progress line per benchmark on stderr
    assert [line.split()[3] for line in stderr.splitlines()] == ["alloc:", "match:"]
    assert leftover_bench_pools(p.pid) == []


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_bench_interrupted_leaves_no_pool(sig: signal.Signals, status: int) -> None:
    p = subprocess.Popen([sys.executable, "-m", "pykvshm", "bench", "--quick", "--only", "publish_acquire"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the suite runs (its progress line), then until its pool exists or a few seconds pass
        assert p.stderr is not None
        deadline = time.monotonic() + 30
        while p.stderr.read(1) not in ("[", "") and time.monotonic() < deadline:
            pass
        while not leftover_bench_pools(p.pid) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    assert p.returncode == status and "Traceback" not in err, err
    assert leftover_bench_pools(p.pid) == []
