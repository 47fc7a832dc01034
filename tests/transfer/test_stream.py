"""Layer-wise transfers through the pool, across processes: order, early consumers, timeouts, aborts, crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import pykvshm
from pykvshm import errors
from pykvshm.testing import blocks_for_keys
from pykvshm.transfer import TransferConsumer, TransferProducer

CTX = mp.get_context("fork")
SPEC = pykvshm.KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, block_tokens=8, dtype="float16")  # 4 KiB blocks


@pytest.fixture(params=["coherent", "noncoherent"])
def tpool(pool_name: str, request: pytest.FixtureRequest):
    """Both modes: a noncoherent consumer polls `ready` (no futex across hosts)."""
    p = pykvshm.Pool.create(pool_name, spec=SPEC, capacity="8MiB", coherence=request.param)
    yield p
    p.close()


def keys_for(rid: str, n: int = 6) -> list[bytes]:
    return pykvshm.block_keys(np.arange(n * SPEC.block_tokens), SPEC.block_tokens, salt=rid.encode())


def _producer(name: str, rid: str, n: int, delay: float, stamps, start_evt, mode: str) -> None:
    pool = pykvshm.Pool.open(name)
    keys = keys_for(rid, n)
    data = blocks_for_keys(keys, SPEC)
    start_evt.wait()
    try:
        tx = TransferProducer(pool, rid, keys)
        for layer in range(SPEC.num_layers):
            time.sleep(delay)  # "compute" the layer
            if mode == "die" and layer == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "abort" and layer == 2:
                tx.abort()
                os._exit(0)
            if mode == "stall" and layer == 2:
                time.sleep(30)
            stamps[layer] = time.monotonic()  # before the put: a consumer may have it before put_layer returns
            tx.put_layer(layer, np.ascontiguousarray(data[:, layer]))
        tx.finish()
    except errors.TransferAbortedError:
        stamps[SPEC.num_layers] = -1.0  # told that the consumer aborted
        os._exit(0)
    pool.close()
    os._exit(0)


def _start_producer(tpool, rid, n=6, delay=0.05, mode="ok"):
    stamps = CTX.RawArray("d", SPEC.num_layers + 1)
    evt = CTX.Event()
    p = CTX.Process(target=_producer, args=(tpool.name, rid, n, delay, stamps, evt, mode))
    p.start()
    return p, stamps, evt


def test_layers_arrive_in_order_while_prefill_runs(tpool) -> None:
    rid = "req-order"
    p, stamps, evt = _start_producer(tpool, rid, delay=0.15)
    evt.set()
    keys = keys_for(rid)
    expect = blocks_for_keys(keys, SPEC)
    got_at = []
    with TransferConsumer(tpool, rid, timeout=10) as rx:
        assert rx.num_blocks == 6 and rx.num_layers == SPEC.num_layers
        out = np.empty((6, *SPEC.layer_shape), dtype=SPEC.np_dtype)
        for layer in range(SPEC.num_layers):
            rx.read_layer(layer, out, timeout=10)
            got_at.append(time.monotonic())
            assert np.array_equal(out.view(np.uint16), expect[:, layer].view(np.uint16))
    p.join(10)
    assert p.exitcode == 0
    # Overlap: layer 0 was in the consumer's hands before the producer began putting the last
    # layer, and no layer reached the consumer before the producer began putting it.
    assert got_at[0] < stamps[SPEC.num_layers - 1]
    assert all(got_at[i] >= stamps[i] for i in range(SPEC.num_layers))
    # Finished: the blocks are sealed into the prefix index.
    assert tpool.match(keys) == 6
    tpool.check()


def test_consumer_may_open_before_the_producer(tpool) -> None:
    rid = "req-early"
    p, stamps, evt = _start_producer(tpool, rid, delay=0.0)
    t0 = time.monotonic()
    import threading

    threading.Timer(0.4, evt.set).start()
    with TransferConsumer(tpool, rid, timeout=10) as rx:  # waits (futex) until the producer opens
        assert time.monotonic() - t0 >= 0.3
        out = np.empty((6, *SPEC.block_shape), dtype=SPEC.np_dtype)
        rx.read_all(out, timeout=10)
    assert np.array_equal(out.view(np.uint16), blocks_for_keys(keys_for(rid), SPEC).view(np.uint16))
    p.join(10)


def test_attach_by_keys(tpool) -> None:
    rid = "req-bykeys"
    p, stamps, evt = _start_producer(tpool, rid, delay=0.0)
    evt.set()
    keys = keys_for(rid)
    with TransferConsumer(tpool, keys=keys, timeout=10) as rx:
        out = np.empty((6, *SPEC.block_shape), dtype=SPEC.np_dtype)
        rx.read_all(out)
    assert np.array_equal(out.view(np.uint16), blocks_for_keys(keys, SPEC).view(np.uint16))
    p.join(10)


def test_timeouts_are_bounded(tpool) -> None:
    t0 = time.monotonic()
    with pytest.raises(errors.TransferGoneError):
        TransferConsumer(tpool, "nobody-sends-this", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    rid = "req-stall"
    p, stamps, evt = _start_producer(tpool, rid, delay=0.0, mode="stall")
    evt.set()
    rx = TransferConsumer(tpool, rid, timeout=10)
    rx.wait_layer(1, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(errors.TransferTimeoutError, match="layer 2"):
        rx.wait_layer(2, timeout=0.5)
    assert 0.45 < time.monotonic() - t0 < 5
    p.kill()
    p.join(10)


def test_producer_abort_wakes_the_consumer(tpool) -> None:
    rid = "req-abort"
    free0 = tpool.stats()["free"]
    p, stamps, evt = _start_producer(tpool, rid, delay=0.05, mode="abort")
    evt.set()
    rx = TransferConsumer(tpool, rid, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(errors.TransferAbortedError):
        rx.wait_layer(3, timeout=20)
    assert time.monotonic() - t0 < 5
    p.join(10)
    s = tpool.stats()
    assert s["free"] == free0 and s["writing"] == 0
    assert tpool.match(keys_for(rid)) == 0
    tpool.recover()  # the producer exited without closing its pool handle
    tpool.check()


def test_consumer_abort_stops_the_producer(tpool) -> None:
    rid = "req-cabort"
    free0 = tpool.stats()["free"]
    p, stamps, evt = _start_producer(tpool, rid, delay=0.1)
    evt.set()
    rx = TransferConsumer(tpool, rid, timeout=10)
    rx.wait_layer(0, timeout=10)
    rx.abort()
    p.join(10)
    assert p.exitcode == 0 and stamps[SPEC.num_layers] == -1.0  # the producer was told
    assert tpool.stats()["free"] == free0 and tpool.match(keys_for(rid)) == 0
    tpool.recover()
    tpool.check()


def test_producer_killed_mid_transfer(tpool) -> None:
    rid = "req-die"
    free0 = tpool.stats()["free"]
    p, stamps, evt = _start_producer(tpool, rid, delay=0.05, mode="die")
    evt.set()
    rx = TransferConsumer(tpool, rid, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(errors.TransferAbortedError):
        rx.wait_layer(3, timeout=20)  # the consumer notices the dead producer and recovers it
    assert time.monotonic() - t0 < 5
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    s = tpool.stats()
    assert s["free"] == free0 and s["writing"] == 0 and s["recovered_members"] == 1
    tpool.check()


def test_cached_blocks_are_not_sent_again(tpool) -> None:
    keys = keys_for("shared", 6)
    data = blocks_for_keys(keys, SPEC)
    tpool.publish(keys[:4], data[:4])
    with TransferProducer(tpool, "req-cached", keys) as tx:
        assert tx.cached_blocks == 4
        rx = TransferConsumer(tpool, "req-cached", timeout=5)
        for layer in range(SPEC.num_layers):
            tx.put_layer(layer, np.ascontiguousarray(data[:, layer]))
        out = np.empty((6, *SPEC.block_shape), dtype=SPEC.np_dtype)
        rx.read_all(out)
    assert np.array_equal(out.view(np.uint16), data.view(np.uint16))
    assert tpool.match(keys) == 6 and tpool.stats()["pinned"] == 0
    tpool.check()


def test_misuse(tpool) -> None:
    keys = keys_for("misuse", 3)
    data = blocks_for_keys(keys, SPEC)
    tx = TransferProducer(tpool, "req-misuse", keys)
    with pytest.raises(errors.PoolExistsError):
        TransferProducer(tpool, "req-misuse", keys)
    with pytest.raises(errors.InvalidHandleError, match="in order"):
        tx.put_layer(1, np.ascontiguousarray(data[:, 1]))
    # The failed put aborted the transfer: its blocks are back.
    assert tpool.stats()["writing"] == 0
    tx2 = TransferProducer(tpool, "req-misuse-2", keys)
    with pytest.raises(errors.ShapeMismatchError):
        tx2.put_layer(0, data[:, 0, 0])
    tx2.put_layer(0, np.ascontiguousarray(data[:, 0]))
    with pytest.raises(errors.InvalidHandleError, match="1 of 4 layers"):
        tx2.finish()
    assert tpool.stats()["writing"] == 0
    with pytest.raises(errors.PoolFullError, match="per transfer"):
        TransferProducer(tpool, "too-big", keys_for("big", tpool._core.transfer_max_blocks + 1))
    tpool.check()
