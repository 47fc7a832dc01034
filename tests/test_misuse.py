"""Misuse of a healthy pool: bad handles, leases and views used out of order, closed and forked handles,
arrays and keys of the wrong kind.  Each must raise its own ``pykvshm.errors`` class (or the standard
TypeError / ValueError for plain argument errors) and leave the pool consistent.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import pykvshm
from pykvshm import errors as E


def make_keys(n: int, salt: bytes = b"misuse") -> list[bytes]:
    return pykvshm.block_keys(np.arange(n * 4), 4, salt=salt)


def blocks(spec: pykvshm.KVSpec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-100, 100, (n, *spec.block_shape)).astype(spec.np_dtype)


@pytest.fixture
def other(pool: pykvshm.Pool, pool_name: str) -> Iterator[pykvshm.Pool]:
    """A second handle (member) on the same pool."""
    p = pykvshm.Pool.open(pool_name)
    yield p
    p.close()


@pytest.fixture
def published(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> tuple[list[bytes], np.ndarray]:
    keys = make_keys(4)
    data = blocks(spec, 4)
    assert pool.publish(keys, data) == 4
    return keys, data


def assert_quiescent_ok(pool: pykvshm.Pool) -> None:
    pool.check(strict=True)
    s = pool.stats()
    assert s["writing"] == 0 and s["pinned"] == 0 and s["evicting"] == 0


# ---- allocator handles ----

def test_double_free_in_two_calls(pool: pykvshm.Pool) -> None:
    h = pool.alloc(2)
    pool.free(h)
    with pytest.raises(E.DoubleFreeError, match="double free"):
        pool.free(h[:1])
    assert pool.stats()["free"] == pool.num_blocks
    assert_quiescent_ok(pool)


def test_double_free_in_one_call_frees_nothing(pool: pykvshm.Pool) -> None:
    h = pool.alloc(2)
    with pytest.raises(E.DoubleFreeError, match="twice"):
        pool.free(np.array([h[0], h[1], h[0]], dtype=np.uint64))
    assert pool.stats()["writing"] == 2  # all or nothing: the call was refused before any block moved
    pool.free(h)
    assert_quiescent_ok(pool)


def test_free_a_handle_of_another_pool_handle(pool: pykvshm.Pool, other: pykvshm.Pool) -> None:
    h = other.alloc(1)
    with pytest.raises(E.InvalidHandleError, match="another pool handle"):
        pool.free(h)
    with pytest.raises(E.InvalidHandleError, match="another pool handle"):
        pool.block_view(int(h[0]))
    assert pool.stats()["writing"] == 1
    other.free(h)  # still the owner's to free
    assert_quiescent_ok(pool)


@pytest.mark.parametrize("index", ["num_blocks", "2**32-1"])
def test_out_of_range_handle(pool: pykvshm.Pool, index: str) -> None:
    i = pool.num_blocks if index == "num_blocks" else 2**32 - 1
    h = (1 << 32) | i
    with pytest.raises(E.InvalidHandleError, match=f"the pool has {pool.num_blocks} blocks"):
        pool.free([h])
    with pytest.raises(E.InvalidHandleError):
        pool.block_view(h)
    assert_quiescent_ok(pool)


def test_stale_handle_after_the_block_was_reused(pool: pykvshm.Pool) -> None:
    old = int(pool.alloc(1)[0])
    pool.free([old])
    everything = pool.alloc(pool.num_blocks)  # the old block is claimed again, one generation later
    assert (old & 0xFFFFFFFF) in {int(h) & 0xFFFFFFFF for h in everything}
    with pytest.raises(E.StaleHandleError, match="stale"):
        pool.free([old])
    with pytest.raises(E.StaleHandleError, match="stale"):
        pool.block_view(old)
    pool.free(everything)
    assert_quiescent_ok(pool)


def test_block_view_of_a_freed_handle(pool: pykvshm.Pool) -> None:
    h = int(pool.alloc(1)[0])
    pool.free([h])
    with pytest.raises(E.InvalidHandleError) as info:
        pool.block_view(h)
    # A view of a freed block is a use after free, not a double free.
    assert not isinstance(info.value, E.DoubleFreeError), f"block_view raised {info.value!r}"


def test_block_view_of_a_sealed_block_is_refused(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    with pool.writer(make_keys(1)) as w:
        h = int(w.handles[0])
    with pytest.raises(E.InvalidHandleError, match="not a block being written"):
        pool.block_view(h)
    with pytest.raises(E.InvalidHandleError):
        pool.free([h])
    assert pool.match(make_keys(1)) == 1


def test_free_refused_while_a_block_view_is_alive(pool: pykvshm.Pool) -> None:
    h = pool.alloc(1)
    v = pool.block_view(int(h[0]))
    v[...] = 1
    with pytest.raises(E.ViewsAliveError):
        pool.free(h)
    del v
    pool.free(h)
    assert_quiescent_ok(pool)


# ---- leases and views ----

def test_release_twice_is_idempotent(pool: pykvshm.Pool, published) -> None:
    keys, _ = published
    lease = pool.acquire(keys)
    assert pool.stats()["pinned"] == 4
    lease.release()
    lease.release()
    assert lease.released and len(lease) == 0
    with lease:
        pass
    assert_quiescent_ok(pool)


class _SlowTracker:
    """A view tracker that yields to other threads while it is asked whether views are alive: it widens
    the window between release()'s "already released?" check and its setting of the flag, so a race
    that happened in 7 of 20,000 trials happens in every one without the fix."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def alive(self) -> bool:
        import time

        time.sleep(0.002)
        return self.inner.alive()  # type: ignore[attr-defined]

    def anchor(self, owner: object) -> object:
        return self.inner.anchor(owner)  # type: ignore[attr-defined]


