"""Baseline transports across two real processes: bytes, layer order, timeouts, aborts.

Each test starts one producer and one consumer process that share a pipe for the out-of-band
metadata and for sequencing; every wait is bounded and the parent kills children that outlive
their budget, so a hang fails the test instead of stalling the run. Children leave through
``os._exit`` (NIXL 1.5.1 can segfault at interpreter shutdown after transfers).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

from pykvshm.transfer import BackendUnavailableError, TransferAborted, TransferTimeout, TransportError
from pykvshm.transfer.baselines import TRANSPORTS, get_transport

CHILD_BUDGET_S = 45.0

# name -> (package to importorskip, options for both sides on this host)
BACKENDS = {
    "tcp": (None, {}),
    "nixl": ("nixl", {"ucx_net_devices": "lo"}),
    "mooncake": ("mooncake.engine", {}),
}


def _data(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _skip_without(package: str) -> None:
    """Like ``pytest.importorskip`` but also for an ImportError that is not ModuleNotFoundError
    (``mooncake.engine`` without libibverbs.so.1), which importorskip turns into a warning."""
    try:
        importlib.import_module(package)
    except ImportError as e:
        pytest.skip(f"{package} not importable: {e}")


# -- child processes ------------------------------------------------------------------------------

def _child(role: str, name: str, options: dict, peer, results, script) -> None:
    report: dict = {"role": role}
    try:
        cls = get_transport(name)
        side = cls.producer(**options) if role == "producer" else cls.consumer(**options)
        peer.send(side.metadata())
        side.connect(peer.recv(), timeout=15)
        script(side, peer, report)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        report["error"] = traceback.format_exc()
    results.put(report)
    results.close()
    results.join_thread()  # flush before os._exit
    os._exit(0)


def _run_pair(name: str, producer_script, consumer_script) -> tuple[dict, dict]:
    package, options = BACKENDS[name]
    if package is not None:
        _skip_without(package)
    # fork: the children run this module's functions, which a spawned child could only import
    # with the repository root on sys.path (and then it would import the unbuilt sources).
    # The parent never imports nixl or mooncake, so nothing of theirs is forked.
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    a, b = ctx.Pipe()
    procs = [ctx.Process(target=_child, args=("producer", name, options, a, results, producer_script)),
             ctx.Process(target=_child, args=("consumer", name, options, b, results, consumer_script))]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + CHILD_BUDGET_S
    try:
        while len(reports) < 2 and time.monotonic() < deadline:
            try:
                report = results.get(timeout=0.5)
            except Exception:  # queue.Empty; a child that died silently is caught below
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            reports[report["role"]] = report
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        results.join_thread()
    for role in ("producer", "consumer"):
        assert role in reports, f"{name} {role} sent no report (hung or crashed)"
        assert "error" not in reports[role], f"{name} {role} failed:\n{reports[role]['error']}"
    return reports["producer"], reports["consumer"]


# -- scripts: data round trips --------------------------------------------------------------------

WHOLE = ("whole", 11, 4, 4 * 65536)          # request id, seed, layers, bytes
LAYERED = ("layered", 12, 8, 8 * 12_289)     # odd layer size
BIG = ("big", 13, 2, 16 << 20)


def _roundtrip_producer(side, peer, report) -> None:
    # Producer registers first for "whole", after the consumer for "layered": neither order may matter.
    bufs = {rid: _data(seed, n) for rid, seed, _, n in (WHOLE, LAYERED, BIG)}
    side.register(WHOLE[0], bufs[WHOLE[0]], WHOLE[2])
    side.send(WHOLE[0], timeout=10)
    assert peer.recv() == "consumer registered layered"
    side.register(LAYERED[0], bufs[LAYERED[0]], LAYERED[2])
    for layer in range(LAYERED[2]):
        side.send_layer(LAYERED[0], layer, timeout=10)
        time.sleep(0.002)  # a simulated per-layer compute step
    side.register(BIG[0], bufs[BIG[0]], BIG[2])
    side.send(BIG[0], timeout=20)
    assert peer.recv() == "done"
    for rid in bufs:
        side.release(rid)
    side.close()


def _roundtrip_consumer(side, peer, report) -> None:
    dst = {rid: np.zeros(n, np.uint8) for rid, _, _, n in (WHOLE, LAYERED, BIG)}
    side.register(WHOLE[0], dst[WHOLE[0]], WHOLE[2])
    side.wait(WHOLE[0], timeout=10)
    report["whole_equal"] = bool(np.array_equal(dst[WHOLE[0]], _data(WHOLE[1], WHOLE[3])))

    rid, seed, layers, n = LAYERED
    side.register(rid, dst[rid], layers)
    peer.send("consumer registered layered")
    expect = _data(seed, n).reshape(layers, -1)
    got = dst[rid].reshape(layers, -1)
    per_layer = []
    for layer in range(layers):
        side.wait_layer(rid, layer, timeout=10)
        per_layer.append(bool(np.array_equal(got[layer], expect[layer])))
    report["layers_equal"] = per_layer
    side.wait(rid, timeout=1)  # all layers arrived: returns at once

    side.register(BIG[0], dst[BIG[0]], BIG[2])
    side.wait(BIG[0], timeout=20)
    report["big_equal"] = bool(np.array_equal(dst[BIG[0]], _data(BIG[1], BIG[3])))
    peer.send("done")
    for rid in dst:
        side.release(rid)
    side.close()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_roundtrip_whole_and_layerwise(name: str) -> None:
    _, consumer = _run_pair(name, _roundtrip_producer, _roundtrip_consumer)
    assert consumer["whole_equal"]
    assert consumer["layers_equal"] == [True] * LAYERED[2]
    assert consumer["big_equal"]


# -- scripts: timeouts, aborts, a dead peer -------------------------------------------------------

def _elapsed(fn, *args, **kwargs) -> tuple[str, float, dict]:
    """Run ``fn``; return the exception class name (or "ok"), seconds taken and details."""
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
    except TransferAborted as e:
        return type(e).__name__, time.monotonic() - t0, {"reason": e.reason, "by_peer": e.by_peer}
    except TransportError as e:
        return type(e).__name__, time.monotonic() - t0, {}
    return "ok", time.monotonic() - t0, {}


def _failure_producer(side, peer, report) -> None:
    buf = _data(21, 4 * 4096)
    # 1. nothing is sent for "idle": the consumer times out (nothing to do here).
    # 2. the consumer never registers "orphan": send_layer times out.
    side.register("orphan", buf.copy(), 4)
    report["orphan"] = _elapsed(side.send_layer, "orphan", 0, timeout=0.5)
    # 3. producer abort after layer 0.
    side.register("p-abort", buf.copy(), 4)
    side.send_layer("p-abort", 0, timeout=10)
    assert peer.recv() == "got layer 0"
    side.abort("p-abort", "prefill failed")
    report["p-abort-local"] = _elapsed(side.send_layer, "p-abort", 1, timeout=1)
    # 4. consumer abort: the notice may take a moment to arrive, so retry within a bound.
    side.register("c-abort", buf.copy(), 4)
    peer.send("registered c-abort")
    assert peer.recv() == "aborted c-abort"
    deadline = time.monotonic() + 5
    outcome = ("ok", 0.0, {})
    while time.monotonic() < deadline:
        outcome = _elapsed(side.send_layer, "c-abort", 0, timeout=1)
        if outcome[0] != "ok":
            break
        time.sleep(0.05)
    report["c-abort"] = outcome
    # 5. the producer dies without closing: the consumer's wait must still end.
    assert peer.recv() == "registered dead"
    side.register("dead", buf.copy(), 4)
    side.send_layer("dead", 0, timeout=10)
    peer.send("producer exiting")  # and _child exits without close()


def _failure_consumer(side, peer, report) -> None:
    side.register("idle", np.zeros(4 * 4096, np.uint8), 4)
    report["idle"] = _elapsed(side.wait_layer, "idle", 0, timeout=0.3)

    dst = np.zeros(4 * 4096, np.uint8)
    side.register("p-abort", dst, 4)
    side.wait_layer("p-abort", 0, timeout=10)
    report["p-abort-layer0"] = bool(np.array_equal(dst[:4096], _data(21, 4 * 4096)[:4096]))
    peer.send("got layer 0")
    report["p-abort"] = _elapsed(side.wait_layer, "p-abort", 1, timeout=10)

    assert peer.recv() == "registered c-abort"
    side.register("c-abort", np.zeros(4 * 4096, np.uint8), 4)
    side.abort("c-abort", "decode cancelled")
    peer.send("aborted c-abort")
    report["c-abort-local"] = _elapsed(side.wait_layer, "c-abort", 0, timeout=1)
    report["c-abort-reregister"] = _elapsed(side.register, "c-abort", np.zeros(4 * 4096, np.uint8), 4)

    side.register("dead", np.zeros(4 * 4096, np.uint8), 4)
    peer.send("registered dead")
    side.wait_layer("dead", 0, timeout=10)
    assert peer.recv() == "producer exiting"
    report["dead"] = _elapsed(side.wait_layer, "dead", 1, timeout=3)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_timeouts_and_aborts_end_every_wait(name: str) -> None:
    producer, consumer = _run_pair(name, _failure_producer, _failure_consumer)

    kind, secs, _ = consumer["idle"]
    assert kind == "TransferTimeout" and 0.25 <= secs < 2.0
    kind, secs, _ = producer["orphan"]
    assert kind == "TransferTimeout" and 0.45 <= secs < 2.5

    assert consumer["p-abort-layer0"]
    kind, _, info = consumer["p-abort"]
    assert kind == "TransferAborted" and info == {"reason": "prefill failed", "by_peer": True}
    kind, secs, info = producer["p-abort-local"]
    assert kind == "TransferAborted" and not info["by_peer"] and secs < 0.5

    kind, _, info = producer["c-abort"]
    assert kind == "TransferAborted" and info == {"reason": "decode cancelled", "by_peer": True}
    kind, secs, info = consumer["c-abort-local"]
    assert kind == "TransferAborted" and not info["by_peer"] and secs < 0.5
    assert consumer["c-abort-reregister"][0] == "TransferAborted"

    # A dead producer: socket transports see the connection drop, NIXL only the timeout.
    kind, secs, _ = consumer["dead"]
    assert kind in ("TransportError", "TransferTimeout") and secs < 4.0


# -- in-process checks: lazy imports and misuse ---------------------------------------------------

def test_registry_and_lazy_imports() -> None:
    code = ("import sys, pykvshm.transfer.baselines; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nixl', 'mooncake')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, env=env)
    assert out.stdout.strip() == "[]"
    assert set(TRANSPORTS) == {"tcp", "nixl", "mooncake"}
    with pytest.raises(KeyError, match="unknown transport"):
        get_transport("carrier-pigeon")
    assert issubclass(BackendUnavailableError, ImportError)
    assert issubclass(TransferTimeout, TimeoutError) and issubclass(TransferTimeout, TransportError)


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("nixl", "nixl._api", "mooncake", "mooncake.engine"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    for name in ("nixl", "mooncake"):
        cls = get_transport(name)
        assert not cls.available()
        with pytest.raises(BackendUnavailableError, match=r"pip install"):
            cls.producer()
        with pytest.raises(ImportError, match=r"pykvshm\[baselines\]"):
            cls.consumer()


def test_buffer_checks_tcp() -> None:
    cls = get_transport("tcp")
    with cls.producer() as producer:
        with pytest.raises(ValueError, match="equal layers"):
            producer.register("r", np.zeros(10, np.uint8), 3)
        with pytest.raises(ValueError, match="C-contiguous"):
            producer.register("r", np.zeros((4, 4), np.uint8).T, 2)
        producer.register("r", np.zeros(12, np.uint8), 3)
        with pytest.raises(ValueError, match="already registered"):
            producer.register("r", np.zeros(12, np.uint8), 3)
        with pytest.raises(IndexError):
            producer.send_layer("r", 3, timeout=0.1)
