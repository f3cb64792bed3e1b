"""The acquisition service: views in, volumes out, as soon as the last view arrives.

:class:`AcquisitionService` is the in-process core that vendor Python code can drive directly
(``open`` an acquisition, ``add_view`` frames from the camera callback, get the volume from
``result`` or an ``on_volume`` callback); the ZeroMQ server (:mod:`.server`) feeds the same core from
the wire. One worker thread owns all acquisition state and the engine: callers and the ingest
thread only validate, copy each frame into a budgeted buffer and enqueue it, so ingest never waits
for compute unless the budget is spent -- and then it waits (back-pressure), it never drops.

Defined outcomes (docs/protocol.md, "Faults"): every rejected message and every failed acquisition
becomes one :class:`StreamError` (``on_error``, the ``error`` topic) and one count in ``status``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .._version import __version__
from ..files import Volume
from ..geometry import Geometry
from . import protocol
from .protocol import DEFAULT_LIMITS, Frame, Limits, ProtocolError, Start, Stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """Service settings.

    ``acquisition_timeout_s``: an acquisition with no message for this long is dropped with a
    ``timeout`` error (or, with ``partial_on_timeout``, reconstructed from the views present and
    flagged incomplete). ``queue_bytes``: memory for frames received but not yet processed; when it
    is spent, ingest blocks (back-pressure to the microscope). ``preview_every``: publish a progressive
    volume every that many views (0: never; costs one finalize each).

    ``memory_bytes``: the service's memory budget, the queue's ``queue_bytes`` included. An
    acquisition is admitted only if its whole footprint (:func:`acquisition_footprint`: background,
    views waiting for the background, engine session) fits in what the acquisitions in flight leave
    of ``memory_bytes - queue_bytes``; otherwise its start is refused (``too_large`` if it could
    never fit, ``too_many_acquisitions`` if it does not fit now).
    """

    acquisition_timeout_s: float = 30.0
    partial_on_timeout: bool = False
    max_in_flight: int = 8
    queue_bytes: int = 256 * 1024 * 1024
    queue_messages: int = 4096
    status_interval_s: float = 1.0
    preview_every: int = 0
    remembered_ids: int = 1024
    memory_bytes: int = 2 * 1024**3
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        for name in ("acquisition_timeout_s", "status_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
        if self.memory_bytes < self.queue_bytes:
            raise ValueError(f"memory_bytes ({self.memory_bytes}) must hold at least queue_bytes ({self.queue_bytes})")
        if self.max_in_flight < 1 or self.queue_messages < 1 or self.preview_every < 0:
            raise ValueError("max_in_flight and queue_messages must be >= 1, preview_every >= 0")
        if self.queue_bytes < self.limits.max_frame_bytes:
            raise ValueError(f"queue_bytes ({self.queue_bytes}) must hold at least one frame of "
                             f"limits.max_frame_bytes ({self.limits.max_frame_bytes})")


@dataclass(frozen=True)
class StreamResult:
    """A volume (or a preview) of one acquisition. ``latency_s``: from the arrival of the last view
    used to the volume being ready. ``complete`` is False when views were missing (``missing`` lists
    their (polarization, view))."""

    acquisition_id: str
    volume: Volume
    complete: bool
    views_used: int
    views_expected: int
    missing: tuple[tuple[int, int], ...]
    latency_s: float
    engine: str
    preview: bool = False
    incomplete_reason: str | None = None

    def header(self) -> dict:
        return {"acquisition_id": self.acquisition_id, "complete": self.complete, "views_used": self.views_used,
                "views_expected": self.views_expected, "missing": [list(m) for m in self.missing],
                "latency_s": self.latency_s, "engine": self.engine, "incomplete_reason": self.incomplete_reason,
                "sdk_version": __version__}


@dataclass(frozen=True)
class StreamError:
    """One rejected message or failed acquisition. ``fatal``: the acquisition was dropped (no volume
    will come for it); otherwise only the message was rejected and the acquisition carries on."""

    reason: str
    detail: str
    acquisition_id: str | None = None
    message_type: str | None = None
    fatal: bool = False
    rejected_message: bool = True
    polarization: int | None = None
    view: int | None = None

    def header(self) -> dict:
        return {"reason": self.reason, "detail": self.detail, "acquisition_id": self.acquisition_id,
                "message_type": self.message_type, "fatal": self.fatal, "polarization": self.polarization,
                "view": self.view}

    @classmethod
    def from_protocol_error(cls, error: ProtocolError) -> "StreamError":
        # a start that is rejected never begins; a rejected view/background/stop leaves its acquisition running
        return cls(error.reason, error.detail, error.acquisition_id, error.message_type,
                   fatal=error.message_type == "start" and error.acquisition_id is not None)


def acquisition_footprint(start: Start, reconstructor) -> int:
    """Bytes one acquisition may hold while in flight: its background (accumulated, or the inline
    copy), the views that may arrive before the background is whole, and the engine's session
    (``reconstructor.session_bytes(geometry)`` when the engine states it, else an estimate of two
    float32 copies of the frames plus 64 bytes per voxel)."""
    g = start.geometry
    frames = 2 * g.n_views * math.prod(g.hologram_shape)
    itemsize = np.dtype(start.dtype).itemsize
    session_bytes = getattr(reconstructor, "session_bytes", None)
    session = int(session_bytes(g)) if callable(session_bytes) else 2 * frames * 4 + 64 * math.prod(g.volume_shape)
    return 2 * frames * itemsize + session


class AcquisitionFailed(RuntimeError):
    """Raised by :meth:`AcquisitionHandle.result` when the acquisition ended without a volume."""

    def __init__(self, error: StreamError) -> None:
        super().__init__(f"acquisition {error.acquisition_id!r} failed: {error.reason}: {error.detail}")
        self.error = error


class ServiceClosed(RuntimeError):
    """The service is closed (or closing) and takes no more messages."""


class BufferPool:
    """Reusable frame buffers with a hard cap on the bytes allocated (in use + idle).

    ``take`` blocks while the buffers in use would exceed the capacity: this is where back-pressure
    starts. Idle buffers of other sizes are freed to make room, so memory never exceeds the cap.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._in_use = 0
        self._allocated = 0
        self._idle: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._cond = threading.Condition()
        self._closed = False

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def take(self, nbytes: int, timeout_s: float | None = None) -> np.ndarray | None:
        """A uint8 buffer of ``nbytes``, or None on timeout. Raises ServiceClosed once closed."""
        if nbytes > self.capacity_bytes:
            raise ValueError(f"a frame of {nbytes} bytes exceeds the buffer capacity {self.capacity_bytes}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._in_use + nbytes > self.capacity_bytes and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._closed:
                raise ServiceClosed("service closed")
            self._in_use += nbytes
            idle = self._idle.get(nbytes)
            if idle:
                return idle.pop()
            # free idle buffers of other sizes until the new one fits under the cap
            for size in list(self._idle):
                while self._idle[size] and self._allocated + nbytes > self.capacity_bytes:
                    self._idle[size].pop()
                    self._allocated -= size
            self._allocated += nbytes
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        with self._cond:
            self._in_use -= buffer.nbytes
            self._idle[buffer.nbytes].append(buffer)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Acquisition:
    """Worker-thread state of one acquisition in flight."""

    def __init__(self, start: Start, now: float) -> None:
        g = start.geometry
        self.id = start.acquisition_id
        self.geometry = g
        self.dtype = start.dtype
        self.shape = g.hologram_shape
        self.background: np.ndarray | None = None
        self.background_received = np.zeros((2, g.n_views), dtype=bool)
        self.pending: list[tuple[int, int, np.ndarray]] = []   # views that came before the background was whole
        self.session = None
        self.received = np.zeros((2, g.n_views), dtype=bool)
        self.n_received = 0
        self.highest_index = -1
        self.last_activity_s = now
        self.last_view_s = now
        self.footprint_bytes = 0

    @property
    def views_expected(self) -> int:
        return self.received.size

    def missing(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(p), int(v)) for p, v in np.argwhere(~self.received))

    def progress(self) -> str:
        return (f"{self.n_received}/{self.views_expected} views, "
                f"{int(self.background_received.sum()) if self.session is None else self.views_expected}"
                f"/{self.views_expected} background frames")


