"""The ZeroMQ service (``biref serve``): PULL ingest -> :class:`AcquisitionService` -> PUB results.

Threads: the ingest thread owns the PULL socket (and its monitor); the service's worker thread owns
the engine and the PUB socket; an optional writer thread saves volumes. Ingest reads the header
frame, validates it, takes a buffer of exactly the announced size from the service's bounded pool
and receives the payload straight into it (``recv_into``): nothing is allocated for a message
before its header passed. When the pool is spent, ingest stops reading; ZeroMQ's high-water marks
then fill and the microscope's ``send`` blocks: back-pressure end to end, no drops.
"""
from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
import urllib.parse
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..files import remove_stale_parts, write_volume
from . import DEFAULT_INGEST, DEFAULT_RESULTS, protocol
from .protocol import ProtocolError
from .security import CurveServer, configure_server, start_authenticator
from .service import AcquisitionService, ServiceClosed, ServiceConfig, StreamError, StreamResult


log = logging.getLogger(__name__)

_MONITORED = {
    zmq.EVENT_ACCEPTED: "connections",
    zmq.EVENT_DISCONNECTED: "disconnects",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failures",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failures",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failures",
}


def _endpoint(address: str) -> str:
    # "tcp://host:0" asks for any free port, as in most socket APIs; ZeroMQ spells it "*"
    return re.sub(r":0$", ":*", address)


def safe_filename(acquisition_id: str) -> str:
    """The file name (without ``.h5``) of an acquisition id: percent-encoding of every character
    outside ``A-Za-z0-9_-`` and of a leading dot, so that distinct ids never share a file
    (``run/1``, ``run_1``, ``run:1``) and ``urllib.parse.unquote`` gives the id back. Raises
    ValueError when the name would exceed 240 bytes (an id of many non-ASCII characters)."""
    name = urllib.parse.quote(acquisition_id, safe="-_.")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 240:
        raise ValueError(f"acquisition id {acquisition_id[:40]!r}... needs a file name longer than 240 bytes")
    return name


