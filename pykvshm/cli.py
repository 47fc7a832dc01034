"""The ``pykvshm`` command: create, inspect, recover and remove pools; run the benchmarks and the demo.

Human output by default, ``--json`` for scripts.  Errors are one line on stderr,
``pykvshm <command>: error: <message>``, and exit status 1 (2 for usage errors, as argparse
reports them); never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import signal
import stat as _stat
import sys
import time
from typing import Any, Callable, NoReturn

from . import __version__
from .errors import CorruptPoolError, PoolError
from .pool import DEFAULT_MAX_MEMBERS, Pool
from .spec import KVSpec, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2


def _out(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human(data))


def _info_dict(pool: Pool) -> dict[str, Any]:
    s = pool.spec
    return {
        "name": pool.name,
        "path": pool.path,
        "uuid": pool.uuid,
        "layout_version": int(__import__("pykvshm._core", fromlist=["x"]).layout_info()["layout_version"]),
        "coherence": pool.coherence,
        "checksums": pool.checksums,
        "total_bytes": pool.total_bytes,
        "num_blocks": pool.num_blocks,
        "max_members": pool.max_members,
        "created": _dt.datetime.fromtimestamp(pool._core.created_ns / 1e9, _dt.timezone.utc).isoformat(),
        "spec": {
            "num_layers": s.num_layers,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "block_tokens": s.block_tokens,
            "dtype": s.dtype,
            "block_bytes": s.block_bytes,
        },
        "members": [m for m in pool.members() if not m["self"]],
        "pages": _pages(pool),
    }


def _pages(pool: Pool) -> dict[str, Any]:
    pl = pool.placement
    return {"page_size": pl.get("page_size"), "huge_pages_refusal": pl.get("huge_pages_refusal")}


def _human_info(d: dict[str, Any]) -> str:
    s = d["spec"]
    lines = [
        f"pool        {d['name']}  ({d['path']})",
        f"uuid        {d['uuid']}",
        f"layout      version {d['layout_version']}, {d['coherence']}, checksums {'on' if d['checksums'] else 'off'}",
        f"size        {d['total_bytes'] / 2**20:.1f} MiB, {d['num_blocks']} blocks of {s['block_bytes']} bytes",
        f"geometry    {s['num_layers']} layers x 2 x {s['block_tokens']} tokens x {s['num_kv_heads']} kv heads x "
        f"{s['head_dim']} ({s['dtype']})",
        f"created     {d['created']}",
        f"pages       {d['pages']['page_size'] // 1024} KiB"
        + (f" (no 2 MiB pages: {d['pages']['huge_pages_refusal']})" if d["pages"]["huge_pages_refusal"] else ""),
        f"members     {len(d['members'])} attached of {d['max_members'] - 1} (member table of {d['max_members']} slots)",
    ]
    for m in d["members"]:
        lines.append(f"  slot {m['slot']:3d}  pid {m['pid']:7d}  {m['status']:10s}  {'alive' if m['alive'] else 'DEAD'}"
                     f"  host {m['host_id']:#018x}")
    return "\n".join(lines)


def _human_stat(s: dict[str, Any]) -> str:
    acq = s["hits"] + s["misses"]
    rate = f"{100.0 * s['hits'] / acq:.1f}%" if acq else "n/a"
    return (
        f"blocks   total {s['total']}  free {s['free']}  sealed {s['sealed']}  writing {s['writing']}  "
        f"pinned {s['pinned']}  evicting {s['evicting']}\n"
        f"prefix   hits {s['hits']}  misses {s['misses']}  hit rate {rate}  evictions {s['evictions']}\n"
        f"bytes    in {s['bytes_in']}  out {s['bytes_out']}  published {s['published']}  "
        f"duplicates {s['duplicates']}\n"
        f"members  {s['members']} attached, {s['recovered_members']} recovered"
    )


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ValueError(f"--mode must be octal permission bits such as 600 or 660, got {text!r}")
    return mode


def cmd_create(args: argparse.Namespace) -> int:
    spec = KVSpec(args.layers, args.kv_heads, args.head_dim, args.block_tokens, args.dtype)
    capacity, mode = parse_size(args.capacity), _octal_mode(args.mode)
    with Pool.create(args.name, spec=spec, capacity=capacity, mode=mode,
                     prefault=args.prefault, huge_pages=args.huge_pages, numa_node=args.numa_node,
                     coherence=args.coherence, checksums=args.checksums, max_members=args.max_members) as pool:
        _out(args, _info_dict(pool), _human_info)
    return 0


def _open(args: argparse.Namespace, read_only: bool = False) -> Pool:
    # info, stat and check attach read-only (Pool.open(read_only=True)): they take no member slot,
    # change nothing, and work for a user who may only read the pool file (a monitor writes
    # nothing, so the ownership check that --allow-foreign lifts does not apply to it).
    if read_only:
        return Pool.open(args.name, read_only=True)
    return Pool.open(args.name, allow_foreign=args.allow_foreign)


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as pool:
        _out(args, _info_dict(pool), _human_info)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise ValueError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    with _open(args, read_only=True) as pool:
        if not args.watch:
            _out(args, pool.stats(), _human_stat)
            return 0
        try:
            while True:
                s = pool.stats()
                if args.json:
                    print(json.dumps(s, sort_keys=True), flush=True)
                else:
                    print(f"--- {time.strftime('%H:%M:%S')}\n{_human_stat(s)}", flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def cmd_recover(args: argparse.Namespace) -> int:
    with _open(args) as pool:
        # Attaching already recovers; run it once more and report the total work done.
        before = pool.stats()["recovered_members"]
        r = pool.recover()
        r["recovered_members_total"] = pool.stats()["recovered_members"]
        r["recovered_on_attach"] = before
        _out(args, r, lambda d: f"recovered {d['members_recovered']} dead members now "
                                f"({d['blocks_freed']} blocks freed, {d['pins_dropped']} pins dropped); "
                                f"{d['recovered_members_total']} recovered in the pool's lifetime")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as pool:
        if args.checksums and not pool.checksums:
            raise PoolError(f"pool '{args.name}' was created without block checksums; --checksums has nothing to verify")
        pool.check(strict=not args.live, checksums=args.checksums)
        _out(args, {"ok": True, "strict": not args.live, "checksums": args.checksums},
             lambda d: "pool is consistent" + (" and every sealed block matches its checksum" if d["checksums"] else ""))
    return 0


_MAGIC = b"PYKVSHM\0"


_FILE_KINDS = [(_stat.S_ISDIR, "a directory"), (_stat.S_ISFIFO, "a FIFO"), (_stat.S_ISSOCK, "a socket"),
               (_stat.S_ISBLK, "a block device"), (_stat.S_ISCHR, "a character device")]


def _refuse_foreign_file(name: str) -> None:
    """Raise unless ``name`` is a regular file carrying a pykvshm pool's magic (or a device-DAX device,
    which ``Pool.destroy`` checks itself and leaves untouched when it holds no pool).

    ``Pool.destroy`` removes whatever file the name points at; from the command line a mistyped
    path must not cost the user a file that was never a pool.  Nothing is opened before ``lstat``
    says it is a regular file, and then without blocking: a FIFO must not hang the command.
    """
    path = Pool.path_for(name)  # InvalidNameError for a bad name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # Pool.destroy reports it as PoolNotFoundError
    except OSError:
        return  # e.g. a directory we cannot search: Pool.destroy gives the precise reason
    if _stat.S_ISLNK(st.st_mode):
        return  # Pool.destroy refuses symlinks itself (O_NOFOLLOW) and removes nothing
    if _stat.S_ISCHR(st.st_mode) and os.path.basename(path).startswith("dax"):
        return  # device DAX: Pool.destroy wipes it only when it holds a pool
    refuse = f"{path} is not a pykvshm pool"
    force = "not removing it (--force removes it anyway)"
    if not _stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise CorruptPoolError(f"{refuse}: it is {kind}; {force}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise CorruptPoolError(f"{refuse}: cannot read its start to check ({e.strerror}); {force}") from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not _stat.S_ISREG(now.st_mode):
            raise CorruptPoolError(f"{path} was replaced while it was being checked; {force}")
        head = os.pread(fd, len(_MAGIC), 0)
    finally:
        os.close(fd)
    if head == _MAGIC:
        return
    if not head.strip(b"\0"):
        what = "it is empty" if not head else "its first bytes are zero"
        raise CorruptPoolError(f"{refuse}: {what} (so is a pool whose creation was interrupted, and so are many "
                               f"other files); {force}")
    raise CorruptPoolError(f"{refuse} (no pykvshm magic at its start); {force}")


def cmd_destroy(args: argparse.Namespace) -> int:
    if not args.force:
        _refuse_foreign_file(args.name)
    Pool.destroy(args.name)
    _out(args, {"destroyed": args.name}, lambda d: f"destroyed {d['destroyed']}")
    return 0


def _benchmark_names(text: str) -> list[str]:
    from .benchmarks import BENCHMARKS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"known: {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def _terminate(signum: int, frame: Any) -> NoReturn:
    # SIGTERM unwinds like ^C does, so that the suite's clean-up runs (scratch pools, children)
    raise SystemExit(128 + signum)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmarks

    if args.list:
        items = benchmarks.listing()
        _out(args, items, lambda d: "\n".join(f"{b['name']:16s} {b['title']} (full version: {b['full_script']})"
                                               for b in d))
        return 0
    names = args.only or list(benchmarks.BENCHMARKS)
    if args.out:  # fail now, not after minutes of measuring
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "folder is not writable", folder)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = benchmarks.run(names, quick=args.quick, progress=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=float)
            f.write("\n")
    _out(args, report, benchmarks.render)
    for name, error in report["errors"].items():
        print(f"pykvshm bench: error: {name}: {error}", file=sys.stderr)
    return EXIT_ERROR if report["errors"] else 0


def cmd_exporter(args: argparse.Namespace) -> int:
    from .exporter import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    if not args.lease > 0:
        raise ValueError(f"--lease must be a positive number of seconds, got {args.lease:g}")

    def ready(url: str) -> None:
        print(f"pykvshm exporter: serving {', '.join(args.pool)} on {url}", flush=True)

    previous = signal.signal(signal.SIGTERM, _terminate)  # a container stop ends it like ^C
    try:
        serve(args.pool, args.host, args.port, lease=args.lease, ready=ready)
    except SystemExit as e:
        return 0 if e.code == 128 + signal.SIGTERM else int(e.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .vllm_demo.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pykvshm", description="Shared-memory KV-cache pools for disaggregated LLM serving.")
    ap.add_argument("--version", action="version", version=f"pykvshm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(fn=fn)
        if fn in (cmd_info, cmd_stat, cmd_recover, cmd_check):
            p.add_argument("--allow-foreign", action="store_true",
                           help="attach even to a pool owned by another user or writable by group/others")
        return p

    p = add("create", cmd_create, "create a pool")
    p.add_argument("name", help="POSIX shm name (in /dev/shm) or absolute path")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--capacity", default="512MiB")
    p.add_argument("--mode", default="600", help="octal permission bits (default 600)")
    p.add_argument("--prefault", action="store_true")
    p.add_argument("--huge-pages", action="store_true")
    p.add_argument("--numa-node", type=int, default=None)
    p.add_argument("--coherence", choices=["coherent", "noncoherent"], default="coherent")
    p.add_argument("--checksums", action="store_true", help="store and verify a CRC32C per block")
    p.add_argument("--max-members", type=int, default=DEFAULT_MAX_MEMBERS,
                   help=f"member table slots (attached handles + 1 spare; default {DEFAULT_MAX_MEMBERS})")

    p = add("info", cmd_info, "geometry, layout version, coherence mode and members of a pool")
    p.add_argument("name")
    p = add("stat", cmd_stat, "live counters: blocks free/sealed/pinned, hit rate, evictions, bytes")
    p.add_argument("name")
    p.add_argument("--watch", action="store_true", help="print again every --interval seconds until ^C")
    p.add_argument("--interval", type=float, default=1.0)
    p = add("recover", cmd_recover, "reclaim what dead processes held")
    p.add_argument("name")
    p = add("check", cmd_check, "verify the pool's invariants (read-only: after a crash, `recover` first)")
    p.add_argument("name")
    p.add_argument("--live", action="store_true", help="only the checks that hold while other processes work")
    p.add_argument("--checksums", action="store_true",
                   help="also verify every sealed block against its checksum (a pool created with checksums)")
    p = add("destroy", cmd_destroy, "remove a pool")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="remove the file even if it does not look like a pykvshm pool")
    p = add("bench", cmd_bench, "run the benchmark suite: pykvshm beside baselines measured in the same run")
    p.add_argument("--quick", action="store_true", help="a few seconds per benchmark")
    p.add_argument("--only", type=_benchmark_names, metavar="NAME[,NAME]",
                   help="run only these benchmarks (see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    p = add("exporter", cmd_exporter, "serve a pool's metrics to Prometheus (read-only attach; needs pykvshm[ops])")
    p.add_argument("--pool", action="append", required=True, metavar="NAME",
                   help="pool to export (POSIX shm name or path); repeat for several pools")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=9464, help="TCP port (default 9464; 0 picks a free one)")
    p.add_argument("--lease", type=float, default=10.0,
                   help="seconds after which a silent member of another host counts as dead")
    p = add("demo", cmd_demo, "disaggregated prefill -> pool -> decode on real vLLM engines, beside baselines")
    from .vllm_demo.command import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    return ap


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    if isinstance(e, PoolError):
        return f"{type(e).__name__}: {text}"
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`pykvshm stat --watch | head`): leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (PoolError, ValueError, TypeError, OSError, ImportError) as e:
        message = _one_line(e)
    except Exception as e:  # noqa: BLE001 - a bug still gets one line, with its type to search for
        message = f"unexpected {type(e).__name__}: {' '.join(str(e).split())}"
    print(f"pykvshm {args.command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
