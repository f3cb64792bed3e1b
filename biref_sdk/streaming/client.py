"""Clients of the ZeroMQ service: :class:`Producer` (the microscope side, PUSH) and
:class:`Subscriber` (result consumers, SUB). Every blocking call takes a deadline."""
from __future__ import annotations

import time

import zmq

from ..files import Acquisition
from ..geometry import Geometry
from . import protocol
from .protocol import DEFAULT_LIMITS, Limits, Result
from .security import CurveClient, configure_client


class Producer:
    """Streams acquisitions to the service's ingest socket (PUSH, lossless: a full queue blocks).

    ``timeout_s``: a send that cannot be queued within this time raises TimeoutError (None: wait
    as long as the service applies back-pressure).
    """

    def __init__(self, address: str, *, timeout_s: float | None = 30.0, sndhwm: int = 64,
                 curve: CurveClient | None = None, context: zmq.Context | None = None) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.linger = 0
        self.socket.sndhwm = sndhwm
        self.socket.sndtimeo = -1 if timeout_s is None else int(timeout_s * 1000)
        if curve is not None:
            configure_client(self.socket, curve)
        self.socket.connect(address)
        self.address = address
        self.timeout_s = timeout_s

    def send(self, frames) -> None:
        """Send one message. Frames are copied before this returns, so a camera may reuse its buffer
        at once (zero-copy sends would read the buffer later, from ZeroMQ's I/O thread)."""
        try:
            self.socket.send_multipart(frames, copy=True)
        except zmq.Again:
            raise TimeoutError(f"the service at {self.address} took no message within the send timeout") from None

    def start(self, acquisition_id: str, geometry: Geometry, dtype="uint16", background=None) -> None:
        self.send(protocol.encode_start(acquisition_id, geometry, dtype, background))

    def view(self, acquisition_id: str, polarization: int, view: int, frame, dtype=None) -> None:
        self.send(protocol.encode_frame("view", acquisition_id, polarization, view, frame, dtype))

    def background(self, acquisition_id: str, polarization: int, view: int, frame, dtype=None) -> None:
        self.send(protocol.encode_frame("background", acquisition_id, polarization, view, frame, dtype))

    def stop(self, acquisition_id: str) -> None:
        self.send(protocol.encode_stop(acquisition_id))

    def send_acquisition(self, acquisition: Acquisition, acquisition_id: str, *, rate_views_per_s: float | None = None,
                         background: str = "inline", order=None, stop: bool = True) -> dict:
        """Stream a whole acquisition: start (background inline or as ``background`` messages), the
        2*V views in ``order`` (default polarization-major) paced at ``rate_views_per_s``, then stop.
        Returns timings (``last_view_sent_s`` is a ``time.perf_counter`` value)."""
        if background not in ("inline", "messages"):
            raise ValueError("background must be 'inline' or 'messages'")
        geometry = acquisition.geometry
        dtype = acquisition.holograms.dtype
        self.start(acquisition_id, geometry, dtype, acquisition.background if background == "inline" else None)
        if background == "messages":
            for p in range(2):
                for v in range(geometry.n_views):
                    self.background(acquisition_id, p, v, acquisition.background[p, v])
        if order is None:
            order = [(p, v) for p in range(2) for v in range(geometry.n_views)]
        begin = time.perf_counter()
        for i, (p, v) in enumerate(order):
            if rate_views_per_s:
                # pace on a fixed schedule so that send jitter does not accumulate
                delay = begin + i / rate_views_per_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.view(acquisition_id, p, v, acquisition.holograms[p, v])
        last_view_sent_s = time.perf_counter()
        if stop:
            self.stop(acquisition_id)
        return {"acquisition_id": acquisition_id, "views": len(order), "first_view_sent_s": begin,
                "last_view_sent_s": last_view_sent_s}

    def close(self, linger_s: float | None = None) -> None:
        """Close after the queued messages are delivered, waiting at most ``linger_s`` (default: the
        send timeout); ``linger_s=0`` discards them (a microscope that dies)."""
        linger_s = self.timeout_s if linger_s is None else linger_s
        self.socket.close(linger=-1 if linger_s is None else int(linger_s * 1000))
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ResultError(RuntimeError):
    """The service reported an error for the acquisition a subscriber was waiting for."""

    def __init__(self, header: dict) -> None:
        super().__init__(f"acquisition {header.get('acquisition_id')!r}: {header.get('reason')}: {header.get('detail')}")
        self.header = header