_STOP = object()


class AcquisitionService:
    """Incremental reconstruction of streamed acquisitions with any :class:`Reconstructor`.

    Callbacks run on the service's worker thread (keep them short; a slow callback delays the next
    message): ``on_volume(StreamResult)``, ``on_preview(StreamResult)``, ``on_error(StreamError)``,
    ``on_status(dict)`` (every ``status_interval_s``).
    """

    def __init__(self, reconstructor, config: ServiceConfig = ServiceConfig(), *,
                 on_volume: Callable[[StreamResult], None] | None = None,
                 on_error: Callable[[StreamError], None] | None = None,
                 on_status: Callable[[dict], None] | None = None,
                 on_preview: Callable[[StreamResult], None] | None = None,
                 status_extra: Callable[[], dict] | None = None) -> None:
        self.reconstructor = reconstructor
        self.engine = str(getattr(reconstructor, "name", type(reconstructor).__name__))
        self.config = config
        self.limits = config.limits
        self.on_volume, self.on_error, self.on_status, self.on_preview = on_volume, on_error, on_status, on_preview
        self._status_extra = status_extra
        self.pool = BufferPool(config.queue_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_messages)
        self._lock = threading.Lock()
        self._counters = collections.Counter()
        self._errors = collections.Counter()
        self._active: dict[str, _Acquisition] = {}
        self._reserved_bytes = 0                       # footprints of the acquisitions in flight
        self._queued: collections.Counter = collections.Counter()   # messages per id waiting for the worker
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._futures: dict[str, _Future] = {}
        self._closing = False
        self._started_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="biref-acquisition-worker", daemon=True)
        self._thread.start()

    # -- feeding ------------------------------------------------------------------------------------
    def open(self, acquisition_id: str, geometry: Geometry, dtype="uint16", background=None,
             timeout_s: float | None = None) -> "AcquisitionHandle":
        """Begin an acquisition from Python. ``background`` [2, V, H, W] now, or later frame by frame
        with ``add_background``. Raises ValueError for input that no service state could accept."""
        dtype = np.dtype(dtype)
        if dtype.name not in protocol.WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(protocol.WIRE_DTYPES)}, got {dtype}")
        # the wire path's validation, so that both entry points accept exactly the same acquisitions
        header = protocol.parse_header(protocol.encode_start(acquisition_id, geometry, dtype)[0], self.limits)
        future = _Future()
        with self._lock:
            if acquisition_id in self._futures:
                raise ValueError(f"acquisition {acquisition_id!r} is already open")
            self._futures[acquisition_id] = future
        handle = AcquisitionHandle(self, acquisition_id, header.fields["geometry"], protocol.WIRE_DTYPES[dtype.name], future)
        try:
            arrays = []
            if background is not None:
                arrays = [self._copy_in(header, 0, protocol._wire_array(background, dtype), timeout_s)]
            self._enqueue(protocol.build_message(header, [a for a, _ in arrays]), [b for _, b in arrays], timeout_s)
        except BaseException:
            with self._lock:
                self._futures.pop(acquisition_id, None)
            raise
        return handle

    def submit_frames(self, frames, timeout_s: float | None = None) -> bool:
        """Feed one wire message (a list of bytes-like frames). A message that breaks the protocol is
        counted and reported through ``on_error``; returns whether it was accepted for processing."""
        received_s = time.perf_counter()
        try:
            if not isinstance(frames, (list, tuple)) or not frames:
                raise ProtocolError("malformed", "a message needs at least a header frame")
            header = protocol.parse_header(frames[0], self.limits)
            protocol.check_payload(header, len(frames) - 1, self.limits)
            views = [protocol.payload_array(header, i, f) for i, f in enumerate(frames[1:])]
        except ProtocolError as error:
            self.report(StreamError.from_protocol_error(error), timeout_s)
            return False
        except Exception as error:   # a decoder bug costs this message, never the caller's thread
            log.exception("internal error while decoding a message")
            self.report(StreamError("internal_error", f"{type(error).__name__} while decoding a message"), timeout_s)
            return False
        copies = [self._copy_in(header, i, view, timeout_s) for i, view in enumerate(views)]
        self._enqueue(protocol.build_message(header, [a for a, _ in copies], received_s), [b for _, b in copies],
                      timeout_s)
        return True

    def submit(self, message, buffers=(), timeout_s: float | None = None,
               cancel: threading.Event | None = None) -> None:
        """Enqueue an already validated message whose payload lives in ``buffers`` taken from
        ``self.pool`` (the ZeroMQ ingest path; the buffers go back to the pool once processed).
        With ``cancel``, waits for room until that event is set (then raises ServiceClosed)."""
        self._enqueue(message, list(buffers), timeout_s, cancel)

    def report(self, error: StreamError, timeout_s: float | None = None,
               cancel: threading.Event | None = None) -> None:
        """Count and publish an error found before the worker (a message that did not decode)."""
        with self._lock:
            self._counters["messages_received"] += 1
        self._put(("error", error), timeout_s, cancel)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _copy_in(self, header, index: int, array: np.ndarray, timeout_s):
        buffer = self.pool.take(header.payload_nbytes(index), timeout_s)
        if buffer is None:
            raise TimeoutError("the service is busy: no buffer freed up in time")
        shape, dtype = header.payload[index]
        target = buffer.view(dtype).reshape(shape)
        np.copyto(target, array, casting="no")
        return target, buffer

    def _enqueue(self, message, buffers, timeout_s, cancel=None) -> None:
        with self._lock:
            self._counters["messages_received"] += 1
            # an acquisition with messages waiting here is not idle, however long the worker is busy
            self._queued[message.acquisition_id] += 1
        try:
            self._put(("message", message, buffers), timeout_s, cancel)
        except BaseException:
            self._dequeued(message.acquisition_id)
            for b in buffers:
                self.pool.give(b)
            raise

    def _dequeued(self, acquisition_id: str) -> None:
        with self._lock:
            self._queued[acquisition_id] -= 1
            if self._queued[acquisition_id] <= 0:
                del self._queued[acquisition_id]

    def _put(self, item, timeout_s, cancel=None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._closing:
                raise ServiceClosed("service closed")
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if cancel is not None:
                wait = 0.1 if wait is None else min(wait, 0.1)
            try:
                self._queue.put(item, timeout=wait)
                return
            except queue.Full:
                if cancel is not None and cancel.is_set():
                    raise ServiceClosed("ingest stopped") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("the service is busy: its message queue stayed full") from None

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self, timeout_s: float | None = 30.0) -> None:
        """Process what was submitted, fail what is still in flight (``shutdown``), stop the worker."""
        if self._closing:
            self._thread.join(timeout_s)
            return
        self._closing = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self.pool.close()

    def __enter__(self) -> "AcquisitionService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict:
        """Counters since start (the ``status`` topic's content)."""
        with self._lock:
            counters = dict(self._counters)
            errors = dict(self._errors)
        status = {
            "engine": self.engine, "sdk_version": __version__, "uptime_s": time.monotonic() - self._started_s,
            "acquisitions_in_flight": len(self._active), "queue_messages": self._queue.qsize(),
            "queue_bytes": self.pool.in_use_bytes, "queue_capacity_bytes": self.pool.capacity_bytes,
            "memory_budget_bytes": self.config.memory_bytes, "acquisition_bytes_reserved": self._reserved_bytes,
            "errors": errors, "rejected_messages": counters.pop("rejected_messages", 0),
        }
        for name in ("messages_received", "bytes_received", "views_accepted", "background_frames_accepted",
                     "out_of_order_views", "acquisitions_started", "volumes", "partial_volumes", "previews",
                     "callback_errors", "stops_after_volume", "ingest_waits"):
            status[name] = counters.pop(name, 0)
        status.update(counters)
        if self._status_extra is not None:
            try:
                status.update(self._status_extra())
            except Exception:  # a broken extra must not stop the heartbeat
                status["status_extra_failed"] = True
        return status

    # -- worker -------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_status = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_status:
                self._emit("on_status", self.status())
                next_status = now + self.config.status_interval_s
            try:
                item = self._queue.get(timeout=max(0.0, min(next_status - now, 0.05)))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._process(item)
            self._expire(time.perf_counter())
        # shutdown: whatever is still in flight will never complete
        for acquisition_id in list(self._active):
            self._fail(acquisition_id, StreamError("shutdown", f"service stopped with the acquisition in flight "
                                                   f"({self._active[acquisition_id].progress()})",
                                                   acquisition_id, fatal=True, rejected_message=False))
        self._emit("on_status", self.status())

    def _process(self, item) -> None:
        if item[0] == "error":
            self._error(item[1])
            return
        _, message, buffers = item
        self._dequeued(message.acquisition_id)
        try:
            if isinstance(message, Start):
                self._start(message)
            elif isinstance(message, Stop):
                self._stop(message)
            else:
                self._frame(message)
        except Exception as error:  # a bug must cost one message, not the service
            log.exception("internal error on a %s message", message.type)
            self._error(StreamError("internal_error", f"{type(error).__name__}: {error}",
                                    message.acquisition_id, message.type))
        finally:
            for buffer in buffers:
                self.pool.give(buffer)

    def _reject(self, reason: str, detail: str, message, fatal: bool = False) -> None:
        self._error(StreamError(reason, detail, message.acquisition_id, message.type, fatal=fatal,
                                polarization=getattr(message, "polarization", None),
                                view=getattr(message, "view", None)))

    def _start(self, message: Start) -> None:
        acquisition_id = message.acquisition_id
        if acquisition_id in self._active:
            self._reject("duplicate_start", "an acquisition with this id is in flight; the first one continues", message)
            return
        if len(self._active) >= self.config.max_in_flight:
            self._reject("too_many_acquisitions", f"{len(self._active)} acquisitions already in flight "
                         f"(max_in_flight={self.config.max_in_flight})", message, fatal=True)
            return
        footprint = acquisition_footprint(message, self.reconstructor)
        budget = self.config.memory_bytes - self.config.queue_bytes
        if footprint > budget:
            self._reject("too_large", f"the acquisition needs about {footprint} bytes, more than the service's "
                         f"memory budget for acquisitions ({budget} bytes)", message, fatal=True)
            return
        if self._reserved_bytes + footprint > budget:
            self._reject("too_many_acquisitions", f"the acquisition needs about {footprint} bytes; "
                         f"{len(self._active)} acquisitions in flight hold {self._reserved_bytes} of the "
                         f"{budget} bytes budgeted", message, fatal=True)
            return
        acquisition = _Acquisition(message, time.perf_counter())
        acquisition.footprint_bytes = footprint
        self._reserved_bytes += footprint
        if message.background is not None:
            if not self._open_session(acquisition, np.array(message.background), message):
                return
            acquisition.background_received[:] = True
        else:
            acquisition.background = np.zeros((2, acquisition.geometry.n_views, *acquisition.shape), acquisition.dtype)
        self._active[acquisition_id] = acquisition
        self._recent.pop(acquisition_id, None)
        self.count("acquisitions_started")

    def _open_session(self, acquisition: _Acquisition, background: np.ndarray, message) -> bool:
        try:
            acquisition.session = self.reconstructor.start(acquisition.geometry, background)
        except Exception as error:
            self._reject("engine_rejected", f"{self.engine}: {type(error).__name__}: {error}", message, fatal=True)
            if acquisition.id not in self._active:   # an inline background: not yet admitted
                self._reserved_bytes -= acquisition.footprint_bytes
            self._finish(acquisition.id)
            return False
        acquisition.background = None
        return True

    def _frame(self, message: Frame) -> None:
        acquisition = self._active.get(message.acquisition_id)
        if acquisition is None:
            if message.acquisition_id in self._recent:
                self._reject("acquisition_finished", "the acquisition already produced its volume or failed", message)
            else:
                self._reject("unknown_acquisition", "no start message for this acquisition", message)
            return
        acquisition.last_activity_s = time.perf_counter()
        p, v = message.polarization, message.view
        if message.frame.shape != acquisition.shape or message.frame.dtype != acquisition.dtype:
            self._reject("shape_mismatch", f"frame {list(message.frame.shape)} {message.frame.dtype.name}, the start "
                         f"announced {list(acquisition.shape)} {acquisition.dtype.name}", message)
            return
        if v >= acquisition.geometry.n_views:
            self._reject("invalid_field", f"view {v} outside 0..{acquisition.geometry.n_views - 1}", message)
            return
        if message.type == "background":
            self._background(acquisition, message)
            return
        if acquisition.received[p, v]:
            self._reject("duplicate_view", f"polarization {p} view {v} was already received; the first is kept", message)
            return
        acquisition.received[p, v] = True
        acquisition.n_received += 1
        acquisition.last_view_s = message.received_s
        index = p * acquisition.geometry.n_views + v
        if index < acquisition.highest_index:
            self.count("out_of_order_views")   # fine: views may come in any order
        acquisition.highest_index = max(acquisition.highest_index, index)
        self.count("views_accepted")
        if acquisition.session is None:
            acquisition.pending.append((p, v, np.array(message.frame)))
            return
        if not self._add_view(acquisition, p, v, message.frame):
            return
        if acquisition.n_received == acquisition.views_expected:
            self._publish_volume(acquisition)
        elif self.config.preview_every and acquisition.n_received % self.config.preview_every == 0:
            self._publish_preview(acquisition)

    def _background(self, acquisition: _Acquisition, message: Frame) -> None:
        p, v = message.polarization, message.view
        if acquisition.session is not None or acquisition.background_received[p, v]:
            self._reject("duplicate_background", f"background polarization {p} view {v} was already received "
                         "(or sent inline with the start)", message)
            return
        acquisition.background[p, v] = message.frame
        acquisition.background_received[p, v] = True
        self.count("background_frames_accepted")
        if not acquisition.background_received.all():
            return
        if not self._open_session(acquisition, acquisition.background, message):
            return
        pending, acquisition.pending = acquisition.pending, []
        for p, v, frame in pending:
            if not self._add_view(acquisition, p, v, frame):
                return
        if acquisition.n_received == acquisition.views_expected:
            self._publish_volume(acquisition)

    def _add_view(self, acquisition: _Acquisition, p: int, v: int, frame: np.ndarray) -> bool:
        try:
            acquisition.session.add_view(p, v, frame)
            return True
        except Exception as error:
            self._fail(acquisition.id, StreamError("engine_error", f"{self.engine} failed on polarization {p} view {v}: "
                                                   f"{type(error).__name__}: {error}", acquisition.id, "view",
                                                   fatal=True, rejected_message=False, polarization=p, view=v))
            return False

    def _stop(self, message: Stop) -> None:
        acquisition = self._active.get(message.acquisition_id)
        if acquisition is None:
            if message.acquisition_id in self._recent:
                self.count("stops_after_volume")   # stop is optional; after the volume it changes nothing
            else:
                self._reject("unknown_acquisition", "no start message for this acquisition", message)
            return
        if acquisition.session is None or acquisition.n_received == 0:
            self._fail(acquisition.id, StreamError("incomplete", f"stop with nothing to reconstruct "
                                                   f"({acquisition.progress()})", acquisition.id, "stop", fatal=True))
            return
        self._publish_volume(acquisition, incomplete_reason="stop")

    def _expire(self, now: float) -> None:
        timeout = self.config.acquisition_timeout_s
        with self._lock:
            queued = set(self._queued)
        for acquisition in [a for a in self._active.values()
                            if now - a.last_activity_s > timeout and a.id not in queued]:
            if self.config.partial_on_timeout and acquisition.session is not None and acquisition.n_received:
                self._publish_volume(acquisition, incomplete_reason="timeout")
            else:
                self._fail(acquisition.id, StreamError(
                    "timeout", f"no message for {timeout:g} s ({acquisition.progress()}); acquisition dropped",
                    acquisition.id, fatal=True, rejected_message=False))

    def _result(self, acquisition: _Acquisition, preview: bool, incomplete_reason: str | None) -> StreamResult:
        volume = acquisition.session.finalize(allow_missing=True) if acquisition.n_received < acquisition.views_expected \
            else acquisition.session.finalize()
        latency_s = time.perf_counter() - acquisition.last_view_s
        complete = acquisition.n_received == acquisition.views_expected
        result = StreamResult(acquisition.id, volume, complete, acquisition.n_received, acquisition.views_expected,
                              acquisition.missing(), latency_s, self.engine, preview,
                              None if complete else incomplete_reason)
        volume.parameters = {**volume.parameters, "streaming": {k: v for k, v in result.header().items()
                                                                if k not in ("latency_s",)}}
        return result

    def _publish_volume(self, acquisition: _Acquisition, incomplete_reason: str | None = None) -> None:
        try:
            result = self._result(acquisition, False, incomplete_reason)
        except Exception as error:
            # with views missing, an engine that cannot reconstruct from the few present is the
            # sender's incomplete acquisition, not an engine failure
            reason = "engine_error" if incomplete_reason is None else "incomplete"
            self._fail(acquisition.id, StreamError(reason, f"{self.engine} failed to finalize "
                                                   f"({acquisition.progress()}): {type(error).__name__}: {error}",
                                                   acquisition.id, fatal=True, rejected_message=False))
            return
        self._finish(acquisition.id)
        self.count("volumes")
        if not result.complete:
            self.count("partial_volumes")
        self._emit("on_volume", result)
        future = self._pop_future(acquisition.id)
        if future is not None:
            future.set(result)

    def _publish_preview(self, acquisition: _Acquisition) -> None:
        try:
            result = self._result(acquisition, True, "preview")
        except Exception as error:
            self._error(StreamError("engine_error", f"preview failed: {type(error).__name__}: {error}",
                                    acquisition.id, rejected_message=False))
            return
        self.count("previews")
        self._emit("on_preview", result)

    def _fail(self, acquisition_id: str, error: StreamError) -> None:
        self._finish(acquisition_id)
        self._error(error)

    def _finish(self, acquisition_id: str) -> None:
        acquisition = self._active.pop(acquisition_id, None)
        if acquisition is not None:
            self._reserved_bytes -= acquisition.footprint_bytes
        self._recent[acquisition_id] = None
        while len(self._recent) > self.config.remembered_ids:
            self._recent.popitem(last=False)

    def _error(self, error: StreamError) -> None:
        if error.fatal and error.acquisition_id in self._active:
            # e.g. a malformed second start under the id of a running acquisition: that one carries on
            error = dataclasses.replace(error, fatal=False)
        if error.fatal and error.acquisition_id is not None:
            self._finish(error.acquisition_id)   # later frames of a refused start: "acquisition_finished"
        with self._lock:
            self._errors[error.reason] += 1
            if error.rejected_message:
                self._counters["rejected_messages"] += 1
        self._emit("on_error", error)
        if error.fatal and error.acquisition_id is not None:
            future = self._pop_future(error.acquisition_id)
            if future is not None:
                future.set(AcquisitionFailed(error))

    def _pop_future(self, acquisition_id: str):
        with self._lock:
            return self._futures.pop(acquisition_id, None)

    def _emit(self, name: str, value) -> None:
        callback = getattr(self, name)
        if callback is None:
            return
        try:
            callback(value)
        except Exception:  # a vendor callback must not stop the service
            self.count("callback_errors")
            log.exception("the %s callback failed", name)


