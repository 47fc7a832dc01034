"""NIXL with its UCX backend: the stack vLLM's NixlConnector uses.

The producer WRITEs a layer (or the whole request) from its registered buffer into the
consumer's registered buffer and attaches a NIXL notification that the consumer polls for. On
RDMA hardware UCX carries the write over verbs; on one host without RDMA it uses CMA
(``process_vm_writev``) or TCP, whichever ``UCX_TLS`` allows.

Control messages are NIXL notifications too: the consumer announces a registration with the
partial agent metadata of the new region, and aborts travel the same way. With the agent's
progress thread off (the default here, and the faster setting on a 2-core host) nothing
progresses between calls: the producer polls while it sends, the consumer while it waits.

Options (both sides): ``ucx_net_devices`` and ``ucx_tls`` set ``UCX_NET_DEVICES`` / ``UCX_TLS``
for this process before UCX starts (``"lo"`` on a host without RDMA; ``"mlx5_0:1"`` or unset on
RDMA hardware); ``backend_params`` are UCX backend init parameters (e.g.
``{"ucx_error_handling_mode": "none"}``, required for ``UCX_TLS=sm``); ``progress_thread``.
"""

from __future__ import annotations

import os
import struct
import time
import uuid

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

__all__ = ["INSTALL", "NixlConsumer", "NixlProducer", "NixlTransport"]

INSTALL = ("pip install 'pykvshm[baselines]'  "
           "(or: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)")

# notification: kind (1 byte), id length (u16), id, body
_HELLO, _REG, _DATA, _ABORT = b"H", b"R", b"D", b"A"
_ID = struct.Struct("<H")
_REG_BODY = struct.Struct("<QQI")   # remote address, size, num_layers; then partial metadata
_DATA_BODY = struct.Struct("<II")   # first layer, layer count


def _import_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise BackendUnavailableError(f"the NIXL baseline needs the nixl package: {INSTALL}") from e
    return nixl_agent, nixl_agent_config


def _pack(kind: bytes, request_id: str, body: bytes = b"") -> bytes:
    rid = request_id.encode()
    return kind + _ID.pack(len(rid)) + rid + body


def _unpack(msg: bytes) -> tuple[bytes, str, bytes]:
    (n,) = _ID.unpack_from(msg, 1)
    return msg[:1], msg[3:3 + n].decode(), msg[3 + n:]