class Subscriber:
    """Receives results from the service's PUB socket.

    PUB/SUB drops for a subscriber that falls behind its high-water mark (the service never
    waits for subscribers); every topic carries a sequence number ``seq``, so such a loss is
    counted in ``missed[topic]``. ``rejected`` counts messages that failed to decode.
    """

    def __init__(self, address: str, topics=("volume", "preview", "error", "status"), *, rcvhwm: int = 64,
                 curve: CurveClient | None = None, limits: Limits = DEFAULT_LIMITS,
                 context: zmq.Context | None = None) -> None:
        unknown = set(topics) - set(protocol.TOPICS)
        if unknown:
            raise ValueError(f"unknown topics {sorted(unknown)}; choose from {protocol.TOPICS}")
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.rcvhwm = rcvhwm
        # a subscriber must not be made to allocate whatever a (spoofed) publisher sends
        self.socket.maxmsgsize = max(limits.max_volume_voxels * 12, limits.max_header_bytes)
        if curve is not None:
            configure_client(self.socket, curve)
        self.topics = tuple(topics)
        for topic in self.topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(address)
        self.limits = limits
        self.address = address
        self.missed = {topic: 0 for topic in protocol.TOPICS}
        self.rejected = 0
        self.last_status: dict | None = None
        self._next_seq: dict[str, int] = {}

    def recv(self, timeout_s: float) -> Result:
        """The next result message; raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.socket.poll(remaining_ms, zmq.POLLIN):
                raise TimeoutError(f"no result from {self.address} within {timeout_s:g} s")
            frames = self.socket.recv_multipart(copy=False)
            try:
                result = protocol.decode_result([f.buffer for f in frames], self.limits)
            except protocol.ProtocolError:
                self.rejected += 1
                continue
            self._track(result)
            return result

    def _track(self, result: Result) -> None:
        seq = result.header.get("seq")
        if isinstance(seq, int):
            expected = self._next_seq.get(result.topic)
            if expected is not None and seq > expected:
                self.missed[result.topic] += seq - expected
            self._next_seq[result.topic] = seq + 1
        if result.topic == "status":
            self.last_status = result.header

    def wait_ready(self, timeout_s: float = 10.0) -> dict:
        """Wait for a status heartbeat: from then on the subscription is live (a PUB/SUB
        subscription takes effect only after the connection is made). Returns that status."""
        subscribed = "status" in self.topics
        if not subscribed:
            self.socket.setsockopt(zmq.SUBSCRIBE, b"status")
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                result = self.recv(max(0.0, deadline - time.monotonic()))
                if result.topic == "status":
                    return result.header
        finally:
            if not subscribed:
                self.socket.setsockopt(zmq.UNSUBSCRIBE, b"status")

    def wait_for(self, predicate, timeout_s: float) -> Result:
        """The first result for which ``predicate(result)`` holds; raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.recv(max(0.0, deadline - time.monotonic()))
            if predicate(result):
                return result

    def wait_volume(self, acquisition_id: str | None = None, timeout_s: float = 60.0) -> Result:
        """The next volume (of ``acquisition_id`` if given). Raises ResultError if the service reports
        that this acquisition failed, TimeoutError after ``timeout_s``."""
        def match(result: Result) -> bool:
            if acquisition_id is not None and result.acquisition_id != acquisition_id:
                return False
            if result.topic == "error" and result.header.get("fatal"):
                raise ResultError(result.header)
            return result.topic == "volume"
        return self.wait_for(match, timeout_s)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

