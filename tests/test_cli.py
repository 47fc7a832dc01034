"""The pykvshm command: every subcommand, --json output, and one-line errors with a non-zero status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pykvshm
from pykvshm.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_info_stat_check_recover_destroy(capsys, pool_name: str) -> None:
    code, out, _ = run(capsys, "create", pool_name, "--layers", "2", "--kv-heads", "2", "--head-dim", "8",
                       "--block-tokens", "4", "--capacity", "8MiB", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["spec"]["num_layers"] == 2 and info["num_blocks"] > 0 and info["coherence"] == "coherent"
    code, out, _ = run(capsys, "info", pool_name)
    assert code == 0 and "geometry    2 layers" in out and "layout      version 1" in out
    code, out, _ = run(capsys, "info", pool_name, "--json")
    assert json.loads(out)["uuid"] == info["uuid"]
    code, out, _ = run(capsys, "stat", pool_name, "--json")
    s = json.loads(out)
    assert code == 0 and s["free"] == s["total"] == info["num_blocks"]
    code, out, _ = run(capsys, "stat", pool_name)
    assert code == 0 and "hit rate" in out
    code, out, _ = run(capsys, "check", pool_name, "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "strict": True}
    code, out, _ = run(capsys, "recover", pool_name, "--json")
    assert code == 0 and json.loads(out)["members_recovered"] == 0
    code, out, _ = run(capsys, "destroy", pool_name)
    assert code == 0 and "destroyed" in out
    assert not os.path.exists(f"/dev/shm/{pool_name}")


def test_recover_reports_dead_members(capsys, pool: pykvshm.Pool) -> None:
    pid = os.fork()
    if pid == 0:
        p = pykvshm.Pool.open(pool.name)
        p.alloc(3)
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    assert sorted(m["alive"] for m in pool.members()) == [False, True]
    code, out, _ = run(capsys, "recover", pool.name, "--json")
    r = json.loads(out)
    # The CLI's own attach already recovered the dead member.
    assert code == 0 and r["recovered_members_total"] == 1
    assert pool.stats()["writing"] == 0


@pytest.mark.parametrize("argv, needle", [
    (["info", "no-such-pool-xyz"], "PoolNotFoundError"),
    (["stat", "bad/name"], "InvalidNameError"),
    (["recover", "../etc"], "InvalidNameError"),
    (["destroy", "no-such-pool-xyz"], "PoolNotFoundError"),
    (["create", "x", "--layers", "0", "--kv-heads", "1", "--head-dim", "1"], "GeometryMismatchError"),
])
def test_errors_are_one_line(capsys, argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_pool_is_one_line(capsys, tmp_path) -> None:
    f = tmp_path / "junk.kv"
    f.write_bytes(os.urandom(1 << 16))
    code, _, err = run(capsys, "info", str(f))
    assert code == 1 and "CorruptPoolError" in err and err.count("\n") == 1


def test_console_script_exit_status(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "pykvshm.cli", "info", "no-such-pool-xyz"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "PoolNotFoundError" in r.stderr and "Traceback" not in r.stderr
