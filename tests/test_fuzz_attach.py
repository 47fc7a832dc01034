"""Fuzzing attach: damage a small pool file, then open it and use it.

Hypothesis mutates a freshly made pool file (an absolute path): superblock bytes and fields (with and
without a recomputed checksum), region offsets and sizes, control words, member slots, block state
words, descriptors (pin masks, keys), index entries, data bytes, and the file's length.  A worker
process then opens the file and uses it (match, acquire + copy_to + views + release, publish,
alloc + block_view + free, writer, stats, check(strict=False), recover, members, close).

Allowed outcomes: success, or a ``pykvshm.errors.PoolError`` subclass.  A crash (signal), a hang
(timeout), any other exception, or a rejected open() that changed the file fails the example.  The
worker is one long-lived interpreter fed over a pipe and restarted when it dies, so a segfault is a
failed example with its signal, not a dead pytest.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pykvshm
from pykvshm import _core

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCALE = float(os.environ.get("PYKVSHM_FUZZ_SCALE", "1"))  # e.g. 20 for a deeper local run
EXAMPLE_TIMEOUT_S = 20.0
CAPACITY = "2200KiB"  # ~300 blocks of 512 B behind the 2 MiB-aligned data region
SALT = b"fuzz"
N_KEYS = 24

LAYOUT = _core.layout_info()
OFF = LAYOUT["offsets"]
REG = LAYOUT["regions"]
SB_BYTES = LAYOUT["sizeof_superblock"]
VERSION_AT = OFF["superblock.layout_version"]
CHECKSUM_AT = OFF["superblock.checksum"]
MEMBER_BYTES = LAYOUT["sizeof_member_slot"]
DESC_BYTES = LAYOUT["sizeof_block_desc"]
M64 = (1 << 64) - 1


def fuzz_settings(n: int) -> Any:
    extra: dict[str, Any] = {"database": None} if CI else {}
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=CI, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **extra)


def spec() -> pykvshm.KVSpec:
    return pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")


# ---- the words of the layout, re-derived here so mutations can be aimed (pinned by a sanity test) ----

def mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def key_hash(key: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    return mix64(k0 ^ mix64((k1 + 0x9E3779B97F4A7C15) & M64))


def entry_word(fp: int, gen: int, index: int) -> int:
    return (1 << 63) | ((fp & 0x7FFF) << 48) | ((gen & 0xFFFFF) << 28) | (index & ((1 << 28) - 1))


def state_word(gen: int, kind: int, owner: int, ref: bool = False) -> int:
    return ((gen & 0xFFFFFFFF) << 32) | ((kind & 7) << 29) | ((1 << 28) if ref else 0) | (owner & ((1 << 28) - 1))


def member_word(status: int, epoch: int, payload: int) -> int:
    return ((status & 3) << 62) | ((epoch & 0x3FFFFFFF) << 32) | (payload & 0xFFFFFFFF)


def fix_checksum(buf: bytearray) -> None:
    c = _core.crc32c(bytes(buf[0:VERSION_AT]))
    c = _core.crc32c(bytes(buf[VERSION_AT + 4 : CHECKSUM_AT]), c)
    struct.pack_into("<Q", buf, CHECKSUM_AT, c)


class Template:
    """A pool image to damage, and where its interesting words are.  (A plain class: hypothesis
    pretty-prints a dataclass field by field, 2 MiB image included, when it reports an example.)"""

    def __init__(self, raw: bytes, regions: list[tuple[int, int]], nblocks: int, nslots: int, dead_pid: int,
                 keys: list[bytes]) -> None:
        self.raw = raw
        self.regions = regions
        self.nblocks = nblocks
        self.nslots = nslots
        self.dead_pid = dead_pid
        self.keys = keys
        self.key_block: dict[int, tuple[int, int]] = {}  # key number -> (block, gen) of keys sealed in the image
        self.hot_blocks: list[int] = []  # blocks that are sealed, written or pinned
        self.live_slots: list[int] = []  # index positions holding live entries

    def __repr__(self) -> str:  # hypothesis prints fixtures of failing examples; keep the 2 MiB image out
        return f"<Template {len(self.raw)} bytes, {self.nblocks} blocks, dead_pid={self.dead_pid}>"

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.raw, off)[0]

    def state(self, block: int) -> int:
        return self.u64(self.regions[REG["states"]][0] + 8 * block)


def read_template(raw: bytes, keys: list[bytes], dead_pid: int) -> Template:
    regions = [struct.unpack_from("<QQ", raw, OFF["superblock.regions"] + 16 * r) for r in range(len(REG))]
    nblocks = struct.unpack_from("<Q", raw, OFF["superblock.num_blocks"])[0]
    nslots = struct.unpack_from("<Q", raw, OFF["superblock.index_slots"])[0]
    t = Template(raw, regions, nblocks, nslots, dead_pid, keys)
    desc0 = regions[REG["descriptors"]][0]
    by_key = {}
    for b in range(nblocks):
        s = t.state(b)
        pins = t.u64(desc0 + DESC_BYTES * b) | t.u64(desc0 + DESC_BYTES * b + 8)
        if (s >> 29) & 7 or pins:
            t.hot_blocks.append(b)
            by_key[raw[desc0 + DESC_BYTES * b + 16 : desc0 + DESC_BYTES * b + 32]] = (b, s >> 32)
    for k, key in enumerate(keys):
        if key in by_key:
            t.key_block[k] = by_key[key]
    idx0 = regions[REG["index"]][0]
    t.live_slots = [p for p in range(nslots) if t.u64(idx0 + 8 * p) >> 63]
    return t


# ---- the worker: opens and uses one damaged pool per request ----

WORKER = textwrap.dedent(
    r"""
    import faulthandler, json, os, sys, traceback, warnings
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not break the protocol
    faulthandler.enable()
    warnings.simplefilter("error")
    import numpy as np
    import pykvshm
    from pykvshm.errors import PoolError

    KEYS = pykvshm.block_keys(np.arange(%(n)d * 4), 4, salt=%(salt)r)
    NEW = pykvshm.block_keys(np.arange(8 * 4) + 10**6, 4, salt=%(salt)r + b"-new")

    def steps(pool):
        spec = pool.spec
        def acquire():
            lease = pool.acquire(KEYS)  # on an error the lease stays for close() to drop
            out = np.empty((len(lease), *spec.block_shape), spec.np_dtype)
            lease.copy_to(out)
            views = lease.views()
            assert len(views) == len(lease)
            del views
            lease.release()
        def publish():
            keys = NEW[:3] + KEYS[:3]
            pool.publish(keys, np.zeros((len(keys), *spec.block_shape), spec.np_dtype))
            pool.match(keys)
        def alloc_free():
            hs = pool.alloc(3)
            v = pool.block_view(int(hs[0]))
            v[...] = 1
            del v
            pool.free(hs)
        def writer():
            with pool.writer(NEW[3:6]) as w:
                for v in w.views():
                    v[...] = 2
                del v
        return [("match", lambda: pool.match(KEYS)), ("acquire", acquire), ("publish", publish),
                ("alloc_free", alloc_free), ("writer", writer), ("stats", pool.stats),
                ("check", lambda: pool.check(strict=False)), ("recover", pool.recover), ("members", pool.members),
                ("acquire_again", acquire), ("close", pool.close)]

    for line in sys.stdin:
        req = json.loads(line)
        if req.get("segv"):  # the harness's own test: crash for real
            import ctypes
            ctypes.string_at(0)
        rep = {"id": req["id"], "steps": []}
        try:
            try:
                pool = pykvshm.Pool.open(req["path"])
            except PoolError as e:
                rep["open"] = [type(e).__name__, str(e)]
            else:
                rep["open"] = ["ok", ""]
                for name, fn in steps(pool):
                    try:
                        fn()
                        rep["steps"].append([name, "ok"])
                    except PoolError as e:
                        rep["steps"].append([name, type(e).__name__ + ": " + str(e)[:200]])
                try:
                    pool.close()
                except PoolError:
                    pass
                del pool
        except BaseException:
            rep["bad"] = traceback.format_exc()
        proto.write(json.dumps(rep) + "\n")
    """
) % {"n": N_KEYS, "salt": SALT}


class Worker:
    """One interpreter that serves many examples; restarted after it dies or hangs."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.count = 0
        self.buf = b""

    def start(self) -> None:
        self.count += 1
        self.err_path = self.log_dir / f"worker-{self.count}.stderr"
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err)
        self.buf = b""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.err.close()
            self.proc = None

    def stderr_tail(self) -> str:
        return self.err_path.read_bytes()[-3000:].decode(errors="replace")

    def run(self, path: str, rid: int, segv: bool = False) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps({"path": path, "id": rid, "segv": segv}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + EXAMPLE_TIMEOUT_S
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self._kill()
                return {"hang": f"no answer within {EXAMPLE_TIMEOUT_S} s", "stderr": tail}
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                rc = self.proc.wait()
                tail = self.stderr_tail()
                self.stop()
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
                return {"died": how, "stderr": tail}
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        rep = json.loads(line)
        assert rep["id"] == rid
        return rep

    def _kill(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGABRT)  # faulthandler dumps where it was stuck
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        tail = self.stderr_tail()
        self.stop()
        return tail


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def worker(fuzz_dir: Path) -> Iterator[Worker]:
    w = Worker(fuzz_dir)
    yield w
    w.stop()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, numpy as np, pykvshm
    pool = pykvshm.Pool.open(sys.argv[1])
    keys = pykvshm.block_keys(np.arange(%(n)d * 4), 4, salt=%(salt)r)
    lease = pool.acquire(keys[:6])                       # pins
    w = pool.writer(pykvshm.block_keys(np.arange(8), 4, salt=b"crashed"))  # WRITING blocks in the index
    h = pool.alloc(2)                                    # WRITING blocks outside it
    sys.stdout.write(str(os.getpid()))
    sys.stdout.flush()
    os._exit(0)                                          # die holding all of it
    """
) % {"n": N_KEYS, "salt": SALT}


@pytest.fixture(scope="module")
def templates(fuzz_dir: Path) -> dict[str, Template]:
    """'clean': a closed pool with sealed blocks; 'crashed': the same after a member died holding pins and writes."""
    s = spec()
    keys = pykvshm.block_keys(np.arange(N_KEYS * 4), 4, salt=SALT)
    path = str(fuzz_dir / "template.kv")
    with pykvshm.Pool.create(path, spec=s, capacity=CAPACITY) as pool:
        pool.publish(keys[:20], np.arange(20 * s.block_bytes // 2, dtype=np.uint16).view(s.np_dtype).reshape(20, *s.block_shape))
        with pool.acquire(keys[:8]):
            pass  # sets CLOCK reference bits
        hs = pool.alloc(3)
        pool.free(hs[1:2])
        pool.free(hs[[0, 2]])
    clean = Path(path).read_bytes()
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    crashed = Path(path).read_bytes()
    os.unlink(path)
    return {"clean": read_template(clean, keys, 0), "crashed": read_template(crashed, keys, int(r.stdout))}


# ---- strategies: abstract mutations, resolved against a template ----

INTERESTING = [0, 1, 2, 3, 7, 8, 63, 64, 127, 128, 255, 256, 4095, 4096, 65535, 2**28 - 1, 2**28, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**32 + 1, 2**48, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
SYMBOLS = ["parent_pid", "dead_pid", "host_id", "now_ns", "file_size", "nblocks", "nslots"]
raw_values = st.one_of(st.sampled_from(INTERESTING), st.sampled_from(SYMBOLS), st.integers(0, M64))

SB_FIELDS = {  # name -> (offset, width)
    "magic": (0, 8), "version": (VERSION_AT, 4), "header_bytes": (12, 4), "total_bytes": (32, 8),
    "coherence": (52, 4), "flags": (56, 4), "max_members": (60, 4),
    "num_layers": (64, 4), "num_kv_heads": (68, 4), "head_dim": (72, 4), "block_tokens": (76, 4),
    "dtype_code": (80, 4), "dtype_size": (84, 4), "block_bytes": (88, 8), "block_stride": (96, 8),
    "num_blocks": (104, 8), "index_slots": (112, 8), "index_probe_limit": (120, 4), "transfer_max_blocks": (124, 4),
    "reserved": (OFF["superblock.reserved"], 8), "checksum": (CHECKSUM_AT, 8),
}
sb_values = st.one_of(raw_values, st.integers(0, 12), st.tuples(st.just("delta"), st.sampled_from([-64, -2, -1, 1, 2, 64])))

SEMANTIC_FIELDS = ["dtype_code", "dtype_size", "num_layers", "num_kv_heads", "head_dim", "block_tokens", "coherence",
                   "flags", "num_blocks", "index_slots", "total_bytes", "block_bytes", "block_stride"]
superblock_mutation = st.one_of(
    st.tuples(st.just("sb_xor"), st.integers(0, SB_BYTES - 1), st.integers(1, 255)),
    # Fields the checks must understand, not just checksum: small and neighbouring values.
    st.tuples(st.just("sb_field"), st.sampled_from(SEMANTIC_FIELDS),
              st.one_of(st.integers(0, 12), st.tuples(st.just("delta"), st.sampled_from([-2, -1, 1, 2])))),
    st.tuples(st.just("sb_field"), st.sampled_from(sorted(SB_FIELDS)), sb_values),
    st.tuples(st.just("region"), st.integers(0, 6), st.sampled_from(["offset", "size"]),
              st.one_of(raw_values, st.tuples(st.just("delta"), st.sampled_from([-4096, -64, -8, 8, 64, 4096, 2 << 20])))),
)

blocksel = st.one_of(st.tuples(st.just("hot"), st.integers(0, 1000)), st.tuples(st.just("any"), st.integers(0, 10**6)))
gen_choice = st.one_of(st.sampled_from(["same", "+1", "-1", "zero"]), st.integers(0, 2**32 - 1))
state_values = st.one_of(
    st.tuples(st.just("state"), gen_choice, st.integers(0, 7), st.booleans(), st.sampled_from([0, 1, 2, 127, 128, 2**28 - 1])),
    st.tuples(st.just("raw"), raw_values),
)
entry_values = st.one_of(
    st.tuples(st.just("entry"), st.sampled_from(["key", "rand"]), st.integers(0, N_KEYS - 1), gen_choice,
              st.sampled_from(["key_block", "hot", "last", "nblocks", "max"])),
    st.tuples(st.just("raw"), st.one_of(st.sampled_from([0, 1, 2, 3, 2**63, 2**63 + 1]), raw_values)),
)
member_values = st.one_of(
    st.tuples(st.just("ctl"), st.integers(0, 3), st.sampled_from([0, 1, 2, 2**30 - 1]),
              st.one_of(st.sampled_from([0, 1, "parent_pid", "dead_pid", 2**31, 2**32 - 1]),
                        st.tuples(st.just("recoverer"), st.integers(0, 65535), st.integers(0, 3)))),
    st.tuples(st.just("raw"), raw_values),
)
possel = st.one_of(st.tuples(st.just("live"), st.integers(0, 1000)), st.tuples(st.just("any"), st.integers(0, 10**6)),
                   st.tuples(st.just("home"), st.integers(0, N_KEYS - 1), st.integers(0, 70)))

word_mutation = st.one_of(
    st.tuples(st.just("control"), st.sampled_from([0, 128, 256] + [1024 + 8 * k for k in range(16)]), raw_values),
    st.tuples(st.just("member"), st.one_of(st.sampled_from([0, 1, 2, 127]), st.integers(0, 127)), st.integers(0, 31),
              member_values),
    st.tuples(st.just("state"), blocksel, state_values),
    st.tuples(st.just("desc"), blocksel, st.sampled_from(["pin0", "pin1", "key0", "key1", "crc"]), raw_values),
    st.tuples(st.just("entry"), possel, entry_values),
    # pin records (layout version 3): in-use ones and any other, raw words
    st.tuples(st.just("pinrec"), st.one_of(st.tuples(st.just("live"), st.integers(0, 100)),
                                           st.tuples(st.just("any"), st.integers(0, 10**7))), raw_values),
    st.tuples(st.just("data"), st.integers(0, 10**6), st.integers(0, 255)),
)

size_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.one_of(st.sampled_from([0, 1, 100, 256, 511, 512, 4095, 4096, 8192, "data", "end-1"]),
                                             st.integers(0, 3 << 20))),
    st.tuples(st.just("extend"), st.sampled_from([1, 64, 4096, 2 << 20])),
)


def resolve_value(v: Any, t: Template, size: int, width: int = 8, old: int | None = None) -> int:
    if isinstance(v, tuple) and v[0] == "delta":
        return ((old or 0) + v[1]) % (1 << (8 * width))
    if isinstance(v, str):
        v = {"parent_pid": os.getpid(), "dead_pid": t.dead_pid, "host_id": _core.local_host_id(),
             "now_ns": time.time_ns(), "file_size": size, "nblocks": t.nblocks, "nslots": t.nslots}[v]
    return int(v) % (1 << (8 * width))


def put(buf: bytearray, off: int, width: int, value: int) -> None:
    if 0 <= off and off + width <= len(buf):
        buf[off : off + width] = value.to_bytes(width, "little")


def get(buf: bytearray, off: int, width: int) -> int:
    return int.from_bytes(buf[off : off + width], "little")


def pick_block(sel: tuple[str, int], t: Template) -> int:
    kind, i = sel
    if kind == "hot" and t.hot_blocks:
        return t.hot_blocks[i % len(t.hot_blocks)]
    return i % t.nblocks


def resolve_gen(choice: Any, gen: int) -> int:
    return {"same": gen, "+1": gen + 1, "-1": gen - 1, "zero": 0}.get(choice, choice) if isinstance(choice, str) else choice


def apply_mutation(buf: bytearray, m: tuple, t: Template) -> None:
    size = len(t.raw)
    kind = m[0]
    if kind == "sb_xor":
        buf[m[1]] ^= m[2]
    elif kind == "sb_field":
        off, width = SB_FIELDS[m[1]]
        put(buf, off, width, resolve_value(m[2], t, size, width, get(buf, off, width)))
    elif kind == "region":
        off = OFF["superblock.regions"] + 16 * m[1] + (0 if m[2] == "offset" else 8)
        put(buf, off, 8, resolve_value(m[3], t, size, 8, get(buf, off, 8)))
    elif kind == "control":
        put(buf, t.regions[REG["control"]][0] + m[1], 8, resolve_value(m[2], t, size))
    elif kind == "member":
        off = t.regions[REG["members"]][0] + MEMBER_BYTES * m[1] + 8 * m[2]
        v = m[3]
        if v[0] == "ctl":
            payload = v[3]
            if isinstance(payload, tuple):
                payload = (payload[1] << 16) | payload[2]  # recoverer slot:16 | epoch:16
            value = member_word(v[1], v[2], resolve_value(payload, t, size, 4))
        else:
            value = resolve_value(v[1], t, size)
        put(buf, off, 8, value)
    elif kind == "state":
        b = pick_block(m[1], t)
        off = t.regions[REG["states"]][0] + 8 * b
        v = m[2]
        if v[0] == "state":
            value = state_word(resolve_gen(v[1], get(buf, off, 8) >> 32), v[2], v[4], v[3])
        else:
            value = resolve_value(v[1], t, size)
        put(buf, off, 8, value)
    elif kind == "desc":
        b = pick_block(m[1], t)
        rel, width = {"pin0": (0, 8), "pin1": (8, 8), "key0": (16, 8), "key1": (24, 8), "crc": (32, 4)}[m[2]]
        put(buf, t.regions[REG["descriptors"]][0] + DESC_BYTES * b + rel, width, resolve_value(m[3], t, size, width))
    elif kind == "entry":
        sel = m[1]
        if sel[0] == "live" and t.live_slots:
            pos = t.live_slots[sel[1] % len(t.live_slots)]
        elif sel[0] == "home":
            pos = (key_hash(t.keys[sel[1]]) + sel[2]) % t.nslots
        else:
            pos = sel[1] % t.nslots
        v = m[2]
        if v[0] == "entry":
            _, fp_kind, k, gen_c, idx_kind = v
            block, gen = t.key_block.get(k, (pick_block(("hot", k), t), 0))
            fp = (key_hash(t.keys[k]) >> 49) & 0x7FFF if fp_kind == "key" else k * 997
            index = {"key_block": block, "hot": pick_block(("hot", k + 1), t), "last": t.nblocks - 1,
                     "nblocks": t.nblocks, "max": (1 << 28) - 1}[idx_kind]
            value = entry_word(fp, resolve_gen(gen_c, gen), index)
        else:
            value = resolve_value(v[1], t, size)
        put(buf, t.regions[REG["index"]][0] + 8 * pos, 8, value)
    elif kind == "pinrec":
        rec_off, rec_size = t.regions[REG["pins"]]
        n = rec_size // 8
        live = np.flatnonzero(np.frombuffer(bytes(t.raw), dtype="<u8", count=n, offset=rec_off)).tolist()
        sel = m[1]
        pos = live[sel[1] % len(live)] if sel[0] == "live" and live else sel[1] % n
        put(buf, rec_off + 8 * pos, 8, resolve_value(m[2], t, size))
    elif kind == "data":
        data_off, data_size = t.regions[REG["data"]]
        buf[data_off + m[1] % data_size] = m[2]
    elif kind == "truncate":
        n = {"data": t.regions[REG["data"]][0], "end-1": size - 1}.get(m[1], m[1]) if isinstance(m[1], str) else m[1]
        del buf[min(n, len(buf)) :]
    elif kind == "extend":
        buf.extend(b"\0" * m[1])
    else:
        raise AssertionError(m)


def damaged(t: Template, mutations: list[tuple], fix: bool, fix_size: bool = False) -> bytes:
    buf = bytearray(t.raw)
    for m in mutations:
        apply_mutation(buf, m, t)
    if fix_size and len(buf) >= SB_BYTES:
        put(buf, OFF["superblock.total_bytes"], 8, len(buf))
    if fix and len(buf) >= SB_BYTES:
        fix_checksum(buf)
    return bytes(buf)


_ids = iter(range(1, 10**9))


def run_example(worker: Worker, fuzz_dir: Path, image: bytes) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(dir=fuzz_dir, suffix=".kv")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        rep = worker.run(path, next(_ids))
        assert "died" not in rep, f"the worker crashed ({rep['died']}) using the damaged pool:\n{rep['stderr']}"
        assert "hang" not in rep, f"the worker hung ({rep['hang']}):\n{rep['stderr']}"
        assert "bad" not in rep, f"a non-PoolError escaped: open={rep.get('open')} steps={rep['steps']}\n{rep['bad']}"
        if rep["open"][0] != "ok":
            after = Path(path).read_bytes()
            if after != image:
                if len(after) != len(image):
                    where = f"length {len(image)} -> {len(after)}"
                else:
                    diff = np.flatnonzero(np.frombuffer(after, np.uint8) != np.frombuffer(image, np.uint8))
                    where = f"{len(diff)} bytes differ, first at offset {int(diff[0])}"
                pytest.fail(f"open() refused the pool with {rep['open'][0]}: {rep['open'][1]!r} but modified the file "
                            f"({where})")
        return rep
    finally:
        os.unlink(path)


# ---- sanity: the re-derived words match what the core wrote, so mutations hit what they aim at ----

def test_templates_are_what_the_mutations_assume(templates: dict[str, Template], worker: Worker, fuzz_dir: Path) -> None:
    clean, crashed = templates["clean"], templates["crashed"]
    assert clean.nblocks > 200 and len(clean.key_block) == 20 and len(clean.live_slots) == 20
    idx0 = clean.regions[REG["index"]][0]
    for k, (block, gen) in clean.key_block.items():
        h = key_hash(clean.keys[k])
        pos = next(p for p in clean.live_slots if clean.u64(idx0 + 8 * p) & ((1 << 28) - 1) == block)
        assert clean.u64(idx0 + 8 * pos) == entry_word(h >> 49, gen, block)
        assert (pos - h) % clean.nslots < LAYOUT["index_probe_limit"]
        assert clean.state(block) >> 29 & 7 == 2  # sealed
    assert crashed.dead_pid > 0 and len(crashed.live_slots) == 22 and len(crashed.hot_blocks) == 24
    # Both open and are usable as they are.
    for t in (clean, crashed):
        rep = run_example(worker, fuzz_dir, t.raw)
        assert rep["open"][0] == "ok" and all(s == "ok" for _, s in rep["steps"]), rep


def test_worker_reports_a_crash_as_a_failed_example(worker: Worker) -> None:
    # The harness itself: a segfault in the worker comes back as "died", and the next request gets a new worker.
    assert worker.proc is None or worker.proc.poll() is None
    rep = worker.run("/nonexistent/pool.kv", next(_ids), segv=True)
    assert rep.get("died") == "signal SIGSEGV", rep
    assert "Fatal Python error" in rep["stderr"]
    rep = worker.run("/nonexistent/pool.kv", next(_ids))
    assert rep["open"][0] == "PoolNotFoundError"


# ---- known shapes of damage that pass the core's checks once the checksum is recomputed ----

PASSING_DAMAGE = {
    "unknown-dtype-code-0": ("clean", [("sb_field", "dtype_code", 0)]),
    "unknown-dtype-code-9-crashed": ("crashed", [("sb_field", "dtype_code", 9)]),
    "dtype-code-int8-size-2": ("clean", [("sb_field", "dtype_code", 6)]),
    "dtype-code-float32-size-2": ("clean", [("sb_field", "dtype_code", 3)]),
    "other-geometry-same-block-size": ("clean", [("sb_field", "num_layers", 4), ("sb_field", "block_tokens", 2)]),
    "noncoherent": ("clean", [("sb_field", "coherence", 1)]),
    "checksums-flag-on": ("clean", [("sb_field", "flags", 1)]),
}


@pytest.mark.parametrize("case", list(PASSING_DAMAGE))
def test_superblock_damage_with_a_valid_checksum(templates: dict[str, Template], worker: Worker, fuzz_dir: Path,
                                                 case: str) -> None:
    which, mutations = PASSING_DAMAGE[case]
    run_example(worker, fuzz_dir, damaged(templates[which], mutations, fix=True))


# ---- the fuzzers ----

@fuzz_settings(40)
@given(which=st.sampled_from(["clean", "crashed"]), mutations=st.lists(superblock_mutation, min_size=1, max_size=3),
       fix=st.sampled_from([True, True, True, False]))
def test_fuzz_superblock(templates: dict[str, Template], worker: Worker, fuzz_dir: Path, which: str,
                         mutations: list[tuple], fix: bool) -> None:
    t = templates[which]
    image = damaged(t, mutations, fix)
    rep = run_example(worker, fuzz_dir, image)
    if not fix and image[:SB_BYTES] != t.raw[:SB_BYTES] and image[VERSION_AT:VERSION_AT + 4] == t.raw[VERSION_AT:VERSION_AT + 4]:
        assert rep["open"][0] != "ok", "a damaged superblock with a stale checksum was accepted"


@fuzz_settings(45)
@given(which=st.sampled_from(["clean", "crashed"]), mutations=st.lists(word_mutation, min_size=1, max_size=6))
def test_fuzz_shared_words(templates: dict[str, Template], worker: Worker, fuzz_dir: Path, which: str,
                           mutations: list[tuple]) -> None:
    run_example(worker, fuzz_dir, damaged(templates[which], mutations, fix=False))


@fuzz_settings(15)
@given(which=st.sampled_from(["clean", "crashed"]), size=size_mutation,
       others=st.lists(st.one_of(superblock_mutation, word_mutation), max_size=2), fix_size=st.booleans())
def test_fuzz_file_size(templates: dict[str, Template], worker: Worker, fuzz_dir: Path, which: str, size: tuple,
                        others: list[tuple], fix_size: bool) -> None:
    t = templates[which]
    image = damaged(t, [*others, size], fix=fix_size, fix_size=fix_size)
    rep = run_example(worker, fuzz_dir, image)
    if len(image) < len(t.raw) and not fix_size and not others:
        assert rep["open"][0] == "CorruptPoolError", rep["open"]