class _Future:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._value = None

    def set(self, value) -> None:
        self._value = value
        self._event.set()

    def get(self, timeout_s: float | None):
        if not self._event.wait(timeout_s):
            raise TimeoutError("no result yet")
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


@dataclass
class AcquisitionHandle:
    """One acquisition driven from Python: feed frames, then ``result()``. Frames are copied, so the
    camera may reuse its buffer as soon as a call returns."""

    service: AcquisitionService
    acquisition_id: str
    geometry: Geometry
    dtype: np.dtype
    _future: _Future = field(repr=False)

    def add_view(self, polarization: int, view: int, frame, timeout_s: float | None = None) -> None:
        self._send("view", polarization, view, frame, timeout_s)

    def add_background(self, polarization: int, view: int, frame, timeout_s: float | None = None) -> None:
        self._send("background", polarization, view, frame, timeout_s)

    def stop(self, timeout_s: float | None = None) -> None:
        """No more views will come: reconstruct from those received (flagged if some are missing)."""
        self.service._enqueue(Stop(self.acquisition_id), [], timeout_s)

    def result(self, timeout_s: float | None = None) -> StreamResult:
        """The volume; raises AcquisitionFailed if the acquisition failed, TimeoutError if not ready."""
        return self._future.get(timeout_s)

    def _send(self, message_type, polarization, view, frame, timeout_s) -> None:
        frame = np.asarray(frame)
        if frame.shape != self.geometry.hologram_shape:
            raise ValueError(f"frame shape {frame.shape} != hologram shape {self.geometry.hologram_shape}")
        if polarization not in (0, 1) or not 0 <= int(view) < self.geometry.n_views:
            raise ValueError(f"polarization {polarization} / view {view} out of range (0..1, 0..{self.geometry.n_views - 1})")
        wire = protocol._wire_array(frame, self.dtype)
        buffer = self.service.pool.take(wire.nbytes, timeout_s)
        if buffer is None:
            raise TimeoutError("the service is busy: no buffer freed up in time")
        target = buffer.view(self.dtype).reshape(wire.shape)
        target[...] = wire
        self.service._enqueue(Frame(message_type, self.acquisition_id, int(polarization), int(view), target),
                              [buffer], timeout_s)
