"""The data path of the copy engine: every way KV goes in and out of the pool is bit-exact
(synchronous, asynchronous, in place, views, span gathers and scatters, both kernels, several
threads), across processes, and every misuse is a clear error."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

import pykvshm
from pykvshm import errors
from pykvshm.testing import blocks_for_keys
from pykvshm.transfer import TransferConsumer, TransferProducer

CTX = mp.get_context("fork")
SPEC = pykvshm.KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, block_tokens=8, dtype="float16")  # 4 KiB blocks
LAYER_BYTES = SPEC.block_bytes // SPEC.num_layers


def keys_for(rid: str, n: int = 6) -> list[bytes]:
    return pykvshm.block_keys(np.arange(n * SPEC.block_tokens), SPEC.block_tokens, salt=rid.encode())


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact (random fp16 bytes include NaNs, which array_equal calls different)."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(params=[("coherent", "auto", 1), ("coherent", "stream", 2), ("noncoherent", "memcpy", 1)],
                ids=["coherent-auto-1t", "coherent-stream-2t", "noncoherent-memcpy-1t"])
def cpool(pool_name: str, request: pytest.FixtureRequest):
    coherence, kernel, threads = request.param
    p = pykvshm.Pool.create(pool_name, spec=SPEC, capacity="8MiB", coherence=coherence, copy_kernel=kernel,
                            copy_threads=threads)
    yield p
    p.close()


def test_engine_options(cpool) -> None:
    info = cpool.copy_engine_info()
    assert info["kernel"] in ("auto", "stream", "memcpy") and info["threads"] in (1, 2)
    with pytest.raises(ValueError, match="copy_kernel"):
        pykvshm.Pool.open(cpool.name, copy_kernel="fast")
    with pytest.raises(ValueError, match="copy_threads"):
        pykvshm.Pool.open(cpool.name, copy_threads=0)


def test_publish_copy_to_and_spans_bit_exact(cpool) -> None:
    keys = keys_for("spans", 5)
    data = blocks_for_keys(keys, SPEC)
    assert cpool.publish(keys, data) == 5
    with cpool.acquire(keys) as lease:
        out = np.zeros_like(data)
        lease.copy_to(out)
        assert same(out, data)
        # Gather one layer of each block into a layer-major buffer (what an engine's loader does),
        # synchronously and queued on the engine.
        for wait in (True, False):
            dst = np.zeros((SPEC.num_layers, 5, *SPEC.layer_shape), dtype=SPEC.np_dtype)
            futs = []
            for layer in range(SPEC.num_layers):
                f = lease.read_spans(dst, np.arange(5), layer * LAYER_BYTES,
                                     (layer * 5 + np.arange(5)) * LAYER_BYTES, LAYER_BYTES, wait=wait)
                futs.append(f)
            for f in futs:
                if f is not None:
                    f.wait()
                    assert f.done()
            assert same(dst, np.ascontiguousarray(data.transpose(1, 0, 2, 3, 4, 5)))
        # A torch destination of another shape: bytes are bytes.
        torch = pytest.importorskip("torch")
        t = torch.zeros(5 * SPEC.block_bytes, dtype=torch.uint8)
        lease.read_spans(t, [4, 3, 2, 1, 0], 0, np.arange(5) * SPEC.block_bytes, SPEC.block_bytes)
        assert t.numpy().tobytes() == data[::-1].tobytes()


def test_writer_write_spans_and_write_layer(cpool) -> None:
    keys = keys_for("writer", 4)
    data = blocks_for_keys(keys, SPEC)
    with cpool.writer(keys) as w:
        # layers 0..1 as one scatter from a block-major buffer, 2..3 through write_layer
        flat = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        w.write_spans(flat, np.arange(4), 0, np.arange(4) * SPEC.block_bytes, 2 * LAYER_BYTES)
        for layer in (2, 3):
            w.write_layer(layer, np.ascontiguousarray(data[:, layer]))
    with cpool.acquire(keys) as lease:
        out = np.zeros_like(data)
        lease.copy_to(out)
    assert same(out, data)


def test_span_misuse(cpool) -> None:
    keys = keys_for("misuse", 2)
    cpool.publish(keys, blocks_for_keys(keys, SPEC))
    with cpool.acquire(keys) as lease:
        dst = np.zeros(2 * SPEC.block_bytes, np.uint8)
        with pytest.raises(errors.ShapeMismatchError, match="past the end of the"):
            lease.read_spans(dst, [0, 1], 0, [0, SPEC.block_bytes + 1], SPEC.block_bytes)
        with pytest.raises(errors.ShapeMismatchError, match="past the end of a"):
            lease.read_spans(dst, [0], SPEC.block_bytes - 8, 0, 16)
        with pytest.raises(errors.ShapeMismatchError, match="block numbers"):
            lease.read_spans(dst, [2], 0, 0, 16)
        with pytest.raises(errors.ShapeMismatchError, match="negative"):
            lease.read_spans(dst, [0], -1, 0, 16)
        ro = np.zeros(SPEC.block_bytes, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            lease.read_spans(ro, [0], 0, 0, 16)
        with pytest.raises(errors.ShapeMismatchError, match="C-contiguous"):
            lease.read_spans(np.zeros((64, 128), np.uint8)[:, ::2], [0], 0, 0, 16)
        with pytest.raises(TypeError):
            lease.read_spans([0] * 100, [0], 0, 0, 16)
        assert not dst.any()  # nothing was copied by a refused call
    with pytest.raises(errors.PoolError, match="released"):
        lease.read_spans(dst, [0], 0, 0, 16)


def test_release_waits_for_queued_copies(cpool) -> None:
    keys = keys_for("queued", 6)
    data = blocks_for_keys(keys, SPEC)
    cpool.publish(keys, data)
    dst = np.zeros(data.nbytes, np.uint8)
    lease = cpool.acquire(keys)
    for _ in range(20):
        lease.read_spans(dst, np.arange(6), 0, np.arange(6) * SPEC.block_bytes, SPEC.block_bytes, wait=False)
    lease.release()  # waits for the 20 queued gathers before dropping the pins
    assert dst.tobytes() == data.tobytes()
    assert cpool.stats()["pinned"] == 0


def test_producer_async_in_place_and_consumer_views(cpool) -> None:
    keys = keys_for("inplace", 6)
    data = blocks_for_keys(keys, SPEC)
    cpool.publish(keys[:2], data[:2])  # two blocks cached: no slot for them on the producer
    tx = TransferProducer(cpool, "req-inplace", keys)
    rx = TransferConsumer(cpool, "req-inplace", keys=keys, timeout=5)
    assert tx.cached_blocks == 2
    kept = []
    for layer in range(SPEC.num_layers):
        if layer % 2:
            views = tx.layer_views(layer)
            assert views[0] is None and views[1] is None and all(v is not None for v in views[2:])
            for j, v in enumerate(views):
                if v is not None:
                    v[...] = data[j, layer]
            kept.append(views[2])
            del views, v
            tx.put_layer(layer)  # nothing to copy: marked ready
        else:
            src = np.ascontiguousarray(data[:, layer])
            tx.put_layer(layer, src)  # queued on the copy engine
    tx.wait()
    for layer in range(SPEC.num_layers):
        out = np.zeros((6, *SPEC.layer_shape), SPEC.np_dtype)
        rx.read_layer(layer, out, timeout=5)
        assert same(out, np.ascontiguousarray(data[:, layer]))
        views = rx.layer_views(layer)
        assert len(views) == 6 and all(same(v, data[j, layer]) for j, v in enumerate(views))
        with pytest.raises(ValueError, match="read-only"):
            views[0][...] = 0
        del views
        rx.validate(layer)
    tx.finish()
    # Views handed to the producer are read-only once the transfer is finished.
    with pytest.raises(ValueError, match="read-only"):
        kept[0][...] = 0
    del kept
    with rx.acquire() as lease:
        out = np.zeros_like(data)
        lease.copy_to(out)
    assert same(out, data)
    cpool.check()


def test_producer_misuse(cpool) -> None:
    keys = keys_for("pmisuse", 3)
    data = blocks_for_keys(keys, SPEC)
    tx = TransferProducer(cpool, "req-pmisuse", keys)
    with pytest.raises(errors.ShapeMismatchError, match="out of range"):
        tx.layer_views(SPEC.num_layers)
    rx = TransferConsumer(cpool, "req-pmisuse", timeout=5)
    with pytest.raises(errors.ShapeMismatchError, match="not ready"):
        rx.layer_views(0)
    with pytest.raises(errors.ShapeMismatchError, match="not finished"):
        rx.acquire()
    tx.put_layer(0, np.ascontiguousarray(data[:, 0]))
    rx.abort()  # the consumer gives up: the producer's next call (or finish) raises and frees
    with pytest.raises(errors.TransferAbortedError):
        for layer in range(1, SPEC.num_layers):
            tx.put_layer(layer, np.ascontiguousarray(data[:, layer]))
        tx.finish()
    with pytest.raises(errors.InvalidHandleError, match="finished or aborted"):
        tx.layer_views(0)
    assert cpool.stats()["writing"] == 0
    cpool.check()


def test_validate_detects_reuse(cpool) -> None:
    """In-place reads are seqlock-validated: a block recycled under a reader is reported."""
    keys = keys_for("reuse", 2)
    data = blocks_for_keys(keys, SPEC)
    tx = TransferProducer(cpool, "req-reuse", keys)
    rx = TransferConsumer(cpool, "req-reuse", timeout=5)
    tx.put_layer(0, np.ascontiguousarray(data[:, 0]), wait=True)
    views = rx.layer_views(0)
    tx.abort()  # the producer gives up; its blocks are freed and reallocated
    cpool.alloc(cpool.stats()["free"])
    del views
    with pytest.raises((errors.TransferGoneError, errors.TransferAbortedError)):
        rx.validate(0)


def _in_place_producer(name: str, rid: str, n: int) -> None:
    pool = pykvshm.Pool.open(name)
    keys = keys_for(rid, n)
    data = blocks_for_keys(keys, SPEC)
    with TransferProducer(pool, rid, keys) as tx:
        for layer in range(SPEC.num_layers):
            views = tx.layer_views(layer)
            for j, v in enumerate(views):
                v[...] = data[j, layer]
            del views, v
            tx.put_layer(layer)
    pool.close()
    os._exit(0)


def test_across_processes_both_in_place(cpool) -> None:
    """A producer process computes into the pool, a consumer reads the views: zero copies."""
    rx_keys = keys_for("req-xproc", 5)
    p = CTX.Process(target=_in_place_producer, args=(cpool.name, "req-xproc", 5))
    p.start()
    rx = TransferConsumer(cpool, "req-xproc", keys=rx_keys, timeout=10)
    data = blocks_for_keys(rx_keys, SPEC)
    for layer in range(SPEC.num_layers):
        rx.wait_layer(layer, timeout=10)
        views = rx.layer_views(layer)
        got = [v.copy() for v in views]
        del views
        rx.validate(layer)
        assert all(same(g, data[j, layer]) for j, g in enumerate(got))
    p.join(10)
    assert p.exitcode == 0
    cpool.check()


def _close_inherited(pool) -> None:
    # The parent's handle, inherited through fork: closing it must neither touch the pool nor wait
    # for the parent's copy-engine thread (it does not exist here).
    pool._core.close()
    os._exit(0)


def test_closing_an_inherited_handle_after_fork_does_not_hang(cpool) -> None:
    keys = keys_for("fork", 2)
    cpool.publish(keys, blocks_for_keys(keys, SPEC))
    with cpool.acquire(keys) as lease:  # start the handle's copy-engine thread
        dst = np.zeros(2 * SPEC.block_bytes, np.uint8)
        lease.read_spans(dst, [0, 1], 0, [0, SPEC.block_bytes], SPEC.block_bytes, wait=False).wait()
    p = CTX.Process(target=_close_inherited, args=(cpool,))
    p.start()
    p.join(20)
    assert p.exitcode == 0, "the child hung or crashed closing an inherited handle"
    assert cpool.match(keys) == 2  # the parent's handle is untouched
    cpool.check()
