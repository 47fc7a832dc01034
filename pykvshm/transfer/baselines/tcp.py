"""Plain TCP sockets: the always-available baseline (no extra packages).

One connection per producer/consumer pair. The consumer listens (its metadata is its address);
the producer connects. Frames carry a fixed header and, for data, the raw layer bytes, which the
consumer's reader thread receives straight into the registered destination buffer
(``recv_into``, no intermediate copy). The consumer announces each registration (``REG``) so the
producer can check sizes, and either side may send ``ABORT``.

:class:`FramedLink` is also the control channel of the Mooncake baseline, as the vLLM Mooncake
connector keeps its own side channel next to the transfer engine.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from ..transport import (
    DEFAULT_TIMEOUT,
    BookConsumer,
    LayerBook,
    Producer,
    TransferTimeout,
    Transport,
    TransportError,
    layer_range,
)

__all__ = ["FramedLink", "TcpConsumer", "TcpProducer", "TcpTransport"]

# kind, id length, first layer, layer count, payload length (bytes that follow the id)
_HEADER = struct.Struct("<BHIIQ")
HELLO, REG, DATA, ABORT, NOTIFY = 1, 2, 3, 4, 5
_TICK = 0.2  # socket timeout: how often blocked calls re-check deadlines and close()

Handler = Callable[[int, str, int, int, int], None]


class FramedLink:
    """A socket carrying framed messages, with a reader thread dispatching to ``handler``.

    ``handler(kind, request_id, a, b, payload_len)`` runs on the reader thread and must consume
    exactly ``payload_len`` bytes with :meth:`recv_into` / :meth:`discard`. A lost connection
    calls ``on_lost(reason)`` once.
    """

    def __init__(self, sock: socket.socket, handler: Handler, on_lost: Callable[[str], None]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_TICK)
        self._sock = sock
        self._handler = handler
        self._on_lost = on_lost
        self._send_lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="pykvshm-tcp-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    # -- sending --------------------------------------------------------------------------
    def send(self, kind: int, request_id: str, a: int = 0, b: int = 0,
             payload: memoryview | bytes = b"", deadline: float | None = None) -> None:
        rid = request_id.encode()
        head = _HEADER.pack(kind, len(rid), a, b, len(payload)) + rid
        with self._send_lock:
            self._send_all(memoryview(head), deadline)
            if len(payload):
                self._send_all(memoryview(payload).cast("B"), deadline)

    def _send_all(self, view: memoryview, deadline: float | None) -> None:
        while len(view):
            if self._closed:
                raise TransportError("connection closed")
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TransferTimeout("timed out sending: the peer does not read") from None
                continue
            except OSError as e:
                raise TransportError(f"send failed: {e}") from e
            view = view[sent:]

    # -- receiving (reader thread only) -------------------------------------------------------
    def recv_into(self, view: memoryview) -> None:
        view = view.cast("B")
        while len(view):
            try:
                got = self._sock.recv_into(view)
            except TimeoutError:
                if self._closed:
                    raise ConnectionError("closed") from None
                continue
            if got == 0:
                raise ConnectionError("peer closed the connection")
            view = view[got:]

    def discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            k = min(n, len(scratch))
            self.recv_into(scratch[:k])
            n -= k

    def _read_loop(self) -> None:
        head = memoryview(bytearray(_HEADER.size))
        try:
            while not self._closed:
                try:
                    got = self._sock.recv_into(head, 1)  # idle wait on the first byte only
                except TimeoutError:
                    continue
                if got == 0:
                    raise ConnectionError("peer closed the connection")
                self.recv_into(head[1:])
                kind, id_len, a, b, length = _HEADER.unpack(head)
                rid = bytearray(id_len)
                self.recv_into(memoryview(rid))
                self._handler(kind, rid.decode(), a, b, length)
        except (ConnectionError, OSError) as e:
            self._on_lost("closed" if self._closed else str(e))

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(2 * _TICK + 1)
        self._sock.close()


def listen(host: str) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(1)
    return srv


def accept(srv: socket.socket, timeout: float) -> socket.socket:
    srv.settimeout(timeout)
    try:
        sock, _ = srv.accept()
    except TimeoutError:
        raise TransferTimeout(f"no peer connected within {timeout:g} s") from None
    return sock


def dial(address: bytes, timeout: float) -> socket.socket:
    host, _, port = address.decode().rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, int(port)), timeout=max(deadline - time.monotonic(), 0.01))
        except OSError as e:
            if time.monotonic() > deadline:
                raise TransferTimeout(f"could not connect to {address.decode()}: {e}") from e
            time.sleep(0.01)


class _TcpSide:
    """Shared TCP machinery: book keeping, the link, abort and close."""

    def __init__(self) -> None:
        self._book = LayerBook()
        self._link: FramedLink | None = None

    def _attach(self, sock: socket.socket) -> None:
        self._link = FramedLink(sock, self._on_frame, self._book.mark_broken)
        self._link.start()

    def _require_link(self) -> FramedLink:
        if self._link is None:
            raise TransportError("not connected: call connect() first")
        return self._link

    def _on_frame(self, kind: int, rid: str, a: int, b: int, length: int) -> None:
        link = self._require_link()
        if kind == ABORT:
            reason = bytearray(length)
            link.recv_into(memoryview(reason))
            self._book.mark_aborted(rid, reason.decode(errors="replace"), by_peer=True)
        else:
            self._on_other_frame(link, kind, rid, a, b, length)

    def _on_other_frame(self, link: FramedLink, kind: int, rid: str, a: int, b: int, length: int) -> None:
        link.discard(length)

    def abort(self, request_id: str, reason: str = "") -> None:
        if self._book.mark_aborted(request_id, reason, by_peer=False) and self._link is not None:
            try:
                self._link.send(ABORT, request_id, payload=reason.encode(),
                                deadline=time.monotonic() + 1.0)
            except TransportError:
                pass  # best effort: the peer is gone or not reading

    def release(self, request_id: str) -> None:
        self._book.remove(request_id)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        self._book.mark_broken("closed")


class TcpProducer(_TcpSide, Producer):
    """Producer over one TCP connection to the consumer's address."""

    def metadata(self) -> bytes:
        return b""  # the producer dials; the consumer needs nothing from it

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._attach(dial(peer_metadata, timeout))
        self._require_link().send(HELLO, "")

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        self._book.add(request_id, buf, num_layers)

    def _on_other_frame(self, link: FramedLink, kind: int, rid: str, a: int, b: int, length: int) -> None:
        if kind == REG:  # a = num_layers, payload = 8-byte total size
            size = bytearray(8)
            link.recv_into(memoryview(size))
            self._book.set_peer(rid, (a, int.from_bytes(size, "little")))
        else:
            link.discard(length)

    def prepare(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        buf, num_layers, _ = self._book.get(request_id)
        peer_layers, peer_size = self._book.wait_peer(request_id, timeout)
        if (peer_layers, peer_size) != (num_layers, buf.nbytes):
            raise ValueError(f"request {request_id!r}: consumer registered {peer_layers} layers / "
                             f"{peer_size} bytes, producer {num_layers} / {buf.nbytes}")

    def _send_layers(self, request_id: str, layer: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        buf, num_layers, layer_bytes = self._book.get(request_id)
        layers = layer_range(num_layers, layer)
        self.prepare(request_id, timeout)
        view = memoryview(buf).cast("B")[layers.start * layer_bytes: layers.stop * layer_bytes]
        self._book.check(request_id)
        self._require_link().send(DATA, request_id, layers.start, len(layers), view, deadline)

    def send_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, layer, timeout)

    def send(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, None, timeout)


class TcpConsumer(_TcpSide, BookConsumer):
    """Consumer: listens on ``host`` (loopback by default) and receives into registered buffers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self._server = listen(host)

    def metadata(self) -> bytes:
        host, port = self._server.getsockname()[:2]
        return f"{host}:{port}".encode()

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        sock = accept(self._server, timeout)
        self._server.close()
        self._attach(sock)

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        self._book.add(request_id, buf, num_layers)
        self._require_link().send(REG, request_id, num_layers, 0, buf.nbytes.to_bytes(8, "little"),
                                  deadline=time.monotonic() + DEFAULT_TIMEOUT)

    def _on_other_frame(self, link: FramedLink, kind: int, rid: str, a: int, b: int, length: int) -> None:
        if kind != DATA:
            link.discard(length)
            return
        try:
            buf, _, layer_bytes = self._book.get(rid)
        except (KeyError, TransportError):  # released or aborted meanwhile: drop the bytes
            link.discard(length)
            return
        start = a * layer_bytes
        if start + length > buf.nbytes or length != b * layer_bytes:
            link.discard(length)
            self._book.mark_aborted(rid, "producer sent a layer that does not fit", by_peer=True)
            return
        link.recv_into(memoryview(buf).cast("B")[start:start + length])
        self._book.mark_ready(rid, range(a, a + b))

    def close(self) -> None:
        self._server.close()
        super().close()


class TcpTransport(Transport):
    """Python sockets; ``consumer(host=...)`` picks the listening interface (loopback default)."""

    name = "tcp"
    producer_class = TcpProducer
    consumer_class = TcpConsumer
