"""A PID namespace that kept its parent's /proc (``unshare --pid --fork`` without ``--mount-proc``):
members there must not be judged dead by pid (issue 15).

In such a namespace ``/proc/<pid>`` names the process with that pid in the *parent* namespace, so a
member whose namespace-local pid has no process of that number outside was judged dead at once by
another member of its namespace, and its blocks and slot were taken while it ran.  The core detects
the case (``/proc/self`` differs from ``getpid()``) and falls back to heartbeat liveness: each such
process is a host of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

import pykvshm

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import pykvshm
    name = sys.argv[1]
    assert int(os.readlink("/proc/self")) != os.getpid()  # /proc is the parent namespace's
    # Reach a namespace-local pid that no process has in the parent namespace's /proc.
    while True:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            if os.path.exists(f"/proc/{os.getpid()}"):
                os._exit(3)
            with pykvshm.Pool.open(name, lease=5.0) as a:  # member A
                h = a.alloc(2)
                os.write(w, b"x")
                time.sleep(2.0)
                try:
                    a.free(h)  # A is alive: its blocks must still be its own
                    os._exit(0)
                except pykvshm.errors.PoolError as e:
                    print("member A lost:", type(e).__name__, e, flush=True)
                    os._exit(1)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        if got:
            break
        os.waitpid(pid, 0)  # its pid exists outside: try the next one
    with pykvshm.Pool.open(name, lease=5.0) as b:  # member B attaches and runs recovery
        rep = b.recover()
        print("recovered", rep["members_recovered"], flush=True)
        _, status = os.waitpid(pid, 0)
        sys.exit(0 if rep["members_recovered"] == 0 and os.waitstatus_to_exitcode(status) == 0 else 1)
    """
)


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_members_in_a_pid_namespace_with_a_foreign_proc_are_not_judged_dead(pool_name: str,
                                                                             spec: pykvshm.KVSpec) -> None:
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB") as p:
        r = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", SCRIPT, pool_name],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "recovered 0" in r.stdout
        p.check(strict=True)