class _NixlSide:
    def __init__(self, role: str, *, ucx_net_devices: str | None = None, ucx_tls: str | None = None,
                 backend_params: dict[str, str] | None = None, progress_thread: bool = False) -> None:
        nixl_agent, nixl_agent_config = _import_nixl()
        if ucx_net_devices is not None:  # read by UCX when the backend starts: set before it
            os.environ["UCX_NET_DEVICES"] = ucx_net_devices
        if ucx_tls is not None:
            os.environ["UCX_TLS"] = ucx_tls
        self.name = f"pykvshm-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=[])
        self._agent = nixl_agent(self.name, config)
        self._agent.create_backend("UCX", dict(backend_params or {}))
        self._book = LayerBook()
        self._regs: dict[str, object] = {}   # request id -> registration descriptors
        self._peer: str | None = None

    # -- setup ----------------------------------------------------------------------------
    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Load the peer and exchange HELLO notifications until each side has heard the other.

        A notification from an agent not yet loaded is dropped, so a side stops only after it
        heard the peer (then both have loaded each other) and sends one last HELLO for the peer.
        """
        name = self._agent.add_remote_agent(peer_metadata)
        self._peer = name.decode() if isinstance(name, bytes) else name  # notifs are keyed by str
        deadline = time.monotonic() + timeout
        next_hello = 0.0
        self._heard = False
        while not self._heard:
            now = time.monotonic()
            if now > deadline:
                raise TransferTimeout(f"NIXL peer {self._peer} did not connect within {timeout:g} s")
            if now >= next_hello:
                self._agent.send_notif(self._peer, _pack(_HELLO, ""))
                next_hello = now + 0.02
            self._progress()
            time.sleep(0.001)
        self._agent.send_notif(self._peer, _pack(_HELLO, ""))

    def _require_peer(self) -> str:
        if self._peer is None:
            raise TransportError("not connected: call connect() first")
        return self._peer

    def _register_local(self, request_id: str, buf: np.ndarray, num_layers: int):
        layer_bytes = self._book.add(request_id, buf, num_layers)
        try:
            self._regs[request_id] = self._agent.register_memory(
                [(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
        except Exception:
            self._book.remove(request_id)
            raise
        return layer_bytes

    def _descs(self, addr: int, layer_bytes: int, num_layers: int) -> list[tuple[int, int, int]]:
        """One descriptor per layer, then one for the whole request (index ``num_layers``)."""
        descs = [(addr + i * layer_bytes, layer_bytes, 0) for i in range(num_layers)]
        return descs + [(addr, layer_bytes * num_layers, 0)]

    # -- progress -------------------------------------------------------------------------
    def _progress(self) -> None:
        for agent, msgs in self._agent.get_new_notifs().items():
            if (agent.decode() if isinstance(agent, bytes) else agent) != self._peer:
                continue
            for msg in msgs:
                kind, rid, body = _unpack(msg)
                if kind == _HELLO:
                    self._heard = True
                elif kind == _ABORT:
                    self._book.mark_aborted(rid, body.decode(errors="replace"), by_peer=True)
                else:
                    self._on_notif(kind, rid, body)

    def _on_notif(self, kind: bytes, rid: str, body: bytes) -> None:
        pass

    # -- teardown -------------------------------------------------------------------------
    def abort(self, request_id: str, reason: str = "") -> None:
        if self._book.mark_aborted(request_id, reason, by_peer=False) and self._peer is not None:
            try:
                self._agent.send_notif(self._peer, _pack(_ABORT, request_id, reason.encode()))
            except Exception:  # noqa: BLE001 - best effort, the peer may be gone
                pass

    def release(self, request_id: str) -> None:
        self._book.remove(request_id)
        reg = self._regs.pop(request_id, None)
        if reg is not None:
            self._agent.deregister_memory(reg)

    def close(self) -> None:
        for rid in list(self._regs):
            self.release(rid)
        if self._peer is not None:
            try:
                self._agent.remove_remote_agent(self._peer)
            except Exception:  # noqa: BLE001
                pass
            self._peer = None
        self._book.mark_broken("closed")


class NixlProducer(_NixlSide, Producer):
    """Writes layers into the consumer's buffer with NIXL WRITE + notification."""

    def __init__(self, **options) -> None:
        super().__init__("producer", **options)
        self._local: dict[str, object] = {}    # request id -> prepped local dlist
        self._remote: dict[str, object] = {}   # request id -> prepped remote dlist

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        layer_bytes = self._register_local(request_id, buf, num_layers)
        self._local[request_id] = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", self._descs(buf.ctypes.data, layer_bytes, num_layers), "DRAM")

    def _on_notif(self, kind: bytes, rid: str, body: bytes) -> None:
        if kind == _REG:
            addr, size, num_layers = _REG_BODY.unpack_from(body)
            self._agent.add_remote_agent(body[_REG_BODY.size:])  # loads the new region's keys
            self._book.set_peer(rid, (addr, size, num_layers))

    def prepare(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        peer = self._require_peer()
        buf, num_layers, layer_bytes = self._book.get(request_id)
        addr, size, peer_layers = self._book.wait_peer(request_id, timeout, poll=self._progress)
        if (size, peer_layers) != (buf.nbytes, num_layers):
            raise ValueError(f"request {request_id!r}: consumer registered {peer_layers} layers / "
                             f"{size} bytes, producer {num_layers} / {buf.nbytes}")
        if request_id not in self._remote:
            self._remote[request_id] = self._agent.prep_xfer_dlist(
                peer, self._descs(addr, layer_bytes, num_layers), "DRAM")

    def _send_layers(self, request_id: str, layer: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._progress()  # sees aborts and registrations that arrived meanwhile
        buf, num_layers, layer_bytes = self._book.get(request_id)
        layers = layer_range(num_layers, layer)
        self.prepare(request_id, timeout)
        index = [num_layers if layer is None else layer]
        notif = _pack(_DATA, request_id, _DATA_BODY.pack(layers.start, len(layers)))
        handle = self._agent.make_prepped_xfer("WRITE", self._local[request_id], index,
                                               self._remote[request_id], index, notif)
        try:
            state = self._agent.transfer(handle)
            spin_until = time.monotonic() + 5e-5
            while state == "PROC":
                now = time.monotonic()
                if now > deadline:
                    raise TransferTimeout(f"NIXL write of {request_id!r} did not finish in {timeout:g} s")
                if now > spin_until:
                    time.sleep(2e-5)  # do not starve a consumer that shares this core
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransportError(f"NIXL write of {request_id!r} failed (state {state})")
        finally:
            try:
                self._agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - an unfinished write cannot always be cancelled
                pass

    def send_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, layer, timeout)

    def send(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send_layers(request_id, None, timeout)

    def release(self, request_id: str) -> None:
        for table in (self._local, self._remote):
            handle = table.pop(request_id, None)
            if handle is not None:
                self._agent.release_dlist_handle(handle)
        super().release(request_id)


class NixlConsumer(_NixlSide, BookConsumer):
    """Registers destination buffers and polls NIXL notifications while waiting."""

    def __init__(self, **options) -> None:
        super().__init__("consumer", **options)

    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        peer = self._require_peer()
        self._register_local(request_id, buf, num_layers)
        partial = self._agent.get_partial_agent_metadata(self._regs[request_id], inc_conn_info=False)
        body = _REG_BODY.pack(buf.ctypes.data, buf.nbytes, num_layers) + partial
        self._agent.send_notif(peer, _pack(_REG, request_id, body))

    def _on_notif(self, kind: bytes, rid: str, body: bytes) -> None:
        if kind == _DATA:
            first, count = _DATA_BODY.unpack_from(body)
            self._book.mark_ready(rid, range(first, first + count))

    @property
    def _poll(self):  # type: ignore[override]
        return self._progress  # NIXL notifications are pumped by the waiting thread


class NixlTransport(Transport):
    """NIXL agents with the UCX backend, WRITE + notification per layer."""

    name = "nixl"
    producer_class = NixlProducer
    consumer_class = NixlConsumer
    requires = staticmethod(_import_nixl)