class StreamingServer:
    """Binds the ingest (PULL) and results (PUB) sockets and runs the service until ``close``.

    ``ingest``/``results``: ZeroMQ endpoints to bind; ``tcp://127.0.0.1:0`` picks a free port
    (read the bound one from ``ingest_address``/``results_address``). ``save_dir``: write each volume
    to ``<save_dir>/<acquisition_id>.h5`` (atomically). ``on_volume``/``on_error``: extra in-process
    callbacks (worker thread).
    """

    def __init__(self, reconstructor, ingest: str = DEFAULT_INGEST, results: str = DEFAULT_RESULTS,
                 config: ServiceConfig = ServiceConfig(), *, save_dir=None, curve: CurveServer | None = None,
                 ingest_hwm: int = 64, results_hwm: int = 32, on_volume=None, on_error=None,
                 context: zmq.Context | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self._user_on_volume, self._user_on_error = on_volume, on_error
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self._own_context = context is None
        self.context = context or zmq.Context()
        self._authenticator = None
        self._seq = collections.Counter()
        self._net = collections.Counter()
        self._stopping = threading.Event()
        self._closed = False
        self._ingest_thread = None
        self._writer = None
        self.service = None
        try:
            if curve is not None:
                self._authenticator = start_authenticator(self.context, curve)
            self._pull = self._socket(zmq.PULL, curve)
            self._pull.rcvhwm = ingest_hwm
            # libzmq drops a peer that sends a larger frame, before any of it reaches us
            self._pull.maxmsgsize = max(self.limits.max_frame_bytes, self.limits.max_header_bytes)
            self.ingest_address = self._bind(self._pull, ingest)
            self._monitor = self._pull.get_monitor_socket(sum(_MONITORED))
            self._pub = self._socket(zmq.PUB, curve)
            self._pub.sndhwm = results_hwm
            self.results_address = self._bind(self._pub, results)
            if self.save_dir is not None:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                for part in remove_stale_parts(self.save_dir):
                    log.warning("removed %s, left by a writer that was killed", part)
                self._save_queue: queue.Queue = queue.Queue(maxsize=4)
                self._writer = threading.Thread(target=self._write_volumes, name="biref-volume-writer", daemon=True)
                self._writer.start()
            self.service = AcquisitionService(reconstructor, config, on_volume=self._on_volume,
                                              on_error=self._on_error, on_status=self._on_status,
                                              on_preview=self._on_preview, status_extra=self._status_extra)
        except BaseException:
            self._close_sockets()
            raise
        self._ingest_thread = threading.Thread(target=self._ingest, name="biref-ingest", daemon=True)
        self._ingest_thread.start()

    def _socket(self, kind, curve):
        socket = self.context.socket(kind)
        socket.linger = 0
        try:
            if curve is not None:
                configure_server(socket, curve)
        except BaseException:
            socket.close(linger=0)   # an open socket would block the context's termination for ever
            raise
        return socket

    @staticmethod
    def _bind(socket, address: str) -> str:
        try:
            socket.bind(_endpoint(address))
        except zmq.ZMQError as error:
            raise OSError(f"cannot bind {address}: {error}") from None
        return socket.last_endpoint.decode()

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Stop ingest, let the worker finish what was received, then close the sockets."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._ingest_thread is not None:
            self._ingest_thread.join(timeout_s)
        if self.service is not None:
            self.service.close(timeout_s)
        if self._writer is not None:
            self._save_queue.put(None)
            self._writer.join(timeout_s)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for name in ("_monitor", "_pull", "_pub"):
            socket = getattr(self, name, None)
            if socket is not None:
                if name == "_pull":
                    try:
                        socket.disable_monitor()
                    except zmq.ZMQError:
                        pass
                socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "StreamingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self) -> dict:
        return self.service.status()

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Block until ``stop`` is set (or KeyboardInterrupt), then close."""
        stop = stop or threading.Event()
        try:
            while not stop.wait(0.5):
                if not self._ingest_thread.is_alive() or not self.service.alive:
                    raise RuntimeError("a service thread died; see the traceback above")
        finally:
            self.close()

    # -- ingest thread ------------------------------------------------------------------------------
    def _ingest(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(100))
                if self._monitor in ready:
                    self._monitor_events()
                if self._pull in ready:
                    # a burst, so that a busy stream is not slowed down by a poll per message
                    for _ in range(256):
                        if self._stopping.is_set() or not self._receive(zmq.NOBLOCK):
                            break
        except ServiceClosed:
            pass
        except BaseException:
            log.exception("the ingest thread stopped")
            raise

    def _monitor_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            name = _MONITORED.get(event["event"])
            if name:
                self._net[name] += 1

    def _drain(self) -> int:
        """Discard the rest of a multipart message; returns the number of frames discarded."""
        n = 0
        while self._pull.rcvmore:
            self._pull.recv(copy=False)
            n += 1
        return n

    def _take(self, nbytes: int):
        waited = False
        while True:
            buffer = self.service.pool.take(nbytes, timeout_s=0.1)
            if buffer is not None:
                return buffer
            if not waited:
                self.service.count("ingest_waits")   # back-pressure engaged
                waited = True
            if self._stopping.is_set():
                raise ServiceClosed("ingest stopped")

    def _receive(self, flags: int) -> bool:
        try:
            header_frame = self._pull.recv(flags, copy=False)
        except zmq.Again:
            return False
        try:
            self._receive_message(header_frame)
        except ServiceClosed:
            raise
        except Exception as error:
            # whatever a message does to the decoder, it costs that message, never the ingest thread
            log.exception("internal error while receiving a message")
            self._drain()
            self.service.report(StreamError("internal_error", f"{type(error).__name__} while receiving a message"),
                                cancel=self._stopping)
        return True

    def _receive_message(self, header_frame) -> None:
        received_s = time.perf_counter()
        payloads = _SocketPayloads(self._pull)
        try:
            message, buffers = protocol.receive_message(header_frame.buffer, payloads, self._take,
                                                        self.service.pool.give, self.limits, received_s)
        except ProtocolError as error:
            self.service.count("bytes_received", len(header_frame) + payloads.nbytes)
            self.service.report(StreamError.from_protocol_error(error), cancel=self._stopping)
            return
        self.service.count("bytes_received", len(header_frame) + payloads.nbytes)
        self.service.submit(message, buffers, cancel=self._stopping)

    # -- publisher-thread callbacks: publish -----------------------------------------------------------
    def _publish(self, topic: str, header: dict, volume=None) -> None:
        header = {"seq": self._seq[topic], "time_unix_s": time.time(), **header}
        self._seq[topic] += 1
        # PUB never blocks: a subscriber beyond its high-water mark misses messages and sees the gap in "seq"
        self._pub.send_multipart(protocol.encode_result(topic, header, volume), copy=False)

    def _on_volume(self, result: StreamResult) -> None:
        self._publish("volume", result.header(), result.volume)
        if self.save_dir is not None:
            self._save_queue.put((result.acquisition_id, result.volume))
        if self._user_on_volume is not None:
            self._user_on_volume(result)

    def _on_preview(self, result: StreamResult) -> None:
        self._publish("preview", result.header(), result.volume)

    def _on_error(self, error: StreamError) -> None:
        self._publish("error", error.header())
        if self._user_on_error is not None:
            self._user_on_error(error)

    def _on_status(self, status: dict) -> None:
        self._publish("status", status)

    def _status_extra(self) -> dict:
        extra = {name: self._net[name] for name in ("connections", "disconnects", "handshake_failures")}
        if self.save_dir is not None:
            extra.update(volumes_saved=self._net["volumes_saved"], save_errors=self._net["save_errors"])
        return extra

    def _write_volumes(self) -> None:
        while True:
            item = self._save_queue.get()
            if item is None:
                return
            acquisition_id, volume = item
            try:
                path = self.save_dir / f"{safe_filename(acquisition_id)}.h5"
                if path.exists():   # an id seen before (after it left the remembered ids): keep the first
                    raise FileExistsError(f"{path} exists; the new volume is not written over it")
                write_volume(path, volume)
                self._net["volumes_saved"] += 1
            except Exception as error:
                self._net["save_errors"] += 1
                log.error("could not save the volume of %r: %s", acquisition_id, error)


class _SocketPayloads:
    """The payload frames of the message being received on a PULL socket, read straight into the
    buffers the decoder takes (no intermediate copy): :class:`protocol.PayloadFrames`' methods."""

    def __init__(self, socket) -> None:
        self._socket = socket
        self.nbytes = 0

    def more(self) -> bool:
        return bool(self._socket.rcvmore)

    def read_into(self, buffer) -> int:
        got = self._socket.recv_into(buffer)
        self.nbytes += got
        return got

    def skip_rest(self) -> int:
        n = 0
        while self._socket.rcvmore:
            self.nbytes += len(self._socket.recv(copy=False))
            n += 1
        return n