def test_release_from_two_threads_drops_the_pins_once(pool: pykvshm.Pool, published) -> None:
    """Two threads releasing the same lease used to both drop its pins, the second drop taking the pin
    of another lease of the same handle on the same blocks (whose views then pointed at evictable
    blocks)."""
    import threading

    keys, _ = published
    for _ in range(20):
        a = pool.acquire(keys)
        b = pool.acquire(keys)
        a._views = _SlowTracker(a._views)  # type: ignore[assignment]
        go = threading.Barrier(2)
        errors: list[BaseException] = []

        def release() -> None:
            go.wait()
            try:
                a.release()
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                errors.append(e)

        threads = [threading.Thread(target=release) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and a.released
        assert pool.stats()["pinned"] == 4, "the other lease lost its pins"
        b.release()  # still holds its own pins: no error
        assert pool.stats()["pinned"] == 0
    assert_quiescent_ok(pool)


def test_commit_and_abort_from_two_threads_do_exactly_one(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    import threading

    for i in range(10):
        keys = make_keys(2, salt=b"race-%d" % i)
        w = pool.writer(keys)
        w._views = _SlowTracker(w._views)  # type: ignore[assignment]
        go = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(op: str) -> None:
            go.wait()
            try:
                getattr(w, op)()
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                errors.append(e)

        threads = [threading.Thread(target=run, args=(op,)) for op in ("commit", "abort")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert w.done
        # Either the commit won (the keys are in) or the abort did (they are not, and the
        # late commit was refused cleanly by the core's state checks); never both, never a crash.
        assert all(isinstance(e, E.InvalidHandleError) for e in errors), errors
        assert pool.match(keys) in (0, 2)
        assert pool.stats()["writing"] == 0
    assert_quiescent_ok(pool)


def test_views_work_while_the_lease_is_held(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, data = published
    lease = pool.acquire(keys)
    views = lease.views()
    for j, v in enumerate(views):
        np.testing.assert_array_equal(v, data[j])
        assert not v.flags.writeable
        with pytest.raises(ValueError):
            v[...] = 0
    del v
    with pytest.raises(E.ViewsAliveError):
        lease.release()
    assert not lease.released and pool.stats()["pinned"] == 4
    with pytest.raises(E.ViewsAliveError):
        pool.close()
    assert not pool.closed
    # Everything still works while the views keep the lease alive.
    np.testing.assert_array_equal(views[3], data[3])
    out = np.empty((4, *spec.block_shape), dtype=spec.np_dtype)
    lease.copy_to(out)
    np.testing.assert_array_equal(out, data)
    derived = views[0][1:]  # a slice keeps the same anchor alive
    del views
    with pytest.raises(E.ViewsAliveError):
        lease.release()
    del derived
    lease.release()
    assert_quiescent_ok(pool)


def test_block_views_block_close(pool: pykvshm.Pool) -> None:
    h = pool.alloc(1)
    v = pool.block_view(int(h[0]))
    with pytest.raises(E.ViewsAliveError):
        pool.close()
    assert not pool.closed
    del v
    pool.free(h)
    pool.close()
    assert pool.closed


def test_writer_views_block_commit_and_abort(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    w = pool.writer(make_keys(2))
    views = w.views()
    with pytest.raises(E.ViewsAliveError):
        w.commit()
    with pytest.raises(E.ViewsAliveError):
        w.abort()
    with pytest.raises(E.ViewsAliveError):
        pool.close()
    del views
    w.abort()
    w.abort()
    with pytest.raises(E.InvalidHandleError):
        w.commit()
    assert pool.match(make_keys(2)) == 0
    assert_quiescent_ok(pool)


def test_a_block_view_of_a_writer_block_blocks_commit_and_abort(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    """A writable pool.block_view() of a Writer's block used to survive commit(): the sealed block,
    which readers trust to be immutable, stayed writable through it."""
    keys = make_keys(2, salt=b"bv")
    w = pool.writer(keys)
    v = pool.block_view(int(w.handles[1]))
    v[...] = 7
    for op in (w.commit, w.abort):
        with pytest.raises(E.ViewsAliveError, match="pool.block_view"):
            op()
    assert not w.done
    del v
    w.commit()
    assert pool.match(keys) == 2
    with pytest.raises(E.InvalidHandleError):  # the sealed block gives no writable view any more
        pool.block_view(int(w.handles[1]))
    with pool.acquire(keys) as lease:
        assert (lease.copy_to(np.empty((2, *spec.block_shape), spec.np_dtype))[1] == 7).all()
    assert_quiescent_ok(pool)


def test_a_failed_create_leaves_no_file(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """A creator that cannot open the file it just made (mode 0o400 for a user other than root) used to
    leave it behind under the pool's name."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, pykvshm
        os.setgid(65534); os.setuid(65534)  # nobody: the mode binds this user, unlike root
        spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
        try:
            pykvshm.Pool.create({pool_name!r}, spec=spec, capacity="4MiB", mode=0o400)
        except pykvshm.errors.PoolError as e:
            print("refused:", e)
        """)
    if os.geteuid() != 0:
        pytest.skip("needs root to run the creator as another user")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "refused:" in r.stdout and "Permission denied" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(pykvshm.Pool.path_for(pool_name))


def test_lease_of_another_handle_cannot_be_released_twice_by_hand(pool: pykvshm.Pool, other: pykvshm.Pool,
                                                                   published) -> None:
    keys, _ = published
    lease = other.acquire(keys)
    with pytest.raises(E.InvalidHandleError, match="not pinned by this pool handle"):
        pool._core.release(lease.handles)  # pins belong to the member that took them
    assert pool.stats()["pinned"] == 4
    lease.release()
    assert_quiescent_ok(pool)


# ---- closed pool ----

CLOSED_OPS: dict[str, Callable[[pykvshm.Pool, list[bytes], np.ndarray], object]] = {
    "match": lambda p, k, d: p.match(k),
    "acquire": lambda p, k, d: p.acquire(k),
    "publish": lambda p, k, d: p.publish(k, d),
    "writer": lambda p, k, d: p.writer(k),
    "alloc": lambda p, k, d: p.alloc(1),
    "free": lambda p, k, d: p.free([1 << 32]),
    "block_view": lambda p, k, d: p.block_view(1 << 32),
    "stats": lambda p, k, d: p.stats(),
    "check": lambda p, k, d: p.check(),
    "recover": lambda p, k, d: p.recover(),
    "members": lambda p, k, d: p.members(),
}


@pytest.mark.parametrize("op", list(CLOSED_OPS))
def test_closed_pool_raises_pool_closed(pool_name: str, spec: pykvshm.KVSpec, op: str) -> None:
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB")
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(E.PoolClosedError, match="closed"):
        CLOSED_OPS[op](pool, make_keys(2), blocks(spec, 2))


def test_lease_outliving_its_pool(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, _ = published
    lease = pool.acquire(keys)
    pool.close()  # drops every pin of this member
    lease.release()  # no-op, no error
    with pytest.raises(E.PoolClosedError):
        lease.copy_to(np.empty((4, *spec.block_shape), dtype=spec.np_dtype))
    with pytest.raises(E.PoolClosedError):
        lease.views()


def test_close_drops_pins_and_aborts_writes(pool: pykvshm.Pool, other: pykvshm.Pool, published) -> None:
    keys, _ = published
    lease = pool.acquire(keys)
    w = pool.writer(make_keys(3, salt=b"unfinished"))
    h = pool.alloc(2)
    assert other.stats()["pinned"] == 4 and other.stats()["writing"] == 5
    pool.close()
    assert lease.released and w.done
    s = other.stats()
    assert s["pinned"] == 0 and s["writing"] == 0
    assert other.match(make_keys(3, salt=b"unfinished")) == 0
    other.check(strict=True)
    del h


# ---- close() while other threads are inside calls ----

_CLOSE_RACE = r"""
import sys, threading, time
import numpy as np
import pykvshm
from pykvshm import errors as E

name, rounds = sys.argv[1], int(sys.argv[2])
spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
keys = pykvshm.block_keys(np.arange(64 * 4), 4, salt=b"close-race")
data = np.ones((64, *spec.block_shape), np.float16)
unexpected = []
for r in range(rounds):
    pool = pykvshm.Pool.create(name, spec=spec, capacity="8MiB")
    pool.publish(keys, data)
    go = threading.Barrier(9)

    def work(i):
        out = np.empty_like(data)
        go.wait()
        try:
            while True:
                k = i % 4
                if k == 0:
                    pool.match(keys)
                elif k == 1:
                    pool.stats()
                elif k == 2:
                    with pool.acquire(keys) as lease:
                        lease.copy_to(out[:len(lease)])
                else:
                    pool.free(pool.alloc(4))
                    pool.check(strict=False)
        except E.PoolClosedError:
            pass  # the only clean outcome once close() has begun
        except Exception as e:
            unexpected.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    go.wait()
    time.sleep(0.001 * (r % 5))
    pool.close()
    for t in threads:
        t.join()
    pykvshm.Pool.destroy(name)
print("unexpected:", unexpected[:3])
sys.exit(1 if unexpected else 0)
"""


def test_close_while_eight_threads_are_inside_calls(pool_name: str) -> None:
    """close() used to unmap under match / stats / copy_to running without the GIL (a segfault in
    most runs); now later calls raise PoolClosedError and close() waits for those in flight."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CLOSE_RACE, pool_name, "20"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"exit {r.returncode} (-11 is a segfault): {r.stdout} {r.stderr[-2000:]}"


def test_close_wakes_a_transfer_waiter(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    """A thread waiting (without the GIL) for a layer gets PoolClosedError promptly when another
    thread closes the handle, instead of keeping close() waiting for its whole timeout."""
    import threading
    import time

    from pykvshm.transfer import TransferConsumer, TransferProducer

    producer = pykvshm.Pool.open(pool.name)
    try:
        tx = TransferProducer(producer, "close-wakes", make_keys(2, salt=b"tx"))
        rx = TransferConsumer(pool, "close-wakes", timeout=5)
        got: list[BaseException] = []

        def wait() -> None:
            try:
                rx.wait_layer(0, timeout=30)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                got.append(e)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        pool.close()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert len(got) == 1 and isinstance(got[0], E.PoolClosedError), got
        tx.abort()
    finally:
        producer.close()


def test_close_refused_for_views_lets_other_calls_go_on(pool: pykvshm.Pool, published) -> None:
    keys, _ = published
    lease = pool.acquire(keys)
    v = lease.views()
    with pytest.raises(E.ViewsAliveError):
        pool.close()
    assert not pool.closed and pool.match(keys) == 4  # the refused close reopened the handle
    del v
    lease.release()
    pool.close()
    assert pool.closed


# ---- arrays ----

@pytest.mark.parametrize("data", [[[0.0]], (1, 2), b"bytes", None, 3.5])
def test_publish_data_of_the_wrong_kind_is_a_type_error(pool: pykvshm.Pool, spec: pykvshm.KVSpec, data) -> None:
    """publish(keys, a list) used to raise AttributeError ('list' object has no attribute 'shape')."""
    with pytest.raises(TypeError, match=r"publish data must be a numpy array or a torch tensor of shape \(2, "):
        pool.publish(make_keys(2), data)
    with pytest.raises(TypeError, match="copy_to destination must be a numpy array"):
        pool.publish(make_keys(1), blocks(spec, 1))
        with pool.acquire(make_keys(1)) as lease:
            lease.copy_to(data)
    assert_quiescent_ok(pool)


def test_alloc_of_more_blocks_than_the_pool_has_is_refused_up_front(pool: pykvshm.Pool) -> None:
    """alloc(400_000_000) used to allocate a 3 GB handle array and scan for 31 s before PoolFullError."""
    import time

    for n in (pool.num_blocks + 1, 400_000_000, 2**63):
        t0 = time.monotonic()
        with pytest.raises(E.PoolFullError, match=f"asked for {n} blocks but the pool has only {pool.num_blocks}"):
            pool.alloc(n)
        assert time.monotonic() - t0 < 2
    with pytest.raises(E.PoolFullError, match="400000000 blocks"):  # the core refuses it as early
        pool._core.alloc(400_000_000, True)
    with pytest.raises(ValueError, match="a number of blocks"):
        pool.alloc(-1)
    assert_quiescent_ok(pool)


def test_publish_wrong_shape(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    keys = make_keys(2)
    bad = np.zeros((2, spec.num_layers, 2, spec.block_tokens, spec.num_kv_heads, spec.head_dim + 1), spec.np_dtype)
    with pytest.raises(E.ShapeMismatchError, match="expected"):
        pool.publish(keys, bad)
    with pytest.raises(E.ShapeMismatchError, match="expected"):
        pool.publish(keys, np.zeros((3, *spec.block_shape), spec.np_dtype))  # one row too many
    with pytest.raises(E.ShapeMismatchError):
        pool.publish(keys, np.zeros(spec.block_shape, spec.np_dtype))  # no leading block dimension
    assert pool.match(keys) == 0
    assert_quiescent_ok(pool)


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint16"])
def test_publish_wrong_dtype(pool: pykvshm.Pool, spec: pykvshm.KVSpec, dtype: str) -> None:
    keys = make_keys(2)
    with pytest.raises(E.DTypeMismatchError, match=dtype):
        pool.publish(keys, np.zeros((2, *spec.block_shape), dtype=dtype))
    assert pool.match(keys) == 0
    assert_quiescent_ok(pool)


def test_publish_non_contiguous_source_is_copied(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    keys = make_keys(2)
    src = blocks(spec, 4)[::2]
    assert not src.flags.c_contiguous
    assert pool.publish(keys, src) == 2
    with pool.acquire(keys) as lease:
        out = lease.copy_to(np.empty((2, *spec.block_shape), spec.np_dtype))
    np.testing.assert_array_equal(out, src)


def test_copy_to_wrong_shape(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, _ = published
    with pool.acquire(keys) as lease:
        with pytest.raises(E.ShapeMismatchError, match="expected"):
            lease.copy_to(np.empty((3, *spec.block_shape), spec.np_dtype))
        with pytest.raises(E.ShapeMismatchError, match="expected"):
            lease.copy_to(np.empty((4, spec.block_bytes // spec.itemsize), spec.np_dtype))
        with pytest.raises(E.DTypeMismatchError):
            lease.copy_to(np.empty((4, *spec.block_shape), np.float32))
        with pytest.raises(E.ShapeMismatchError, match="contiguous"):
            lease.copy_to(np.empty((8, *spec.block_shape), spec.np_dtype)[::2])
    assert_quiescent_ok(pool)


def test_copy_to_read_only_array(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, data = published
    out = np.zeros((4, *spec.block_shape), spec.np_dtype)
    out.flags.writeable = False
    with pool.acquire(keys) as lease:
        with pytest.raises(ValueError, match="read-only"):
            lease.copy_to(out)
        assert len(lease) == 4  # the lease is still usable
        ok = lease.copy_to(np.empty_like(data))
    assert not out.any()
    np.testing.assert_array_equal(ok, data)


def test_copy_to_a_read_only_buffer(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, _ = published
    out = np.frombuffer(bytes(4 * spec.block_bytes), dtype=spec.np_dtype).reshape(4, *spec.block_shape)
    with pool.acquire(keys) as lease:
        with pytest.raises(ValueError, match="read-only"):
            lease.copy_to(out)


# ---- keys ----

BAD_KEYS: dict[str, tuple[object, type[BaseException]]] = {
    "one-bytes-object": (b"x" * 16, TypeError),
    "floats": ([1.5, 2.5], TypeError),
    "none": (None, TypeError),
    "list-of-none": ([None], TypeError),
    "strings": (["abc", "def"], TypeError),
    "bool": ([True], TypeError),
    "empty-key": ([b""], ValueError),
    "int": (7, TypeError),
}


@pytest.mark.parametrize("what", list(BAD_KEYS))
@pytest.mark.parametrize("op", ["match", "acquire", "publish", "writer"])
def test_keys_of_the_wrong_type(pool: pykvshm.Pool, spec: pykvshm.KVSpec, what: str, op: str) -> None:
    keys, exc = BAD_KEYS[what]
    with pytest.raises(exc):
        if op == "match":
            pool.match(keys)
        elif op == "acquire":
            pool.acquire(keys)
        elif op == "publish":
            pool.publish(keys, blocks(spec, 1))
        else:
            pool.writer(keys)
    assert_quiescent_ok(pool)


def test_keys_of_other_lengths_are_folded(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    keys = [b"a" * 32, 12345, np.arange(3, dtype=np.int64)]
    assert pool.publish(keys, blocks(spec, 3)) == 3
    assert pool.match(keys) == 3
    assert pool.match([pykvshm.fold_key(k) for k in keys]) == 3


def test_raw_key_buffer_of_wrong_length_is_refused(pool: pykvshm.Pool) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        pool._core.match(b"x" * 17)


# ---- fork ----

def _fork_and_run(child: Callable[[], int]) -> int:
    """Run ``child`` in a forked process; returns its exit code (signal as negative)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = child()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


FORKED_OPS: dict[str, Callable[..., object]] = {
    "match": lambda p, lease, h, k, d: p.match(k),
    "acquire": lambda p, lease, h, k, d: p.acquire(k),
    "publish": lambda p, lease, h, k, d: p.publish(make_keys(2, salt=b"child"), d),
    "writer": lambda p, lease, h, k, d: p.writer(make_keys(2, salt=b"child")),
    "alloc": lambda p, lease, h, k, d: p.alloc(1),
    "free": lambda p, lease, h, k, d: p.free(h),
    "block_view": lambda p, lease, h, k, d: p.block_view(int(h[0])),
    "lease.copy_to": lambda p, lease, h, k, d: lease.copy_to(np.empty((len(lease), *p.spec.block_shape), p.spec.np_dtype)),
    "lease.views": lambda p, lease, h, k, d: lease.views(),
    "lease.release": lambda p, lease, h, k, d: lease.release(),
    "stats": lambda p, lease, h, k, d: p.stats(),
    "check": lambda p, lease, h, k, d: p.check(strict=False),
    "recover": lambda p, lease, h, k, d: p.recover(),
    "members": lambda p, lease, h, k, d: p.members(),
}


@pytest.mark.parametrize("op", list(FORKED_OPS))
def test_handle_used_in_forked_child(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published, op: str) -> None:
    keys, data = published
    lease = pool.acquire(keys)
    held = pool.alloc(1)
    fn = FORKED_OPS[op]

    def child() -> int:
        try:
            fn(pool, lease, held, keys, blocks(spec, 2))
        except E.ForkedHandleError as e:
            return 0 if "fork" in str(e) else 3
        except BaseException:
            return 2
        return 1  # no error: the parent's handle was used as if it were the child's

    rc = _fork_and_run(child)
    # The parent's handle, pins and blocks are untouched and still work.
    s = pool.stats()
    assert s["pinned"] == 4, f"the child's {op} (exit code {rc}) dropped the parent's pins: {s}"
    assert s["writing"] == 1 and s["sealed"] == 4
    assert rc != 1, f"{op} in a forked child did not raise ForkedHandleError"
    assert rc == 0, f"{op} in a forked child failed with exit code {rc} (2: another exception, 3: bad message)"
    out = lease.copy_to(np.empty((4, *spec.block_shape), spec.np_dtype))
    np.testing.assert_array_equal(out, data)
    assert pool.match(keys) == 4
    lease.release()
    pool.free(held)
    assert_quiescent_ok(pool)


def test_close_in_forked_child_leaves_parent_alone(pool: pykvshm.Pool, spec: pykvshm.KVSpec, published) -> None:
    keys, data = published
    lease = pool.acquire(keys)

    def child() -> int:
        pool._core.close()  # only drops the child's mapping
        return 0 if pool.closed else 1

    assert _fork_and_run(child) == 0
    assert pool.stats()["pinned"] == 4 and not pool.closed
    np.testing.assert_array_equal(lease.copy_to(np.empty_like(data)), data)
    lease.release()
    assert_quiescent_ok(pool)


def test_forked_child_can_open_the_pool_again(pool: pykvshm.Pool, pool_name: str, spec: pykvshm.KVSpec,
                                              published) -> None:
    keys, data = published

    def child() -> int:
        with pykvshm.Pool.open(pool_name, spec=spec) as mine:
            with mine.acquire(keys) as lease:
                out = lease.copy_to(np.empty_like(data))
            ok = np.array_equal(out, data) and mine.publish(make_keys(1, salt=b"from-child"), blocks(spec, 1)) == 1
        return 0 if ok else 1

    assert _fork_and_run(child) == 0
    assert pool.match(make_keys(1, salt=b"from-child")) == 1
    assert_quiescent_ok(pool)
