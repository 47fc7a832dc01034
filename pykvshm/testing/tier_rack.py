"""Racks for the cluster tier's tests: each rack is a process tree in its own PID namespace
(``unshare --pid --fork --mount-proc``, like :mod:`pykvshm.testing.rig`'s hosts, so it is a host of
its own to the pool and dies whole when its init is killed) with its own pool, and all racks share
one Mooncake Store on loopback.  The rig's hosts also get a network namespace of their own; a rack
keeps the machine's, because the store is reached over TCP on loopback (a namespace of its own
would need a veth pair and routes to reach it).

Rack programs (``python -m pykvshm.testing.tier_rack <task> ...``), reporting JSON status to
``<workdir>/<name>.0.json`` and stopping when ``<workdir>/<name>.stop`` appears:

* ``demote``: publishes prompts ``--first``.. of ``--blocks`` blocks (content implied by each key,
  :mod:`pykvshm.testing.content`) and demotes each to the store, reporting the prompts stored;
  with ``--loop`` it keeps going with new prompts until stopped.
* ``promote``: promotes prompts ``--first``..``--first+--prompts`` from the store (cycling with
  ``--loop``), reads every block it gets and counts wrong ones (a wrong block is never acceptable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .rig import MAX_HOST_SECONDS, Host, _unshare_args, pid_namespace

SALT = b"tier-rack"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def start_rack(workdir: Path | str, name: str, task: str, pool: str, url: str, *args: str) -> Host:
    """Start a rack program in a PID namespace of its own; returns the rig's :class:`Host` for it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ns = [a for a in _unshare_args() if a != "--net"]
    log = open(workdir / f"{name}.log", "wb")
    cmd = [shutil.which("unshare") or "unshare", *ns, sys.executable, "-m", "pykvshm.testing.tier_rack", task,
           "--pool", pool, "--url", url, "--workdir", str(workdir), "--name", name, *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return Host(name, workdir, proc, log)


def _run(args: argparse.Namespace) -> int:
    from ..pool import Pool
    from .content import blocks_for_keys, prompt_keys, verify_block

    wd = Path(args.workdir)
    status_path = wd / f"{args.name}.0.json"
    stop = wd / f"{args.name}.stop"
    pool = Pool.open(args.pool, lease=args.lease)
    spec = pool.spec
    tier = pool.tier(args.url, demoter=False)
    st: dict[str, Any] = {"pid": os.getpid(), "pid_ns": pid_namespace(), "done": [], "wrong": 0, "rounds": 0,
                          "errors": 0, "last_error": "", "prefix": {}, "tier": {}}
    deadline = time.monotonic() + MAX_HOST_SECONDS
    prompt = args.first
    while time.monotonic() < deadline and not stop.exists():
        keys = prompt_keys(spec, prompt, args.blocks, SALT)
        try:
            if args.task == "demote":
                pool.publish(keys, blocks_for_keys(keys, spec))
                tier.demote_keys(keys)
                if tier.lookup(keys) == len(keys):
                    st["done"].append(prompt)
            else:
                got = tier.promote(keys, timeout=60)
                st["prefix"][str(prompt)] = got
                with pool.acquire(keys) as lease:
                    views = lease.views()
                    st["wrong"] += sum(not verify_block(v, k) for v, k in zip(views, keys))
                    del views
                if got == len(keys):
                    st["done"].append(prompt)
        except Exception as e:  # noqa: BLE001 -- reported; the store may be down on purpose
            st["errors"] += 1
            st["last_error"] = f"{type(e).__name__}: {e}"
        st["rounds"] += 1
        st["tier"] = tier.stats()
        _write_json(status_path, st)
        prompt += 1
        if prompt >= args.first + args.prompts:
            if not args.loop:
                break
            prompt = args.first if args.task == "promote" else prompt
    st["finished"] = True
    _write_json(status_path, st)
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    tier.close()
    pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pykvshm.testing.tier_rack", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["demote", "promote"])
    p.add_argument("--pool", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--loop", action="store_true")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
