"""Mooncake Transfer Engine (TCP here, RDMA on hardware that has it), P2PHANDSHAKE metadata.

Each side runs a ``TransferEngine`` initialised with ``P2PHANDSHAKE`` (no etcd / metadata
server: peers exchange segment descriptors directly over the engine's RPC port). Like vLLM's
Mooncake connector, a side channel (one TCP connection, :class:`~.tcp.FramedLink`) carries what
the engine does not: the consumer's destination address per request, the "layer ready" notice
and aborts. The producer submits one write per layer (``transfer_submit_write``) and polls it,
so every wait honours its timeout.

Options: ``host`` (address the engine and side channel bind to, loopback by default);
``protocol`` (``"tcp"``; ``"rdma"`` on RDMA hardware); ``device_name`` (``""`` = auto, e.g.
``"mlx5_0"``).
"""

from __future__ import annotations

import json
import time

import numpy as np

from ..transport import (
    DEFAULT_TIMEOUT,
    BackendUnavailableError,
    BookConsumer,
    LayerBook,
    Producer,
    TransferTimeout,
    Transport,
    TransportError,
    layer_range,
)
from .tcp import ABORT, DATA, HELLO, REG, FramedLink, accept, dial, listen

__all__ = ["INSTALL", "MooncakeConsumer", "MooncakeProducer", "MooncakeTransport"]

INSTALL = ("pip install 'pykvshm[baselines]'  (or: pip install mooncake-transfer-engine-non-cuda; "
           "its engine also needs the system library libibverbs.so.1: apt-get install libibverbs1)")


def _import_engine():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise BackendUnavailableError(
            f"the Mooncake baseline needs the Mooncake transfer engine ({e}): {INSTALL}") from e
    return TransferEngine


class _MooncakeSide:
    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "") -> None:
        TransferEngine = _import_engine()
        self._engine = TransferEngine()
        ret = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if ret != 0:
            raise TransportError(f"Mooncake TransferEngine.initialize failed ({ret}) on {host}/{protocol}")
        self._host = host
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._book = LayerBook()
        self._link: FramedLink | None = None
        self._registered: dict[str, int] = {}  # request id -> registered address

    def _attach(self, sock) -> None:
        self._link = FramedLink(sock, self._on_frame, self._book.mark_broken)
        self._link.start()

    def _require_link(self) -> FramedLink:
        if self._link is None:
            raise TransportError("not connected: call connect() first")
        return self._link

    def _on_frame(self, kind: int, rid: str, a: int, b: int, length: int) -> None:
        link = self._require_link()
        payload = bytearray(length)
        link.recv_into(memoryview(payload))
        if kind == ABORT:
            self._book.mark_aborted(rid, payload.decode(errors="replace"), by_peer=True)
        else:
            self._on_message(kind, rid, a, b, bytes(payload))

    def _on_message(self, kind: int, rid: str, a: int, b: int, payload: bytes) -> None:
        pass

    def _register_local(self, request_id: str, buf: np.ndarray, num_layers: int) -> int:
        layer_bytes = self._book.add(request_id, buf, num_layers)
        ret = self._engine.register_memory(buf.ctypes.data, buf.nbytes)
        if ret != 0:
            self._book.remove(request_id)
            raise TransportError(f"Mooncake register_memory failed ({ret})")
        self._registered[request_id] = buf.ctypes.data
        return layer_bytes

    def abort(self, request_id: str, reason: str = "") -> None:
        if self._book.mark_aborted(request_id, reason, by_peer=False) and self._link is not None:
            try:
                self._link.send(ABORT, request_id, payload=reason.encode(),
                                deadline=time.monotonic() + 1.0)
            except TransportError:
                pass

    def release(self, request_id: str) -> None:
        self._book.remove(request_id)
        addr = self._registered.pop(request_id, None)
        if addr is not None:
            self._engine.unregister_memory(addr)

    def close(self) -> None:
        for rid in list(self._registered):
            self.release(rid)
        if self._link is not None:
            self._link.close()
        self._book.mark_broken("closed")


class MooncakeProducer(_MooncakeSide, Producer):
    """Writes each layer into the consumer's registered buffer with the transfer engine."""

    def metadata(self) -> bytes:
        return json.dumps({"session": self.session}).encode()

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        peer = json.loads(peer_metadata)
        self._peer_session = peer["session"]
        self._attach(dial(peer["control"].encode(), timeout))
        self._require_link().send(HELLO, "")

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        self._register_local(request_id, buf, num_layers)

    def _on_message(self, kind: int, rid: str, a: int, b: int, payload: bytes) -> None:
        if kind == REG:  # a = num_layers, payload = address and size
            peer = json.loads(payload)
            self._book.set_peer(rid, (peer["addr"], peer["size"], a))

    def prepare(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the consumer's registration; return its destination address."""
        buf, num_layers, _ = self._book.get(request_id)
        addr, size, peer_layers = self._book.wait_peer(request_id, timeout)
        if (size, peer_layers) != (buf.nbytes, num_layers):
            raise ValueError(f"request {request_id!r}: consumer registered {peer_layers} layers / "
                             f"{size} bytes, producer {num_layers} / {buf.nbytes}")
        return addr

    def _send_layers(self, request_id: str, layer: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        link = self._require_link()
        buf, num_layers, layer_bytes = self._book.get(request_id)
        layers = layer_range(num_layers, layer)
        addr = self.prepare(request_id, timeout)
        offset = layers.start * layer_bytes
        length = len(layers) * layer_bytes
        self._book.check(request_id)
        batch = self._engine.transfer_submit_write(
            self._peer_session, buf.ctypes.data + offset, addr + offset, length)
        if batch < 0:
            raise TransportError(f"Mooncake transfer_submit_write failed ({batch})")
        spin_until = time.monotonic() + 5e-5
        while True:
            status = self._engine.transfer_check_status(batch)
            if status == 1:
                break
            if status < 0:
                raise TransportError(f"Mooncake write of {request_id!r} failed (status {status})")
            if time.monotonic() > deadline:
                raise TransferTimeout(f"Mooncake write of {request_id!r} did not finish in {timeout:g} s")
            if time.monotonic() > spin_until:
                time.sleep(2e-5)  # do not starve a consumer that shares this core
        link.send(DATA, request_id, layers.start, len(layers), deadline=deadline)

    def send_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, layer, timeout)

    def send(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, None, timeout)


class MooncakeConsumer(_MooncakeSide, BookConsumer):
    """Registers destination buffers with its engine; notices arrive on the side channel."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._server = listen(self._host)

    def metadata(self) -> bytes:
        host, port = self._server.getsockname()[:2]
        return json.dumps({"session": self.session, "control": f"{host}:{port}"}).encode()

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        sock = accept(self._server, timeout)
        self._server.close()
        self._attach(sock)

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        link = self._require_link()
        self._register_local(request_id, buf, num_layers)
        body = json.dumps({"addr": buf.ctypes.data, "size": buf.nbytes}).encode()
        link.send(REG, request_id, num_layers, 0, body, deadline=time.monotonic() + DEFAULT_TIMEOUT)

    def _on_message(self, kind: int, rid: str, a: int, b: int, payload: bytes) -> None:
        if kind == DATA:
            self._book.mark_ready(rid, range(a, a + b))

    def close(self) -> None:
        self._server.close()
        super().close()


class MooncakeTransport(Transport):
    """Mooncake Transfer Engine, P2PHANDSHAKE metadata, one write per layer."""

    name = "mooncake"
    producer_class = MooncakeProducer
    consumer_class = MooncakeConsumer
    requires = staticmethod(_import_engine)
