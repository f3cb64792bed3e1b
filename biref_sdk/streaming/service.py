"""The acquisition service: views in, volumes out, as soon as the last view arrives.

:class:`AcquisitionService` is the in-process core that vendor Python code can drive directly
(``open`` an acquisition, ``add_view`` frames from the camera callback, get the volume from
``result`` or an ``on_volume`` callback); the ZeroMQ server (:mod:`.server`) feeds the same core from
the wire. It is a thin shell around one :class:`~.acquisition.AcquisitionMachine` per acquisition:

- callers and the ingest thread only validate, copy each frame into a budgeted buffer and enqueue
  a typed work item, so ingest never waits for compute unless the budget is spent -- and then it
  waits (back-pressure), it never drops;
- one dispatcher thread admits acquisitions (the memory budget), routes messages to their
  acquisition's inbox and times idle ones out;
- a pool of ``workers`` threads runs the machines: one acquisition's messages are handled in order
  by one worker at a time, different acquisitions side by side, so a slow reconstruction delays no
  other acquisition while a worker is free;
- one publisher thread runs the callbacks, in order, so they never run concurrently.

Defined outcomes (docs/protocol.md, "Faults"): every rejected message and every failed acquisition
becomes one :class:`StreamError` (``on_error``, the ``error`` topic) and one count in ``status``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._version import __version__
from ..geometry import Geometry
from ..reconstruction.base import Reconstructor
from . import protocol
from .acquisition import AcquisitionMachine, Outcomes, StreamError, StreamResult
from .protocol import DEFAULT_LIMITS, Frame, Limits, Message, ProtocolError, Start, Stop

__all__ = ["AcquisitionFailed", "AcquisitionHandle", "AcquisitionService", "BufferPool", "ServiceClosed",
           "ServiceConfig", "StreamError", "StreamResult", "acquisition_footprint"]

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

    ``workers``: reconstruction threads (default: the CPU cores, at most ``max_in_flight``). Memory
    does not grow with them: each admitted acquisition's footprint already holds its engine session,
    and a worker only ever runs an admitted acquisition; more workers than cores only share them.
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
    workers: int | None = None
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
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if self.queue_bytes < self.limits.max_frame_bytes:
            raise ValueError(f"queue_bytes ({self.queue_bytes}) must hold at least one frame of "
                             f"limits.max_frame_bytes ({self.limits.max_frame_bytes})")

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers is not None else max(1, min(os.cpu_count() or 1, self.max_in_flight))


def acquisition_footprint(start: Start, reconstructor) -> int:
    """Bytes one acquisition may hold while in flight: its background (accumulated, or the inline
    copy), the views that may arrive before the background is whole, and the engine's session
    (``reconstructor.session_bytes(geometry)``; the base class's estimate for a duck-typed one)."""
    g = start.geometry
    frames = 2 * g.n_views * math.prod(g.hologram_shape)
    itemsize = np.dtype(start.dtype).itemsize
    session_bytes = getattr(reconstructor, "session_bytes", None)  # Reconstructor.session_bytes
    session = int(session_bytes(g)) if callable(session_bytes) else Reconstructor.session_bytes(reconstructor, g)
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



# -- typed work items ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Incoming:
    """A decoded message and the pool buffers its payload lives in (given back once handled)."""

    message: Message
    buffers: tuple = ()


@dataclass(frozen=True)
class Report:
    """An error found before the dispatcher (a message that did not decode)."""

    error: StreamError


@dataclass(frozen=True)
class Expire:
    """The dispatcher saw the acquisition idle at ``now_s``; its machine decides."""

    now_s: float


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Publish:
    """A callback to run on the publisher thread, then a future to settle."""

    callback: str
    value: object
    future: concurrent.futures.Future | None = None
    settle_with: object = None


class _Slot:
    """An admitted acquisition: its machine, its inbox of work items, and whether a worker runs it."""

    def __init__(self, machine: AcquisitionMachine, footprint_bytes: int) -> None:
        self.machine = machine
        self.footprint_bytes = footprint_bytes
        self.inbox: collections.deque = collections.deque()
        self.busy = False


class AcquisitionService:
    """Incremental reconstruction of streamed acquisitions with any :class:`Reconstructor`.

    Callbacks run on the service's publisher thread, one at a time and in order (keep them short; a
    slow callback delays the next one, not the reconstructions): ``on_volume(StreamResult)``,
    ``on_preview(StreamResult)``, ``on_error(StreamError)``, ``on_status(dict)`` (every
    ``status_interval_s``). The reconstructor's sessions of different acquisitions run on different
    worker threads at the same time.
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
        self._outbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._progress = threading.Condition()   # notified when an acquisition's worker goes idle
        self._next_status = time.monotonic()
        self._counters = collections.Counter()
        self._errors = collections.Counter()
        self._slots: dict[str, _Slot] = {}
        self._reserved_bytes = 0                       # footprints of the acquisitions in flight
        self._queued: collections.Counter = collections.Counter()   # messages per id not yet dispatched
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._closing = False
        self._started_s = time.monotonic()
        self._workers = concurrent.futures.ThreadPoolExecutor(config.worker_count,
                                                              thread_name_prefix="biref-reconstruction")
        self._publisher = threading.Thread(target=self._publish_loop, name="biref-publisher", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="biref-dispatcher", daemon=True)
        self._publisher.start()
        self._dispatcher.start()

    # -- feeding ------------------------------------------------------------------------------------
    def open(self, acquisition_id: str, geometry: Geometry, dtype="uint16", background=None,
             timeout_s: float | None = None) -> "AcquisitionHandle":
        """Begin an acquisition from Python. ``background`` [2, V, H, W] now, or later frame by frame
        with ``add_background``. Raises ValueError for input that no service state could accept."""
        # the limits of a start from the wire, checked on the typed values (no encoding round trip)
        start = protocol.start_message(acquisition_id, geometry, dtype, background, self.limits)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if acquisition_id in self._futures:
                raise ValueError(f"acquisition {acquisition_id!r} is already open")
            self._futures[acquisition_id] = future
        try:
            buffers = ()
            if background is not None:
                target, buffer = self._copy_in(protocol._wire_array(background, start.dtype), timeout_s)
                start, buffers = dataclasses.replace(start, background=target), (buffer,)
            self._enqueue(Incoming(start, buffers), timeout_s)
        except BaseException:
            with self._lock:
                self._futures.pop(acquisition_id, None)
            raise
        return AcquisitionHandle(self, acquisition_id, geometry, start.dtype, future)

    def submit_frames(self, frames, timeout_s: float | None = None) -> bool:
        """Feed one wire message (a list of bytes-like frames). A message that breaks the protocol is
        counted and reported through ``on_error``; returns whether it was accepted for processing."""
        received_s = time.perf_counter()

        def take(nbytes):
            buffer = self.pool.take(nbytes, timeout_s)
            if buffer is None:
                raise TimeoutError("the service is busy: no buffer freed up in time")
            return buffer

        try:
            if not isinstance(frames, (list, tuple)) or not frames:
                raise ProtocolError("malformed", "a message needs at least a header frame")
            message, buffers = protocol.receive_message(frames[0], protocol.PayloadFrames(frames[1:]), take,
                                                        self.pool.give, self.limits, received_s)
        except ProtocolError as error:
            self.report(StreamError.from_protocol_error(error), timeout_s)
            return False
        except (TimeoutError, ServiceClosed):
            raise
        except Exception as error:   # a decoder bug costs this message, never the caller's thread
            log.exception("internal error while decoding a message")
            self.report(StreamError("internal_error", f"{type(error).__name__} while decoding a message"), timeout_s)
            return False
        self._enqueue(Incoming(message, tuple(buffers)), timeout_s)
        return True

    def submit(self, message, buffers=(), timeout_s: float | None = None,
               cancel: threading.Event | None = None) -> None:
        """Enqueue an already validated message whose payload lives in ``buffers`` taken from
        ``self.pool`` (the ZeroMQ ingest path; the buffers go back to the pool once processed).
        With ``cancel``, waits for room until that event is set (then raises ServiceClosed)."""
        self._enqueue(Incoming(message, tuple(buffers)), timeout_s, cancel)

    def report(self, error: StreamError, timeout_s: float | None = None,
               cancel: threading.Event | None = None) -> None:
        """Count and publish an error found before the dispatcher (a message that did not decode)."""
        with self._lock:
            self._counters["messages_received"] += 1
        self._put(Report(error), timeout_s, cancel)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _copy_in(self, array: np.ndarray, timeout_s):
        buffer = self.pool.take(array.nbytes, timeout_s)
        if buffer is None:
            raise TimeoutError("the service is busy: no buffer freed up in time")
        target = buffer.view(array.dtype).reshape(array.shape)
        np.copyto(target, array, casting="no")
        return target, buffer

    def _enqueue(self, item: Incoming, timeout_s, cancel=None) -> None:
        acquisition_id = item.message.acquisition_id
        with self._lock:
            self._counters["messages_received"] += 1
            # an acquisition with messages waiting here is not idle, however long the workers are busy
            self._queued[acquisition_id] += 1
        try:
            self._put(item, timeout_s, cancel)
        except BaseException:
            self._dequeued(acquisition_id)
            self._give_back(item)
            raise

    def _dequeued(self, acquisition_id: str) -> None:
        with self._lock:
            self._queued[acquisition_id] -= 1
            if self._queued[acquisition_id] <= 0:
                del self._queued[acquisition_id]

    def _give_back(self, item) -> None:
        for buffer in getattr(item, "buffers", ()):
            self.pool.give(buffer)

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
        """Process what was submitted, fail what is still in flight (``shutdown``), stop the threads."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._closing:
            self._closing = True
            self._queue.put(Shutdown())
        self._dispatcher.join(timeout_s)
        self._publisher.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.pool.close()

    def __enter__(self) -> "AcquisitionService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._dispatcher.is_alive() and self._publisher.is_alive()

    def status(self) -> dict:
        """Counters since start (the ``status`` topic's content)."""
        with self._lock:
            counters = dict(self._counters)
            errors = dict(self._errors)
            in_flight = len(self._slots)
            reserved = self._reserved_bytes
            busy = sum(slot.busy for slot in self._slots.values())
        status = {
            "engine": self.engine, "sdk_version": __version__, "uptime_s": time.monotonic() - self._started_s,
            "acquisitions_in_flight": in_flight, "queue_messages": self._queue.qsize(),
            "queue_bytes": self.pool.in_use_bytes, "queue_capacity_bytes": self.pool.capacity_bytes,
            "memory_budget_bytes": self.config.memory_bytes, "acquisition_bytes_reserved": reserved,
            "workers": self.config.worker_count, "workers_busy": busy,
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

    # -- dispatcher thread: admission, routing, timeouts ------------------------------------------------
    def _dispatch_loop(self) -> None:
        try:
            while True:
                now = time.monotonic()
                if now >= self._next_status:
                    self._outbox.put(Publish("on_status", self.status()))
                    self._next_status = now + self.config.status_interval_s
                try:
                    item = self._queue.get(timeout=max(0.0, min(self._next_status - now, 0.05)))
                except queue.Empty:
                    item = None
                if isinstance(item, Shutdown):
                    break
                if item is not None:
                    self._dispatch(item)
                self._expire_idle(time.perf_counter())
        finally:
            self._shut_down()

    def _dispatch(self, item) -> None:
        if isinstance(item, Report):
            self._publish_error(item.error)
            return
        message = item.message
        self._dequeued(message.acquisition_id)
        delivered = False   # a delivered item's buffers are the worker's to give back
        try:
            if isinstance(message, Start):
                delivered = self._admit_when_settled(message) and self._deliver(message.acquisition_id, item)
            else:
                delivered = self._deliver(message.acquisition_id, item)
                if not delivered:
                    self._unrouted(message)
        except Exception as error:  # a bug must cost one message, not the service
            log.exception("internal error on a %s message", message.type)
            self._publish_error(StreamError("internal_error", f"{type(error).__name__}: {error}",
                                            message.acquisition_id, message.type))
        finally:
            if not delivered:
                self._give_back(item)

    def _admit_when_settled(self, start: Start) -> bool:
        """Admit ``start`` as a single worker would have: a start that does not fit now, while
        acquisitions in flight still have messages being handled (which may finish them), waits
        until they are handled -- the dispatcher stops routing meanwhile, so ingest meets
        back-pressure as it would behind one busy worker; a start still refused then is refused."""
        while True:
            admitted = self._admit(start)
            if admitted is not None:
                return admitted
            with self._progress:
                self._progress.wait(0.05)
            now = time.monotonic()
            if now >= self._next_status:
                self._outbox.put(Publish("on_status", self.status()))
                self._next_status = now + self.config.status_interval_s
            self._expire_idle(time.perf_counter())

    def _admit(self, start: Start) -> bool | None:
        """Admission: the id is free, and the whole footprint fits the memory budget now. None: it
        does not fit now, but work in progress may change that (see ``_admit_when_settled``)."""
        acquisition_id = start.acquisition_id
        with self._lock:
            in_flight, reserved = len(self._slots), self._reserved_bytes
            running = acquisition_id in self._slots
            working = any(slot.busy or slot.inbox for slot in self._slots.values())
        if running:
            self._publish_error(StreamError.rejecting(start, "duplicate_start", "an acquisition with this id is in "
                                                      "flight; the first one continues"))
            return False
        footprint = acquisition_footprint(start, self.reconstructor)
        budget = self.config.memory_bytes - self.config.queue_bytes
        busy_now = in_flight >= self.config.max_in_flight or reserved + footprint > budget
        if busy_now and footprint <= budget and working:
            return None
        if in_flight >= self.config.max_in_flight:
            self._publish_error(StreamError.rejecting(start, "too_many_acquisitions", f"{in_flight} acquisitions "
                                                      f"already in flight (max_in_flight={self.config.max_in_flight})",
                                                      fatal=True))
            return False
        if footprint > budget:
            self._publish_error(StreamError.rejecting(start, "too_large", f"the acquisition needs about {footprint} "
                                                      "bytes, more than the service's memory budget for acquisitions "
                                                      f"({budget} bytes)", fatal=True))
            return False
        if reserved + footprint > budget:
            self._publish_error(StreamError.rejecting(start, "too_many_acquisitions", f"the acquisition needs about "
                                                      f"{footprint} bytes; {in_flight} acquisitions in flight hold "
                                                      f"{reserved} of the {budget} bytes budgeted", fatal=True))
            return False
        machine = AcquisitionMachine(start, self.reconstructor, self.engine, self.config.preview_every)
        with self._lock:
            self._slots[acquisition_id] = _Slot(machine, footprint)
            self._reserved_bytes += footprint
            self._recent.pop(acquisition_id, None)
            self._counters["acquisitions_started"] += 1
        return True

    def _deliver(self, acquisition_id: str, item) -> bool:
        """Put ``item`` in the acquisition's inbox and make sure a worker runs it; False if no such
        acquisition is in flight. Delivered items keep their buffers until a worker handled them."""
        with self._lock:
            slot = self._slots.get(acquisition_id)
            if slot is None:
                return False
            slot.inbox.append(item)
            start_worker = not slot.busy
            slot.busy = True
        if start_worker:
            self._workers.submit(self._run_slot, slot)
        return True

    def _unrouted(self, message) -> None:
        with self._lock:
            finished = message.acquisition_id in self._recent
        if isinstance(message, Stop) and finished:
            self.count("stops_after_volume")   # stop is optional; after the volume it changes nothing
        elif finished:
            self._publish_error(StreamError.rejecting(message, "acquisition_finished",
                                                      "the acquisition already produced its volume or failed"))
        else:
            self._publish_error(StreamError.rejecting(message, "unknown_acquisition",
                                                      "no start message for this acquisition"))

    def _expire_idle(self, now_s: float) -> None:
        timeout = self.config.acquisition_timeout_s
        with self._lock:
            idle = [(acquisition_id, slot) for acquisition_id, slot in self._slots.items()
                    if not slot.busy and acquisition_id not in self._queued
                    and slot.machine.idle_for(now_s) > timeout]
        for acquisition_id, _ in idle:
            self._deliver(acquisition_id, Expire(now_s))

    def _shut_down(self) -> None:
        """Let the workers finish what was delivered, then fail what is still in flight."""
        self._workers.shutdown(wait=True)
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            self._apply(slot, slot.machine.shutdown())
        self._outbox.put(Publish("on_status", self.status()))
        self._outbox.put(None)

    # -- worker threads: the machines -------------------------------------------------------------------
    def _run_slot(self, slot: _Slot) -> None:
        while True:
            with self._lock:
                if not slot.inbox:
                    slot.busy = False
                    idle = True
                else:
                    idle = False
                    item = slot.inbox.popleft()
            if idle:
                with self._progress:
                    self._progress.notify_all()
                return
            try:
                self._apply(slot, self._handle(slot.machine, item))
            except Exception as error:   # a bug must cost one message, not the worker
                message = getattr(item, "message", None)
                log.exception("internal error in acquisition %r", slot.machine.id)
                self._publish_error(StreamError("internal_error", f"{type(error).__name__}: {error}", slot.machine.id,
                                                getattr(message, "type", None)))
            finally:
                self._give_back(item)

    def _handle(self, machine: AcquisitionMachine, item) -> Outcomes:
        if machine.done:   # finished by an earlier item of its inbox: what follows is refused
            message = getattr(item, "message", None)
            if message is None or isinstance(message, Stop):
                return Outcomes(counts={"stops_after_volume": 1} if message is not None else {})
            return Outcomes(errors=[StreamError.rejecting(message, "acquisition_finished",
                                                          "the acquisition already produced its volume or failed")])
        if isinstance(item, Expire):
            return machine.expire(item.now_s, self.config.acquisition_timeout_s, self.config.partial_on_timeout)
        message = item.message
        if isinstance(message, Start):
            return machine.begin(message)
        if isinstance(message, Stop):
            return machine.stop(message, time.perf_counter())
        return machine.frame(message, time.perf_counter())

    def _apply(self, slot: _Slot, out: Outcomes) -> None:
        """Count and publish what the machine produced; a finished acquisition leaves the service."""
        acquisition_id = slot.machine.id
        with self._lock:
            self._counters.update(out.counts)
        if out.finished:
            self._finish(acquisition_id)
        for error in out.errors:
            self._publish_error(error, own=True)
        if out.preview is not None:
            self._outbox.put(Publish("on_preview", out.preview))
        if out.volume is not None:
            self._outbox.put(Publish("on_volume", out.volume, self._pop_future(acquisition_id), out.volume))

    def _finish(self, acquisition_id: str) -> None:
        with self._lock:
            slot = self._slots.pop(acquisition_id, None)
            if slot is not None:
                self._reserved_bytes -= slot.footprint_bytes
            self._recent[acquisition_id] = None
            while len(self._recent) > self.config.remembered_ids:
                self._recent.popitem(last=False)

    def _publish_error(self, error: StreamError, own: bool = False) -> None:
        """Count and publish an error. ``own``: from the acquisition's own machine, which has already
        finished it if fatal; otherwise a fatal error under the id of a running acquisition (a
        malformed second start) leaves that one running, and a refused start's id is remembered so
        that its later frames are ``acquisition_finished``."""
        if not own and error.fatal:
            with self._lock:
                running = error.acquisition_id in self._slots
            if running:
                error = dataclasses.replace(error, fatal=False)
            elif error.acquisition_id is not None:
                self._finish(error.acquisition_id)
        with self._lock:
            self._errors[error.reason] += 1
            if error.rejected_message:
                self._counters["rejected_messages"] += 1
        future = self._pop_future(error.acquisition_id) if error.fatal and error.acquisition_id is not None else None
        self._outbox.put(Publish("on_error", error, future, AcquisitionFailed(error)))

    def _pop_future(self, acquisition_id: str):
        with self._lock:
            return self._futures.pop(acquisition_id, None)

    # -- publisher thread: callbacks, in order ----------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            callback = getattr(self, item.callback)
            if callback is not None:
                try:
                    callback(item.value)
                except Exception:  # a vendor callback must not stop the service
                    self.count("callback_errors")
                    log.exception("the %s callback failed", item.callback)
            if item.future is not None:
                if isinstance(item.settle_with, BaseException):
                    item.future.set_exception(item.settle_with)
                else:
                    item.future.set_result(item.settle_with)


@dataclasses.dataclass
class AcquisitionHandle:
    """One acquisition driven from Python: feed frames, then ``result()``. Frames are copied, so the
    camera may reuse its buffer as soon as a call returns."""

    service: AcquisitionService
    acquisition_id: str
    geometry: Geometry
    dtype: np.dtype
    _future: concurrent.futures.Future = dataclasses.field(repr=False)

    def add_view(self, polarization: int, view: int, frame, timeout_s: float | None = None) -> None:
        self._send("view", polarization, view, frame, timeout_s)

    def add_background(self, polarization: int, view: int, frame, timeout_s: float | None = None) -> None:
        self._send("background", polarization, view, frame, timeout_s)

    def stop(self, timeout_s: float | None = None) -> None:
        """No more views will come: reconstruct from those received (flagged if some are missing)."""
        self.service._enqueue(Incoming(Stop(self.acquisition_id)), timeout_s)

    def result(self, timeout_s: float | None = None) -> StreamResult:
        """The volume; raises AcquisitionFailed if the acquisition failed, TimeoutError if not ready."""
        try:
            return self._future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError("no result yet") from None

    def _send(self, message_type, polarization, view, frame, timeout_s) -> None:
        frame = np.asarray(frame)
        if frame.shape != self.geometry.hologram_shape:
            raise ValueError(f"frame shape {frame.shape} != hologram shape {self.geometry.hologram_shape}")
        if polarization not in (0, 1) or not 0 <= int(view) < self.geometry.n_views:
            raise ValueError(f"polarization {polarization} / view {view} out of range (0..1, 0..{self.geometry.n_views - 1})")
        target, buffer = self.service._copy_in(protocol._wire_array(frame, self.dtype), timeout_s)
        self.service._enqueue(Incoming(Frame(message_type, self.acquisition_id, int(polarization), int(view), target),
                                       (buffer,)), timeout_s)
